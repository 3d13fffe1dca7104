//! The probe bench uses: memory estimates (no GPU needed) and the measured ceilings (skipped,
//! saying so, where no GPU can be used; GPT2RS_REQUIRE_GPU=1 makes that a failure).

use gpt2rs::config::Gpt2Config;
use gpt2rs::quant::{DType, WeightFormat};
use gpt2rs_cuda::{probe, CudaEngine};

#[test]
fn memory_needed_counts_weights_caches_and_scratch() {
    let c = Gpt2Config::preset("gpt2").unwrap();
    let one = CudaEngine::memory_needed(&c, DType::F16, 1, 32).unwrap();
    // The matrices in f16 like the CPU's f16 format; the GPU keeps the same f32 vectors.
    let cpu_f16 = WeightFormat::new(DType::F16).model_bytes(&c);
    assert!(
        one.weights.abs_diff(cpu_f16) < cpu_f16 / 100,
        "{one:?} vs {cpu_f16}"
    );
    // Keys and values of 12 layers × 1024 positions × 768, in f16.
    assert_eq!(one.kv_cache, 2 * 12 * 1024 * 768 * 2);
    let many = CudaEngine::memory_needed(&c, DType::F16, 32, 32 * 512).unwrap();
    assert_eq!(many.kv_cache, 32 * one.kv_cache);
    assert!(many.scratch > 100 * one.scratch / 10, "{many:?} vs {one:?}");
    assert_eq!(many.total(), many.weights + many.kv_cache + many.scratch);
    let f32 = CudaEngine::memory_needed(&c, DType::F32, 1, 32).unwrap();
    assert_eq!(f32.kv_cache, 2 * one.kv_cache);
    // int8 / int4 keep their packed groups on the GPU, with an f16 KV cache; a long pass
    // adds room to dequantize the largest matrix (the LM head) for cuBLAS.
    for (dtype, share) in [(DType::Int8, 0.56), (DType::Int4, 0.31)] {
        let q = CudaEngine::memory_needed(&c, dtype, 1, 8).unwrap();
        let cpu = WeightFormat::new(dtype).model_bytes(&c);
        assert!(
            q.weights.abs_diff(cpu) < cpu / 100,
            "{dtype}: {q:?} vs {cpu}"
        );
        assert!(
            (q.weights as f64) < share * one.weights as f64,
            "{dtype}: {q:?}"
        );
        assert_eq!(q.kv_cache, one.kv_cache);
        let long = CudaEngine::memory_needed(&c, dtype, 1, 32).unwrap();
        assert_eq!(
            long.scratch,
            q.scratch + 50257 * 768 * 2,
            "{long:?} vs {q:?}"
        );
    }
}

#[test]
fn ceilings_are_measured_where_there_is_a_gpu() {
    let gpus = match probe::list() {
        Ok(g) if !g.is_empty() => g,
        other if std::env::var_os("GPT2RS_REQUIRE_GPU").is_none() => {
            eprintln!("skipped (no usable GPU): {other:?}");
            return;
        }
        other => panic!("no GPU: {other:?}"),
    };
    assert!(gpus[0].memory_total > 1 << 30, "{gpus:?}");
    let c = probe::measure(0).unwrap();
    eprintln!("{:?}: {c:?}", gpus[0].name);
    assert!(c.copy_gbs > 50.0, "{c:?}");
    // Tensor cores run f16 many times faster than plain f32 on every GPU this backend targets.
    assert!(c.f16_gemm_tflops > 2.0 * c.f32_gemm_tflops, "{c:?}");
    let gauge = probe::MemoryGauge::open(0).unwrap();
    assert!(gauge.free().unwrap() > 0);
}
