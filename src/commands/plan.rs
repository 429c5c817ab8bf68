//! `longctx plan`: whether a context fits a GPU configuration, and what to change if not.

use crate::units;
use anyhow::{Context, Result};
use longctx_engine::apps::plan::{plan, preset, Hardware, KvLayout, ModelShape, GB, GIB};
use longctx_engine::ModelConfig;
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The model: scout, maverick, or the path of a Hugging Face config.json.
    #[arg(long, default_value = "scout")]
    model: String,
    /// Context in tokens (k = 1024, m = 1024^2: Scout's 10M is 10m).
    #[arg(long, default_value = "10m")]
    context: String,
    /// GPUs in the job (tensor parallel for the weights, a ring for the KV).
    #[arg(long, default_value_t = 8)]
    gpus: usize,
    /// Memory per GPU, with a unit: 80GB (10^9 bytes), 80GiB (2^30), 512MiB.
    #[arg(long, default_value = "80GB")]
    gpu_mem: String,
    /// KV element type: bf16 or fp8.
    #[arg(long, default_value = "bf16")]
    kv_dtype: String,
    /// Host memory the KV may spill to (all nodes together), with a unit (512GiB); 0 for none.
    #[arg(long, default_value = "0")]
    host_mem: String,
    /// hybrid (local layers keep one chunk) or full (every layer keeps the context).
    #[arg(long, default_value = "hybrid")]
    layout: String,
    /// Dense bf16 TFLOP/s per GPU the kernels reach.
    #[arg(long, default_value_t = 395.6)]
    tflops: f64,
    /// GPU-to-GPU bandwidth, GB/s each way.
    #[arg(long, default_value_t = 450.0)]
    link_gbs: f64,
    /// Print the plan as one JSON object on stdout. Default: off (a report in words).
    #[arg(long)]
    json: bool,
}

