//! How `gpt2rs bench` prints a [`Report`]: an aligned terminal table (the default), JSON, CSV and
//! a Markdown section for `docs/benchmarks.md`.

use super::types::{Report, Row, Stat};

/// The terminal output: who/what/where, the machine's ceilings, one line per row, then the notes.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let info = info_lines(r);
    let label_w = info
        .iter()
        .map(|(l, _)| l.chars().count())
        .max()
        .unwrap_or(0);
    for (label, value) in &info {
        out += &format!("{:<w$}  {value}\n", format!("{label}:"), w = label_w + 1);
    }
    out.push('\n');

    let cols = columns(r);
    let lines: Vec<Line> = r.rows.iter().map(|row| cells(row, cols.len())).collect();
    let mut widths: Vec<usize> = cols.iter().map(|c| width(&c.title)).collect();
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(&line.cells) {
            *w = (*w).max(width(cell));
        }
    }
    let titles: Vec<String> = cols.iter().map(|c| c.title.clone()).collect();
    let header = aligned(&titles, &cols, &widths);
    out += &header;
    out.push('\n');
    out += &"-".repeat(width(&header));
    out.push('\n');
    for line in &lines {
        let mut text = aligned(&line.cells, &cols, &widths);
        if let Some(reason) = &line.skipped {
            text += &format!("  skipped: {reason}");
        }
        out += text.trim_end();
        out.push('\n');
    }

    let notes = all_notes(r);
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            out += &format!("note: {note}\n");
        }
    }
    out
}

/// The whole report as pretty-printed JSON.
pub fn json(r: &Report) -> String {
    let mut s = serde_json::to_string_pretty(r).expect("a Report always serializes to JSON");
    s.push('\n');
    s
}

/// One header line and one line per row, with flat columns; nothing else (the header and the
/// machine are in the JSON and Markdown outputs).
pub fn csv(r: &Report) -> String {
    const HEADER: [&str; 28] = [
        "backend",
        "model",
        "synthetic",
        "params",
        "dtype",
        "weight_bytes",
        "batch",
        "prompt_len",
        "new_tokens",
        "skipped",
        "prefill_tok_s_median",
        "prefill_tok_s_min",
        "prefill_tok_s_max",
        "ttft_ms_median",
        "decode_tok_s_median",
        "decode_tok_s_min",
        "decode_tok_s_max",
        "decode_ms_per_step_median",
        "peak_memory_bytes",
        "gpu_memory_bytes",
        "decode_roofline",
        "prefill_roofline",
        "decode_ceiling_tok_s",
        "compare_engine",
        "compare_decode_tok_s",
        "compare_prefill_tok_s",
        "decode_speedup",
        "prefill_speedup",
    ];
    let mut out = HEADER.join(",");
    out.push('\n');
    for row in &r.rows {
        let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        let cmp = row.compare.as_ref();
        let fields: [String; HEADER.len()] = [
            row.backend.clone(),
            row.model.clone(),
            row.synthetic.to_string(),
            row.params.to_string(),
            row.dtype.clone(),
            row.weight_bytes.to_string(),
            row.batch.to_string(),
            row.prompt_len.to_string(),
            row.new_tokens.to_string(),
            row.skipped.clone().unwrap_or_default(),
            f(row.prefill_tok_s.map(|s| s.median)),
            f(row.prefill_tok_s.map(|s| s.min)),
            f(row.prefill_tok_s.map(|s| s.max)),
            f(row.ttft_ms.map(|s| s.median)),
            f(row.decode_tok_s.map(|s| s.median)),
            f(row.decode_tok_s.map(|s| s.min)),
            f(row.decode_tok_s.map(|s| s.max)),
            f(row.decode_ms_per_step.map(|s| s.median)),
            row.peak_memory_bytes
                .map(|b| b.to_string())
                .unwrap_or_default(),
            row.gpu_memory_bytes
                .map(|b| b.to_string())
                .unwrap_or_default(),
            f(row.decode_roofline),
            f(row.prefill_roofline),
            f(row.decode_ceiling_tok_s),
            cmp.map(|c| c.engine.clone()).unwrap_or_default(),
            f(cmp.and_then(|c| c.decode_tok_s)),
            f(cmp.and_then(|c| c.prefill_tok_s)),
            f(cmp.and_then(|c| c.decode_speedup)),
            f(cmp.and_then(|c| c.prefill_speedup)),
        ];
        let quoted: Vec<String> = fields.iter().map(|s| csv_field(s)).collect();
        out += &quoted.join(",");
        out.push('\n');
    }
    out
}

