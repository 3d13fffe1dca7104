//! The tensor-core products of short passes (f16 / bf16 weights, sm_80 and later), and which
//! of them a pass of so many rows runs on:
//!
//! - kernels.cu's gemv_tc (6-8 rows by default): each warp loads its weights and x straight
//!   into registers, 16 weight rows a block of 8 warps.
//! - gemm_tc.cu's gemm_tc (none by default; GPT2RS_CUDA_GEMM_ROWS=lo-hi): weights and x
//!   stream through shared memory in cp.async stages, 64 weight rows a block of 4 warps. On
//!   the H200 it is as fast as cuBLAS at 16 rows of gpt2 and slower everywhere else (1.3-1.8x
//!   at 32-64 rows; docs/benchmarks.md, fifteenth session), so it runs only when asked.
//!
//! Both fuse the products' epilogues (QKV into the caches, bias + GELU, residual, the LM
//! head's picks) and split matrices with too few tiles along k, summed by a tile's last block
//! in a fixed order. Longer passes, and lengths outside both ranges, go to cuBLAS.

use crate::device::{device_err, Device};
use crate::launch::Arg;
use crate::weights::DeviceMatrix;
use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaFunction, LaunchConfig};
use gpt2rs::Result;
use std::ops::RangeInclusive;

/// The most rows either kernel takes (gemm_tc's largest B tiles: 8 of 8 rows).
const TC_MAX_ROWS: usize = 64;
/// gemv_tc's kernels take up to 8, 16, 32 and 64 rows.
const GEMV_TC_ROWS: [usize; 4] = [8, 16, 32, 64];
/// Where gemv_tc is the fastest path by default. Measured on an H200 (docs/benchmarks.md):
/// from 6 rows the CUDA-core matrix-vector kernels are bound by their FMAs (gpt2-xl at 8
/// rows: 3.76 ms a step against 2.6 on the tensor cores); above 8 it is slower than cuBLAS.
const GEMV_TC_DEFAULT: RangeInclusive<usize> = 6..=8;
/// gemv_tc's weight rows per block (16 · kernels.cu's TC_MT), threads (TC_WARPS warps) and
/// k per warp step.
const GEMV_TC_TILE: usize = 16;
const GEMV_TC_THREADS: u32 = 256;
const GEMV_TC_STEP: usize = 32;
/// gemm_tc's kernels take up to 16, 32 and 64 rows.
const GEMM_TC_ROWS: [usize; 3] = [16, 32, 64];
/// Where gemm_tc runs by default: nowhere (see the module's notes).
#[allow(clippy::reversed_empty_ranges)]
const GEMM_TC_DEFAULT: RangeInclusive<usize> = 1..=0;
/// gemm_tc.cu's GEMM_TR weight rows a block, 32 · GEMM_WARPS threads, GEMM_BK k a stage.
const GEMM_TC_TILE: usize = 64;
const GEMM_TC_THREADS: u32 = 128;
const GEMM_TC_STEP: usize = 64;

/// One tensor-core product kernel for passes of up to `rows` rows.
pub(crate) struct TcKernel {
    pub f: CudaFunction,
    rows: usize,
    /// Weight rows a block, threads a block, k a block's step (k must be a multiple).
    tile: usize,
    threads: u32,
    step: usize,
    /// Dynamic shared memory a block.
    shared: u32,
    /// Blocks the whole GPU holds at once.
    resident: usize,
    /// Blocks a matrix is spread over at most when it is split along k.
    target: usize,
    /// Splits along k at most, and the fewest k steps a split block takes.
    most_splits: usize,
    min_steps: usize,
    /// gemm_tc's last argument: whether split tiles are summed across clusters of their
    /// blocks (None: gemv_tc, which has no such argument).
    clusters: Option<bool>,
}

impl TcKernel {
    /// The launch for `w`: tiles of `tile` weight rows; a matrix with fewer tiles than half the
    /// target is split along k (each block at least `min_steps` steps) as far as `target`
    /// blocks: a second wave would pay the memory latency again.
    pub fn launch_config(&self, w: &DeviceMatrix) -> LaunchConfig {
        let tiles = w.rows.div_ceil(self.tile);
        let ks = if 2 * tiles > self.target {
            1
        } else {
            let most = (w.cols / self.step / self.min_steps).clamp(1, self.most_splits);
            (self.target / tiles).clamp(1, most)
        };
        LaunchConfig {
            grid_dim: (tiles as u32, ks as u32, 1),
            block_dim: (self.threads, 1, 1),
            shared_mem_bytes: self.shared,
        }
    }

