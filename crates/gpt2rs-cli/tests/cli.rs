//! The `gpt2rs` program end to end on the `full-vocab` fixture (GPT-2's vocabulary, random
//! weights made by transformers): outputs, options, and errors that say what to do.

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> String {
    fixtures().join("models/full-vocab").display().to_string()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gpt2rs"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], needle: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?} should fail cleanly: {err}"
    );
    assert!(
        err.contains(needle),
        "{args:?}: {err:?} should mention {needle:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("expected/full-vocab.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn greedy_text_matches_transformers_and_streams_the_prompt_first() {
    let m = model();
    for case in expected()["greedy"].as_array().unwrap() {
        let prompt = case["prompt_text"].as_str().unwrap();
        let out = ok(&["generate", "-m", &m, "-p", prompt, "-n", "20", "--json"]);
        let got = &json_lines(&out)[0];
        assert_eq!(got["tokens"], case["output"], "greedy from {prompt:?}");
        let plain = ok(&["generate", "-m", &m, "-p", prompt, "-n", "20"]);
        assert_eq!(
            plain,
            format!("{prompt}{}\n", got["text"].as_str().unwrap())
        );
    }
}

#[test]
fn batched_prompts_each_get_their_own_greedy_tokens() {
    let m = model();
    let cases = expected()["greedy"].as_array().unwrap().clone();
    let mut args = vec!["generate", "-m", &m, "-n", "20", "--json"];
    for c in &cases {
        args.extend(["-p", c["prompt_text"].as_str().unwrap()]);
    }
    let lines = json_lines(&ok(&args));
    assert_eq!(lines.len(), cases.len());
    for (line, case) in lines.iter().zip(&cases) {
        assert_eq!(line["tokens"], case["output"]);
    }
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    let m = model();
    let args = |seed: &'static str| {
        vec![
            "generate",
            "-m",
            m.as_str(),
            "-p",
            "Once upon a time",
            "-n",
            "24",
            "--temperature",
            "1.2",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--num-return-sequences",
            "3",
            "--seed",
            seed,
            "--json",
        ]
    };
    let a = json_lines(&ok(&args("7")));
    assert_eq!(a.len(), 3);
    assert_eq!(a, json_lines(&ok(&args("7"))));
    let b = json_lines(&ok(&args("8")));
    assert_ne!(a, b);
    // This fixture's distributions are peaked (one token takes most of the mass after a few
    // steps), so one seed's three samples may agree by chance; over three seeds they must not
    // all.
    let c = json_lines(&ok(&args("9")));
    assert!(
        [&a, &b, &c]
            .iter()
            .any(|s| s.iter().any(|x| x["tokens"] != s[0]["tokens"])),
        "the samples of a prompt should not always be equal"
    );
}

#[test]
fn stop_strings_cut_the_text() {
    let m = model();
    let full = &json_lines(&ok(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The capital of France is",
        "-n",
        "30",
        "--json",
    ]))[0];
    let text = full["text"].as_str().unwrap();
    // Stop at the second word-sized piece of the greedy text.
    let stop: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(3)
        .collect();
    let at = text.find(&stop).unwrap();
    let cut = &json_lines(&ok(&[
        "generate",
        "-m",
        &m,
        "-p",
        "The capital of France is",
        "-n",
        "30",
        "--stop",
        &stop,
        "--json",
    ]))[0];
    assert_eq!(cut["text"].as_str().unwrap(), &text[..at]);
    assert_eq!(cut["finish_reason"], "stop");
}

#[test]
fn long_prompts_fail_clearly_or_truncate() {
    let m = model();
    let long = "word ".repeat(300); // 300 tokens; the fixture's context is 256
    fails(
        &["generate", "-m", &m, "-p", &long, "-n", "3"],
        "--truncate",
    );
    let out = &json_lines(&ok(&[
        "generate",
        "-m",
        &m,
        "-p",
        &long,
        "-n",
        "3",
        "--truncate",
        "--json",
    ]))[0];
    // 256 prompt tokens leave no room: the context is full, so nothing more can be generated.
    assert!(out["tokens"].as_array().unwrap().len() <= 1);
}