/// A section for `docs/benchmarks.md`: a list with the run and the machine, the table, the notes.
pub fn markdown(r: &Report) -> String {
    let date = r.header.date_utc.get(..10).unwrap_or(&r.header.date_utc);
    let mut out = format!(
        "### gpt2rs {} on {}, {date}\n\n",
        r.header.gpt2rs_version,
        machine(r)
    );
    for (label, value) in info_lines(r) {
        let value = if label == "command" {
            format!("`{value}`")
        } else {
            value
        };
        out += &format!("- **{label}**: {value}\n");
    }
    out.push('\n');

    let cols = columns(r);
    let titles: Vec<String> = cols.iter().map(|c| c.title.clone()).collect();
    out += &md_line(&titles);
    let rule: Vec<String> = cols
        .iter()
        .map(|c| if c.right { "---:" } else { "---" }.to_string())
        .collect();
    out += &format!("|{}|\n", rule.join("|"));
    for row in &r.rows {
        let mut line = cells(row, cols.len());
        if let Some(reason) = line.skipped.take() {
            line.cells.push(format!("skipped: {reason}"));
            line.cells.resize(cols.len(), String::new());
        }
        out += &md_line(&line.cells);
    }

    let notes = all_notes(r);
    if !notes.is_empty() {
        out += "\nNotes:\n\n";
        for note in notes {
            out += &format!("- {note}\n");
        }
    }
    out
}

/// The machine in a few words: the CPU, and the GPUs whose rows are in the report.
pub fn machine(r: &Report) -> String {
    let mut parts = vec![r.hardware.cpu_model.clone()];
    for g in r.hardware.gpus.iter().filter(|g| g.ceilings.is_some()) {
        if !parts.contains(&g.name) {
            parts.push(g.name.clone());
        }
    }
    parts.join(" + ")
}

/// A table column.
struct Col {
    title: String,
    /// Right-aligned (numbers) or left-aligned (names).
    right: bool,
}

/// The columns every row starts with, also printed for skipped rows.
const ID_COLS: [(&str, bool); 7] = [
    ("backend", false),
    ("model", false),
    ("params", true),
    ("dtype", false),
    ("weights", true),
    ("batch", true),
    ("prompt", true),
];

const MEASURED_COLS: [&str; 7] = [
    "prefill tok/s",
    "TTFT ms",
    "decode tok/s",
    "ms/step",
    "peak mem",
    "decode %roofline",
    "prefill %roofline",
];

/// The table's columns: the comparison ones only when some row has a comparison.
fn columns(r: &Report) -> Vec<Col> {
    let mut cols: Vec<Col> = ID_COLS
        .iter()
        .map(|&(t, right)| Col {
            title: t.into(),
            right,
        })
        .collect();
    cols.extend(MEASURED_COLS.iter().map(|&t| Col {
        title: t.into(),
        right: true,
    }));
    if let Some(engine) = compare_label(r) {
        for t in [
            format!("{engine} decode tok/s"),
            format!("{engine} prefill tok/s"),
            "decode speedup".to_string(),
        ] {
            cols.push(Col {
                title: t,
                right: true,
            });
        }
    }
    cols
}

/// Short name of the other engine for column titles: the first word of its description when
/// every comparison used the same engine, "other" otherwise; `None` without comparisons.
fn compare_label(r: &Report) -> Option<String> {
    let engines = compare_engines(r);
    match engines.as_slice() {
        [] => None,
        [one] => Some(one.split_whitespace().next().unwrap_or("other").to_string()),
        _ => Some("other".into()),
    }
}

/// The distinct engines compared against, in order of appearance.
fn compare_engines(r: &Report) -> Vec<String> {
    let mut engines: Vec<String> = Vec::new();
    for c in r.rows.iter().filter_map(|row| row.compare.as_ref()) {
        if !engines.contains(&c.engine) {
            engines.push(c.engine.clone());
        }
    }
    engines
}

