//! Each architecture as data: every tensor a model of it holds, by its Hugging Face name and
//! its GGUF name (as llama.cpp's `convert_hf_to_gguf.py` writes it), with its shape, and each
//! layer's kind (RoPE attention, chunked-local in Llama 4, or NoPE with temperature tuning; a
//! dense feed-forward or routed experts), resolved once from the config. The loader (GGUF
//! names to Hugging Face names), the model's constructor, the random test models and the
//! planner's parameter counts all read this one table.

use crate::config::{Arch, ModelConfig};

/// What a tensor is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm,
    FfnNorm,
    Q,
    K,
    V,
    O,
    /// A dense feed-forward's projections (Llama's `mlp`, Llama 4's dense `feed_forward`).
    Gate,
    Up,
    Down,
    Router,
    SharedGate,
    SharedUp,
    SharedDown,
    /// transformers' fused routed experts, input-major: `[E, hidden, 2 * inter]` (gate then
    /// up) and `[E, inter, hidden]` (safetensors only).
    ExpertsGateUp,
    ExpertsDown,
    /// llama.cpp's routed experts, each expert `[out, in]`: `[E, inter, hidden]` twice and
    /// `[E, hidden, inter]` (GGUF only).
    GgufExpertsGate,
    GgufExpertsUp,
    GgufExpertsDown,
}

/// A tensor's shape in terms of the config.
#[derive(Clone, Copy, Debug)]
enum Dims {
    Hidden,
    VocabByHidden,
    /// `[heads * head_dim, hidden]`.
    QOut,
    /// `[kv_heads * head_dim, hidden]`.
    KvOut,
    /// `[hidden, heads * head_dim]`.
    OOut,
    /// `[inter, hidden]` and `[hidden, inter]` of the layer's dense feed-forward.
    DenseIn,
    DenseOut,
    /// The same for the shared expert (the experts' intermediate size).
    SharedIn,
    SharedOut,
    /// `[experts, hidden]`.
    Router,
    /// `[E, hidden, 2 * inter]`, `[E, inter, hidden]`.
    FusedGateUp,
    FusedDown,
    /// `[E, inter, hidden]`, `[E, hidden, inter]`.
    StackedIn,
    StackedOut,
}

/// One row of an architecture's table: `{L}` in a name is the layer.
struct Entry {
    role: Role,
    hf: Option<&'static str>,
    gguf: Option<&'static str>,
    dims: Dims,
}

const fn both(role: Role, hf: &'static str, gguf: &'static str, dims: Dims) -> Entry {
    Entry {
        role,
        hf: Some(hf),
        gguf: Some(gguf),
        dims,
    }
}

/// Every model's tensors outside the layers.
const GLOBAL: &[Entry] = &[
    both(
        Role::Embed,
        "model.embed_tokens.weight",
        "token_embd.weight",
        Dims::VocabByHidden,
    ),
    both(
        Role::LmHead,
        "lm_head.weight",
        "output.weight",
        Dims::VocabByHidden,
    ),
    both(
        Role::FinalNorm,
        "model.norm.weight",
        "output_norm.weight",
        Dims::Hidden,
    ),
];

/// Every layer's attention and norms (Llama and Llama 4 alike).
const ATTENTION: &[Entry] = &[
    both(
        Role::AttnNorm,
        "model.layers.{L}.input_layernorm.weight",
        "blk.{L}.attn_norm.weight",
        Dims::Hidden,
    ),
    both(
        Role::FfnNorm,
        "model.layers.{L}.post_attention_layernorm.weight",
        "blk.{L}.ffn_norm.weight",
        Dims::Hidden,
    ),
    both(
        Role::Q,
        "model.layers.{L}.self_attn.q_proj.weight",
        "blk.{L}.attn_q.weight",
        Dims::QOut,
    ),
    both(
        Role::K,
        "model.layers.{L}.self_attn.k_proj.weight",
        "blk.{L}.attn_k.weight",
        Dims::KvOut,
    ),
    both(
        Role::V,
        "model.layers.{L}.self_attn.v_proj.weight",
        "blk.{L}.attn_v.weight",
        Dims::KvOut,
    ),
    both(
        Role::O,
        "model.layers.{L}.self_attn.o_proj.weight",
        "blk.{L}.attn_output.weight",
        Dims::OOut,
    ),
];

/// Llama's feed-forward.
const LLAMA_MLP: &[Entry] = &[
    both(
        Role::Gate,
        "model.layers.{L}.mlp.gate_proj.weight",
        "blk.{L}.ffn_gate.weight",
        Dims::DenseIn,
    ),
    both(
        Role::Up,
        "model.layers.{L}.mlp.up_proj.weight",
        "blk.{L}.ffn_up.weight",
        Dims::DenseIn,
    ),
    both(
        Role::Down,
        "model.layers.{L}.mlp.down_proj.weight",
        "blk.{L}.ffn_down.weight",
        Dims::DenseOut,
    ),
];

