//! [`CudaEngine`]: the engine of engine.rs, taking turns with the other engines (and
//! [`crate::probe`]) that use the same GPU in this process.
//!
//! Engines on one GPU share its primary CUDA context. With two engines working at once, one
//! capturing a CUDA graph, the capture was invalidated (CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
//! and the other's cuBLAS products failed (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED), although
//! captures are THREAD_LOCAL: some of an engine's calls act on the whole context (opening it,
//! loading and unloading modules and freeing memory are the likely ones; which exactly was
//! not isolated).
//! So every call that touches the GPU holds the GPU's turn, including opening and dropping
//! the engine (a drop also waits for the frees it enqueued). One engine per GPU (bench,
//! serve, `--devices`) never waits; engines on different GPUs never wait for each other.

use crate::engine::{GpuEngine, MemoryNeeded};
use gpt2rs::config::Gpt2Config;
use gpt2rs::engine::{BatchEntry, Engine, Logits, SeqId};
use gpt2rs::quant::DType;
use gpt2rs::weights::ModelWeights;
use gpt2rs::Result;
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

/// The turn of GPU `ordinal`: one per GPU, for the whole process.
pub(crate) fn gpu_turn(ordinal: usize) -> Arc<GpuTurn> {
    static TURNS: OnceLock<Mutex<HashMap<usize, Arc<GpuTurn>>>> = OnceLock::new();
    let mut turns = lock(TURNS.get_or_init(Default::default));
    turns.entry(ordinal).or_default().clone()
}

/// Locks `m`; a thread that panicked holding it left nothing half-done here (the counters
/// change in single steps), so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A first-come, first-served lock (a ticket lock), so an engine that opens, runs and drops
/// itself in a loop cannot keep another one waiting for the GPU.
#[derive(Default)]
pub(crate) struct GpuTurn {
    tickets: Mutex<Tickets>,
    served: Condvar,
}

#[derive(Default)]
struct Tickets {
    next: u64,
    serving: u64,
}

impl GpuTurn {
    /// Waits for this caller's turn; it lasts until the guard drops (unwinding included).
    pub(crate) fn take(&self) -> Turn<'_> {
        let mut t = lock(&self.tickets);
        let mine = t.next;
        t.next += 1;
        while t.serving != mine {
            t = self
                .served
                .wait(t)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        Turn { of: self }
    }
}

/// Holding the GPU's turn.
pub(crate) struct Turn<'a> {
    of: &'a GpuTurn,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        lock(&self.of.tickets).serving += 1;
        self.of.served.notify_all();
    }
}

/// GPT-2 on an NVIDIA GPU.
pub struct CudaEngine {
    turn: Arc<GpuTurn>,
    /// Dropped by hand, holding the turn (see the module's comment).
    engine: ManuallyDrop<GpuEngine>,
}

impl CudaEngine {
    /// Opens GPU `ordinal` and copies `weights` onto it; fails with the numbers when they do
    /// not fit, and plainly when there is no GPU or the precision is not supported here.
    pub fn new(weights: &ModelWeights, ordinal: usize) -> Result<Self> {
        let turn = gpu_turn(ordinal);
        let engine = {
            let _turn = turn.take();
            GpuEngine::new(weights, ordinal)?
        };
        Ok(Self {
            turn,
            engine: ManuallyDrop::new(engine),
        })
    }

    /// Runs the products of passes of `rows` rows on the tensor cores (kernels.cu's gemv_tc,
    /// within 1-64 rows; where it has kernels), instead of the default (TC_DEFAULT_ROWS) or
    /// GPT2RS_CUDA_TC_ROWS; for tests and comparisons.
    pub fn with_tensor_core_rows(mut self, rows: std::ops::RangeInclusive<usize>) -> Self {
        self.engine.set_tensor_core_rows(rows);
        self
    }

    /// Runs the products of passes of `rows` rows (within 1-64) in gemm_tc.cu's streamed
    /// tensor-core kernel, instead of the default (none) or GPT2RS_CUDA_GEMM_ROWS (`1..=0`
    /// for none); for tests and comparisons.
    pub fn with_streamed_rows(mut self, rows: std::ops::RangeInclusive<usize>) -> Self {
        self.engine.set_streamed_rows(rows);
        self
    }

