//! The capacity planner: will a context of N tokens fit on G GPUs, where does the KV go, and
//! how long does prefill take?
//!
//! Memory per GPU = weights / G (tensor and expert parallel shard every weight evenly) + the
//! device share of the KV / G (KV heads split by tensor parallelism, the sequence by ring
//! attention) + activations of one prefill chunk + a reserve (10% of the card: runtime,
//! CUDA context, fragmentation, as vLLM's default `gpu_memory_utilization` 0.9 leaves).
//! Llama 4's chunked-local layers keep only the current chunk's KV ("hybrid"); a runtime
//! that gives every layer the whole context ("full", vLLM's layout) needs all 48 layers'.

use crate::config::{Arch, ModelConfig};

/// What the planner needs to know of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub name: String,
    pub params: f64,
    pub active_params: f64,
    pub layers: usize,
    /// Layers that attend to the whole context (Llama 4's NoPE layers).
    pub global_layers: usize,
    pub kv_heads: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub chunk: usize,
}

impl ModelShape {
    /// From a config: parameter counts from the architecture's tensor shapes.
    pub fn from_config(name: &str, c: &ModelConfig) -> ModelShape {
        let (total, active) = crate::arch::parameters(c);
        let (global, chunk) = match (&c.arch, &c.llama4) {
            (Arch::Llama4, Some(l4)) => (l4.rope_layers.iter().filter(|r| !**r).count(), l4.chunk),
            _ => (c.layers, c.max_position),
        };
        ModelShape {
            name: name.to_string(),
            params: total,
            active_params: active,
            layers: c.layers,
            global_layers: global,
            kv_heads: c.kv_heads,
            heads: c.heads,
            head_dim: c.head_dim,
            hidden: c.hidden,
            intermediate: c.intermediate,
            chunk,
        }
    }
}

fn llama4(experts: usize, step: usize, mlp: usize, max_pos: usize) -> ModelConfig {
    let json = serde_json::json!({
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text",
        "vocab_size": 202048, "hidden_size": 5120, "num_hidden_layers": 48,
        "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "intermediate_size": 8192, "intermediate_size_mlp": mlp, "num_local_experts": experts,
        "num_experts_per_tok": 1, "interleave_moe_layer_step": step,
        "attention_chunk_size": 8192, "rope_theta": 500000.0,
        "max_position_embeddings": max_pos, "tie_word_embeddings": false
    });
    ModelConfig::from_hf_json(&json.to_string()).expect("built-in config")
}

/// Llama 4 Scout (17B active, 16 experts) and Maverick (17B active, 128 experts, MoE every
/// second layer), from their published configs.
pub fn preset(name: &str) -> Option<ModelShape> {
    match name {
        "scout" => Some(ModelShape::from_config(
            "Llama 4 Scout 17B-16E",
            &llama4(16, 1, 16384, 10485760),
        )),
        "maverick" => Some(ModelShape::from_config(
            "Llama 4 Maverick 17B-128E",
            &llama4(128, 2, 16384, 1048576),
        )),
        _ => None,
    }
}

/// How the KV is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvLayout {
    /// Local layers keep one chunk; global layers the whole context.
    Hybrid,
    /// Every layer keeps the whole context.
    Full,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Hardware {
    pub gpus: usize,
    pub gpu_mem: f64,
    pub host_mem: f64,
    /// Dense bf16 throughput per GPU the kernels reach (FLOP/s).
    pub flops: f64,
    /// GPU-to-GPU link, bytes/s each way.
    pub link: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub weights_per_gpu: f64,
    pub kv_global_total: f64,
    pub kv_local_total: f64,
    pub activations_per_gpu: f64,
    pub reserve_per_gpu: f64,
    /// KV bytes per tier, whole job: device (all GPUs), host, and what does not fit anywhere.
    pub kv_device: f64,
    pub kv_host: f64,
    pub kv_short: f64,
    pub fits: bool,
    pub prefill_seconds: f64,
    pub ring_steps: usize,
    pub step_compute_s: f64,
    pub step_transfer_s: f64,
    /// The longest context that fits on the GPUs alone.
    pub max_context_on_gpus: f64,
}

/// KV bytes per token of one layer.
pub fn kv_token_layer(m: &ModelShape, kv_bytes: f64) -> f64 {
    (m.kv_heads * m.head_dim * 2) as f64 * kv_bytes
}