/// Llama 4's dense feed-forward (its layers between MoE ones).
const LLAMA4_DENSE: &[Entry] = &[
    both(
        Role::Gate,
        "model.layers.{L}.feed_forward.gate_proj.weight",
        "blk.{L}.ffn_gate.weight",
        Dims::DenseIn,
    ),
    both(
        Role::Up,
        "model.layers.{L}.feed_forward.up_proj.weight",
        "blk.{L}.ffn_up.weight",
        Dims::DenseIn,
    ),
    both(
        Role::Down,
        "model.layers.{L}.feed_forward.down_proj.weight",
        "blk.{L}.ffn_down.weight",
        Dims::DenseOut,
    ),
];

/// Llama 4's MoE feed-forward: router, shared expert, routed experts in either layout.
const LLAMA4_MOE: &[Entry] = &[
    both(
        Role::Router,
        "model.layers.{L}.feed_forward.router.weight",
        "blk.{L}.ffn_gate_inp.weight",
        Dims::Router,
    ),
    Entry {
        role: Role::ExpertsGateUp,
        hf: Some("model.layers.{L}.feed_forward.experts.gate_up_proj"),
        gguf: None,
        dims: Dims::FusedGateUp,
    },
    Entry {
        role: Role::ExpertsDown,
        hf: Some("model.layers.{L}.feed_forward.experts.down_proj"),
        gguf: None,
        dims: Dims::FusedDown,
    },
    both(
        Role::SharedGate,
        "model.layers.{L}.feed_forward.shared_expert.gate_proj.weight",
        "blk.{L}.ffn_gate_shexp.weight",
        Dims::SharedIn,
    ),
    both(
        Role::SharedUp,
        "model.layers.{L}.feed_forward.shared_expert.up_proj.weight",
        "blk.{L}.ffn_up_shexp.weight",
        Dims::SharedIn,
    ),
    both(
        Role::SharedDown,
        "model.layers.{L}.feed_forward.shared_expert.down_proj.weight",
        "blk.{L}.ffn_down_shexp.weight",
        Dims::SharedOut,
    ),
    Entry {
        role: Role::GgufExpertsGate,
        hf: None,
        gguf: Some("blk.{L}.ffn_gate_exps.weight"),
        dims: Dims::StackedIn,
    },
    Entry {
        role: Role::GgufExpertsUp,
        hf: None,
        gguf: Some("blk.{L}.ffn_up_exps.weight"),
        dims: Dims::StackedIn,
    },
    Entry {
        role: Role::GgufExpertsDown,
        hf: None,
        gguf: Some("blk.{L}.ffn_down_exps.weight"),
        dims: Dims::StackedOut,
    },
];

/// How one layer computes, resolved from the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerKind {
    /// RoPE on q and k (chunked-local attention in Llama 4); `false`: NoPE, attending to the
    /// whole context with temperature tuning.
    pub rope: bool,
    /// Routed experts (with a router and a shared expert) instead of a dense feed-forward.
    pub moe: bool,
}

/// Layer `l`'s kind.
pub fn layer_kind(cfg: &ModelConfig, l: usize) -> LayerKind {
    LayerKind {
        rope: cfg
            .llama4
            .as_ref()
            .is_none_or(|a| a.rope_layers.get(l).copied().unwrap_or(true)),
        moe: cfg.arch == Arch::Llama4 && cfg.is_moe_layer(l),
    }
}

/// The table rows of a layer of this kind.
fn layer_entries(arch: Arch, moe: bool) -> [&'static [Entry]; 2] {
    match (arch, moe) {
        (Arch::Llama, _) => [ATTENTION, LLAMA_MLP],
        (Arch::Llama4, false) => [ATTENTION, LLAMA4_DENSE],
        (Arch::Llama4, true) => [ATTENTION, LLAMA4_MOE],
    }
}

/// Every table row an architecture may have outside the layers (`layer` false) or in one.
fn all_entries(arch: Arch, layer: bool) -> &'static [&'static [Entry]] {
    match (arch, layer) {
        (_, false) => &[GLOBAL],
        (Arch::Llama, true) => &[ATTENTION, LLAMA_MLP],
        (Arch::Llama4, true) => &[ATTENTION, LLAMA4_DENSE, LLAMA4_MOE],
    }
}

