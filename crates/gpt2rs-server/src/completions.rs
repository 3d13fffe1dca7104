//! `POST /v1/completions`: read and check the request, hand its prompts to the least loaded
//! engine, and answer with one JSON object or a stream of server-sent events in OpenAI's
//! chunk format ending with `data: [DONE]`.

use crate::api::{self, Limits, Plan};
use crate::errors::ApiError;
use crate::worker::{Failure, Job, JobEvent};
use crate::App;
use axum::body::{to_bytes, Body};
use axum::extract::State;
use axum::http::header::CONTENT_LENGTH;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use gpt2rs::generate::FinishReason;
use gpt2rs::scheduler::{Event, TokenLogprob};
use gpt2rs::tokenizer::Tokenizer;
use serde_json::{json, Map, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub async fn handle(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match start(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => {
            app.count_failure(&e);
            e.into_response()
        }
    }
}

async fn start(app: &Arc<App>, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    if app.draining.load(Relaxed) {
        return Err(ApiError::unavailable(
            "the server is shutting down; send the request to another replica",
        ));
    }
    let limit = app.cfg.body_limit;
    let too_large = || {
        ApiError::too_large(format!(
            "the request body is larger than the server's limit of {limit} bytes"
        ))
    };
    // Refuse an announced oversized body before reading any of it.
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let bytes = match tokio::time::timeout(app.cfg.body_timeout, to_bytes(body, limit)).await {
        Err(_) => {
            return Err(ApiError::request_timeout(format!(
                "the request body did not arrive within {:.0} s",
                app.cfg.body_timeout.as_secs_f64()
            )))
        }
        Ok(Err(_)) => return Err(too_large()),
        Ok(Ok(b)) => b,
    };
    let limits = Limits {
        max_sequences: app.cfg.scheduler.max_running,
        max_tokens: app.cfg.max_tokens_per_request,
    };
    let plan = api::plan(
        api::parse(&bytes)?,
        &app.cfg.model_name,
        &app.model,
        &app.tokenizer,
        limits,
    )?;

    // A place in the queue for each prompt, or 429.
    let jobs = plan.requests.len() as u64;
    let before = app.metrics.queue_depth.fetch_add(jobs, Relaxed);
    if before + jobs > app.cfg.max_queue as u64 {
        app.metrics.queue_depth.fetch_sub(jobs, Relaxed);
        return Err(ApiError::busy(
            format!(
                "the server is at capacity ({} requests waiting); retry shortly",
                before
            ),
            1,
        ));
    }
    let worker = app
        .workers
        .iter()
        .min_by_key(|w| w.load())
        .expect("at least one engine");
    let (tx, rx) = unbounded_channel();
    let deadline = arrived + app.cfg.request_timeout;
    for (i, request) in plan.requests.iter().enumerate() {
        let job = Job {
            prompt_index: i,
            request: request.clone(),
            events: tx.clone(),
            arrived,
            deadline,
        };
        if worker.submit(job).is_err() {
            app.metrics.queue_depth.fetch_sub(jobs - i as u64, Relaxed);
            return Err(ApiError::unavailable("the engine has stopped"));
        }
    }
    drop(tx);
    let out = Output::new(app.clone(), plan);
    if out.plan.stream {
        // Counted as ok (or failed) when the stream ends.
        Ok(stream(out, rx).into_response())
    } else {
        let r = collect(out, rx).await?;
        app.metrics.requests.ok.fetch_add(1, Relaxed);
        Ok(axum::Json(r).into_response())
    }
}

/// One choice being built (prompt `prompt`, sample `sample`).
#[derive(Default)]
struct Choice {
    text: String,
    tokens: usize,
    finish: Option<&'static str>,
    logprobs: Logprobs,
    /// Whether the echoed prompt was sent (streaming).
    started: bool,
    /// Characters of echoed prompt before the generated text.
    echo_chars: usize,
}

/// OpenAI's legacy logprobs object, as parallel lists.
#[derive(Default, Clone)]
struct Logprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    /// Characters of text before the next token.
    offset: usize,
}

impl Logprobs {
    fn push(&mut self, tok: &Tokenizer, token: u32, lp: Option<f32>, top: Option<&[(u32, f32)]>) {
        let s = token_text(tok, token);
        self.text_offset.push(self.offset);
        self.offset += s.chars().count();
        self.tokens.push(s);
        self.token_logprobs.push(lp);
        self.top_logprobs.push(top.map(|t| {
            t.iter()
                .map(|&(id, lp)| (token_text(tok, id), json!(lp)))
                .collect()
        }));
    }