fn gb(x: f64) -> String {
    format!("{:.1} GB", x / GB)
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.gpus >= 1, "--gpus must be at least 1");
    let shape = match preset(&args.model) {
        Some(s) => s,
        None => {
            let p = PathBuf::from(&args.model);
            let text = std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "--model {}: not scout, maverick or a readable config.json",
                    args.model
                )
            })?;
            ModelShape::from_config(&args.model, &ModelConfig::from_hf_json(&text)?)
        }
    };
    let context = units::tokens(&args.context)? as f64;
    anyhow::ensure!(context >= 1.0, "--context must be at least 1 token");
    let kv_bytes = match args.kv_dtype.as_str() {
        "bf16" => 2.0,
        "fp8" => 1.0,
        d => anyhow::bail!("--kv-dtype {d}: expected bf16 or fp8"),
    };
    let layout = match args.layout.as_str() {
        "hybrid" => KvLayout::Hybrid,
        "full" => KvLayout::Full,
        l => anyhow::bail!("--layout {l}: expected hybrid or full"),
    };
    let hw = Hardware {
        gpus: args.gpus,
        gpu_mem: units::bytes(&args.gpu_mem)? as f64,
        host_mem: units::bytes(&args.host_mem)? as f64,
        flops: args.tflops * 1e12,
        link: args.link_gbs * 1e9,
    };
    let p = plan(&shape, context, &hw, kv_bytes, layout);
    // What would make it fit.
    let mut advice = vec![];
    if !p.fits {
        if kv_bytes > 1.0 && plan(&shape, context, &hw, 1.0, layout).fits {
            advice.push("--kv-dtype fp8 fits".to_string());
        }
        if layout == KvLayout::Full && plan(&shape, context, &hw, kv_bytes, KvLayout::Hybrid).fits {
            advice.push("the hybrid layout (local layers keep one chunk) fits".into());
        }
        // Host memory takes only the KV: suggested only when the weights and activations
        // leave the GPUs room, and checked by planning again with it (once it was suggested
        // where the weights alone exceeded a GPU, and did not fit).
        let fixed = p.weights_per_gpu + p.activations_per_gpu + p.reserve_per_gpu;
        if fixed >= hw.gpu_mem {
            advice.push(format!(
                "the weights alone ({} per GPU, with activations and reserve {}) exceed a GPU's \
                 {}: more GPUs or more memory per GPU (host memory holds only the KV)",
                gb(p.weights_per_gpu),
                gb(fixed),
                gb(hw.gpu_mem)
            ));
        } else if p.kv_short > 0.0 {
            // Rounded up to whole GiB, as a user types it.
            let more = (p.kv_short / GIB).ceil() * GIB;
            let host = hw.host_mem + more;
            let with_host = Hardware {
                host_mem: host,
                ..hw.clone()
            };
            if plan(&shape, context, &with_host, kv_bytes, layout).fits {
                advice.push(format!(
                    "host memory for the KV overflow: --host-mem {:.0}GiB ({} more)",
                    host / GIB,
                    gb(p.kv_short)
                ));
            }
        }
        if let Some(g) = (args.gpus + 1..=1024).find(|g| {
            plan(
                &shape,
                context,
                &Hardware {
                    gpus: *g,
                    ..hw.clone()
                },
                kv_bytes,
                layout,
            )
            .fits
        }) {
            advice.push(format!("{g} GPUs fit"));
        }
    }
    let refs: Vec<(String, f64)> = [("bf16", 2.0), ("fp8", 1.0)]
        .iter()
        .flat_map(|(n, b)| {
            [("hybrid", KvLayout::Hybrid), ("full", KvLayout::Full)].map(|(ln, l)| {
                (
                    format!("{n} KV, {ln}"),
                    plan(&shape, context, &hw, *b, l).max_context_on_gpus,
                )
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": shape.name, "params": shape.params, "active_params": shape.active_params,
                "context": context, "gpus": args.gpus, "gpu_mem": hw.gpu_mem,
                "weights_per_gpu": p.weights_per_gpu, "kv_global_total": p.kv_global_total,
                "kv_local_total": p.kv_local_total, "activations_per_gpu": p.activations_per_gpu,
                "reserve_per_gpu": p.reserve_per_gpu, "kv_device": p.kv_device,
                "kv_host": p.kv_host, "kv_short": p.kv_short, "fits": p.fits,
                "prefill_seconds": p.prefill_seconds, "ring_steps": p.ring_steps,
                "ring_step_compute_s": p.step_compute_s, "ring_step_transfer_s": p.step_transfer_s,
                "max_context_on_gpus": p.max_context_on_gpus, "advice": advice,
                "max_context_by_config": refs.iter().map(|(k, v)| json!({"config": k, "tokens": v})).collect::<Vec<_>>(),
            }))?
        );
        return Ok(());
    }
    println!(
        "{}: {:.1}B parameters ({:.1}B active), {} layers ({} global), context {} tokens, {} x {} GPUs",
        shape.name,
        shape.params / 1e9,
        shape.active_params / 1e9,
        shape.layers,
        shape.global_layers,
        context as u64,
        args.gpus,
        gb(hw.gpu_mem)
    );
    let g = args.gpus as f64;
    println!("per GPU:");
    println!("  weights (bf16, sharded)        {}", gb(p.weights_per_gpu));
    println!("  KV on the GPU                  {}", gb(p.kv_device / g));
    println!(
        "    of which local layers        {}",
        gb((p.kv_local_total / g).min(p.kv_device / g))
    );
    println!(
        "  activations (one chunk)        {}",
        gb(p.activations_per_gpu)
    );
    println!("  reserve (10%)                  {}", gb(p.reserve_per_gpu));
    println!(
        "  total                          {} of {}",
        gb(p.weights_per_gpu + p.kv_device / g + p.activations_per_gpu + p.reserve_per_gpu),
        gb(hw.gpu_mem)
    );
    println!(
        "KV, whole job: {} global + {} local ({} KV); on GPUs {}, in host memory {}, nowhere {}",
        gb(p.kv_global_total),
        gb(p.kv_local_total),
        args.kv_dtype,
        gb(p.kv_device),
        gb(p.kv_host),
        gb(p.kv_short.max(0.0))
    );
    println!(
        "ring: {} steps per global layer; a step computes {:.3} s and moves its KV shard in {:.3} s ({})",
        p.ring_steps,
        p.step_compute_s,
        p.step_transfer_s,
        if p.step_transfer_s <= p.step_compute_s { "hidden" } else { "NOT hidden" }
    );
    println!(
        "prefill estimate: {:.0} s ({:.1} h) at {} TFLOP/s per GPU",
        p.prefill_seconds,
        p.prefill_seconds / 3600.0,
        args.tflops
    );
    println!("longest context on these GPUs alone:");
    for (k, v) in &refs {
        println!("  {k:<16} {:>6.2}M tokens", v / 1e6);
    }
    if p.fits {
        println!("verdict: FITS");
    } else {
        println!("verdict: DOES NOT FIT; options: {}", advice.join("; "));
    }
    Ok(())
}