/// One tensor of a model, resolved: its names (None where that format has no such tensor)
/// and its shape, outermost first, as the format stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub role: Role,
    pub layer: Option<usize>,
    pub hf: Option<String>,
    pub gguf: Option<String>,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Its Hugging Face name (every tensor the model reads has one).
    pub fn name(&self) -> &str {
        self.hf
            .as_deref()
            .unwrap_or_else(|| self.gguf.as_deref().expect("every table row has a name"))
    }

    /// A routed experts' tensor (resident or not by the expert budget).
    pub fn is_routed_expert(&self) -> bool {
        matches!(
            self.role,
            Role::ExpertsGateUp
                | Role::ExpertsDown
                | Role::GgufExpertsGate
                | Role::GgufExpertsUp
                | Role::GgufExpertsDown
        )
    }

    /// Its element count, in f64: a planner's hypothetical model may not fit a usize product.
    fn elems(&self) -> f64 {
        self.shape.iter().map(|&d| d as f64).product()
    }
}

fn dims(cfg: &ModelConfig, d: Dims) -> Vec<usize> {
    let (h, hd) = (cfg.hidden, cfg.head_dim);
    let (e, ei) = cfg
        .moe
        .as_ref()
        .map_or((0, 0), |m| (m.experts, m.intermediate));
    match d {
        Dims::Hidden => vec![h],
        Dims::VocabByHidden => vec![cfg.vocab, h],
        Dims::QOut => vec![cfg.heads * hd, h],
        Dims::KvOut => vec![cfg.kv_heads * hd, h],
        Dims::OOut => vec![h, cfg.heads * hd],
        Dims::DenseIn => vec![cfg.intermediate, h],
        Dims::DenseOut => vec![h, cfg.intermediate],
        Dims::SharedIn => vec![ei, h],
        Dims::SharedOut => vec![h, ei],
        Dims::Router => vec![e, h],
        Dims::FusedGateUp => vec![e, h, 2 * ei],
        Dims::FusedDown => vec![e, ei, h],
        Dims::StackedIn => vec![e, ei, h],
        Dims::StackedOut => vec![e, h, ei],
    }
}

/// A table name with its layer filled in.
fn fill(name: Option<&str>, layer: Option<usize>) -> Option<String> {
    match layer {
        Some(l) => name.map(|n| n.replace("{L}", &l.to_string())),
        None => name.map(String::from),
    }
}

fn resolve(cfg: &ModelConfig, e: &Entry, layer: Option<usize>) -> TensorSpec {
    TensorSpec {
        role: e.role,
        layer,
        hf: fill(e.hf, layer),
        gguf: fill(e.gguf, layer),
        shape: dims(cfg, e.dims),
    }
}

/// Every tensor of a model of this config, in both formats' names (a tied model's LM head
/// is left out: it is the embedding).
pub fn tensors(cfg: &ModelConfig) -> Vec<TensorSpec> {
    with_head(cfg, !cfg.tie_embeddings)
}

/// [`tensors`], with or without the LM head.
pub(crate) fn with_head(cfg: &ModelConfig, head: bool) -> Vec<TensorSpec> {
    let mut all: Vec<TensorSpec> = GLOBAL
        .iter()
        .filter(|e| head || e.role != Role::LmHead)
        .map(|e| resolve(cfg, e, None))
        .collect();
    for l in 0..cfg.layers {
        let kind = layer_kind(cfg, l);
        for part in layer_entries(cfg.arch, kind.moe) {
            all.extend(part.iter().map(|e| resolve(cfg, e, Some(l))));
        }
    }
    all
}

/// The tensor of `role` in layer `layer` (None: outside the layers), or None where a model
/// of this config has no such tensor.
pub fn tensor(cfg: &ModelConfig, layer: Option<usize>, role: Role) -> Option<TensorSpec> {
    let rows: Vec<&'static [Entry]> = match layer {
        None => vec![GLOBAL],
        Some(l) if l < cfg.layers => layer_entries(cfg.arch, layer_kind(cfg, l).moe).to_vec(),
        Some(_) => return None,
    };
    rows.iter()
        .flat_map(|r| r.iter())
        .find(|e| e.role == role)
        .map(|e| resolve(cfg, e, layer))
}

/// The names (Hugging Face, GGUF) of the tensor of `role` in layer `layer` (None: outside
/// the layers) of an architecture, whatever the config: `(None, None)` where it has none.
pub fn names(arch: Arch, layer: Option<usize>, role: Role) -> (Option<String>, Option<String>) {
    let Some(e) = all_entries(arch, layer.is_some())
        .iter()
        .flat_map(|t| t.iter())
        .find(|e| e.role == role)
    else {
        return (None, None);
    };
    (fill(e.hf, layer), fill(e.gguf, layer))
}