    /// What a launch with `cfg` adds: gemm_tc's `clustered` argument, and the clusters (the
    /// splits of a tile) when it sums split tiles across them.
    pub fn cluster_launch(&self, cfg: &LaunchConfig) -> (Option<Arg>, Option<(u32, u32, u32)>) {
        let Some(on) = self.clusters else {
            return (None, None);
        };
        let split = on && cfg.grid_dim.1 > 1;
        let clusters = split.then_some((1, cfg.grid_dim.1, 1));
        (Some(Arg::Int(i32::from(split))), clusters)
    }

    /// Floats of partial sums a split product leaves (tiles × splits ≤ target blocks).
    fn part_floats(&self) -> usize {
        self.target * self.tile * self.rows.next_multiple_of(8)
    }
}

/// The tensor-core kernels of one weight format, by kind and row count.
pub(crate) struct TcKernels {
    gemv: Vec<TcKernel>,
    gemm: Vec<TcKernel>,
}

impl TcKernels {
    /// The kernels for weights with suffix `suffix` (f16 or bf16) on `dev`.
    pub fn load(dev: &Device, suffix: &str) -> Result<Self> {
        let load = |name: String,
                    rows: usize,
                    tile: usize,
                    threads: u32,
                    step: usize,
                    shared: usize,
                    waves: Option<usize>,
                    clusters: Option<bool>| {
            let f = dev.function(&format!("{name}_{suffix}"))?;
            // Its static shared memory counts against the 48 KB a kernel gets unless it asks
            // for more, so any dynamic amount is asked for.
            if shared > 0 {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(device_err("giving a tensor-core product its shared memory"))?;
            }
            let blocks = f
                .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
                .map_err(device_err("reading a kernel's occupancy"))?;
            let resident = blocks.max(1) as usize * dev.sm_count;
            let target = match waves {
                Some(per_sm) => (per_sm * dev.sm_count).min(resident),
                None => resident,
            };
            Ok(TcKernel {
                f,
                rows,
                tile,
                threads,
                step,
                shared: shared as u32,
                resident,
                target,
                // gemv_tc: at most 8 splits, a step for each of its 8 warps; gemm_tc: two
                // stages each, 16 splits, or 8 in clusters (the most a cluster may hold
                // anywhere).
                most_splits: if clusters == Some(false) { 16 } else { 8 },
                min_steps: if waves.is_some() { 2 } else { 8 },
                clusters,
            })
        };
        let gemv = GEMV_TC_ROWS
            .iter()
            .map(|&r| {
                let name = format!("gemv_tc{}", r / 8);
                load(
                    name,
                    r,
                    GEMV_TC_TILE,
                    GEMV_TC_THREADS,
                    GEMV_TC_STEP,
                    0,
                    None,
                    None,
                )
            })
            .collect::<Result<_>>()?;
        let stages = crate::device::gemm_stages();
        let per_sm = gemm_blocks_per_sm();
        // GPT2RS_CUDA_GEMM_CLUSTER=0 sums split tiles through global memory (comparisons).
        let clusters =
            dev.major >= 9 && std::env::var("GPT2RS_CUDA_GEMM_CLUSTER").map_or(true, |v| v != "0");
        let gemm = GEMM_TC_ROWS
            .iter()
            .map(|&r| {
                let shared = stages * (GEMM_TC_TILE + r) * GEMM_TC_STEP * 2;
                let name = format!("gemm_tc{}", r / 8);
                let (tile, threads, step) = (GEMM_TC_TILE, GEMM_TC_THREADS, GEMM_TC_STEP);
                load(
                    name,
                    r,
                    tile,
                    threads,
                    step,
                    shared,
                    Some(per_sm),
                    Some(clusters),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { gemv, gemm })
    }

    /// The kernel for a pass of `rows` rows with a matrix of `k` columns: gemm_tc where
    /// `gemm_rows` holds the length, else gemv_tc where `gemv_rows` does, else none.
    pub fn pick(
        &self,
        rows: usize,
        k: usize,
        gemv_rows: &RangeInclusive<usize>,
        gemm_rows: &RangeInclusive<usize>,
    ) -> Option<&TcKernel> {
        fn fit<'a>(
            ks: &'a [TcKernel],
            range: &RangeInclusive<usize>,
            rows: usize,
            k: usize,
        ) -> Option<&'a TcKernel> {
            let kernel = ks.iter().find(|t| rows <= t.rows)?;
            (range.contains(&rows) && k.is_multiple_of(kernel.step)).then_some(kernel)
        }
        fit(&self.gemm, gemm_rows, rows, k).or_else(|| fit(&self.gemv, gemv_rows, rows, k))
    }