/// One row's cells. A skipped row has only the identity cells, and its reason apart.
struct Line {
    cells: Vec<String>,
    skipped: Option<String>,
}

fn cells(row: &Row, n_cols: usize) -> Line {
    let model = if row.synthetic {
        format!("{} (synthetic)", row.model)
    } else {
        row.model.clone()
    };
    let mut cells = vec![
        row.backend.clone(),
        model,
        params(row.params),
        row.dtype.clone(),
        bytes(row.weight_bytes),
        row.batch.to_string(),
        row.prompt_len.to_string(),
    ];
    if let Some(reason) = &row.skipped {
        return Line {
            cells,
            skipped: Some(reason.clone()),
        };
    }
    cells.extend([
        stat(row.prefill_tok_s),
        opt(row.ttft_ms.map(|s| s.median), num),
        stat(row.decode_tok_s),
        opt(row.decode_ms_per_step.map(|s| s.median), num),
        match row.gpu_memory_bytes {
            Some(b) => format!("{} (GPU)", bytes(b)),
            None => opt(row.peak_memory_bytes, bytes),
        },
        opt(row.decode_roofline, percent),
        opt(row.prefill_roofline, percent),
    ]);
    if cells.len() < n_cols {
        let c = row.compare.as_ref();
        cells.extend([
            opt(c.and_then(|c| c.decode_tok_s), num),
            opt(c.and_then(|c| c.prefill_tok_s), num),
            opt(c.and_then(|c| c.decode_speedup), |x| format!("{x:.2}x")),
        ]);
    }
    Line {
        cells,
        skipped: None,
    }
}

/// The header block, as (label, value) pairs: the run, the machine, its ceilings.
fn info_lines(r: &Report) -> Vec<(&'static str, String)> {
    let (h, hw) = (&r.header, &r.hardware);
    let mut v = vec![
        (
            "gpt2rs",
            format!("{} (commit {})", h.gpt2rs_version, h.git_commit),
        ),
        ("date", h.date_utc.clone()),
        ("command", h.command.clone()),
        ("os", hw.os.clone()),
        (
            "cpu",
            format!(
                "{}, {} logical cores, {} threads used, SIMD {}",
                hw.cpu_model, hw.logical_cores, hw.threads, hw.simd
            ),
        ),
        (
            "ram",
            format!(
                "{} total, {} available",
                hw.ram_total_bytes.map_or_else(|| "unknown".into(), bytes),
                hw.ram_available_bytes
                    .map_or_else(|| "unknown".into(), bytes)
            ),
        ),
    ];
    if hw.gpus.is_empty() {
        v.push(("gpu", "none found".into()));
    }
    for g in &hw.gpus {
        let mut s = match g.ordinal {
            Some(n) => format!("cuda:{n} {}", g.name),
            None => g.name.clone(),
        };
        if let Some(m) = g.memory_bytes {
            s += &format!(", {}", bytes(m));
        }
        match (&g.ceilings, &g.note) {
            (Some(c), _) => {
                s += &format!(
                "; ceilings: copy {} GB/s (bytes read + written, {} buffer), f16 GEMM {} TFLOP/s, \
                     f32 GEMM {} TFLOP/s (cuBLAS, {n}³)",
                num(c.copy_gbs),
                bytes(c.copy_bytes),
                num(c.f16_gemm_tflops),
                num(c.f32_gemm_tflops),
                n = c.gemm_n
            )
            }
            (None, Some(why)) => s += &format!(" (not measured: {why})"),
            (None, None) => s += " (not measured: not in --device)",
        }
        v.push(("gpu", s));
    }
    v.push((
        "cpu ceilings",
        format!(
            "memory read {} GB/s, f32 FMA peak {} GFLOP/s, f32 GEMM {} GFLOP/s",
            num(hw.mem_read_gbs),
            num(hw.f32_fma_peak_gflops),
            num(hw.f32_gemm_gflops)
        ),
    ));
    for d in hw.drift.iter().filter(|d| d.tok_s.len() >= 2) {
        let st = Stat::of(&d.tok_s);
        v.push((
            "drift",
            format!(
                "{} {}: {}-{} tok/s over {} checks during the run (± {}); added to every ± of its rows",
                d.backend,
                d.reference,
                num(st.min),
                num(st.max),
                st.n,
                percent(d.fraction())
            ),
        ));
    }
    let engines = compare_engines(r);
    if !engines.is_empty() {
        v.push(("compared with", engines.join("; ")));
    }
    v
}

