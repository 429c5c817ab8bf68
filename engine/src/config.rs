//! One typed, validated model config, from a Hugging Face `config.json` (LlamaForCausalLM,
//! Llama4ForCausalLM / Llama4TextConfig, Llama4ForConditionalGeneration's `text_config`) or
//! from GGUF metadata (llama architecture).

use crate::gguf::{Gguf, Metadata};
use crate::{EngineError, Result};
use longctx_rope::{Layout, Rope, Scaling};
use serde_json::{Map, Value};

/// The architectures this build runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Dense Llama (Llama 2/3, SmolLM2): rotate-half RoPE in every layer.
    Llama,
    /// Llama 4 text: MoE, NoPE layers, chunked attention, QK-norm, attention temperature.
    Llama4,
}

/// Llama 4's mixture of experts.
#[derive(Clone, Debug, PartialEq)]
pub struct Moe {
    pub experts: usize,
    pub top_k: usize,
    /// Intermediate size of each expert and of the shared expert.
    pub intermediate: usize,
    /// MoE layers are `step-1, 2*step-1, ...` (or as `moe_layers` lists); the rest are dense.
    pub interleave_step: usize,
    /// `true` for each MoE layer.
    pub layers: Vec<bool>,
}

/// Llama 4's attention extras.
#[derive(Clone, Debug, PartialEq)]
pub struct Llama4Attn {
    /// `true` where the layer uses RoPE (and chunked attention); `false` for NoPE layers.
    pub rope_layers: Vec<bool>,
    pub chunk: usize,
    pub qk_norm: bool,
    pub temperature_tuning: bool,
    pub floor_scale: f64,
    pub attn_scale: f64,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab: usize,
    pub hidden: usize,
    /// Intermediate size of the dense feed-forward layers.
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f32,
    pub rope: Rope,
    pub rope_layout: Layout,
    pub tie_embeddings: bool,
    /// The context length the model was trained for.
    pub max_position: usize,
    pub moe: Option<Moe>,
    pub llama4: Option<Llama4Attn>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

fn get<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    m.get(k).filter(|v| !v.is_null())
}

