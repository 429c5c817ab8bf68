//! Chunked prefill through the driver equals one-pass prefill, for both architectures:
//! SmolLM2 (dense Llama, from its GGUF) and a tiny random Llama 4 (chunked attention of 16,
//! so chunks cross attention-chunk boundaries everywhere).

use longctx_chunked_prefill::{prefill, Chunking, PrefillOptions};
use longctx_engine::weights::Weights;
use longctx_engine::{fetch, load, KvOptions, Model, ModelConfig, Runner};
use std::path::Path;
use std::sync::atomic::AtomicBool;

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    (num / b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>()).sqrt()
}

fn check(model: &Model, tokens: &[u32], chunks: &[usize]) {
    let no = AtomicBool::new(false);
    let run = |c: usize| {
        let store = model.kv_store(&KvOptions::default()).unwrap();
        let opts = PrefillOptions {
            chunking: Chunking::Fixed(c),
            checkpoints: None,
        };
        prefill(&Runner::new(model), &store, tokens, &opts, &no, |_| {})
            .unwrap()
            .logits
    };
    let one = run(tokens.len());
    for &c in chunks {
        let e = rel(&run(c), &one);
        eprintln!("chunk {c}: rel error {e:e}");
        assert!(e < 1e-5, "chunk {c}: rel error {e:e}");
    }
}

#[test]
fn smollm2_chunked_equals_one_pass() {
    let path = fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let m = load(&path).unwrap();
    let text = include_str!("reference/ppl.txt");
    let ids = &m.tokenizer.encode(text).unwrap()[..300];
    check(&m.model, ids, &[1, 7, 64, 4096]);
}

#[test]
fn tiny_llama4_chunked_equals_one_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama4_tiny_a");
    let cfg = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json")).unwrap())
        .unwrap();
    let model = Model::new(cfg, Weights::from_safetensors_dir(&dir).unwrap()).unwrap();
    let ids: Vec<u32> = (0..2000u32).map(|i| 3 + (i * 7919) % 297).collect();
    check(&model, &ids, &[1, 7, 64, 4096]);
}
