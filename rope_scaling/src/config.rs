//! A [`Rope`] from a Hugging Face `config.json`, resolved as transformers resolves it.

use crate::schedule::yarn_mscale;
use crate::{Rope, RopeError, Scaling};
use serde_json::{Map, Value};

/// Parses the RoPE of a model from the text of its `config.json`. A multimodal config's
/// `text_config` is used when present (Llama 4). Accepts the legacy `rope_scaling` dict and
/// the newer `rope_parameters`, with `rope_theta`, `head_dim` (else `hidden_size /
/// num_attention_heads`) and `partial_rotary_factor` at the top level or inside the dict.
pub fn from_config_json(text: &str) -> Result<Rope, RopeError> {
    let v: Value = serde_json::from_str(text)?;
    let top = v
        .as_object()
        .ok_or_else(|| RopeError::Invalid("config.json is not a JSON object".into()))?;
    let cfg = match top.get("text_config").and_then(Value::as_object) {
        Some(text) => text,
        None => top,
    };
    from_config(cfg)
}

fn num(m: &Map<String, Value>, key: &str) -> Option<f64> {
    m.get(key).and_then(Value::as_f64)
}

fn from_config(cfg: &Map<String, Value>) -> Result<Rope, RopeError> {
    let empty = Map::new();
    let dict = ["rope_parameters", "rope_scaling"]
        .iter()
        .find_map(|k| cfg.get(*k).and_then(Value::as_object))
        .unwrap_or(&empty);
    let known = ["rope_type", "type", "factor", "rope_theta"];
    if !dict.is_empty() && !known.iter().any(|k| dict.contains_key(*k)) {
        return Err(RopeError::Invalid(
            "per-layer-type RoPE parameters (a nested rope_parameters) are not supported".into(),
        ));
    }
    let rope_type = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let field = |name: &'static str| RopeError::Field {
        field: name,
        rope_type: rope_type.clone(),
    };
    let theta = num(dict, "rope_theta")
        .or_else(|| num(cfg, "rope_theta"))
        .unwrap_or(10000.0);
    let head_dim = match cfg.get("head_dim").and_then(Value::as_u64) {
        Some(h) => h as usize,
        None => {
            let hidden = cfg.get("hidden_size").and_then(Value::as_u64);
            let heads = cfg.get("num_attention_heads").and_then(Value::as_u64);
            match (hidden, heads) {
                (Some(h), Some(n)) if n > 0 => (h / n) as usize,
                _ => return Err(field("head_dim (or hidden_size and num_attention_heads)")),
            }
        }
    };
    let partial = num(dict, "partial_rotary_factor")
        .or_else(|| num(cfg, "partial_rotary_factor"))
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(RopeError::Invalid(format!(
            "partial_rotary_factor {partial} must be in (0, 1]"
        )));
    }
    let max_pos = cfg
        .get("max_position_embeddings")
        .and_then(Value::as_u64)
        .map(|x| x as usize);
    let original = dict
        .get("original_max_position_embeddings")
        .or_else(|| cfg.get("original_max_position_embeddings"))
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .or(max_pos);
    let factor = || num(dict, "factor").ok_or_else(|| field("factor"));

    let scaling = match rope_type.as_str() {
        "default" => Scaling::Default,
        "linear" => Scaling::Linear { factor: factor()? },
        "ntk" => Scaling::Ntk { factor: factor()? },
        "dynamic" => Scaling::Dynamic {
            factor: factor()?,
            max_pos: max_pos.ok_or_else(|| field("max_position_embeddings"))?,
        },
        "yarn" => {
            let original_max_pos =
                original.ok_or_else(|| field("original_max_position_embeddings"))?;
            let factor = match num(dict, "factor") {
                Some(f) => f,
                None => {
                    let m = max_pos.ok_or_else(|| field("factor"))?;
                    m as f64 / original_max_pos as f64
                }
            };
            // transformers treats 0 and absent alike here (`x or default`).
            let nonzero = |k: &str| num(dict, k).filter(|x| *x != 0.0);
            let attention_factor = match num(dict, "attention_factor") {
                Some(a) => a,
                None => match (nonzero("mscale"), nonzero("mscale_all_dim")) {
                    (Some(m), Some(all)) => yarn_mscale(factor, m) / yarn_mscale(factor, all),
                    _ => yarn_mscale(factor, 1.0),
                },
            };
            Scaling::Yarn {
                factor,
                original_max_pos,
                beta_fast: nonzero("beta_fast").unwrap_or(32.0),
                beta_slow: nonzero("beta_slow").unwrap_or(1.0),
                attention_factor,
                truncate: dict
                    .get("truncate")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            }
        }
        "llama3" => Scaling::Llama3 {
            factor: factor()?,
            low_freq_factor: num(dict, "low_freq_factor")
                .ok_or_else(|| field("low_freq_factor"))?,
            high_freq_factor: num(dict, "high_freq_factor")
                .ok_or_else(|| field("high_freq_factor"))?,
            original_max_pos: original.ok_or_else(|| field("original_max_position_embeddings"))?,
        },
        other => return Err(RopeError::UnknownType(other.to_string())),
    };
    let rope = Rope {
        theta,
        head_dim,
        rotary_dim: (head_dim as f64 * partial) as usize,
        scaling,
    };
    rope.validate()?;
    Ok(rope)
}
