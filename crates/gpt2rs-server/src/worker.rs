//! One thread per engine: it owns the engine and its scheduler, takes jobs from the HTTP side
//! between steps, and sends each job's events back on the job's own channel. A job whose
//! receiver is gone (the client disconnected) is cancelled at the next step and its KV cache
//! freed; a job past its deadline ends with a timeout.

use crate::metrics::Metrics;
use gpt2rs::engine::Engine;
use gpt2rs::scheduler::{Event, Request, RequestId, Scheduler, SchedulerConfig};
use gpt2rs::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Builds an engine on the worker's own thread (GPU contexts stay on the thread that made them).
pub type EngineFactory = Box<dyn FnOnce() -> Result<Box<dyn Engine>, String> + Send>;

/// Why a job ended without finishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It ran past its deadline.
    Timeout,
    /// The server is shutting down and the grace period is over.
    Shutdown,
    /// The engine failed.
    Engine,
}

/// What a job's receiver gets: `prompt` is the job's index within its HTTP request.
#[derive(Debug)]
pub enum JobEvent {
    Event { prompt: usize, event: Event },
    Failed { failure: Failure, message: String },
}

/// One prompt of an HTTP request.
pub struct Job {
    pub prompt_index: usize,
    pub request: Request,
    pub events: UnboundedSender<JobEvent>,
    pub arrived: Instant,
    pub deadline: Instant,
}

enum Command {
    Submit(Box<Job>),
    /// End every job now (the shutdown grace period is over).
    CancelAll,
}