    /// Moves the entries out (the running text offset stays).
    fn split_off(&mut self) -> Logprobs {
        let offset = self.offset;
        std::mem::replace(
            self,
            Logprobs {
                offset,
                ..Logprobs::default()
            },
        )
    }

    /// Appends `more`, whose offsets count from the end of this one's text.
    fn append(mut self, more: Logprobs, shift: usize) -> Logprobs {
        self.tokens.extend(more.tokens);
        self.token_logprobs.extend(more.token_logprobs);
        self.top_logprobs.extend(more.top_logprobs);
        self.text_offset
            .extend(more.text_offset.into_iter().map(|o| o + shift));
        self
    }

    fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

fn token_text(tok: &Tokenizer, id: u32) -> String {
    String::from_utf8_lossy(tok.token_bytes(id)).into_owned()
}

/// Turns job events into choices and response objects.
struct Output {
    app: Arc<App>,
    plan: Plan,
    id: String,
    created: u64,
    choices: Vec<Choice>,
    /// Prompt log-probabilities per prompt, gathered as prefill chunks come in.
    prompt_logprobs: Vec<Vec<f32>>,
    unfinished: usize,
}

impl Output {
    fn new(app: Arc<App>, plan: Plan) -> Self {
        let n_choices = plan.prompts.len() * plan.n;
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let id = format!("cmpl-{:016x}{:08x}", rand::random::<u64>(), created as u32);
        Self {
            prompt_logprobs: vec![Vec::new(); plan.prompts.len()],
            choices: (0..n_choices).map(|_| Choice::default()).collect(),
            unfinished: n_choices,
            app,
            plan,
            id,
            created,
        }
    }

    fn index(&self, prompt: usize, sample: usize) -> usize {
        prompt * self.plan.n + sample
    }

    /// The echoed prompt of a choice: its text, and its log-probabilities when asked for.
    fn echo(&self, prompt: usize) -> (String, Option<Logprobs>) {
        let tok = &self.app.tokenizer;
        let ids = &self.plan.prompts[prompt];
        let text = tok.decode(ids);
        let lps = self.plan.logprobs.map(|_| {
            let mut l = Logprobs::default();
            for (i, &t) in ids.iter().enumerate() {
                let lp = i
                    .checked_sub(1)
                    .and_then(|j| self.prompt_logprobs[prompt].get(j));
                l.push(tok, t, lp.copied(), None);
            }
            l
        });
        (text, lps)
    }

    /// Applies one event; returns the index of the choice it changed, if any, and the text
    /// it added (for streaming).
    fn apply(&mut self, prompt: usize, event: Event) -> Option<(usize, String)> {
        let (sample, text) = match event {
            Event::PromptLogprobs(v) => {
                self.prompt_logprobs[prompt].extend(v);
                return None;
            }
            Event::Token {
                sample,
                token,
                text,
                logprob,
            } => {
                let i = self.index(prompt, sample);
                let c = &mut self.choices[i];
                c.tokens += 1;
                if let Some(TokenLogprob { logprob, top }) = logprob {
                    c.logprobs
                        .push(&self.app.tokenizer, token, Some(logprob), Some(&top));
                }
                (sample, text)
            }
            Event::Finished {
                sample,
                reason,
                text,
            } => {
                let i = self.index(prompt, sample);
                self.choices[i].finish = Some(match reason {
                    FinishReason::Length => "length",
                    FinishReason::Eos | FinishReason::Stop => "stop",
                });
                self.unfinished -= 1;
                (sample, text)
            }
        };
        let i = self.index(prompt, sample);
        self.choices[i].text.push_str(&text);
        Some((i, text))
    }

    fn usage(&self) -> Value {
        let prompt: usize = self.plan.prompts.iter().map(Vec::len).sum();
        let completion: usize = self.choices.iter().map(|c| c.tokens).sum();
        json!({
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        })
    }

    fn object(&self, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.app.cfg.model_name,
            "choices": choices,
        })
    }
}

