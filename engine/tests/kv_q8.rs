//! A q8_0 KV cache through the whole model: the logits of a prompt and of the decode steps
//! after it stay close to a bf16 KV's on random tiny models (dense GQA and Llama 4 with its
//! chunked-local and NoPE layers), and a head dim off the q8 block is a clear error.

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
    for (name, cfg) in [
        ("tiny llama, GQA 2, d 32", tiny_llama_config(2, 2, 1, false)),
        ("tiny llama, MHA, d 64", tiny_llama_config(2, 1, 1, true)),
        ("tiny llama4, d 64", tiny_llama4_config()),
    ] {
        let model = random_model(cfg, 3).unwrap();
        let b = run(&model, DType::BF16);
        let q = run(&model, DType::Q8_0);
        let f = run(&model, DType::F32);
        assert_eq!(b.len(), q.len());
        let (eq, eb) = (rel(&q, &f), rel(&b, &f));
        eprintln!(
            "{name}: q8 vs f32 {eq:.2e}, bf16 vs f32 {eb:.2e}, q8 vs bf16 {:.2e}",
            rel(&q, &b)
        );
        assert!(rel(&q, &b) < 2e-2, "{name}: q8 vs bf16 {:.2e}", rel(&q, &b));
        // Not identical: the q8 path did run.
        assert!(q != b && eq > 0.0, "{name}");
    }
}

#[test]
fn a_head_dim_off_the_q8_block_is_a_clear_error() {
    // Hidden 64 over 4 heads: d = 16.
    let model = random_model(tiny_llama_config(1, 4, 2, false), 1).unwrap();
    let opts = KvOptions {
        dtype: DType::Q8_0,
        ..KvOptions::default()
    };
    let e = model.kv_store(&opts).err().expect("d = 16 cannot be q8_0");
    assert!(e.to_string().contains("multiple of 32"), "{e}");
}