fn usize_field(m: &Map<String, Value>, k: &str) -> Result<usize> {
    get(m, k)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| EngineError::Config(format!("missing or non-integer `{k}`")))
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64().map(|x| x as u32))
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// From the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<ModelConfig> {
        let top: Value = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("config.json is not JSON: {e}")))?;
        let top = top
            .as_object()
            .ok_or_else(|| EngineError::Config("config.json is not an object".into()))?;
        let archs: Vec<&str> = get(top, "architectures")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let model_type = get(top, "model_type").and_then(Value::as_str).unwrap_or("");
        let (cfg, arch) = if let Some(t) = get(top, "text_config").and_then(Value::as_object) {
            (t, Arch::Llama4)
        } else if model_type == "llama4_text"
            || model_type == "llama4"
            || archs.iter().any(|a| a.starts_with("Llama4"))
        {
            (top, Arch::Llama4)
        } else if model_type == "llama" || archs.contains(&"LlamaForCausalLM") {
            (top, Arch::Llama)
        } else {
            return Err(EngineError::Unsupported(format!(
                "architecture {archs:?} (model_type {model_type:?}): this build runs \
                 LlamaForCausalLM, Llama4ForCausalLM and Llama4ForConditionalGeneration"
            )));
        };
        let hidden = usize_field(cfg, "hidden_size")?;
        let heads = usize_field(cfg, "num_attention_heads")?;
        let kv_heads = get(cfg, "num_key_value_heads")
            .and_then(Value::as_u64)
            .map_or(heads, |v| v as usize);
        let head_dim = get(cfg, "head_dim")
            .and_then(Value::as_u64)
            .map_or(hidden / heads.max(1), |v| v as usize);
        // Checked before anything per layer is built from it (1e12 layers once aborted).
        let layers = check_layers(usize_field(cfg, "num_hidden_layers")?)?;
        let rope = longctx_rope::from_config_json(&Value::Object(cfg.clone()).to_string())?;
        let eps = get(cfg, "rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-5) as f32;
        let (moe, llama4, intermediate, layout) = match arch {
            Arch::Llama => (
                None,
                None,
                usize_field(cfg, "intermediate_size")?,
                Layout::RotateHalf,
            ),
            Arch::Llama4 => {
                let interval = get(cfg, "no_rope_layer_interval")
                    .and_then(Value::as_u64)
                    .unwrap_or(4) as usize;
                let rope_layers = match get(cfg, "no_rope_layers").and_then(Value::as_array) {
                    Some(a) if !a.is_empty() => {
                        a.iter().map(|x| x.as_u64().unwrap_or(1) != 0).collect()
                    }
                    _ => (0..layers)
                        .map(|i| (i + 1) % interval.max(1) != 0)
                        .collect(),
                };
                let f = |k: &str, d: f64| get(cfg, k).and_then(Value::as_f64).unwrap_or(d);
                let temperature_tuning = match get(cfg, "attn_temperature_tuning") {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Number(n)) => n.as_f64() != Some(0.0),
                    _ => true,
                };
                let l4 = Llama4Attn {
                    rope_layers,
                    chunk: get(cfg, "attention_chunk_size")
                        .and_then(Value::as_u64)
                        .unwrap_or(8192) as usize,
                    qk_norm: get(cfg, "use_qk_norm")
                        .and_then(Value::as_bool)
                        .unwrap_or(true),
                    temperature_tuning,
                    floor_scale: f("floor_scale", 8192.0),
                    attn_scale: f("attn_scale", 0.1),
                };
                let step = get(cfg, "interleave_moe_layer_step")
                    .and_then(Value::as_u64)
                    .unwrap_or(1)
                    .max(1) as usize;
                let moe_layers = match get(cfg, "moe_layers").and_then(Value::as_array) {
                    Some(a) => {
                        let listed: Vec<u64> = a.iter().filter_map(Value::as_u64).collect();
                        (0..layers).map(|l| listed.contains(&(l as u64))).collect()
                    }
                    None => (0..layers).map(|l| (l + 1) % step == 0).collect(),
                };
                let moe = Moe {
                    layers: moe_layers,
                    experts: usize_field(cfg, "num_local_experts")?,
                    top_k: get(cfg, "num_experts_per_tok")
                        .and_then(Value::as_u64)
                        .unwrap_or(1) as usize,
                    intermediate: usize_field(cfg, "intermediate_size")?,
                    interleave_step: step,
                };
                let dense = get(cfg, "intermediate_size_mlp")
                    .and_then(Value::as_u64)
                    .map_or(moe.intermediate, |v| v as usize);
                (Some(moe), Some(l4), dense, Layout::Interleaved)
            }
        };
        let c = ModelConfig {
            arch,
            vocab: usize_field(cfg, "vocab_size")?,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: eps,
            rope,
            rope_layout: layout,
            tie_embeddings: get(cfg, "tie_word_embeddings")
                .or_else(|| get(top, "tie_word_embeddings"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position: get(cfg, "max_position_embeddings")
                .and_then(Value::as_u64)
                .unwrap_or(8192) as usize,
            moe,
            llama4,
            bos: ids(get(cfg, "bos_token_id")).first().copied(),
            eos: ids(get(cfg, "eos_token_id")),
        };
        c.validate()?;
        Ok(c)
    }

    /// From GGUF metadata (architectures `llama` and `llama4`; llama.cpp stores a Llama's Q
    /// and K permuted for its interleaved-pair RoPE, and Llama 4's are interleaved already,
    /// so that is the layout these weights use), and the `rope_freqs` tensor, which
    /// `convert_hf_to_gguf.py` writes instead of llama3 scaling's parameters.
    pub fn from_gguf(g: &Gguf) -> Result<ModelConfig> {
        let mut c = Self::from_gguf_metadata(&g.metadata, g.tensors.contains_key("output.weight"))?;
        if g.tensors.contains_key("rope_freqs.weight") {
            let f: Vec<f64> = g
                .tensor_f32("rope_freqs.weight")?
                .into_iter()
                .map(f64::from)
                .collect();
            let rotary = c.rope.rotary_dim;
            c.rope = Rope::new(c.rope.theta, c.head_dim, Scaling::Factors(f))
                .and_then(|r| r.with_rotary_dim(rotary))
                .map_err(|e| EngineError::Config(format!("rope_freqs.weight: {e}")))?;
        }
        Ok(c)
    }

    /// From GGUF metadata alone; `has_output` says whether the file has its own `output.weight`
    /// (else the embeddings are tied).
    pub fn from_gguf_metadata(g: &Metadata, has_output: bool) -> Result<ModelConfig> {
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if arch != "llama" && arch != "llama4" {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {arch:?}: this build reads llama and llama4 GGUF files"
            )));
        }
        let u = |k: &str| -> Result<usize> {
            g.get(&format!("{arch}.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| EngineError::Config(format!("GGUF lacks {arch}.{k}")))
        };
        let f = |k: &str| g.get(&format!("{arch}.{k}")).and_then(|v| v.as_f64());
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads = u("attention.head_count_kv").unwrap_or(heads);
        let head_dim = u("attention.key_length").unwrap_or(hidden / heads.max(1));
        let theta = f("rope.freq_base").unwrap_or(10000.0);
        let scaling = match g
            .get(&format!("{arch}.rope.scaling.type"))
            .and_then(|v| v.as_str())
        {
            None | Some("none") => Scaling::Default,
            Some("linear") => Scaling::Linear {
                factor: f("rope.scaling.factor").unwrap_or(1.0),
            },
            Some(t) => {
                return Err(EngineError::Unsupported(format!(
                    "GGUF RoPE scaling {t:?} (give it with --rope-scaling instead)"
                )))
            }
        };
        let mut rope = Rope::new(theta, head_dim, scaling)?;
        if let Ok(r) = u("rope.dimension_count") {
            // Checked: a rotary dim of 0 once reached the table builder and panicked.
            rope = rope.with_rotary_dim(r)?;
        }
        let vocab = match u("vocab_size") {
            Ok(v) => v,
            Err(_) => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| EngineError::Config("GGUF gives no vocabulary size".into()))?,
        };
        let tok = |k: &str| {
            g.get(&format!("tokenizer.ggml.{k}"))
                .and_then(|v| v.as_u64())
                .map(|v| v as u32)
        };
        let layers = u("block_count")?;
        check_layers(layers)?;
        let (arch, moe, llama4) = if arch == "llama4" {
            // What llama.cpp's loader assumes (src/models/llama4.cpp), since the converter
            // writes none of it: chunks of 8192 on three layers in four, the fourth NoPE with
            // temperature tuning (floor 8192, scale 0.1); no chunking and RoPE everywhere when
            // the sliding window is 0 (MobileLLM); QK-norm except with 128 experts (Maverick).
            let chunked = u("attention.sliding_window").ok() != Some(0);
            let experts = u("expert_count")?;
            let step = u("interleave_moe_layer_step").unwrap_or(1).max(1);
            let moe = Moe {
                experts,
                top_k: u("expert_used_count").unwrap_or(1),
                intermediate: u("expert_feed_forward_length")?,
                interleave_step: step,
                layers: (0..layers).map(|l| (l + 1) % step == 0).collect(),
            };
            let l4 = Llama4Attn {
                rope_layers: (0..layers).map(|l| !chunked || (l + 1) % 4 != 0).collect(),
                // A chunk longer than any sequence: plain causal attention.
                chunk: if chunked { 8192 } else { 1 << 40 },
                qk_norm: experts != 128,
                temperature_tuning: chunked,
                floor_scale: 8192.0,
                attn_scale: 0.1,
            };
            (Arch::Llama4, Some(moe), Some(l4))
        } else {
            (Arch::Llama, None, None)
        };
        let c = ModelConfig {
            arch,
            vocab,
            hidden,
            intermediate: u("feed_forward_length")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            rms_eps: f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope,
            rope_layout: Layout::Interleaved,
            tie_embeddings: !has_output,
            max_position: u("context_length").unwrap_or(4096),
            moe,
            llama4,
            bos: tok("bos_token_id"),
            eos: tok("eos_token_id").into_iter().collect(),
        };
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(EngineError::Config(m));
        if self.hidden == 0 || self.heads == 0 || self.kv_heads == 0 || self.layers == 0 {
            return bad("hidden size, heads, KV heads and layers must be non-zero".into());
        }
        check_layers(self.layers)?;
        // Sizes a header could make absurd, bounded well above any real model (Llama 4
        // Behemoth: hidden 16,384; Maverick: 128 experts) before anything is allocated.
        for (what, v, max) in [
            ("hidden size", self.hidden, 1 << 17),
            ("intermediate size", self.intermediate, 1 << 20),
            ("attention heads", self.heads, 1 << 12),
            ("max_position_embeddings", self.max_position, 1 << 30),
        ] {
            if v > max {
                return bad(format!(
                    "{what} {v} is beyond any real model (at most {max})"
                ));
            }
        }
        // NaN, infinite or non-positive epsilons once ran and answered garbage.
        if !(self.rms_eps.is_finite() && self.rms_eps > 0.0 && self.rms_eps < 1.0) {
            return bad(format!(
                "rms_norm_eps {} must be a finite number in (0, 1)",
                self.rms_eps
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} query heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(8) || self.head_dim > 256 {
            return bad(format!(
                "head_dim {} must be a multiple of 8 up to 256",
                self.head_dim
            ));
        }
        if self.vocab == 0 || self.vocab > 1 << 24 {
            return bad(format!("vocabulary of {} tokens", self.vocab));
        }
        if let Some(m) = &self.moe {
            if m.experts > 1 << 12 || m.intermediate > 1 << 20 {
                return bad(format!(
                    "{} experts of {} is beyond any real model",
                    m.experts, m.intermediate
                ));
            }
            if m.experts == 0
                || m.top_k == 0
                || m.top_k > m.experts
                || m.interleave_step == 0
                || m.layers.len() != self.layers
            {
                return bad(format!("MoE config {m:?}"));
            }
        }
        if let Some(l) = &self.llama4 {
            if !(l.floor_scale.is_finite() && l.floor_scale > 0.0 && l.attn_scale.is_finite()) {
                return bad(format!(
                    "floor_scale {} and attn_scale {} must be finite (floor_scale > 0)",
                    l.floor_scale, l.attn_scale
                ));
            }
            if l.rope_layers.len() != self.layers || l.chunk == 0 {
                return bad(format!(
                    "no_rope_layers has {} entries for {} layers (chunk {})",
                    l.rope_layers.len(),
                    self.layers,
                    l.chunk
                ));
            }
        }
        Ok(())
    }

    /// Whether layer `l` is a MoE layer.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.moe.as_ref().is_some_and(|m| m.layers[l])
    }
}