#[test]
fn score_matches_transformers_perplexity() {
    let m = model();
    let text = fixtures().join("text/sample.txt").display().to_string();
    for case in expected()["perplexity"].as_array().unwrap() {
        let stride = case["stride"].to_string();
        let out: Value = serde_json::from_str(&ok(&[
            "score",
            "-m",
            &m,
            "--text-file",
            &text,
            "--stride",
            &stride,
            "--json",
        ]))
        .unwrap();
        let want = case["scored_mean_nll"].as_f64().unwrap();
        let got = out["mean_nll"].as_f64().unwrap();
        assert!(
            (got - want).abs() < 1e-4,
            "stride {stride}: {got} vs {want}"
        );
        assert_eq!(out["scored_tokens"], case["n_scored_tokens"]);
        assert_eq!(
            out["token_logprobs"].as_array().unwrap().len() as u64,
            case["n_scored_tokens"].as_u64().unwrap()
        );
    }
    let plain = ok(&["score", "-m", &m, "--text-file", &text]);
    assert!(plain.contains("perplexity:"), "{plain}");
}

#[test]
fn info_describes_checkpoints_and_synthetic_presets() {
    let out = ok(&["info", "-m", &model()]);
    assert!(out.contains("F16") && out.contains("2 layers"), "{out}");
    let out = ok(&["info", "--synthetic", "gpt2-xl", "--batch", "4"]);
    assert!(out.contains("1557.6M") && out.contains("25 heads"), "{out}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let m = model();
    fails(&["generate", "-m", "./no/such/dir", "-p", "x"], "not found");
    fails(
        &["generate", "-m", "not-a-model", "-p", "x"],
        "unknown model",
    );
    fails(
        &["generate", "-m", &m, "-p", "x", "--top-p", "1.5"],
        "top_p",
    );
    fails(
        &["generate", "-m", &m, "-p", "x", "--temperature", "0"],
        "temperature",
    );
    fails(
        &[
            "generate",
            "-m",
            &m,
            "-p",
            "x",
            "--num-return-sequences",
            "2",
        ],
        "sampling",
    );
    fails(
        &["score", "-m", &m, "--text-file", "/no/such/file"],
        "cannot read",
    );
    fails(
        &[
            "score",
            "-m",
            &m,
            "--text-file",
            &fixtures().join("text/sample.txt").display().to_string(),
            "--stride",
            "0",
        ],
        "stride",
    );
    fails(
        &["info", "--synthetic", "gpt2", "--context", "5000"],
        "--context",
    );
}

#[test]
fn synthetic_weights_are_labelled() {
    let out = run(&[
        "generate",
        "--synthetic",
        "distilgpt2",
        "-p",
        "Hi",
        "-n",
        "2",
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SYNTHETIC"));
}

#[test]
fn bench_measures_each_row_and_lists_what_it_skipped() {
    let out = ok(&[
        "bench",
        "--device",
        "cpu",
        "--models",
        &model(),
        "--dtypes",
        "f32,int8",
        "--prompt-len",
        "5,2000",
        "--new-tokens",
        "3",
        "--reps",
        "2",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert!(report["hardware"]["mem_read_gbs"].as_f64().unwrap() > 0.0);
    assert!(report["header"]["command"]
        .as_str()
        .unwrap()
        .contains("bench"));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    let measured: Vec<&Value> = rows.iter().filter(|r| r["skipped"].is_null()).collect();
    assert_eq!(
        measured.len(),
        2,
        "the 5-token prompt runs in both precisions"
    );
    for (row, dtype) in measured.iter().zip(["f32", "int8"]) {
        assert_eq!(row["dtype"], dtype);
        assert_eq!(row["synthetic"], false);
        assert_eq!(row["decode_tok_s"]["n"], 2);
        assert!(row["decode_tok_s"]["median"].as_f64().unwrap() > 0.0);
        assert!(row["prefill_tok_s"]["median"].as_f64().unwrap() > 0.0);
        assert!(row["decode_roofline"].as_f64().unwrap() > 0.0);
    }
    assert!(measured[1]["weight_bytes"].as_u64() < measured[0]["weight_bytes"].as_u64());
    let reasons: Vec<&str> = rows.iter().filter_map(|r| r["skipped"].as_str()).collect();
    assert_eq!(reasons.len(), 2);
    assert!(reasons.iter().all(|r| r.contains("context")));

    let csv = ok(&[
        "bench",
        "--device",
        "cpu",
        "--models",
        &model(),
        "--prompt-len",
        "4",
        "--new-tokens",
        "2",
        "--reps",
        "1",
        "--dtypes",
        "int4",
        "--csv",
    ]);
    assert_eq!(csv.lines().count(), 2, "header and one row: {csv}");
    fails(&["bench", "--dtypes", "f8"], "unknown weight precision");
    fails(&["bench", "--models", "no-such-owner/no-such-model"], "");
    fails(&["bench", "--device", "tpu"], "cpu, cuda, cuda:N or all");
}

#[test]
fn bench_takes_a_prompt_that_fills_the_context_for_one_new_token() {
    // The fixture's context is 256: a 256-token prompt has room for its first token (never
    // fed back), not for a second.
    let bench = |new: &str| -> Vec<Value> {
        let out = ok(&[
            "bench",
            "--device",
            "cpu",
            "--models",
            &model(),
            "--dtypes",
            "f32",
            "--prompt-len",
            "256",
            "--new-tokens",
            new,
            "--reps",
            "1",
            "--json",
        ]);
        let report: Value = serde_json::from_str(&out).unwrap();
        report["rows"].as_array().unwrap().clone()
    };
    let one = bench("1");
    assert!(one[0]["skipped"].is_null(), "{one:?}");
    assert!(one[0]["ttft_ms"]["median"].as_f64().unwrap() > 0.0);
    assert!(
        one[0]["decode_tok_s"].is_null(),
        "no step was decoded: {one:?}"
    );
    let two = bench("2");
    let reason = two[0]["skipped"].as_str().unwrap();
    assert!(reason.contains("257 positions") && reason.contains("context of 256"));
}

/// The GPU path of bench: f16 and int8 measured with their GPU memory and GPU ceilings.
/// Without a usable GPU (or without the feature) it says so and checks the error.
#[test]
fn bench_on_the_gpu_or_says_why_not() {
    let args = [
        "bench",
        "--device",
        "cuda",
        "--models",
        &model(),
        "--dtypes",
        "f16,int8",
        "--prompt-len",
        "5",
        "--new-tokens",
        "3",
        "--reps",
        "2",
        "--json",
    ];
    if !cfg!(feature = "cuda") {
        eprintln!("skipped (built without the cuda feature): checking the error instead");
        return fails(&args, "--features cuda");
    }
    let out = run(&args);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("GPU"), "{err}");
        assert!(std::env::var_os("GPT2RS_REQUIRE_GPU").is_none(), "{err}");
        eprintln!("skipped (no usable GPU): {err}");
        return;
    }
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gpu = &report["hardware"]["gpus"][0];
    assert!(gpu["ceilings"]["copy_gbs"].as_f64().unwrap() > 0.0, "{gpu}");
    assert!(gpu["ceilings"]["f16_gemm_tflops"].as_f64().unwrap() > 0.0);
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in rows {
        assert_eq!(row["backend"], "cuda:0");
        assert!(row["skipped"].is_null(), "{row}");
        assert!(row["decode_tok_s"]["median"].as_f64().unwrap() > 0.0);
        assert!(row["decode_roofline"].as_f64().unwrap() > 0.0);
        assert!(row["gpu_memory_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn quantized_checkpoints_load_in_place_and_say_what_they_are() {
    let m = model();
    let out = std::env::temp_dir().join(format!("gpt2rs-cli-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let dir = out.display().to_string();
    fails(&["quantize", "-m", &m, "--out", &dir], "--dtype");
    ok(&["quantize", "-m", &m, "--dtype", "int8", "--out", &dir]);
    fails(
        &["quantize", "-m", &m, "--dtype", "int8", "--out", &dir],
        "--force",
    );
    assert!(ok(&["info", "-m", &dir]).contains("gpt2rs int8"));

    // The saved checkpoint gives exactly what converting at load gives.
    let greedy = |args: &[&str]| -> Value {
        let mut a = vec!["generate", "-p", "Hello there", "-n", "12", "--json"];
        a.extend_from_slice(args);
        json_lines(&ok(&a))[0]["tokens"].clone()
    };
    assert_eq!(
        greedy(&["-m", &dir]),
        greedy(&["-m", &m, "--dtype", "int8"])
    );
    fails(
        &["generate", "-m", &dir, "--dtype", "int4"],
        "cannot be converted",
    );
    fails(&["generate", "-m", &m, "--f32-lm-head"], "--dtype");

    // Quality against f32 on the same windows.
    let text = fixtures().join("text/sample.txt").display().to_string();
    let score = |dtype: &str| -> Value {
        let a = ["score", "-m", &m, "--text-file", &text, "--dtype", dtype];
        let out = ok(&[&a[..], &["--against", "f32", "--json"]].concat());
        serde_json::from_str(&out).unwrap()
    };
    let (f16, int4) = (score("f16"), score("int4"));
    let div = |v: &Value, k: &str| v["against"]["divergence"][k].as_f64().unwrap();
    assert!(div(&f16, "mean_kl") < div(&int4, "mean_kl"), "{f16} {int4}");
    assert!(div(&f16, "top1_agreement") > 0.95, "{f16}");
    assert_eq!(f16["weights"], "f16");
    std::fs::remove_dir_all(&out).unwrap();
}