    /// The most blocks any kernel leaves partial sums from, and floats of them.
    pub fn split_needs(&self) -> (usize, usize) {
        let all = || self.gemv.iter().chain(&self.gemm);
        let counts = all().map(|t| t.resident).max().unwrap_or(1);
        let floats = all().map(TcKernel::part_floats).max().unwrap_or(1);
        (counts, floats)
    }
}

/// Blocks a multiprocessor that gemm_tc spreads a split matrix over:
/// GPT2RS_CUDA_GEMM_BLOCKS_PER_SM (1-8, for measurements), by default 2.
fn gemm_blocks_per_sm() -> usize {
    std::env::var("GPT2RS_CUDA_GEMM_BLOCKS_PER_SM")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map_or(2, |b| b.clamp(1, 8))
}

/// Pass lengths for gemv_tc: GPT2RS_CUDA_TC_ROWS=lo-hi (within 1-64; `0` for none, for
/// comparisons), by default GEMV_TC_DEFAULT.
pub(crate) fn gemv_tc_rows() -> RangeInclusive<usize> {
    rows_setting("GPT2RS_CUDA_TC_ROWS", GEMV_TC_DEFAULT)
}

/// Pass lengths for gemm_tc: GPT2RS_CUDA_GEMM_ROWS=lo-hi (`0` for none), by default
/// GEMM_TC_DEFAULT.
pub(crate) fn gemm_tc_rows() -> RangeInclusive<usize> {
    rows_setting("GPT2RS_CUDA_GEMM_ROWS", GEMM_TC_DEFAULT)
}

fn rows_setting(var: &str, default: RangeInclusive<usize>) -> RangeInclusive<usize> {
    match std::env::var(var) {
        Ok(v) => parse_rows(var, &v),
        Err(_) => default,
    }
}

/// `lo-hi` as a range within 1-64; anything else means none (with a warning unless `0`).
fn parse_rows(var: &str, v: &str) -> RangeInclusive<usize> {
    let parsed = v.split_once('-').and_then(|(lo, hi)| {
        Some((
            lo.trim().parse::<usize>().ok()?,
            hi.trim().parse::<usize>().ok()?,
        ))
    });
    match parsed {
        Some((lo, hi)) => clamp_rows(lo..=hi),
        // No pass has 0 rows.
        None => {
            if v.trim() != "0" {
                eprintln!("warning: {var}={v} is neither lo-hi nor 0: no products run there");
            }
            #[allow(clippy::reversed_empty_ranges)]
            {
                1..=0
            }
        }
    }
}

/// `rows` within the lengths the kernels take.
pub(crate) fn clamp_rows(rows: RangeInclusive<usize>) -> RangeInclusive<usize> {
    (*rows.start()).max(1)..=(*rows.end()).min(TC_MAX_ROWS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_settings_parse_ranges_and_turn_off_plainly() {
        assert_eq!(parse_rows("X", "9-64"), 9..=64);
        assert_eq!(parse_rows("X", " 2 - 100 "), 2..=64);
        assert_eq!(parse_rows("X", "0-3"), 1..=3);
        for off in ["0", "none", "5"] {
            let r = parse_rows("X", off);
            assert!((1..=64).all(|n| !r.contains(&n)), "{off}: {r:?}");
        }
    }
}