/// The report's notes, then one per distinct failure of the other engine.
fn all_notes(r: &Report) -> Vec<String> {
    let mut notes = r.notes.clone();
    let mut failures: Vec<(String, String, usize)> = Vec::new();
    for c in r.rows.iter().filter_map(|row| row.compare.as_ref()) {
        if let Some(e) = &c.error {
            match failures
                .iter_mut()
                .find(|(eng, err, _)| *eng == c.engine && err == e)
            {
                Some(f) => f.2 += 1,
                None => failures.push((c.engine.clone(), e.clone(), 1)),
            }
        }
    }
    for (engine, error, n) in failures {
        notes.push(format!("{engine}: no numbers for {n} row(s): {error}"));
    }
    notes
}

/// Cells padded to their column widths, two spaces apart.
fn aligned(cells: &[String], cols: &[Col], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(cols.iter().zip(widths))
        .map(|(cell, (col, &w))| {
            let pad = " ".repeat(w.saturating_sub(width(cell)));
            if col.right {
                pad + cell
            } else {
                cell.clone() + &pad
            }
        })
        .collect();
    padded.join("  ")
}

fn md_line(cells: &[String]) -> String {
    let escaped: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
    format!("| {} |\n", escaped.join(" | "))
}

/// Printed width (characters, not bytes: "±" is one).
fn width(s: &str) -> usize {
    s.chars().count()
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// A number with about three significant digits (all of the integer part).
fn num(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let a = x.abs();
    if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// "median ± spread%" (the median alone for a single measurement).
fn stat(s: Option<Stat>) -> String {
    opt(s, |s| {
        if s.n < 2 {
            return num(s.median);
        }
        let p = s.spread() * 100.0;
        if p < 10.0 {
            format!("{} ± {p:.1}%", num(s.median))
        } else {
            format!("{} ± {p:.0}%", num(s.median))
        }
    })
}

/// A fraction as a percentage.
fn percent(f: f64) -> String {
    let p = f * 100.0;
    if p.abs() < 10.0 {
        format!("{p:.1}%")
    } else {
        format!("{p:.0}%")
    }
}

/// Parameter count: 124.4M, 1.56B.
fn params(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else {
        format!("{:.1}M", n / 1e6)
    }
}

/// Bytes in decimal units: 812 MB, 6.42 GB.
fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.0} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// One CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bench::types::{Comparison, Drift, Gpu, GpuCeilings, Hardware, Header};

    /// A small report: a measured row with a comparison, a synthetic one, a skipped one.
    pub(crate) fn sample() -> Report {
        let measured = |model: &str, params: u64, decode: f64, synthetic: bool| Row {
            backend: "cpu".into(),
            model: model.into(),
            synthetic,
            params,
            dtype: "f32".into(),
            weight_bytes: params * 4,
            batch: 1,
            prompt_len: 32,
            new_tokens: 16,
            skipped: None,
            prefill_tok_s: Some(Stat::of(&[900.0, 1000.0, 1100.0])),
            ttft_ms: Some(Stat::of(&[31.0, 32.0, 35.0])),
            decode_tok_s: Some(Stat::of(&[decode * 0.98, decode, decode * 1.01])),
            decode_ms_per_step: Some(Stat::of(&[1000.0 / decode])),
            peak_memory_bytes: Some(params * 4 + 150_000_000),
            gpu_memory_bytes: None,
            decode_roofline: Some(0.63),
            prefill_roofline: Some(0.41),
            decode_ceiling_tok_s: Some(decode / 0.63),
            compare: None,
        };
        let mut first = measured("gpt2", 124_439_808, 85.3, false);
        first.compare = Some(Comparison {
            engine: "transformers 5.23.0 (torch 2.15.0)".into(),
            prefill_tok_s: Some(800.0),
            ttft_ms: Some(40.0),
            decode_tok_s: Some(34.8),
            decode_speedup: Some(85.3 / 34.8),
            prefill_speedup: Some(1000.0 / 800.0),
            error: None,
        });
        let mut second = measured("gpt2-medium", 354_823_168, 30.1, true);
        second.compare = Some(Comparison {
            engine: "transformers 5.23.0 (torch 2.15.0)".into(),
            prefill_tok_s: None,
            ttft_ms: None,
            decode_tok_s: None,
            decode_speedup: None,
            prefill_speedup: None,
            error: Some("out of memory, \"really\"".into()),
        });
        let mut skipped = measured("gpt2-xl", 1_557_611_200, 1.0, true);
        skipped.dtype = "int4".into();
        skipped.skipped = Some("int4 is not implemented yet".into());
        skipped.prefill_tok_s = None;
        skipped.ttft_ms = None;
        skipped.decode_tok_s = None;
        skipped.decode_ms_per_step = None;
        skipped.peak_memory_bytes = None;
        skipped.decode_roofline = None;
        skipped.prefill_roofline = None;
        skipped.decode_ceiling_tok_s = None;
        let mut on_gpu = measured("gpt2", 124_439_808, 1480.0, true);
        on_gpu.backend = "cuda:0".into();
        on_gpu.dtype = "f16".into();
        on_gpu.peak_memory_bytes = None;
        on_gpu.gpu_memory_bytes = Some(1_234_000_000);
        Report {
            header: Header {
                gpt2rs_version: "0.1.0".into(),
                git_commit: "abc1234".into(),
                command: "gpt2rs bench --compare transformers".into(),
                date_utc: "2026-01-02T03:04:05Z".into(),
            },
            hardware: Hardware {
                os: "Linux 6.8 x86_64".into(),
                cpu_model: "Test CPU 9000".into(),
                logical_cores: 2,
                threads: 2,
                simd: "avx2+fma".into(),
                ram_total_bytes: Some(16_000_000_000),
                ram_available_bytes: None,
                gpus: vec![
                    Gpu {
                        name: "NVIDIA H200".into(),
                        memory_bytes: Some(150_000_000_000),
                        ordinal: Some(0),
                        usable: true,
                        note: None,
                        ceilings: Some(GpuCeilings {
                            copy_gbs: 4310.0,
                            copy_bytes: 2 << 30,
                            f16_gemm_tflops: 702.0,
                            f32_gemm_tflops: 51.2,
                            gemm_n: 8192,
                        }),
                    },
                    Gpu {
                        name: "NVIDIA H100".into(),
                        memory_bytes: Some(80_000_000_000),
                        ordinal: None,
                        usable: false,
                        note: Some("this gpt2rs was built without the CUDA backend".into()),
                        ceilings: None,
                    },
                ],
                mem_read_gbs: 12.5,
                f32_fma_peak_gflops: 150.0,
                f32_gemm_gflops: 110.0,
                drift: vec![Drift {
                    backend: "cpu".into(),
                    reference: "gpt2 f16 decode".into(),
                    tok_s: vec![120.0, 124.0, 130.0],
                }],
            },
            rows: vec![first, second, skipped, on_gpu],
            notes: vec!["synthetic = random weights of the exact shape".into()],
        }
    }

    /// Splits one CSV line into fields, honouring quotes.
    fn csv_fields(line: &str) -> Vec<String> {
        let (mut fields, mut cur, mut quoted) = (Vec::new(), String::new(), false);
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                ('"', _) => quoted = !quoted,
                (',', false) => fields.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        fields.push(cur);
        fields
    }

    #[test]
    fn table_has_rows_skips_and_speedup() {
        let t = table(&sample());
        for needle in [
            "gpt2 ",
            "gpt2-medium (synthetic)",
            "gpt2-xl (synthetic)",
            "skipped: int4 is not implemented yet",
            "2.45x",
            "85.3 ± 1.5%",
            "124.4M",
            "1.56B",
            "transformers decode tok/s",
            "cuda:0 NVIDIA H200, 150.00 GB; ceilings: copy 4310 GB/s (bytes read + written, 2.15 GB buffer), f16 GEMM 702 TFLOP/s, f32 GEMM 51.2 TFLOP/s (cuBLAS, 8192³)",
            "NVIDIA H100, 80.00 GB (not measured: this gpt2rs was built without the CUDA backend)",
            "cuda:0   gpt2 (synthetic)",
            "1.23 GB (GPU)",
            "note: synthetic = random weights",
            "note: transformers 5.23.0 (torch 2.15.0): no numbers for 1 row(s)",
            "memory read 12.5 GB/s",
            "63%",
            "648 MB",
        ] {
            assert!(t.contains(needle), "{needle:?} missing from:\n{t}");
        }
        // The header line and the measured rows line up.
        let lines: Vec<&str> = t.lines().collect();
        let head = lines.iter().position(|l| l.starts_with("backend")).unwrap();
        assert!(lines[head + 1].chars().all(|c| c == '-'));
        assert_eq!(width(lines[head]), width(lines[head + 2]));
    }

    #[test]
    fn table_without_comparison_has_no_comparison_columns() {
        let mut r = sample();
        for row in &mut r.rows {
            row.compare = None;
        }
        let t = table(&r);
        assert!(!t.contains("speedup"), "{t}");
        assert!(!t.contains("compared with"), "{t}");
    }

    #[test]
    fn csv_is_flat_and_quoted() {
        let r = sample();
        let c = csv(&r);
        let lines: Vec<&str> = c.lines().collect();
        assert_eq!(lines.len(), r.rows.len() + 1);
        let n = csv_fields(lines[0]).len();
        assert_eq!(n, 28);
        for line in &lines {
            assert_eq!(csv_fields(line).len(), n, "{line}");
        }
        let second = csv_fields(lines[2]);
        assert_eq!(second[1], "gpt2-medium");
        assert_eq!(second[2], "true");
        assert_eq!(second[23], "transformers 5.23.0 (torch 2.15.0)");
        assert_eq!(second[24], "");
        let skipped = csv_fields(lines[3]);
        assert_eq!(skipped[9], "int4 is not implemented yet");
        assert_eq!(skipped[14], "");
        let on_gpu = csv_fields(lines[4]);
        assert_eq!(on_gpu[0], "cuda:0");
        assert_eq!(
            (on_gpu[18].as_str(), on_gpu[19].as_str()),
            ("", "1234000000")
        );
    }

    #[test]
    fn json_parses_back() {
        let r = sample();
        let v: serde_json::Value = serde_json::from_str(&json(&r)).unwrap();
        assert_eq!(v["rows"].as_array().unwrap().len(), 4);
        assert_eq!(v["hardware"]["gpus"][0]["ceilings"]["copy_gbs"], 4310.0);
        assert_eq!(v["hardware"]["cpu_model"], "Test CPU 9000");
    }

    #[test]
    fn markdown_has_a_table() {
        let m = markdown(&sample());
        assert!(m.lines().any(|l| l.starts_with("|---")), "{m}");
        assert!(m.contains("- **command**: `gpt2rs bench --compare transformers`"));
        let rows: Vec<&str> = m.lines().filter(|l| l.starts_with("| ")).collect();
        assert_eq!(rows.len(), 5);
        assert!(m.starts_with("### gpt2rs 0.1.0 on Test CPU 9000 + NVIDIA H200, 2026-01-02"));
        let pipes = |l: &str| l.matches('|').count();
        assert!(rows.iter().all(|l| pipes(l) == pipes(rows[0])), "{m}");
        assert!(m.contains("| skipped: int4 is not implemented yet |"));
    }

    #[test]
    fn the_printed_spread_adds_the_machines_drift() {
        let mut r = sample();
        let tight = Stat::of(&[99.0, 100.0, 101.0]);
        assert!((tight.spread() - 0.01).abs() < 1e-12);
        let mut widened = tight;
        widened.drift = 0.04;
        assert!((widened.spread() - 0.05).abs() < 1e-12);
        r.rows[0].decode_tok_s = Some(widened);
        let t = table(&r);
        assert!(t.contains("100 ± 5.0%"), "{t}");
        // 120-130 tok/s around a median of 124: ± 4.0%.
        assert!(
            t.contains("cpu gpt2 f16 decode: 120-130 tok/s over 3 checks"),
            "{t}"
        );
        assert!(t.contains("(± 4.0%)"), "{t}");
    }
}
