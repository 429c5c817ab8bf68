//! Models with random weights, for scale runs and benchmarks where the weights' values do not
//! matter (a real checkpoint of Llama 4 does not fit this machine): `tiny-llama4` has Llama 4's
//! architecture at a small width.

use crate::config::ModelConfig;
use crate::model::Model;
use crate::weights::{Tensor, Weights};
use crate::{Arch, Result};
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
    let mut map = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        map.insert(name, Tensor::new(shape, rnd(n, scale)));
    };
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let w = 1.0 / (h as f32).sqrt();
    put("model.embed_tokens.weight".into(), vec![cfg.vocab, h], 1.0);
    put("lm_head.weight".into(), vec![cfg.vocab, h], w);
    put("model.norm.weight".into(), vec![h], 1.0);
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 1.0);
        put(format!("{p}.post_attention_layernorm.weight"), vec![h], 1.0);
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![cfg.heads * hd, h],
            w,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.kv_heads * hd, h],
            w,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.kv_heads * hd, h],
            w,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, cfg.heads * hd],
            w,
        );
        let mlp = |put: &mut dyn FnMut(String, Vec<usize>, f32), p: &str, inter: usize| {
            put(format!("{p}.gate_proj.weight"), vec![inter, h], w);
            put(format!("{p}.up_proj.weight"), vec![inter, h], w);
            put(format!("{p}.down_proj.weight"), vec![h, inter], w);
        };
        match (&cfg.arch, cfg.is_moe_layer(l)) {
            (Arch::Llama4, true) => {
                let m = cfg.moe.as_ref().expect("MoE config");
                let f = format!("{p}.feed_forward");
                put(format!("{f}.router.weight"), vec![m.experts, h], w);
                put(
                    format!("{f}.experts.gate_up_proj"),
                    vec![m.experts, h, 2 * m.intermediate],
                    w,
                );
                put(
                    format!("{f}.experts.down_proj"),
                    vec![m.experts, m.intermediate, h],
                    w,
                );
                mlp(&mut put, &format!("{f}.shared_expert"), m.intermediate);
            }
            (Arch::Llama4, false) => mlp(&mut put, &format!("{p}.feed_forward"), cfg.intermediate),
            (Arch::Llama, _) => mlp(&mut put, &format!("{p}.mlp"), cfg.intermediate),
        }
    }
    map
}
