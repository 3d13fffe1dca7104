//! The CPU engine against outputs that Hugging Face transformers produced (f32, eager) on the
//! small random checkpoints in tests/fixtures (made by scripts/make_fixtures.py): logits, greedy
//! continuations alone and in mixed-length batches, sliding-window perplexity, and tokenizer ids.

use gpt2rs::checkpoint::Checkpoint;
use gpt2rs::cpu::CpuEngine;
use gpt2rs::engine::{BatchEntry, Engine, LogitsFor};
use gpt2rs::generate::{generate, GenerationConfig};
use gpt2rs::quant::{DType, WeightFormat};
use gpt2rs::score::kl_divergence;
use gpt2rs::tokenizer::Tokenizer;
use gpt2rs::weights::ModelWeights;
use serde_json::Value;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("expected"))
        .expect("tests/fixtures/expected exists (run scripts/make_fixtures.py)")
        .filter_map(|e| {
            let p = e.ok()?.path();
            (p.extension()? == "json").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 8,
        "expected the fixture models, found {names:?}"
    );
    names
}

struct Fixture {
    name: String,
    engine: CpuEngine,
    expected: Value,
    tensors: Vec<u8>,
}

fn fixture(name: &str) -> Fixture {
    fixture_in(name, WeightFormat::F32)
}

fn fixture_in(name: &str, format: WeightFormat) -> Fixture {
    let dir = fixtures().join("models").join(name);
    let ckpt = Checkpoint::open(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let weights =
        ModelWeights::from_checkpoint_as(&ckpt, format).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected").join(format!("{name}.json"))).unwrap(),
    )
    .unwrap();
    let tensors = std::fs::read(
        fixtures()
            .join("expected")
            .join(format!("{name}.safetensors")),
    )
    .unwrap();
    Fixture {
        name: name.to_string(),
        engine: CpuEngine::new(weights),
        expected,
        tensors,
    }
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an id list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn tokenizer_for(f: &Fixture) -> Tokenizer {
    Tokenizer::for_checkpoint(&fixtures().join("models").join(&f.name)).unwrap()
}

fn prompt_ids(f: &Fixture, case: &Value) -> Vec<u32> {
    if let Some(ids_v) = case.get("ids") {
        return ids(ids_v);
    }
    let text = case["text"].as_str().expect("ids or text");
    tokenizer_for(f).encode(text).unwrap()
}

/// Runs every recorded logits case of every fixture in `format`; returns the worst logit
/// error relative to its row's largest logit, the mean KL divergence from transformers'
/// distribution, and the fraction of positions with the same top token.
fn logits_against_transformers(format: WeightFormat) -> (f64, f64, f64) {
    let (mut worst, mut kl, mut agree, mut n) = (0f64, 0f64, 0usize, 0usize);
    for name in model_names() {
        let mut f = fixture_in(&name, format);
        let st = safetensors::SafeTensors::deserialize(&f.tensors).unwrap();
        for case in f.expected["logits_cases"].as_array().unwrap().clone() {
            let tokens = prompt_ids(&f, &case);
            let view = st.tensor(case["tensor"].as_str().unwrap()).unwrap();
            let want: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            let positions: Vec<usize> = match case.get("positions") {
                Some(p) => ids(p).into_iter().map(|x| x as usize).collect(),
                None => (0..tokens.len()).collect(),
            };
            let seq = f.engine.add_sequence();
            let logits = f
                .engine
                .forward(&[BatchEntry {
                    seq,
                    tokens: &tokens,
                    logits: LogitsFor::All,
                }])
                .unwrap();
            f.engine.remove_sequence(seq);
            let rows: Vec<&[f32]> = logits.entry(0).collect();
            let vocab = logits.vocab;
            assert_eq!(
                want.len(),
                positions.len() * vocab,
                "{name}: reference shape"
            );
            for (k, &pos) in positions.iter().enumerate() {
                let (got, exp) = (rows[pos], &want[k * vocab..(k + 1) * vocab]);
                let scale = exp.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                let diff = got
                    .iter()
                    .zip(exp)
                    .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
                worst = worst.max(diff / scale);
                kl += kl_divergence(exp, got);
                let top = |r: &[f32]| {
                    r.iter()
                        .enumerate()
                        .fold(0, |b, (i, x)| if *x > r[b] { i } else { b })
                };
                agree += usize::from(top(got) == top(exp));
                n += 1;
            }
        }
    }
    (worst, kl / n as f64, agree as f64 / n as f64)
}

#[test]
fn logits_match_transformers_within_1e4_relative() {
    let (worst, _, _) = logits_against_transformers(WeightFormat::F32);
    eprintln!("worst logit error relative to the row's largest logit: {worst:.2e}");
    assert!(worst < 1e-4, "worst relative logit error {worst:.3e}");
}

/// Every smaller precision against the same f32 outputs of transformers, held to bounds that
/// fit its format (about 3x what it measures; the fixtures' weights are scaled up so their
/// distributions are sharp, which makes these errors larger than on trained models).
#[test]
fn every_precision_stays_within_its_bound_of_transformers() {
    for (dtype, max_rel, max_kl, min_top1) in [
        (DType::F16, 1e-2, 3e-5, 0.99),
        (DType::Bf16, 0.3, 2e-3, 0.95),
        (DType::Int8, 0.6, 2e-2, 0.9),
        (DType::Int4, 2.0, 2.0, 0.4),
    ] {
        let (worst, kl, top1) = logits_against_transformers(WeightFormat::new(dtype));
        eprintln!(
            "{dtype}: worst relative logit error {worst:.2e}, mean KL {kl:.2e}, top-1 {top1:.3}"
        );
        assert!(
            worst < max_rel && kl < max_kl && top1 >= min_top1,
            "{dtype}: worst {worst:.3e} (bound {max_rel:.0e}), KL {kl:.3e} (bound {max_kl:.0e}), top-1 {top1:.3} (bound {min_top1})"
        );
    }
}

fn greedy_config(max_new_tokens: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens,
        ..GenerationConfig::default()
    }
}

