//! The `/v1/completions` request body (OpenAI's legacy completions API, plus top_k and
//! repetition_penalty as vLLM has them) and its checks, turned into scheduler requests.

use crate::errors::ApiError;
use gpt2rs::config::Gpt2Config;
use gpt2rs::generate::SamplingParams;
use gpt2rs::scheduler::Request;
use gpt2rs::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::Value;

/// The fields OpenAI's completions API has, and two it lacks. Unknown fields are refused,
/// so a typo never silently changes nothing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Option<Value>,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u64>,
    pub echo: Option<bool>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub best_of: Option<u64>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub suffix: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// Limits the server enforces on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sequences one request may ask for (prompts × n).
    pub max_sequences: usize,
    pub max_tokens: usize,
}

/// A checked request: one scheduler request per prompt.
#[derive(Debug)]
pub struct Plan {
    pub prompts: Vec<Vec<u32>>,
    pub requests: Vec<Request>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub echo: bool,
    pub logprobs: Option<usize>,
}

/// Most alternatives per token `logprobs` may ask for.
pub const MAX_LOGPROBS: u64 = 20;
const MAX_STOPS: usize = 16;
/// OpenAI's default max_tokens for completions.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// Parses a request body, with messages that say which field is wrong and how.
pub fn parse(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid(
            "the request body is empty: send a JSON object such as {\"prompt\": \"Hello\", \"max_tokens\": 16}",
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "the request body is not valid JSON"
            }
            _ => "the request body does not match the completions API",
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// Checks every field against the model and the server's limits.
pub fn plan(
    req: CompletionRequest,
    served_model: &str,
    model: &Gpt2Config,
    tokenizer: &Tokenizer,
    limits: Limits,
) -> Result<Plan, ApiError> {
    if let Some(m) = &req.model {
        if m != served_model {
            return Err(ApiError::not_found(format!(
                "the model '{m}' does not exist here: this server serves '{served_model}' \
                 (see GET /v1/models)"
            )));
        }
    }
    let prompts = prompts(req.prompt.as_ref(), tokenizer, model.vocab_size)?;
    let n = req.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::invalid_param("n", "n must be at least 1"));
    }
    if let Some(b) = req.best_of {
        if b != n {
            return Err(ApiError::invalid_param(
                "best_of",
                "best_of is not supported (only best_of = n, the default)",
            ));
        }
    }
    let sequences = prompts.len() as u64 * n;
    if sequences > limits.max_sequences as u64 {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "this request asks for {sequences} sequences ({} prompts × n = {n}); the server \
                 runs at most {} per request",
                prompts.len(),
                limits.max_sequences
            ),
        ));
    }
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid_param(
                name,
                format!("{name} is not supported; use repetition_penalty (e.g. 1.2)"),
            ));
        }
    }
    if req.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
        return Err(ApiError::invalid_param(
            "logit_bias",
            "logit_bias is not supported",
        ));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "suffix (insertion) is not supported by GPT-2",
        ));
    }
    let sampling = sampling(&req)?;
    let logprobs = match req.logprobs {
        Some(k) if k > MAX_LOGPROBS => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS} (got {k})"),
            ))
        }
        k => k.map(|k| k as usize),
    };
    let echo = req.echo.unwrap_or(false);
    let stop_strings = stops(req.stop.as_ref())?;
    let max_tokens = req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens > limits.max_tokens as u64 {
        return Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "max_tokens is {max_tokens}; this server allows at most {} per request",
                limits.max_tokens
            ),
        ));
    }
    for p in &prompts {
        if p.len() as u64 + max_tokens > model.n_positions as u64 {
            return Err(ApiError::invalid_param(
                if p.len() > model.n_positions {
                    "prompt"
                } else {
                    "max_tokens"
                },
                format!(
                    "this model's maximum context length is {} tokens, however you requested {} \
                     tokens ({} in your prompt; {max_tokens} for the completion); shorten the \
                     prompt or lower max_tokens",
                    model.n_positions,
                    p.len() as u64 + max_tokens,
                    p.len()
                ),
            ));
        }
    }
    let seed = req.seed.map_or_else(rand::random::<u64>, |s| s as u64);
    let requests = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Request {
            prompt: p.clone(),
            sampling: sampling.clone(),
            seed,
            rng_stream: i,
            samples: n as usize,
            max_new_tokens: max_tokens as usize,
            stop_at_eos: true,
            stop_strings: stop_strings.clone(),
            top_logprobs: logprobs,
            prompt_logprobs: echo && logprobs.is_some(),
        })
        .collect();
    Ok(Plan {
        prompts,
        requests,
        n: n as usize,
        stream: req.stream.unwrap_or(false),
        include_usage: req
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        echo,
        logprobs,
    })
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn prompts(v: Option<&Value>, tok: &Tokenizer, vocab: usize) -> Result<Vec<Vec<u32>>, ApiError> {
    const SHAPE: &str =
        "prompt must be a string, a list of strings, a list of token ids, or a list of lists of token ids";
    let bad = |msg: String| ApiError::invalid_param("prompt", msg);
    let text = |s: &str| -> Result<Vec<u32>, ApiError> {
        if s.is_empty() {
            return Err(bad("the prompt is empty: give it some text".into()));
        }
        tok.encode(s).map_err(|e| bad(e.to_string()))
    };
    let ids = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        if items.is_empty() {
            return Err(bad("a token-id prompt is empty".into()));
        }
        items
            .iter()
            .map(|t| match t.as_u64() {
                Some(id) if id < vocab as u64 => Ok(id as u32),
                Some(id) => Err(bad(format!(
                    "token id {id} is outside the vocabulary (0..{vocab})"
                ))),
                None => Err(bad(SHAPE.into())),
            })
            .collect()
    };
    let out = match v {
        None | Some(Value::Null) => return Err(bad("prompt is required".into())),
        Some(Value::String(s)) => vec![text(s)?],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(bad("prompt is an empty list".into()))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|i| i.as_str().ok_or_else(|| bad(SHAPE.into())).and_then(text))
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![ids(items)?],
            Value::Array(_) => items
                .iter()
                .map(|i| {
                    i.as_array()
                        .ok_or_else(|| bad(SHAPE.into()))
                        .and_then(|a| ids(a))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad(SHAPE.into())),
        },
        Some(_) => return Err(bad(SHAPE.into())),
    };
    Ok(out)
}

