//! Models with random weights, for scale runs and benchmarks where the weights' values do not
//! matter (a real checkpoint of Llama 4 does not fit this machine): `tiny-llama4` has Llama 4's
//! architecture at a small width.

use crate::arch::Role;
use crate::config::ModelConfig;
use crate::model::Model;
use crate::weights::{Tensor, Weights};
use crate::Result;
use std::collections::BTreeMap;

/// Dense Llama at hidden 64 (vocabulary 300, head dim 64 / heads), for tests of the pass.
pub fn tiny_llama_config(layers: usize, heads: usize, kv_heads: usize, tie: bool) -> ModelConfig {
    ModelConfig::from_hf_json(
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
            "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": 96, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096,
            "tie_word_embeddings": tie,
        })
        .to_string(),
    )
    .expect("a valid config")
}

/// Llama 4 text at hidden 128: 4 layers of which the last is a global NoPE layer, 2 query
/// heads of 64, 1 KV head, 4 experts (top-1) in every layer, chunked attention of 8192.
pub fn tiny_llama4_config() -> ModelConfig {
    tiny_llama4(false)
}

/// The same with every layer chunked-local (no global layer): its prefill cost is linear in
/// the length, which the scaling benchmark shows.
pub fn tiny_llama4_local_config() -> ModelConfig {
    tiny_llama4(true)
}

fn tiny_llama4(all_local: bool) -> ModelConfig {
    let mut json = serde_json::json!({
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "vocab_size": 1024,
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "intermediate_size": 256,
        "intermediate_size_mlp": 512,
        "num_local_experts": 4,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "attention_chunk_size": 8192,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "use_qk_norm": true,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
        "max_position_embeddings": 10485760,
        "tie_word_embeddings": false
    });
    if all_local {
        json["no_rope_layers"] = serde_json::json!([1, 1, 1, 1]);
    }
    ModelConfig::from_hf_json(&json.to_string()).expect("the built-in config is valid")
}

/// Random weights of the right names and shapes for `cfg`.
pub fn random_model(cfg: ModelConfig, seed: u64) -> Result<Model> {
    let map = random_tensors(&cfg, seed);
    Model::new(cfg, Weights::from_map(map))
}

/// The tensors of [`random_model`], by their Hugging Face names (for tests that alter one).
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> BTreeMap<String, Tensor> {
    let mut s = seed | 1;
    let mut rnd = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    };
    let w = 1.0 / (cfg.hidden as f32).sqrt();
    let mut map = BTreeMap::new();
    // Every tensor of the architecture's table in its Hugging Face layout (llama.cpp's
    // stacked experts are the GGUF form of the fused ones), in the table's order, and an LM
    // head even when tied (unread then; it keeps each seed's weights as they always were).
    for t in crate::arch::with_head(cfg, true) {
        let Some(name) = t.hf else { continue };
        let n = t.shape.iter().product();
        // Embeddings and norms of order one; products scaled by 1/sqrt(hidden).
        let scale = match t.role {
            Role::Embed | Role::AttnNorm | Role::FfnNorm | Role::FinalNorm => 1.0,
            _ => w,
        };
        map.insert(name, Tensor::new(t.shape, rnd(n, scale)));
    }
    map
}