fn failure_error(failure: Failure, message: String) -> ApiError {
    match failure {
        Failure::Timeout => ApiError::timeout(message),
        Failure::Shutdown => ApiError::unavailable(message),
        Failure::Engine => ApiError::internal(message),
    }
}

/// Waits for every choice, then answers with one object.
async fn collect(mut out: Output, mut rx: UnboundedReceiver<JobEvent>) -> Result<Value, ApiError> {
    while out.unfinished > 0 {
        match rx.recv().await {
            Some(JobEvent::Event { prompt, event }) => {
                out.apply(prompt, event);
            }
            Some(JobEvent::Failed { failure, message }) => {
                return Err(failure_error(failure, message))
            }
            None => return Err(ApiError::internal("the engine stopped before finishing")),
        }
    }
    let n = out.plan.n;
    let mut choices = Vec::new();
    for i in 0..out.choices.len() {
        let (prompt_text, prompt_lps) = if out.plan.echo {
            out.echo(i / n)
        } else {
            (String::new(), None)
        };
        let shift = prompt_text.chars().count();
        let c = &mut out.choices[i];
        let logprobs = out.plan.logprobs.map(|_| {
            let generated = c.logprobs.split_off();
            prompt_lps
                .unwrap_or_default()
                .append(generated, shift)
                .to_json()
        });
        choices.push(json!({
            "text": prompt_text + &c.text,
            "index": i,
            "logprobs": logprobs,
            "finish_reason": c.finish,
        }));
    }
    let mut obj = out.object(choices);
    obj["usage"] = out.usage();
    Ok(obj)
}

/// What the SSE stream still has to send.
struct StreamState {
    out: Output,
    rx: UnboundedReceiver<JobEvent>,
    pending: VecDeque<SseEvent>,
    done: bool,
}

/// Streams a chunk per piece of text, each choice's finish reason, usage if asked, then [DONE].
/// Dropping the stream (the client went away) drops the receiver, which cancels the jobs.
fn stream(out: Output, rx: UnboundedReceiver<JobEvent>) -> impl IntoResponse {
    let state = StreamState {
        out,
        rx,
        pending: VecDeque::new(),
        done: false,
    };
    let events = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.done {
                return None;
            }
            if st.out.unfinished == 0 {
                st.out.app.metrics.requests.ok.fetch_add(1, Relaxed);
                if st.out.plan.include_usage {
                    let mut obj = st.out.object(Vec::new());
                    obj["usage"] = st.out.usage();
                    st.pending.push_back(data(&obj));
                }
                st.pending.push_back(SseEvent::default().data("[DONE]"));
                st.done = true;
                continue;
            }
            match st.rx.recv().await {
                Some(JobEvent::Event { prompt, event }) => st.chunk(prompt, event),
                Some(JobEvent::Failed { failure, message }) => {
                    let e = failure_error(failure, message);
                    st.out.app.count_failure(&e);
                    st.pending.push_back(data(&e.body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    let e = ApiError::internal("the engine stopped before finishing");
                    st.pending.push_back(data(&e.body()));
                    st.done = true;
                }
            }
        }
    });
    Sse::new(events)
}

impl StreamState {
    /// Queues the chunk one event makes (none when it adds nothing).
    fn chunk(&mut self, prompt: usize, event: Event) {
        let is_token = matches!(event, Event::Token { .. });
        let Some((i, mut text)) = self.out.apply(prompt, event) else {
            return;
        };
        let out = &mut self.out;
        let mut echoed = None;
        if !out.choices[i].started {
            out.choices[i].started = true;
            if out.plan.echo {
                let (prompt_text, prompt_lps) = out.echo(prompt);
                out.choices[i].echo_chars = prompt_text.chars().count();
                text = prompt_text + &text;
                echoed = prompt_lps;
            }
        }
        let c = &mut out.choices[i];
        let logprobs = out.plan.logprobs.map(|_| {
            let generated = c.logprobs.split_off();
            echoed
                .unwrap_or_default()
                .append(generated, c.echo_chars)
                .to_json()
        });
        // A token whose text is not final yet still sends its log-probability.
        if text.is_empty() && c.finish.is_none() && !(is_token && logprobs.is_some()) {
            return;
        }
        let choice = json!({
            "text": text,
            "index": i,
            "logprobs": logprobs,
            "finish_reason": c.finish,
        });
        let obj = out.object(vec![choice]);
        self.pending.push_back(data(&obj));
    }
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}