fn sampling(req: &CompletionRequest) -> Result<SamplingParams, ApiError> {
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be between 0 and 2 (got {temperature}); 0 means greedy"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be in (0, 1] (got {top_p})"),
        ));
    }
    let top_k = match req.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be positive, or -1 / 0 for no limit (got {k})"),
            ))
        }
    };
    let repetition_penalty = req.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(ApiError::invalid_param(
            "repetition_penalty",
            format!("repetition_penalty must be > 0 (got {repetition_penalty}); 1 is off"),
        ));
    }
    Ok(SamplingParams {
        temperature: (temperature > 0.0).then_some(temperature as f32),
        top_k,
        top_p: top_p as f32,
        repetition_penalty: repetition_penalty as f32,
    })
}

/// `stop`: a string or a list of strings.
fn stops(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || ApiError::invalid_param("stop", "stop must be a string or a list of strings");
    let list = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(String::from).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if list.len() > MAX_STOPS {
        return Err(ApiError::invalid_param(
            "stop",
            format!("at most {MAX_STOPS} stop strings (got {})", list.len()),
        ));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Gpt2Config {
        let mut c = Gpt2Config::preset("gpt2").unwrap();
        c.n_positions = 64;
        c
    }

    fn check(body: &str) -> Result<Plan, ApiError> {
        let limits = Limits {
            max_sequences: 8,
            max_tokens: 32,
        };
        plan(
            parse(body.as_bytes())?,
            "gpt2",
            &model(),
            &Tokenizer::gpt2(),
            limits,
        )
    }

    fn err(body: &str) -> String {
        check(body).unwrap_err().message
    }

    #[test]
    fn accepts_every_prompt_shape() {
        let p = check(r#"{"prompt": "Hello world", "max_tokens": 3}"#).unwrap();
        assert_eq!(p.prompts, vec![vec![15496, 995]]);
        assert_eq!(p.requests[0].max_new_tokens, 3);
        let p =
            check(r#"{"prompt": ["a", "b c"], "n": 2, "temperature": 0.5, "seed": 3}"#).unwrap();
        assert_eq!(p.prompts.len(), 2);
        assert_eq!(p.requests[1].rng_stream, 1);
        assert_eq!(p.requests[0].samples, 2);
        assert_eq!(p.requests[0].sampling.temperature, Some(0.5));
        let p = check(r#"{"prompt": [1, 2, 3], "temperature": 0}"#).unwrap();
        assert_eq!(p.prompts, vec![vec![1, 2, 3]]);
        assert!(p.requests[0].sampling.is_greedy());
        let p = check(r#"{"prompt": [[1], [2, 3]], "model": "gpt2", "stop": ["\n"], "echo": true, "logprobs": 2}"#).unwrap();
        assert_eq!(p.prompts.len(), 2);
        assert!(p.requests[0].prompt_logprobs);
        assert_eq!(p.requests[0].stop_strings, vec!["\n".to_string()]);
    }

    #[test]
    fn refuses_bad_requests_with_a_reason() {
        assert!(err("").contains("empty"));
        assert!(err("{\"prompt\": ").contains("not valid JSON"));
        assert!(err(r#"{"prompt": 5}"#).contains("prompt must be"));
        assert!(err(r#"{"prompt": "hi", "max_tokens": "x"}"#).contains("invalid type"));
        assert!(err(r#"{"prompt": "hi", "max_token": 3}"#).contains("unknown field `max_token`"));
        assert!(err(r#"{"prompt": ""}"#).contains("empty"));
        assert!(err(r#"{"prompt": []}"#).contains("empty"));
        assert!(err(r#"{"max_tokens": 3}"#).contains("required"));
        assert!(err(r#"{"prompt": [99999]}"#).contains("outside the vocabulary"));
        assert!(err(r#"{"prompt": "hi", "max_tokens": 33}"#).contains("at most 32"));
        assert!(err(r#"{"prompt": "hi", "n": 9}"#).contains("at most 8"));
        assert!(err(r#"{"prompt": ["a","b","c"], "n": 3}"#).contains("9 sequences"));
        assert!(err(r#"{"prompt": "hi", "temperature": 3}"#).contains("between 0 and 2"));
        assert!(err(r#"{"prompt": "hi", "top_p": 0}"#).contains("top_p"));
        assert!(err(r#"{"prompt": "hi", "logprobs": 21}"#).contains("logprobs"));
        assert!(err(r#"{"prompt": "hi", "presence_penalty": 1}"#).contains("repetition_penalty"));
        assert!(err(r#"{"prompt": "hi", "stop": 4}"#).contains("stop must be"));
        let long = format!(
            "{{\"prompt\": [{}], \"max_tokens\": 10}}",
            vec!["1"; 60].join(",")
        );
        assert!(err(&long).contains("maximum context length is 64"));
        let e = check(r#"{"prompt": "hi", "model": "gpt-4"}"#).unwrap_err();
        assert_eq!(e.status.as_u16(), 404);
        // Invalid UTF-8 inside a JSON string.
        let e = parse(b"{\"prompt\": \"\xff\xfe\"}").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
    }
}
