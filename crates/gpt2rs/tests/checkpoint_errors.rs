//! Loading checkpoints: round trips through the Hugging Face layout, and clear errors for
//! every kind of broken checkpoint (never a panic).

use gpt2rs::checkpoint::{write_hf_checkpoint, Checkpoint, StoredDtype};
use gpt2rs::config::Gpt2Config;
use gpt2rs::weights::ModelWeights;
use std::path::{Path, PathBuf};

fn tiny_config() -> Gpt2Config {
    let mut c = Gpt2Config::preset("gpt2").unwrap();
    c.n_layer = 2;
    c.n_embd = 40;
    c.n_head = 5;
    c.n_inner = 72;
    c.vocab_size = 101;
    c.n_positions = 33;
    c
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gpt2rs-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(dir: &Path) -> gpt2rs::Result<ModelWeights> {
    ModelWeights::from_checkpoint(&Checkpoint::open(dir)?)
}

#[test]
fn round_trips_in_every_stored_dtype_and_untied_head() {
    let mut cfg = tiny_config();
    for tied in [true, false] {
        cfg.tie_word_embeddings = tied;
        let w = ModelWeights::synthetic(&cfg, 3);
        for dtype in [StoredDtype::F32, StoredDtype::F16, StoredDtype::BF16] {
            let dir = temp_dir(&format!("rt-{tied}-{dtype:?}"));
            write_hf_checkpoint(&w, &dir, dtype).unwrap();
            let back = load(&dir).unwrap();
            assert_eq!(back.config, w.config);
            assert_eq!(back.lm_head.is_some(), !tied);
            let tol = match dtype {
                StoredDtype::F32 => 0.0,
                StoredDtype::F16 => 1e-3,
                StoredDtype::BF16 => 8e-3,
            };
            let close = |a: &[f32], b: &[f32]| {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
            };
            assert!(
                close(&back.wte.dequantize().data, &w.wte.dequantize().data),
                "{dtype:?} wte"
            );
            assert!(
                close(
                    &back.layers[1].qkv.w.dequantize().data,
                    &w.layers[1].qkv.w.dequantize().data
                ),
                "{dtype:?} qkv"
            );
            assert!(
                close(
                    &back.layers[0].mlp_out.w.dequantize().data,
                    &w.layers[0].mlp_out.w.dequantize().data
                ),
                "{dtype:?} mlp"
            );
            assert_eq!(Checkpoint::open(&dir).unwrap().stored_dtype(), Some(dtype));
        }
    }
}

fn expect_err(dir: &Path, needle: &str) {
    let err = match load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(needle),
        "error {err:?} should mention {needle:?}"
    );
}

fn edit_config(dir: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    assert!(text.contains(from), "{from} not in config");
    std::fs::write(dir.join("config.json"), text.replace(from, to)).unwrap();
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    let w = ModelWeights::synthetic(&tiny_config(), 1);
    let good = temp_dir("good");
    write_hf_checkpoint(&w, &good, StoredDtype::F32).unwrap();
    let copy = |name: &str| {
        let d = temp_dir(name);
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        d
    };

    expect_err(&good.join("nope"), "not found");

    let d = copy("no-config");
    std::fs::remove_file(d.join("config.json")).unwrap();
    expect_err(&d, "config.json");

    let d = copy("no-weights");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    expect_err(&d, "model.safetensors");

    let d = copy("pytorch-only");
    std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).unwrap();
    expect_err(&d, "safe_serialization");

    let d = copy("not-gpt2");
    std::fs::write(
        d.join("config.json"),
        r#"{"model_type": "bert", "hidden_size": 8}"#,
    )
    .unwrap();
    expect_err(&d, "bert");

    let d = copy("truncated");
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    expect_err(&d, "truncated");

    let d = copy("garbage");
    std::fs::write(
        d.join("model.safetensors"),
        b"this is not a safetensors file at all",
    )
    .unwrap();
    expect_err(&d, "not a valid safetensors");

    let d = copy("wrong-shape");
    edit_config(&d, "\"n_inner\": 72", "\"n_inner\": 80");
    expect_err(&d, "shape");

    let d = copy("missing-tensor");
    edit_config(&d, "\"n_layer\": 2", "\"n_layer\": 3");
    expect_err(&d, "h.2.");

    let d = copy("untied-without-head");
    edit_config(
        &d,
        "\"tie_word_embeddings\": true",
        "\"tie_word_embeddings\": false",
    );
    expect_err(&d, "lm_head.weight");

    let d = copy("bad-index");
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::write(
        d.join("model.safetensors.index.json"),
        r#"{"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}"#,
    )
    .unwrap();
    expect_err(&d, "shard");
}
