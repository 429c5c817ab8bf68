//! 8-bit KV caches (q8_0 and FP8) through the whole model: the logits of a prompt and of the
//! decode steps after it stay close to a bf16 KV's on random tiny models (dense GQA and
//! Llama 4 with its chunked-local and NoPE layers), and a head dim off the block is a clear
//! error.

use longctx_engine::random::{random_model, tiny_llama4_config, tiny_llama_config};
use longctx_engine::{KvOptions, Logits, Model};
use longctx_kernels::DType;

/// Logits of a 40-token prompt (every position) and then 3 one-token decode steps.
fn run(model: &Model, dtype: DType) -> Vec<f32> {
    let opts = KvOptions {
        dtype,
        ..KvOptions::default()
    };
    let store = model.kv_store(&opts).unwrap();
    let seq = store.create_seq();
    let prompt: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 251).collect();
    let mut all = model
        .forward(&prompt, 0, &store, seq, Logits::All, None, 0)
        .unwrap();
    for (i, t) in [5u32, 77, 140].into_iter().enumerate() {
        all.extend(
            model
                .forward(&[t], 40 + i, &store, seq, Logits::Last, None, 0)
                .unwrap(),
        );
    }
    all
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn q8_kv_logits_are_close_to_bf16_kv_logits() {
    close_to_bf16(DType::Q8_0, 2e-2);
}

/// E4M3 keeps 3 mantissa bits (a relative step of 1/8 to 1/16 per value, where q8 holds a
/// block's large values to 1/254): its logits stray further, and are bounded looser.
#[test]
fn fp8_kv_logits_are_close_to_bf16_kv_logits() {
    close_to_bf16(DType::F8E4M3, 3e-2);
}

fn close_to_bf16(dtype: DType, tol: f64) {
    let name8 = dtype.name();
    for (name, cfg) in [
        ("tiny llama, GQA 2, d 32", tiny_llama_config(2, 2, 1, false)),
        ("tiny llama, MHA, d 64", tiny_llama_config(2, 1, 1, true)),
        ("tiny llama4, d 64", tiny_llama4_config()),
    ] {
        let model = random_model(cfg, 3).unwrap();
        let b = run(&model, DType::BF16);
        let q = run(&model, dtype);
        let f = run(&model, DType::F32);
        assert_eq!(b.len(), q.len());
        let (eq, eb) = (rel(&q, &f), rel(&b, &f));
        eprintln!(
            "{name}: {name8} vs f32 {eq:.2e}, bf16 vs f32 {eb:.2e}, {name8} vs bf16 {:.2e}",
            rel(&q, &b)
        );
        assert!(
            rel(&q, &b) < tol,
            "{name}: {name8} vs bf16 {:.2e}",
            rel(&q, &b)
        );
        // Not identical: the 8-bit path did run.
        assert!(q != b && eq > 0.0, "{name}");
    }
}

#[test]
fn a_head_dim_off_the_block_is_a_clear_error() {
    // Hidden 64 over 4 heads: d = 16.
    let model = random_model(tiny_llama_config(1, 4, 2, false), 1).unwrap();
    for dtype in [DType::Q8_0, DType::F8E4M3] {
        let opts = KvOptions {
            dtype,
            ..KvOptions::default()
        };
        let e = model
            .kv_store(&opts)
            .err()
            .expect("d = 16 cannot be blocks of 32");
        assert!(e.to_string().contains("multiple of 32"), "{e}");
    }
}