/// The RoPE schedule for running past the trained length: `kind` is one of `linear`, `ntk`,
/// `dynamic`, `yarn` (with `factor`), or `none` for the config's own.
pub fn rope_override(cfg: &ModelConfig, kind: &str, factor: f64) -> Result<Rope> {
    let mut rope = cfg.rope.clone();
    let orig = cfg.max_position;
    if !(factor.is_finite() && factor >= 1.0) && kind != "none" {
        return Err(EngineError::Config(format!(
            "RoPE factor {factor} must be a number >= 1"
        )));
    }
    rope.scaling = match kind {
        "none" => return Ok(rope),
        "linear" => Scaling::Linear { factor },
        "ntk" => Scaling::Ntk { factor },
        "dynamic" => Scaling::Dynamic {
            factor,
            max_pos: orig,
        },
        "yarn" => Scaling::Yarn {
            factor,
            original_max_pos: orig,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 0.1 * factor.ln() + 1.0,
            truncate: true,
        },
        k => {
            return Err(EngineError::Config(format!(
                "RoPE scaling {k:?}: expected none, linear, ntk, dynamic or yarn"
            )))
        }
    };
    Ok(rope)
}

/// The most layers a config may give: far above any real model (Llama 4 Behemoth has 128),
/// and checked before anything is sized by it.
const MAX_LAYERS: usize = 4096;

