//! The server over loopback: answers equal the library's `generate`, continuous batching keeps
//! greedy outputs exact, bad input gets OpenAI-style errors, backpressure, cancellation,
//! timeouts, slow clients, graceful shutdown, several engines, and the official `openai`
//! Python client.

use gpt2rs::cpu::CpuEngine;
use gpt2rs::engine::Engine;
use gpt2rs::generate::{self, GenerationConfig};
use gpt2rs::hub::{FetchOptions, ModelSpec};
use gpt2rs::model::{self, LoadedModel};
use gpt2rs::scheduler::SchedulerConfig;
use gpt2rs_server::worker::EngineFactory;
use gpt2rs_server::{RunningServer, ServerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fixture with GPT-2's full vocabulary (random weights made by transformers).
fn fixture() -> LoadedModel {
    let dir = repo().join("tests/fixtures/models/full-vocab");
    let spec = ModelSpec::parse(dir.to_str().unwrap()).unwrap();
    model::load(&spec, 0, &FetchOptions::default()).unwrap()
}

/// The CPU engine with a pause before every pass, so a test can count on a request still
/// running a while later (the fixture model alone makes 250 tokens in a few milliseconds).
struct Slow(CpuEngine);

impl Engine for Slow {
    fn config(&self) -> &gpt2rs::config::Gpt2Config {
        self.0.config()
    }
    fn describe(&self) -> String {
        format!("{} (slowed for a test)", self.0.describe())
    }
    fn add_sequence(&mut self) -> gpt2rs::engine::SeqId {
        self.0.add_sequence()
    }
    fn fork_sequence(&mut self, p: gpt2rs::engine::SeqId) -> gpt2rs::Result<gpt2rs::engine::SeqId> {
        self.0.fork_sequence(p)
    }
    fn remove_sequence(&mut self, seq: gpt2rs::engine::SeqId) {
        self.0.remove_sequence(seq)
    }
    fn sequence_len(&self, seq: gpt2rs::engine::SeqId) -> Option<usize> {
        self.0.sequence_len(seq)
    }
    fn forward(
        &mut self,
        batch: &[gpt2rs::engine::BatchEntry<'_>],
    ) -> gpt2rs::Result<gpt2rs::engine::Logits> {
        std::thread::sleep(Duration::from_millis(5));
        self.0.forward(batch)
    }
}

fn start_with(cfg: ServerConfig, engines: usize) -> RunningServer {
    start_engines(cfg, engines, false)
}

fn start_engines(cfg: ServerConfig, engines: usize, slow: bool) -> RunningServer {
    let m = fixture();
    let config = m.weights.config.clone();
    let factories: Vec<(String, EngineFactory)> = (0..engines)
        .map(|i| {
            let w = m.weights.clone();
            let f: EngineFactory = Box::new(move || {
                let e = CpuEngine::new(w);
                Ok(if slow {
                    Box::new(Slow(e)) as Box<dyn Engine>
                } else {
                    Box::new(e)
                })
            });
            (format!("cpu{i}"), f)
        })
        .collect();
    gpt2rs_server::spawn(
        ServerConfig { port: 0, ..cfg },
        config,
        Arc::new(m.tokenizer),
        factories,
    )
    .unwrap()
}

fn start() -> RunningServer {
    start_with(ServerConfig::default(), 1)
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build(),
    )
}

/// POSTs `body` (raw) and returns the status, the Retry-After header and the JSON answer.
fn post_raw(s: &RunningServer, path: &str, body: &[u8]) -> (u16, Option<String>, Value) {
    let mut r = agent()
        .post(format!("http://{}{path}", s.addr))
        .header("content-type", "application/json")
        .send(body)
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let text = r.body_mut().read_to_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
    (status, retry, v)
}

fn complete(s: &RunningServer, body: Value) -> (u16, Value) {
    let (status, _, v) = post_raw(s, "/v1/completions", body.to_string().as_bytes());
    (status, v)
}

fn get(s: &RunningServer, path: &str) -> (u16, String) {
    let mut r = agent()
        .get(format!("http://{}{path}", s.addr))
        .call()
        .unwrap();
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

/// Streams a completion; returns the `data:` payloads in order.
fn stream(s: &RunningServer, body: Value) -> Vec<String> {
    let r = agent()
        .post(format!("http://{}/v1/completions", s.addr))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    BufReader::new(r.into_body().into_reader())
        .lines()
        .map(Result::unwrap)
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

/// What the library generates greedily for `prompt` (the reference for the server).
fn reference(prompt: &str, max_new_tokens: usize) -> String {
    let m = fixture();
    let ids = m.tokenizer.encode(prompt).unwrap();
    let mut engine = CpuEngine::new(m.weights);
    let cfg = GenerationConfig {
        max_new_tokens,
        ..Default::default()
    };
    let (out, _) =
        generate::generate(&mut engine, &m.tokenizer, &[ids], &cfg, &mut |_| {}).unwrap();
    out[0].text.clone()
}

fn metric(s: &RunningServer, line_start: &str) -> f64 {
    let (_, text) = get(s, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn answers_match_generate_streaming_or_not() {
    let s = start();
    let want = reference("The quick brown fox", 12);
    let (status, v) = complete(
        &s,
        json!({"model": "gpt2", "prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["prompt_tokens"], 4);

    let events = stream(
        &s,
        json!({"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0,
               "stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap().clone())
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, want);
    assert!(chunks.len() > 3, "streamed in pieces");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    let finish: Vec<&Value> = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().unwrap())
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec![&json!("length")]);

    // Echo and log-probabilities: the prompt comes back first; its first token has none.
    let (_, v) = complete(
        &s,
        json!({"prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 2}),
    );
    let c = &v["choices"][0];
    assert_eq!(
        c["text"].as_str().unwrap(),
        format!("The quick brown fox{}", reference("The quick brown fox", 3))
    );
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 7);
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() < 0.0);
    assert_eq!(lp["top_logprobs"][6].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][1], 3);
}

#[test]
fn concurrent_requests_batch_together_and_stay_exact() {
    let cfg = ServerConfig {
        scheduler: SchedulerConfig {
            max_running: 4,
            max_step_tokens: 3,
        },
        ..ServerConfig::default()
    };
    let s = start_with(cfg, 1);
    let prompts = [
        "Hello",
        "A much longer prompt that needs several prefill steps to get in",
        "Numbers: 1 2 3",
        "x",
        "The rain in Spain",
        "Rust is",
    ];
    let answers: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    let (status, v) =
                        complete(s, json!({"prompt": p, "max_tokens": 20, "temperature": 0}));
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, got) in prompts.iter().zip(&answers) {
        assert_eq!(got, &reference(p, 20), "prompt {p:?}");
    }
    assert!(metric(&s, "gpt2rs_generation_tokens_total ") >= 120.0);
    // A list of prompts with n samples each: index = prompt * n + sample; seeded, repeatable.
    let body = json!({"prompt": ["Hello", "Rust is"], "n": 2, "max_tokens": 5, "seed": 7, "temperature": 0.9});
    let (_, a) = complete(&s, body.clone());
    let (_, b) = complete(&s, body);
    let idx: Vec<u64> = a["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, vec![0, 1, 2, 3]);
    assert_eq!(a["choices"], b["choices"], "same seed, same text");
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let s = start();
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (b"{\"prompt\": \"hi\", ", 400, "not valid JSON"),
        (
            b"{\"prompt\": \"hi\", \"max_tokens\": \"ten\"}",
            400,
            "invalid type",
        ),
        (
            b"{\"prompt\": \"hi\", \"temprature\": 1}",
            400,
            "unknown field",
        ),
        (b"{\"prompt\": \"\"}", 400, "empty"),
        (
            b"{\"prompt\": \"hi\", \"max_tokens\": 300}",
            400,
            "maximum context length",
        ),
        (b"{\"prompt\": \"hi\", \"n\": 1000}", 400, "sequences"),
        (b"{\"prompt\": \"\xff\xfe\"}", 400, "JSON"),
        (
            b"{\"prompt\": \"hi\", \"model\": \"gpt-4\"}",
            404,
            "does not exist",
        ),
        (b"", 400, "empty"),
    ];
    for (body, status, msg) in cases {
        let (got, _, v) = post_raw(&s, "/v1/completions", body);
        assert_eq!(got, status, "{}: {v}", String::from_utf8_lossy(body));
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(msg), "{m}");
        assert_eq!(v["error"]["code"], status);
    }
    let long_prompt: Vec<u32> = vec![100; 300];
    let (got, v) = complete(&s, json!({"prompt": long_prompt, "max_tokens": 1}));
    assert_eq!(got, 400);
    assert_eq!(v["error"]["param"], "prompt");
    // A body over the limit is refused from its Content-Length, before it is sent.
    let mut tcp = TcpStream::connect(s.addr).unwrap();
    write!(
        tcp,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        2 << 20
    )
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 413");
    let (got, _, v) = post_raw(&s, "/v1/chat/completions", b"{}");
    assert_eq!(got, 404);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not a chat model"));
    // Still serving.
    let (got, v) = complete(&s, json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(got, 200, "{v}");
    assert!(metric(&s, "gpt2rs_requests_total{outcome=\"invalid\"} ") >= 11.0);
    let (status, models) = get(&s, "/v1/models");
    assert_eq!(status, 200);
    assert!(models.contains("\"id\":\"gpt2\""));
}

#[test]
fn a_full_queue_answers_429_and_disconnects_free_their_sequences() {
    let cfg = ServerConfig {
        scheduler: SchedulerConfig {
            max_running: 1,
            max_step_tokens: 64,
        },
        max_queue: 1,
        ..ServerConfig::default()
    };
    // 250 tokens at 5 ms a step: the first request runs for over a second.
    let s = start_engines(cfg, 1, true);
    let long = json!({"prompt": "Hello", "max_tokens": 250, "stream": true});
    // One running (its client reads one chunk, then holds the stream open), one queued.
    let open = |body: &Value| {
        let mut tcp = TcpStream::connect(s.addr).unwrap();
        let b = body.to_string();
        write!(
            tcp,
            "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        tcp
    };
    let first = open(&long);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&s, "gpt2rs_running_sequences ") < 1.0 {
        assert!(Instant::now() < deadline, "the first request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = open(&long);
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&s, "gpt2rs_queue_depth ") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, retry, v) = post_raw(&s, "/v1/completions", br#"{"prompt": "hi"}"#);
    assert_eq!(status, 429, "{v}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(v["error"]["type"], "rate_limit_error");

    // Both clients leave: their generations stop and nothing stays running.
    drop(first);
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, h) = get(&s, "/health");
        let h: Value = serde_json::from_str(&h).unwrap();
        if h["running_sequences"] == 0 && h["engines"][0]["requests"] == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled work still running: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        metric(&s, "gpt2rs_requests_total{outcome=\"cancelled\"} "),
        2.0
    );
    assert_eq!(metric(&s, "gpt2rs_queue_depth "), 0.0);
}

#[test]
fn timeouts_and_slow_clients() {
    let cfg = ServerConfig {
        request_timeout: Duration::from_millis(300),
        body_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let s = start_with(cfg, 1);
    // A client that sends half a body and stalls gets 408; others are served meanwhile.
    let mut slow = TcpStream::connect(s.addr).unwrap();
    write!(
        slow,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{{\"prompt\""
    )
    .unwrap();
    let (status, v) = complete(&s, json!({"prompt": "hi", "max_tokens": 2}));
    assert_eq!(status, 200, "{v}");
    let mut answer = String::new();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = slow.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Generation past the request timeout ends with 504, or with an error event when
    // streaming. 250 tokens take 250 engine steps: far more than 5 ms.
    let cfg = ServerConfig {
        request_timeout: Duration::from_millis(5),
        ..ServerConfig::default()
    };
    let s = start_with(cfg, 1);
    let big = json!({"prompt": "hi", "max_tokens": 250, "temperature": 0});
    let (status, v) = complete(&s, big.clone());
    assert_eq!(status, 504, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("timeout"));
    let mut body = big;
    body["stream"] = json!(true);
    let events = stream(&s, body);
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(
        events[events.len() - 2].contains("\"error\""),
        "{:?}",
        events.last()
    );
    assert_eq!(
        metric(&s, "gpt2rs_requests_total{outcome=\"timeout\"} "),
        2.0
    );
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let cfg = ServerConfig {
        shutdown_grace: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    // 5 ms a step: the 60-token request is still running when the shutdown starts.
    let s = start_engines(cfg, 1, true);
    let addr = s.addr;
    let want = reference("Hello", 60);
    let client = std::thread::spawn(move || {
        let r = agent()
            .post(format!("http://{addr}/v1/completions"))
            .send(json!({"prompt": "Hello", "max_tokens": 60, "temperature": 0}).to_string())
            .unwrap();
        let mut r = r;
        let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        v["choices"][0]["text"].as_str().unwrap().to_string()
    });
    std::thread::sleep(Duration::from_millis(100));
    s.shutdown();
    assert_eq!(client.join().unwrap(), want, "in-flight work finished");
    assert!(TcpStream::connect(addr).is_err(), "no longer accepting");

    // With no grace period, in-flight streams end with an error event, not a cut connection.
    let cfg = ServerConfig {
        shutdown_grace: Duration::ZERO,
        ..ServerConfig::default()
    };
    let s = start_engines(cfg, 1, true);
    let addr = s.addr;
    let client = std::thread::spawn(move || {
        let r = agent()
            .post(format!("http://{addr}/v1/completions"))
            .send(json!({"prompt": "Hello", "max_tokens": 250, "stream": true}).to_string())
            .unwrap();
        BufReader::new(r.into_body().into_reader())
            .lines()
            .map(Result::unwrap)
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(150));
    s.shutdown();
    let events = client.join().unwrap();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let err = &events[events.len() - 2];
    assert!(err.contains("shutting down"), "{err}");
}

#[test]
fn several_engines_share_the_work() {
    let s = start_with(ServerConfig::default(), 2);
    std::thread::scope(|sc| {
        for i in 0..6 {
            let s = &s;
            sc.spawn(move || {
                let (status, v) = complete(
                    s,
                    json!({"prompt": format!("Prompt {i}"), "max_tokens": 40, "temperature": 0}),
                );
                assert_eq!(status, 200, "{v}");
            });
        }
    });
    let (_, h) = get(&s, "/health");
    let h: Value = serde_json::from_str(&h).unwrap();
    let served: Vec<u64> = h["engines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["served"].as_u64().unwrap())
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 6);
    assert!(
        served.iter().all(|&n| n > 0),
        "both engines served: {served:?}"
    );
}

#[test]
fn the_openai_python_client_works() {
    let check = repo().join("scripts/openai_client_check.py");
    let has_openai = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        assert!(
            std::env::var_os("GPT2RS_REQUIRE_OPENAI").is_none(),
            "GPT2RS_REQUIRE_OPENAI is set but python3 cannot import openai"
        );
        eprintln!("SKIPPED: the openai Python package is not installed (pip install openai)");
        return;
    }
    let s = start();
    let out = std::process::Command::new("python3")
        .arg(&check)
        .arg(format!("http://{}/v1", s.addr))
        .arg(reference("The quick brown fox", 12))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
