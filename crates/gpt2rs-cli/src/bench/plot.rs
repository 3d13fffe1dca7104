//! `gpt2rs bench --plot FILE`: decode speed against model size, one series per backend and
//! precision, each with its bandwidth ceiling, as SVG or PNG.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::types::{Report, Row};

/// The one font all text is drawn with, shipped with the binary (no system fonts needed).
const FAMILY: &str = "DejaVu Sans";
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 700;

/// Tableau 10: distinguishable colours, one per series.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Draws decode tok/s against parameters (both log scale) into `path`: `.svg` or `.png`.
pub fn plot(r: &Report, path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "svg" && ext != "png" {
        bail!(
            "cannot plot to '{}': the file name must end in .svg or .png",
            path.display()
        );
    }
    let data = Data::of(r)?;
    register()?;
    if ext == "svg" {
        draw(
            SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area(),
            &data,
        )
    } else {
        draw(
            BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area(),
            &data,
        )
    }
    .map_err(|e| anyhow!("writing the plot to {}: {e}", path.display()))
}

/// Registers the embedded font, once; also as "sans-serif", the family plotters falls back on.
fn register() -> Result<()> {
    static OK: OnceLock<bool> = OnceLock::new();
    let ok = *OK.get_or_init(|| {
        [FAMILY, "sans-serif"]
            .iter()
            .all(|name| register_font(name, FontStyle::Normal, FONT).is_ok())
    });
    if !ok {
        bail!("the embedded font DejaVu Sans could not be loaded");
    }
    Ok(())
}

/// One line on the plot: (million parameters, tok/s) points, and the ceiling for them if any.
struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    ceiling: Vec<(f64, f64)>,
}

/// What the plot shows, gathered from the report.
struct Data {
    title: String,
    series: Vec<Series>,
    x: (f64, f64),
    y: (f64, f64),
}

impl Data {
    fn of(r: &Report) -> Result<Self> {
        let measured: Vec<&Row> = r
            .rows
            .iter()
            .filter(|row| row.skipped.is_none() && row.decode_tok_s.is_some())
            .collect();
        // Batch 1 when it was run (the smallest batch otherwise).
        let Some(batch) = measured.iter().map(|row| row.batch).min() else {
            bail!("nothing to plot: no row has decode results");
        };
        // Per (backend, dtype, model), the row with the smallest prompt.
        let mut chosen: Vec<&Row> = Vec::new();
        for &row in measured.iter().filter(|row| row.batch == batch) {
            let same =
                |o: &&Row| o.backend == row.backend && o.dtype == row.dtype && o.model == row.model;
            match chosen.iter_mut().find(|o| same(o)) {
                Some(o) if row.prompt_len < o.prompt_len => *o = row,
                Some(_) => {}
                None => chosen.push(row),
            }
        }
        chosen.sort_by_key(|row| row.params);

        let mut series: Vec<Series> = Vec::new();
        let mut add = |label: String, x: f64, y: Option<f64>, ceiling: Option<f64>| {
            let Some(y) = y.filter(|y| y.is_finite() && *y > 0.0) else {
                return;
            };
            let i = match series.iter().position(|s| s.label == label) {
                Some(i) => i,
                None => {
                    series.push(Series {
                        label,
                        points: Vec::new(),
                        ceiling: Vec::new(),
                    });
                    series.len() - 1
                }
            };
            series[i].points.push((x, y));
            if let Some(c) = ceiling.filter(|c| c.is_finite() && *c > 0.0) {
                series[i].ceiling.push((x, c));
            }
        };
        for row in &chosen {
            let x = row.params as f64 / 1e6;
            add(
                format!("gpt2rs {} {}", row.backend, row.dtype),
                x,
                row.decode_tok_s.map(|s| s.median),
                row.decode_ceiling_tok_s,
            );
        }
        // The other engine, where it ran the same configurations.
        for row in &chosen {
            if let Some(c) = &row.compare {
                let engine = c.engine.split_whitespace().next().unwrap_or("other");
                add(
                    format!("{engine} {} {}", row.backend, row.dtype),
                    row.params as f64 / 1e6,
                    c.decode_tok_s,
                    None,
                );
            }
        }
        if series.is_empty() {
            bail!("nothing to plot: no row has decode results");
        }

        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = series
            .iter()
            .flat_map(|s| s.points.iter().chain(&s.ceiling).map(|p| p.1));
        let (x0, x1) = min_max(xs);
        let (y0, y1) = min_max(ys);
        let date = r.header.date_utc.get(..10).unwrap_or(&r.header.date_utc);
        Ok(Self {
            title: format!(
                "GPT-2 decode speed, batch {batch}: {}, {date}",
                super::report::machine(r)
            ),
            series,
            x: (x0 / 1.5, x1 * 1.5),
            y: (y0 / 1.5, y1 * 2.0),
        })
    }
}