/// The Hugging Face name of a GGUF tensor of this architecture (None: not one of its
/// tensors, or one without a Hugging Face counterpart such as llama.cpp's stacked experts).
pub fn hf_name(arch: Arch, gguf: &str) -> Option<String> {
    let (layer, pattern) = match gguf.strip_prefix("blk.") {
        Some(rest) => {
            let (l, name) = rest.split_once('.')?;
            // Digits only: `blk.+1.` is not layer 1 (`blk.007.` is layer 7).
            if !l.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (Some(l.parse::<usize>().ok()?), format!("blk.{{L}}.{name}"))
        }
        None => (None, gguf.to_string()),
    };
    let e = all_entries(arch, layer.is_some())
        .iter()
        .flat_map(|t| t.iter())
        .find(|e| e.gguf == Some(pattern.as_str()))?;
    fill(Some(e.hf?), layer)
}

/// Parameters of a model of this config: all of them, and those one token computes with
/// (every tensor but the embedding table, which is looked up, and `top_k` of the routed
/// experts). Counted from the Hugging Face tensors (GGUF's stacked experts are the same
/// weights again).
pub fn parameters(cfg: &ModelConfig) -> (f64, f64) {
    let share = cfg
        .moe
        .as_ref()
        .map_or(0.0, |m| m.top_k as f64 / m.experts.max(1) as f64);
    let (mut total, mut active) = (0.0, 0.0);
    for t in tensors(cfg).iter().filter(|t| t.hf.is_some()) {
        let n = t.elems();
        total += n;
        active += match t.role {
            Role::Embed if !cfg.tie_embeddings => 0.0,
            _ if t.is_routed_expert() => n * share,
            _ => n,
        };
    }
    (total, active)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{tiny_llama4_config, tiny_llama_config};

    #[test]
    fn every_gguf_name_maps_to_its_hugging_face_name_and_back() {
        for cfg in [tiny_llama_config(2, 4, 1, false), tiny_llama4_config()] {
            let all = tensors(&cfg);
            for t in &all {
                match (&t.hf, &t.gguf) {
                    (Some(hf), Some(g)) => {
                        assert_eq!(hf_name(cfg.arch, g).as_deref(), Some(hf.as_str()))
                    }
                    (None, Some(g)) => assert_eq!(hf_name(cfg.arch, g), None, "{g}"),
                    _ => {}
                }
            }
            // No two tensors share a name in either format.
            for key in [
                |t: &TensorSpec| t.hf.clone(),
                |t: &TensorSpec| t.gguf.clone(),
            ] {
                let mut names: Vec<String> = all.iter().filter_map(key).collect();
                let n = names.len();
                names.sort();
                names.dedup();
                assert_eq!(names.len(), n);
            }
        }
        for bad in [
            "blk.x.attn_q.weight",
            "blk..attn_q.weight",
            "blk.+1.attn_q.weight",
        ] {
            assert_eq!(hf_name(Arch::Llama, bad), None, "{bad}");
        }
        assert_eq!(
            hf_name(Arch::Llama, "blk.007.attn_q.weight").as_deref(),
            Some("model.layers.7.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name(Arch::Llama, "blk.3.ffn_gate.weight").as_deref(),
            Some("model.layers.3.mlp.gate_proj.weight")
        );
        assert_eq!(
            hf_name(Arch::Llama4, "blk.3.ffn_gate.weight").as_deref(),
            Some("model.layers.3.feed_forward.gate_proj.weight")
        );
        assert_eq!(hf_name(Arch::Llama, "blk.0.ffn_gate_inp.weight"), None);
    }

    #[test]
    fn each_layer_kind_comes_from_the_config() {
        let cfg = tiny_llama4_config();
        // The last of the 4 layers is the NoPE (global) one; every layer has experts.
        let kinds: Vec<LayerKind> = (0..4).map(|l| layer_kind(&cfg, l)).collect();
        assert_eq!(kinds.iter().filter(|k| !k.rope).count(), 1);
        assert!(!kinds[3].rope && kinds.iter().all(|k| k.moe));
        let dense = tiny_llama_config(2, 4, 1, true);
        assert!((0..2).all(|l| layer_kind(&dense, l)
            == LayerKind {
                rope: true,
                moe: false
            }));
        // A tied model has no LM head of its own.
        assert!(tensors(&dense).iter().all(|t| t.role != Role::LmHead));
        assert_eq!(
            tensor(&dense, Some(2), Role::Q),
            None,
            "past the last layer"
        );
        assert_eq!(tensor(&dense, Some(0), Role::Router), None, "dense");
    }

    #[test]
    fn parameter_counts_add_up_the_shapes() {
        let cfg = tiny_llama_config(2, 4, 2, false);
        let (h, v, i, hd) = (64.0, 300.0, 96.0, 16.0);
        let layer = 2.0 * h + h * 4.0 * hd * 2.0 + h * 2.0 * hd * 2.0 + 3.0 * h * i;
        let (total, active) = parameters(&cfg);
        assert_eq!(total, 2.0 * v * h + h + 2.0 * layer);
        assert_eq!(active, v * h + h + 2.0 * layer);
    }
}
