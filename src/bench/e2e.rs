//! `longctx bench e2e`: the default model's prefill and decode speed at given context lengths.

use super::kernels::machine;
use super::timing::StreamRead;
use anyhow::Result;
use longctx_engine::{DecodeBytes, KvOptions, Logits};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name (org/name[:FILE], from the
    /// local Hugging Face cache). Default: SmolLM2-135M-Instruct (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Context lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [2048usize, 8192])]
    lengths: Vec<usize>,
    /// Tokens per prefill forward pass.
    #[arg(long, default_value_t = 2048)]
    chunk: usize,
    /// Decode steps timed at each length.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// KV cache element type: f32 (exact), bf16 (half the bytes per decode step), q8
    /// (llama.cpp's q8_0, 56% of bf16's bytes) or fp8 (E4M3, a power-of-two scale per 32: 52%).
    #[arg(long, default_value = "f32")]
    kv_dtype: String,
    /// Weights decode streams: f32 (exact), bf16 (half the bytes, bf16-rounded weights) or
    /// quant (the GGUF blocks, e.g. Q4_1, times int8 activations, as llama.cpp does).
    #[arg(long, default_value = "f32")]
    decode_weights: String,
    /// Keep at most this many bytes of routed experts in memory (as `generate
    /// --expert-budget`); the report adds the bytes read, hit rate and resident peak.
    /// Default: every expert resident.
    #[arg(long, value_parser = crate::units::bytes)]
    expert_budget: Option<u64>,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    context: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Bytes a decode step read, on average over the timed steps (weights and KV), in MB.
    decode_read_mb: f64,
    /// Of which KV, in MB.
    decode_kv_mb: f64,
    /// `decode_read_mb` x tok/s.
    decode_read_gbs: f64,
    /// The streaming read measured just before and just after the decode steps (their mean).
    stream_read_gbs: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    kv_dtype: String,
    decode_weights: String,
    model: String,
    load_s: f64,
    prepare_s: f64,
    rows: Vec<Row>,
    #[serde(skip_serializing_if = "Option::is_none")]
    experts: Option<longctx_engine::experts::ExpertStats>,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.chunk >= 1, "--chunk must be at least 1");
    let dtype = crate::commands::KvDtype::parse(&args.kv_dtype)?;
    let path = crate::commands::resolve_model(&args.model)?;
    let t = Instant::now();
    let mut m = longctx_engine::load(&path)?;
    let load_s = t.elapsed().as_secs_f64();
    if let Some(b) = args.expert_budget {
        m.model
            .set_expert_budget(b)
            .map_err(|e| anyhow::anyhow!("--expert-budget: {e}"))?;
    }
    let t = Instant::now();
    use crate::commands::{prepare, DecodeWeights};
    let weights = match args.decode_weights.as_str() {
        "f32" => DecodeWeights::F32,
        "bf16" => DecodeWeights::Bf16,
        "quant" => DecodeWeights::Quant,
        w => anyhow::bail!("--decode-weights {w}: expected f32, bf16 or quant"),
    };
    prepare(&mut m.model, weights)?;
    let prepare_s = t.elapsed().as_secs_f64();
    let vocab = m.model.cfg.vocab as u32;
    // Warm-up, untimed (as llama-bench and the peer script do): page in the weights, start
    // the thread pool, fault in the first KV blocks, and make the step's workspace for the
    // longest prompt chunk the timed prefills run (llama-bench's warm-up is a run of the
    // same prompt size: a first 2K chunk otherwise pays for faulting in ~100 MB of
    // activations, ~7% of a 2K prefill of the benchmark MoE).
    {
        let warm = args
            .lengths
            .iter()
            .max()
            .map_or(256, |&l| l.min(args.chunk))
            .max(256);
        let store = m.model.kv_store(&KvOptions {
            dtype,
            ..KvOptions::default()
        })?;
        let seq = store.create_seq();
        let ids: Vec<u32> = (0..warm as u32)
            .map(|i| 100 + i % (vocab - 100).max(1))
            .collect();
        let l = m
            .model
            .forward(&ids, 0, &store, seq, Logits::Last, None, 4)?;
        m.model
            .forward(&[argmax(&l)], ids.len(), &store, seq, Logits::Last, None, 4)?;
    }
    // A decode step is memory-bound: its read is compared with the streaming read measured
    // beside it (this machine's swings by tens of percent within minutes).
    let stream = (args.decode_tokens > 0).then(|| StreamRead::new(256 << 20));
    let mut rows = vec![];
    let steps: usize = args.lengths.iter().map(|l| l + args.decode_tokens).sum();
    let bar = crate::commands::Progress::new(steps as u64, "bench e2e", "tokens");
    for &len in &args.lengths {
        // Deterministic token ids spread over the vocabulary (content does not change speed).
        let ids: Vec<u32> = (0..len as u64)
            .map(|i| (i.wrapping_mul(2654435761) % (vocab as u64 - 100) + 100) as u32)
            .collect();
        let store = m.model.kv_store(&KvOptions {
            dtype,
            ..KvOptions::default()
        })?;
        let seq = store.create_seq();
        let t = Instant::now();
        let mut logits = vec![];
        for (i, part) in ids.chunks(args.chunk).enumerate() {
            logits = m
                .model
                .forward(part, i * args.chunk, &store, seq, Logits::Last, None, 4)?;
            bar.inc(part.len() as u64);
        }
        let prefill = t.elapsed().as_secs_f64();
        let mut next = argmax(&logits);
        let bw_before = stream.as_ref().map_or(0.0, |s| s.gbs());
        let t = Instant::now();
        for i in 0..args.decode_tokens {
            let l = m
                .model
                .forward(&[next], len + i, &store, seq, Logits::Last, None, 4)?;
            next = argmax(&l);
            bar.inc(1);
        }
        let decode = t.elapsed().as_secs_f64();
        let bw_after = stream.as_ref().map_or(0.0, |s| s.gbs());
        let read = (0..args.decode_tokens).fold(DecodeBytes::default(), |a, i| {
            let b = m.model.decode_read_bytes(len + i, dtype);
            DecodeBytes {
                weights: a.weights + b.weights,
                kv: a.kv + b.kv,
            }
        });
        let steps = args.decode_tokens.max(1) as f64;
        let decode_tok_s = args.decode_tokens as f64 / decode;
        let read_mb = (read.weights + read.kv) as f64 / steps / 1e6;
        rows.push(Row {
            context: len,
            prefill_s: prefill,
            prefill_tok_s: len as f64 / prefill,
            decode_tok_s,
            decode_read_mb: read_mb,
            decode_kv_mb: read.kv as f64 / steps / 1e6,
            decode_read_gbs: read_mb * decode_tok_s / 1e3,
            stream_read_gbs: (bw_before + bw_after) / 2.0,
        });
    }
    bar.finish_and_clear();
    let r = Report {
        machine: machine(),
        threads: rayon::current_num_threads(),
        kv_dtype: args.kv_dtype.clone(),
        decode_weights: args.decode_weights.clone(),
        model: path.display().to_string(),
        load_s,
        prepare_s,
        rows,
        experts: m.model.expert_stats(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} ({} threads), {}, KV {}, decode weights {}",
        r.machine, r.threads, r.model, r.kv_dtype, r.decode_weights
    );
    // Load: the file mapped and every tensor checked; prepare: the decode weights' copies.
    println!(
        "load {:.3} s (mapped and validated), decode weights prepared in {:.3} s",
        r.load_s, r.prepare_s
    );
    println!(
        "{:>8} {:>10} {:>14} {:>13} {:>13} {:>12} {:>12}",
        "context",
        "prefill s",
        "prefill tok/s",
        "decode tok/s",
        "MB/token(KV)",
        "decode GB/s",
        "stream GB/s"
    );
    for x in &r.rows {
        println!(
            "{:>8} {:>10.2} {:>14.1} {:>13.1} {:>13} {:>12.1} {:>12}",
            x.context,
            x.prefill_s,
            x.prefill_tok_s,
            x.decode_tok_s,
            format!("{:.1} ({:.1})", x.decode_read_mb, x.decode_kv_mb),
            x.decode_read_gbs,
            format!(
                "{:.1} {:.0}%",
                x.stream_read_gbs,
                100.0 * x.decode_read_gbs / x.stream_read_gbs.max(1e-9)
            ),
        );
    }
    if let Some(e) = &r.experts {
        println!("{}", e.sentence());
    }
    Ok(())
}

pub(super) fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
        )
        .0 as u32
}