fn check_layers(layers: usize) -> Result<usize> {
    if layers > MAX_LAYERS {
        return Err(EngineError::Config(format!(
            "{layers} layers is beyond any real model (at most {MAX_LAYERS})"
        )));
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama(extra: &[(&str, serde_json::Value)]) -> String {
        let mut v = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 300, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
        });
        for (k, x) in extra {
            v[*k] = x.clone();
        }
        v.to_string()
    }

    #[test]
    fn a_plain_config_loads() {
        let c = ModelConfig::from_hf_json(&llama(&[])).unwrap();
        assert_eq!((c.layers, c.head_dim, c.rms_eps), (2, 16, 1e-5));
    }

    /// Sizes and floats a crafted config.json could give: each a one-line error, before
    /// anything is allocated from it (1e12 layers once aborted the process).
    #[test]
    fn absurd_sizes_and_bad_floats_are_errors() {
        use serde_json::json;
        for (k, v, needle) in [
            ("num_hidden_layers", json!(1_000_000_000_000u64), "layers"),
            ("hidden_size", json!(1u64 << 40), "hidden size"),
            ("intermediate_size", json!(1u64 << 40), "intermediate size"),
            ("rms_norm_eps", json!(-1.0), "rms_norm_eps"),
            ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
            ("rms_norm_eps", json!(5.0), "rms_norm_eps"),
        ] {
            let e = ModelConfig::from_hf_json(&llama(&[(k, v.clone())])).unwrap_err();
            assert!(e.to_string().contains(needle), "{k} = {v}: {e}");
        }
        let l4 = serde_json::json!({
            "model_type": "llama4_text", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 1_000_000_000_000u64,
            "intermediate_size": 128, "vocab_size": 300, "num_local_experts": 4,
        });
        let e = ModelConfig::from_hf_json(&l4.to_string()).unwrap_err();
        assert!(e.to_string().contains("layers"), "{e}");
    }
}
