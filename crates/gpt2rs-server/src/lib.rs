//! `gpt2rs serve`: GPT-2 behind OpenAI's completions API, with continuous batching.
//!
//! Requests flow: HTTP (axum, [`completions`]) → checks ([`api`]) → the least loaded engine
//! thread ([`worker`]), whose [`gpt2rs::scheduler::Scheduler`] adds them to its running batch at
//! the next step → events back on a per-request channel → one JSON answer or an SSE stream.
//! The server keeps no state between requests, so replicas behind a load balancer scale out.

pub mod api;
mod completions;
pub mod errors;
pub mod loadtest;
pub mod metrics;
pub mod worker;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use errors::ApiError;
use gpt2rs::config::Gpt2Config;
use gpt2rs::scheduler::SchedulerConfig;
use gpt2rs::tokenizer::Tokenizer;
use metrics::Metrics;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use worker::{EngineFactory, Worker, WorkerContext};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    /// The model's name in the API (`model` in requests, `/v1/models`).
    pub model_name: String,
    /// Per engine: sequences in the running batch, prompt tokens prefilled per step.
    pub scheduler: SchedulerConfig,
    /// Requests waiting for a place in a batch before new ones get 429.
    pub max_queue: usize,
    pub max_tokens_per_request: usize,
    /// From arrival to the last token; past it the request ends with 504.
    pub request_timeout: Duration,
    pub body_limit: usize,
    /// Time a client has to send its request body.
    pub body_timeout: Duration,
    /// After SIGINT/SIGTERM, how long in-flight requests may run before they are cancelled.
    pub shutdown_grace: Duration,
    /// Stop on SIGINT/SIGTERM (the `gpt2rs serve` program); tests stop it themselves.
    pub handle_signals: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            model_name: "gpt2".into(),
            scheduler: SchedulerConfig::default(),
            max_queue: 256,
            max_tokens_per_request: 1024,
            request_timeout: Duration::from_secs(300),
            body_limit: 1 << 20,
            body_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            handle_signals: false,
        }
    }
}

/// What every handler shares.
pub struct App {
    cfg: ServerConfig,
    model: Gpt2Config,
    tokenizer: Arc<Tokenizer>,
    workers: Vec<Worker>,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    created: u64,
}

impl App {
    /// Counts a request that ended in an error, by kind.
    fn count_failure(&self, e: &ApiError) {
        let r = &self.metrics.requests;
        let counter = match e.status {
            StatusCode::TOO_MANY_REQUESTS => &r.rejected_busy,
            StatusCode::SERVICE_UNAVAILABLE => &r.unavailable,
            StatusCode::GATEWAY_TIMEOUT => &r.timed_out,
            s if s.is_server_error() => &r.failed,
            _ => &r.invalid,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// A server running on its own threads.
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// Starts a graceful shutdown and waits for it to finish.
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait_inner();
    }

    /// Waits until the server stops (on a signal, when it handles them).
    pub fn wait(mut self) {
        self.wait_inner();
    }

    fn wait_inner(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait_inner();
    }
}

/// Builds every engine (each on its own thread), binds the address and starts serving.
/// Returns once the server accepts connections; fails plainly if an engine or the
/// address cannot be had.
pub fn spawn(
    cfg: ServerConfig,
    model: Gpt2Config,
    tokenizer: Arc<Tokenizer>,
    engines: Vec<(String, EngineFactory)>,
) -> Result<RunningServer, String> {
    if engines.is_empty() {
        return Err("no engine to serve with".into());
    }
    let metrics = Arc::new(Metrics::default());
    let mut workers = Vec::new();
    for (device, factory) in engines {
        let ctx = WorkerContext {
            tokenizer: tokenizer.clone(),
            metrics: metrics.clone(),
            scheduler: cfg.scheduler,
        };
        workers.push(Worker::start(device, factory, ctx)?);
    }
    // A few threads carry the HTTP side (JSON, SSE writes); the cores belong to the engines.
    let http_threads =
        std::thread::available_parallelism().map_or(2, |n| (n.get() / 4).clamp(2, 4));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_threads)
        .thread_name("gpt2rs-http")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the HTTP runtime: {e}"))?;
    let bind = format!("{}:{}", cfg.host, cfg.port);
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(&bind))
        .map_err(|e| {
            format!("cannot listen on {bind}: {e} (is another server using the port? try --port)")
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    let app = Arc::new(App {
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        cfg,
        model,
        tokenizer,
        workers,
        metrics,
        draining: AtomicBool::new(false),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("gpt2rs-serve".into())
        .spawn(move || runtime.block_on(serve(app, listener, stop_rx)))
        .map_err(|e| format!("cannot start the server thread: {e}"))?;
    Ok(RunningServer {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(no_chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(app)
}

async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let signals = app.cfg.handle_signals;
    let shutdown_app = app.clone();
    let shutdown = async move {
        tokio::select! {
            _ = stop => {}
            _ = termination(), if signals => {}
        }
        let app = shutdown_app;
        app.draining.store(true, Relaxed);
        let grace = app.cfg.shutdown_grace;
        eprintln!(
            "shutting down: no new requests; in-flight ones have {:.0} s to finish",
            grace.as_secs_f64()
        );
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            eprintln!("shutdown grace period over: cancelling what is still running");
            for w in &app.workers {
                w.cancel_all();
            }
        });
    };
    let result = axum::serve(listener, router(app.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    if let Err(e) = result {
        eprintln!("error: the server stopped: {e}");
    }
}

/// SIGINT (Ctrl-C) or SIGTERM (what orchestrators send).
async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn models(axum::extract::State(app): axum::extract::State<Arc<App>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": app.cfg.model_name,
            "object": "model",
            "created": app.created,
            "owned_by": "gpt2rs",
            "max_model_len": app.model.n_positions,
        }],
    }))
    .into_response()
}

/// 200 while serving, 503 while draining (so a load balancer stops sending work here).
async fn health(axum::extract::State(app): axum::extract::State<Arc<App>>) -> Response {
    let m = &app.metrics;
    let draining = app.draining.load(Relaxed);
    let engines: Vec<_> = app
        .workers
        .iter()
        .map(|w| {
            json!({
                "device": w.device,
                "engine": w.describe,
                "requests": w.load(),
                "served": w.served(),
            })
        })
        .collect();
    let body = Json(json!({
        "status": if draining { "draining" } else { "ok" },
        "model": app.cfg.model_name,
        "engines": engines,
        "queue_depth": m.queue_depth.load(Relaxed),
        "running_sequences": m.running_sequences.load(Relaxed),
    }));
    let status = if draining {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, body).into_response()
}

async fn metrics_text(axum::extract::State(app): axum::extract::State<Arc<App>>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn no_chat() -> Response {
    ApiError::not_found(
        "GPT-2 is not a chat model: this server has POST /v1/completions (prompt in, text out)",
    )
    .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!(
        "no endpoint {}: this server has POST /v1/completions, GET /v1/models, GET /health and \
         GET /metrics",
        uri.path()
    ))
    .into_response()
}