pub fn plan(m: &ModelShape, context: f64, hw: &Hardware, kv_bytes: f64, layout: KvLayout) -> Plan {
    let g = hw.gpus as f64;
    let per_layer = kv_token_layer(m, kv_bytes);
    let local_layers = m.layers - m.global_layers;
    let (kv_global_total, kv_local_total) = match layout {
        KvLayout::Hybrid => (
            m.global_layers as f64 * per_layer * context,
            local_layers as f64 * per_layer * context.min(m.chunk as f64),
        ),
        KvLayout::Full => (m.layers as f64 * per_layer * context, 0.0),
    };
    let weights_per_gpu = m.params * 2.0 / g;
    // One chunk's activations, sharded by tensor parallelism: ~16 hidden-sized bf16 buffers
    // per token and the expert MLPs' two intermediate buffers.
    let chunk = m.chunk as f64;
    let activations_per_gpu =
        chunk * (16.0 * m.hidden as f64 + 4.0 * m.intermediate as f64) * 2.0 / g.min(8.0) + 1e9;
    let reserve_per_gpu = 0.1 * hw.gpu_mem;
    let room = (hw.gpu_mem - weights_per_gpu - activations_per_gpu - reserve_per_gpu).max(0.0);
    let kv_total = kv_global_total + kv_local_total;
    let kv_device = kv_total.min(room * g);
    let kv_host = (kv_total - kv_device).min(hw.host_mem);
    let kv_short = kv_total - kv_device - kv_host;
    let max_context_on_gpus = {
        let fixed = match layout {
            KvLayout::Hybrid => local_layers as f64 * per_layer * chunk,
            KvLayout::Full => 0.0,
        };
        let per_token = match layout {
            KvLayout::Hybrid => m.global_layers as f64 * per_layer,
            KvLayout::Full => m.layers as f64 * per_layer,
        };
        ((room * g - fixed) / per_token).max(0.0)
    };
    // Prefill FLOPs: the weights, the global layers' causal attention, the local layers'
    // attention within chunks.
    let attn = |n: f64, keys: f64| 4.0 * n * keys / 2.0 * (m.head_dim * m.heads) as f64;
    let global_keys = match layout {
        KvLayout::Hybrid => m.global_layers as f64,
        KvLayout::Full => m.layers as f64,
    };
    let flops = 2.0 * m.active_params * context
        + global_keys * attn(context, context)
        + (m.layers as f64 - global_keys) * attn(context, chunk.min(context));
    let prefill_seconds = flops / (g * hw.flops);
    // Ring over the GPUs for the global layers: a step attends a shard to a shard.
    let shard = context / g;
    let step_compute_s = 4.0 * shard * shard * (m.head_dim * m.heads) as f64 / hw.flops;
    let step_transfer_s = shard * per_layer / hw.link;
    Plan {
        weights_per_gpu,
        kv_global_total,
        kv_local_total,
        activations_per_gpu,
        reserve_per_gpu,
        kv_device,
        kv_host,
        kv_short,
        fits: kv_short <= 0.0 && room > 0.0,
        prefill_seconds,
        ring_steps: hw.gpus,
        step_compute_s,
        step_transfer_s,
        max_context_on_gpus,
    }
}

pub const GB: f64 = 1e9;
pub const GIB: f64 = 1073741824.0;

/// H100 SXM (80 GB) or H200 (141 GB): bf16 dense 989 TFLOP/s, of which a FlashAttention-3
/// class kernel and GEMMs reach about 40%; NVLink 4 at 450 GB/s each way.
pub fn gpu(gpus: usize, mem_gb: f64, host: f64) -> Hardware {
    Hardware {
        gpus,
        gpu_mem: mem_gb * GB,
        host_mem: host,
        flops: 0.4 * 989e12,
        link: 450e9,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scout_and_maverick_have_their_published_sizes() {
        let s = preset("scout").unwrap();
        assert!((105e9..112e9).contains(&s.params), "{}", s.params);
        assert!(
            (16e9..18.5e9).contains(&s.active_params),
            "{}",
            s.active_params
        );
        assert_eq!(s.global_layers, 12);
        let m = preset("maverick").unwrap();
        assert!((390e9..410e9).contains(&m.params), "{}", m.params);
        // Scout's 10M tokens of bf16 KV in its 12 global layers: about 480 GB.
        let kv = kv_token_layer(&s, 2.0) * 12.0 * 10e6;
        assert!((480e9..505e9).contains(&kv), "{kv}");
    }

    #[test]
    fn the_public_serving_figures_come_out() {
        let s = preset("scout").unwrap();
        // vLLM (every layer keeps the context, bf16): 1M on 8xH100 and 3.6M on 8xH200 fit.
        let h100 = plan(&s, 1e6, &gpu(8, 80.0, 0.0), 2.0, KvLayout::Full);
        assert!(h100.fits);
        let h200 = plan(&s, 3.6e6, &gpu(8, 141.0, 0.0), 2.0, KvLayout::Full);
        assert!(h200.fits);
        assert!(
            h200.max_context_on_gpus < 5e6,
            "{}",
            h200.max_context_on_gpus
        );
        // SGLang's hybrid KV: 10M on 8xH200 fits; on 8xH100 it does not in bf16...
        assert!(plan(&s, 10e6, &gpu(8, 141.0, 0.0), 2.0, KvLayout::Hybrid).fits);
        assert!(!plan(&s, 10e6, &gpu(8, 80.0, 0.0), 2.0, KvLayout::Hybrid).fits);
        // ...but does with fp8 KV, or with host memory for the overflow.
        assert!(plan(&s, 10e6, &gpu(8, 80.0, 0.0), 1.0, KvLayout::Hybrid).fits);
        let host = plan(&s, 10e6, &gpu(8, 80.0, 512.0 * GIB), 2.0, KvLayout::Hybrid);
        assert!(host.fits && host.kv_host > 0.0);
    }
}