#[test]
fn greedy_continuations_match_alone_and_in_mixed_length_batches() {
    for name in model_names() {
        let mut f = fixture(&name);
        let tok = tokenizer_for(&f);
        let cases = f.expected["greedy"].as_array().unwrap().clone();
        let mut prompts = Vec::new();
        let mut wants = Vec::new();
        for case in &cases {
            let prompt = ids(&case["prompt"]);
            let want = ids(&case["output"]);
            let n = case["max_new_tokens"].as_u64().unwrap() as usize;
            let (out, _) = generate(
                &mut f.engine,
                &tok,
                std::slice::from_ref(&prompt),
                &greedy_config(n),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(out[0].tokens, want, "{name}: greedy from {prompt:?}");
            prompts.push(prompt);
            wants.push(want);
        }
        // A continuation that ends with the end-of-text token stops there, as in transformers.
        if let Some(case) = f.expected.get("greedy_eos") {
            let n = case["max_new_tokens"].as_u64().unwrap() as usize;
            let (out, _) = generate(
                &mut f.engine,
                &tok,
                &[ids(&case["prompt"])],
                &greedy_config(n),
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(
                out[0].tokens,
                ids(&case["output"]),
                "{name}: greedy stopping at eos"
            );
            assert_eq!(out[0].finish_reason, gpt2rs::generate::FinishReason::Eos);
        }
        // All prompts together: each must get exactly the tokens it gets alone.
        let batch = &f.expected["batched_greedy"];
        let n = batch["max_new_tokens"].as_u64().unwrap() as usize;
        let batch_prompts: Vec<Vec<u32>> = batch["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(ids)
            .collect();
        assert_eq!(
            batch_prompts, prompts,
            "{name}: batched prompts are the greedy prompts"
        );
        let (out, _) = generate(
            &mut f.engine,
            &tok,
            &batch_prompts,
            &greedy_config(n),
            &mut |_| {},
        )
        .unwrap();
        for (i, c) in out.iter().enumerate() {
            assert_eq!(c.prompt_index, i);
            assert_eq!(
                c.tokens, wants[i],
                "{name}: prompt {i} in a mixed-length batch"
            );
        }
    }
}

#[test]
fn sliding_window_perplexity_matches_transformers() {
    for name in model_names() {
        let mut f = fixture(&name);
        for case in f.expected["perplexity"].as_array().unwrap().clone() {
            let tokens = match case.get("text_file") {
                Some(file) => {
                    let text =
                        std::fs::read_to_string(fixtures().join(file.as_str().unwrap())).unwrap();
                    tokenizer_for(&f).encode(&text).unwrap()
                }
                None => ids(&case["ids"]),
            };
            let max_length = case["max_length"].as_u64().unwrap() as usize;
            let stride = case["stride"].as_u64().unwrap() as usize;
            let r = gpt2rs::score::score(&mut f.engine, &tokens, Some(max_length), Some(stride))
                .unwrap();
            // Every token scored once (transformers' per-token losses, averaged exactly)…
            let n_scored = case["n_scored_tokens"].as_u64().unwrap();
            assert_eq!(r.scored_tokens as u64, n_scored, "{name} stride {stride}");
            let want = case["scored_mean_nll"].as_f64().unwrap();
            assert!(
                (r.mean_nll - want).abs() < 1e-5 * want.abs().max(1.0),
                "{name} stride {stride}: mean NLL {} vs transformers {want}",
                r.mean_nll
            );
            // …and the number the guide's own code prints.
            let guide = case["ppl"].as_f64().unwrap();
            assert!(
                (r.guide_perplexity - guide).abs() < 1e-4 * guide,
                "{name} stride {stride}: guide perplexity {} vs {guide}",
                r.guide_perplexity
            );
            if let Some(lps) = case.get("token_logprobs") {
                let lps: Vec<f64> = lps
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(lps.len(), r.token_logprobs.len());
                for (got, want) in r.token_logprobs.iter().zip(&lps) {
                    assert!(
                        (got.logprob - want).abs() < 1e-4,
                        "{name} token {}: {} vs {want}",
                        got.position,
                        got.logprob
                    );
                }
            }
        }
    }
}

#[test]
fn tokenizer_matches_gpt2_tokenizer_fast() {
    let cases: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let tok = Tokenizer::gpt2();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode(text).unwrap(), want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&want),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
}