fn min_max(v: impl Iterator<Item = f64>) -> (f64, f64) {
    v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    })
}

/// An axis label: up to three decimals, without trailing zeros.
fn tick(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Axis ticks at 1, 2, 5 × powers of ten within `range`, or at every 1…9 × power of ten when
/// that gives fewer than three (plotters' own log ticks repeat the powers of ten).
fn ticks(range: (f64, f64)) -> Vec<f64> {
    let at = |multiples: &[f64]| {
        let mut v = Vec::new();
        let mut decade = 10f64.powf(range.0.log10().floor());
        while decade <= range.1 {
            for m in multiples {
                let t = decade * m;
                if t >= range.0 && t <= range.1 {
                    v.push(t);
                }
            }
            decade *= 10.0;
        }
        v
    };
    let v = at(&[1.0, 2.0, 5.0]);
    if v.len() >= 3 {
        v
    } else {
        at(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    }
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, d: &Data) -> Result<()> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e}");
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&d.title, (FAMILY, 22))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(75)
        .build_cartesian_2d(
            (d.x.0..d.x.1).log_scale().with_key_points(ticks(d.x)),
            (d.y.0..d.y.1).log_scale().with_key_points(ticks(d.y)),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("model size, million parameters (log scale)")
        .y_desc("decode tokens/s (log scale)")
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .x_label_formatter(&|x| tick(*x))
        .y_label_formatter(&|y| tick(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(e)?;

    for (i, s) in d.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let line = color.filled().stroke_width(2);
        chart
            .draw_series(LineSeries::new(s.points.clone(), line).point_size(4))
            .map_err(e)?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], line));
        if s.ceiling.is_empty() {
            continue;
        }
        let dashed = color.stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(s.ceiling.clone(), 8, 5, dashed))
            .map_err(e)?
            .label(format!("{} bandwidth ceiling", s.label))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (8, 0)], dashed)
                    + PathElement::new(vec![(12, 0), (20, 0)], dashed)
            });
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::tests::sample;

    #[test]
    fn writes_svg_and_png_and_refuses_jpg() {
        let dir = std::env::temp_dir().join(format!("gpt2rs-plot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let r = sample();
        for name in ["decode.svg", "decode.png"] {
            let path = dir.join(name);
            plot(&r, &path).unwrap();
            let len = std::fs::metadata(&path).unwrap().len();
            assert!(len > 1000, "{name}: {len} bytes");
        }
        let svg = std::fs::read_to_string(dir.join("decode.svg")).unwrap();
        assert!(svg.contains("Test CPU 9000"));
        assert!(svg.contains("gpt2rs cpu f32"));
        assert!(svg.contains("transformers cpu f32"));
        let png = std::fs::read(dir.join("decode.png")).unwrap();
        assert_eq!(&png[1..4], b"PNG");

        let err = plot(&r, &dir.join("decode.jpg")).unwrap_err().to_string();
        assert!(err.contains(".svg or .png"), "{err}");
        assert!(!dir.join("decode.jpg").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(ticks((3.0, 250.0)), [5.0, 10.0, 20.0, 50.0, 100.0, 200.0]);
        assert_eq!(ticks((83.0, 190.0)), [90.0, 100.0]);
    }

    #[test]
    fn nothing_measured_is_an_error() {
        let mut r = sample();
        r.rows.retain(|row| row.skipped.is_some());
        let path = std::env::temp_dir().join("gpt2rs-plot-never-written.svg");
        assert!(plot(&r, &path).is_err());
        assert!(!path.exists());
    }
}