    /// Runs one-row passes (batch-1 decode) in the persistent kernel (decode_step.cu) where
    /// the model and GPU allow it when `on`, kernel by kernel (the default) when not; for
    /// tests and comparisons (GPT2RS_CUDA_STEP=1 turns it on for a whole process).
    pub fn with_decode_step(mut self, on: bool) -> Self {
        self.engine.set_decode_step(on);
        self
    }

    /// Whether one-row passes run in the persistent kernel, and with how many 16 KB slots of
    /// weights in flight per multiprocessor.
    pub fn decode_step_slots(&self) -> Option<usize> {
        self.engine.decode_step_slots()
    }

    /// How many prompt QKV products wrote their keys and values straight into the cache
    /// (cuBLASLt, passes of one sequence), rather than through an f32 product and an
    /// elementwise kernel.
    pub fn qkv_products_into_cache(&self) -> u64 {
        self.engine.qkv_products_into_cache()
    }

    /// Bytes of one sequence's KV cache when it holds the whole context (caches grow in
    /// blocks of 64 positions up to this).
    pub fn cache_bytes_per_sequence(&self) -> u64 {
        self.engine.cache_bytes_per_sequence()
    }

    /// The GPU memory an engine for `config` in `dtype` takes to run `sequences` sequences
    /// in passes of up to `rows` rows (tokens), before it is opened; an error when the
    /// backend does not run `dtype`.
    pub fn memory_needed(
        config: &Gpt2Config,
        dtype: DType,
        sequences: usize,
        rows: usize,
    ) -> Result<MemoryNeeded> {
        GpuEngine::memory_needed(config, dtype, sequences, rows)
    }
}

impl Engine for CudaEngine {
    fn config(&self) -> &Gpt2Config {
        self.engine.config()
    }

    fn describe(&self) -> String {
        self.engine.describe()
    }

    fn add_sequence(&mut self) -> SeqId {
        self.engine.add_sequence()
    }

    fn fork_sequence(&mut self, parent: SeqId) -> Result<SeqId> {
        let _turn = self.turn.take();
        self.engine.fork_sequence(parent)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        let _turn = self.turn.take();
        self.engine.remove_sequence(seq)
    }

    fn sequence_len(&self, seq: SeqId) -> Option<usize> {
        self.engine.sequence_len(seq)
    }

    fn forward(&mut self, batch: &[BatchEntry<'_>]) -> Result<Logits> {
        let _turn = self.turn.take();
        self.engine.forward(batch)
    }

    fn warm_up(&mut self, max_batch: usize, max_step_tokens: usize) -> Result<()> {
        let _turn = self.turn.take();
        self.engine.warm_up(max_batch, max_step_tokens)
    }
}

impl Drop for CudaEngine {
    fn drop(&mut self) {
        let _turn = self.turn.take();
        let ctx = self.engine.context();
        // SAFETY: `engine` is not used again; this is the only place it is dropped.
        unsafe { ManuallyDrop::drop(&mut self.engine) }
        // What dropping it enqueued (frees) is done before the next turn begins. (Nobody
        // captures now, so a whole-context wait is allowed.)
        let _ = ctx.synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn turns_go_in_the_order_they_were_asked_for() {
        let turn = Arc::new(GpuTurn::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = turn.take();
        let waiter = {
            let (turn, order) = (turn.clone(), order.clone());
            std::thread::spawn(move || {
                let _t = turn.take();
                lock(&order).push("waiter");
            })
        };
        // Until the waiter has asked (taken its ticket).
        let start = Instant::now();
        while lock(&turn.tickets).next < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the waiter never asked"
            );
            std::thread::yield_now();
        }
        // Giving the turn back and asking again at once: the waiter, who asked first, goes
        // first (a plain mutex may hand it straight back to this thread).
        drop(held);
        let again = turn.take();
        lock(&order).push("holder again");
        drop(again);
        waiter.join().unwrap();
        assert_eq!(*lock(&order), ["waiter", "holder again"]);
    }

    #[test]
    fn turns_are_exclusive_and_a_panic_gives_the_turn_back() {
        let turn = Arc::new(GpuTurn::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let (turn, inside) = (turn.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        let _t = turn.take();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let t2 = turn.clone();
        let panicked = std::thread::spawn(move || {
            let _t = t2.take();
            panic!("a pass failed while holding the turn");
        })
        .join();
        assert!(panicked.is_err());
        drop(turn.take());
    }
}