/// The HTTP side's handle on a worker.
pub struct Worker {
    pub device: String,
    pub describe: String,
    tx: mpsc::Sender<Command>,
    /// Jobs sent and not yet ended (for picking the least loaded worker).
    load: Arc<AtomicUsize>,
    /// Jobs it has finished.
    served: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a worker shares with the server.
pub struct WorkerContext {
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    pub scheduler: SchedulerConfig,
}

impl Worker {
    /// Starts the thread and waits until its engine is built (or failed to build).
    pub fn start(
        device: String,
        factory: EngineFactory,
        ctx: WorkerContext,
    ) -> Result<Self, String> {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        let counters = (load.clone(), served.clone());
        let name = format!("engine {device}");
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let mut engine = match factory() {
                    Ok(e) => e,
                    Err(msg) => {
                        let _ = ready_tx.send(Err(msg));
                        return;
                    }
                };
                // What an engine would otherwise capture or grow on the first requests of
                // each shape, mid-stream (CUDA graphs per batch size).
                let sched = ctx.scheduler;
                if let Err(e) = engine.warm_up(sched.max_running, sched.max_step_tokens) {
                    let _ = ready_tx.send(Err(format!("warming up the engine: {e}")));
                    return;
                }
                let _ = ready_tx.send(Ok(engine.describe()));
                run(engine, rx, ctx, counters);
            })
            .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(describe)) => Ok(Self {
                device,
                describe,
                tx,
                load,
                served,
                thread: Some(thread),
            }),
            Ok(Err(msg)) => Err(format!("{device}: {msg}")),
            Err(_) => Err(format!(
                "{device}: the engine thread stopped while starting"
            )),
        }
    }

    pub fn load(&self) -> usize {
        self.load.load(Relaxed)
    }

    pub fn served(&self) -> usize {
        self.served.load(Relaxed)
    }

    /// Hands a job to the engine thread; fails if the thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.load.fetch_add(1, Relaxed);
        self.tx.send(Command::Submit(Box::new(job))).map_err(|_| {
            self.load.fetch_sub(1, Relaxed);
            format!("the engine on {} has stopped", self.device)
        })
    }

    pub fn cancel_all(&self) {
        let _ = self.tx.send(Command::CancelAll);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once its jobs are done or cancelled.
        let (tx, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A job the engine thread is working on.
struct Live {
    job: Box<Job>,
    /// Samples not yet finished.
    unfinished: usize,
    /// Still in the scheduler's waiting line (counted in the queue depth).
    queued: bool,
    first_token: bool,
    /// When each sample's last token was made.
    last_token: Vec<Option<Instant>>,
}

fn run(
    mut engine: Box<dyn Engine>,
    rx: mpsc::Receiver<Command>,
    ctx: WorkerContext,
    (load, served): (Arc<AtomicUsize>, Arc<AtomicUsize>),
) {
    let metrics = &ctx.metrics;
    let mut sched = Scheduler::new(engine.config(), ctx.scheduler);
    let mut live: HashMap<RequestId, Live> = HashMap::new();
    let mut next_id: RequestId = 0;
    let mut running_published = 0u64;
    let mut closed = false;
    loop {
        // Take new work: wait for it when idle, else just what has arrived.
        let mut commands = Vec::new();
        if sched.is_idle() && !closed {
            match rx.recv() {
                Ok(c) => commands.push(c),
                Err(_) => closed = true,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        for c in commands {
            match c {
                Command::Submit(job) => {
                    let id = next_id;
                    next_id += 1;
                    let samples = job.request.samples;
                    if let Err(e) = sched.submit(id, job.request.clone()) {
                        // The HTTP side checks requests first; this is a last guard.
                        let _ = job.events.send(JobEvent::Failed {
                            failure: Failure::Engine,
                            message: e.to_string(),
                        });
                        metrics.queue_depth.fetch_sub(1, Relaxed);
                        load.fetch_sub(1, Relaxed);
                        continue;
                    }
                    live.insert(
                        id,
                        Live {
                            job,
                            unfinished: samples,
                            queued: true,
                            first_token: false,
                            last_token: vec![None; samples],
                        },
                    );
                }
                Command::CancelAll => {
                    for (id, l) in live.drain() {
                        sched.cancel(&mut *engine, id);
                        end(metrics, &load, &l);
                        let _ = l.job.events.send(JobEvent::Failed {
                            failure: Failure::Shutdown,
                            message: "the server is shutting down".into(),
                        });
                    }
                }
            }
        }

        // Drop jobs whose client left, and those past their deadline.
        let now = Instant::now();
        let gone: Vec<RequestId> = live
            .iter()
            .filter(|(_, l)| l.job.events.is_closed() || now >= l.job.deadline)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            let l = live.remove(&id).expect("listed");
            sched.cancel(&mut *engine, id);
            end(metrics, &load, &l);
            if l.job.events.is_closed() {
                metrics.requests.cancelled.fetch_add(1, Relaxed);
            } else {
                let _ = l.job.events.send(JobEvent::Failed {
                    failure: Failure::Timeout,
                    message: format!(
                        "the request ran past the server's timeout of {:.0} s",
                        (l.job.deadline - l.job.arrived).as_secs_f64()
                    ),
                });
            }
        }
        if sched.is_idle() {
            publish_running(metrics, &mut running_published, 0);
            if closed {
                return;
            }
            continue;
        }

        let report = sched.step(&mut *engine, &ctx.tokenizer);
        let now = Instant::now();
        metrics.engine_steps.fetch_add(1, Relaxed);
        metrics.step_duration.observe(report.forward_time);
        metrics
            .prompt_tokens
            .fetch_add(report.prefill_tokens as u64, Relaxed);
        // Jobs the scheduler admitted this step leave the queue.
        if live.values().any(|l| l.queued) {
            let waiting: std::collections::HashSet<RequestId> = sched.waiting_ids().collect();
            for (id, l) in live.iter_mut() {
                if l.queued && !waiting.contains(id) {
                    l.queued = false;
                    metrics.queue_depth.fetch_sub(1, Relaxed);
                }
            }
        }
        if let Some((e, ids)) = report.failed {
            for id in ids {
                if let Some(l) = live.remove(&id) {
                    end(metrics, &load, &l);
                    let _ = l.job.events.send(JobEvent::Failed {
                        failure: Failure::Engine,
                        message: format!("the engine failed: {e}"),
                    });
                }
            }
        }
        for (id, event) in report.events {
            let Some(l) = live.get_mut(&id) else { continue };
            match &event {
                Event::Token { sample, .. } => {
                    metrics.generation_tokens.fetch_add(1, Relaxed);
                    if !l.first_token {
                        l.first_token = true;
                        metrics.time_to_first_token.observe(now - l.job.arrived);
                    }
                    if let Some(prev) = l.last_token[*sample] {
                        metrics.inter_token_latency.observe(now - prev);
                    }
                    l.last_token[*sample] = Some(now);
                }
                Event::Finished { .. } => l.unfinished -= 1,
                Event::PromptLogprobs(_) => {}
            }
            let done = l.unfinished == 0;
            if done {
                // Counted before the last event goes out: a client that has its answer finds
                // it in /health and /metrics.
                metrics.request_duration.observe(now - l.job.arrived);
                served.fetch_add(1, Relaxed);
                end(metrics, &load, l);
            }
            let _ = l.job.events.send(JobEvent::Event {
                prompt: l.job.prompt_index,
                event,
            });
            if done {
                live.remove(&id);
            }
        }
        publish_running(metrics, &mut running_published, sched.running() as u64);
    }
}

/// Bookkeeping for a job leaving the thread.
fn end(metrics: &Metrics, load: &AtomicUsize, l: &Live) {
    if l.queued {
        metrics.queue_depth.fetch_sub(1, Relaxed);
    }
    load.fetch_sub(1, Relaxed);
}

/// Adds this worker's change of running sequences to the shared gauge.
fn publish_running(metrics: &Metrics, published: &mut u64, now: u64) {
    if now >= *published {
        metrics
            .running_sequences
            .fetch_add(now - *published, Relaxed);
    } else {
        metrics
            .running_sequences
            .fetch_sub(*published - now, Relaxed);
    }
    *published = now;
}
