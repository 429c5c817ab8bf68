//! What a forward step allocates, counted by a global allocator. Activations live in the
//! model's workspace (made at the first step, kept), so a later step's allocations must not
//! grow with its layers by anything near their activations: what remains per layer is the
//! KV's new blocks and the kernels' own scratch (quantised activations, RoPE tables, the
//! attention's partial outputs).

use longctx_engine::random::random_model;
use longctx_engine::{KvOptions, Logits, Model, ModelConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

struct Counting;

static BYTES: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size() as u64, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size() as u64, Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        BYTES.fetch_add(new as u64, Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROWS: usize = 256;

/// Bytes allocated by a prefill step of `ROWS` tokens after one of the same size.
fn step_bytes(model: &Model, kv: longctx_kernels::DType) -> u64 {
    let store = model
        .kv_store(&KvOptions {
            dtype: kv,
            ..KvOptions::default()
        })
        .unwrap();
    let seq = store.create_seq();
    let prompt: Vec<u32> = (0..ROWS as u32).map(|i| (i * 7 + 1) % 1000).collect();
    model
        .forward(&prompt, 0, &store, seq, Logits::Last, None, 0)
        .unwrap();
    let b0 = BYTES.load(Relaxed);
    model
        .forward(&prompt, ROWS, &store, seq, Logits::Last, None, 0)
        .unwrap();
    BYTES.load(Relaxed) - b0
}

/// A Llama wide enough that a layer's activations dwarf its KV and the kernels' scratch:
/// hidden 512, 8 heads of 64, one KV head, intermediate 1024.
fn wide(layers: usize) -> ModelConfig {
    ModelConfig::from_hf_json(
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 512,
            "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 1,
            "intermediate_size": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": false,
        })
        .to_string(),
    )
    .unwrap()
}

#[test]
fn a_step_allocates_no_activations_per_layer() {
    // The f32 activations one layer of a 256-row step writes: normed x, q, attention, its
    // output, the MLP output (512 each), k and v (64 each), gate, up and their product
    // (1024 each). Before the workspace a layer allocated its gate, up and product (3 MiB
    // here) and the products' tile buffers; what a layer may still allocate is its KV
    // blocks (128 KiB), the attention's partial output (512 KiB) and RoPE tables.
    let act = (ROWS * (512 * 5 + 64 * 2 + 1024 * 3) * 4) as u64;
    for path in ["exact", "fast"] {
        for kv in [longctx_kernels::DType::F32, longctx_kernels::DType::BF16] {
            let mut m = [2, 6].map(|l| random_model(wide(l), 1).unwrap());
            for m in &mut m {
                match path {
                    "exact" => m.enable_f32_weights().unwrap(),
                    _ => m.enable_quant_decode().unwrap(),
                }
            }
            let per_layer = step_bytes(&m[1], kv).saturating_sub(step_bytes(&m[0], kv)) / 4;
            eprintln!("{path} path, KV {kv:?}: {per_layer} bytes a layer; activations {act}");
            assert!(
                per_layer < act / 4,
                "{path}, KV {kv:?}: {per_layer} bytes allocated a layer, activations {act}"
            );
        }
    }
}
