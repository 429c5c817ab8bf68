//! `longctx bench batched`: many sequences at once through the scheduler (continuous
//! batching), as `llama-batched-bench` measures llama.cpp: B sequences, each a prompt of
//! PP tokens and TG new tokens. Reported per B: the generation rate while only decode rows
//! run (`S_TG`: tokens / time of those steps, llama-batched-bench's figure), the prefill
//! rate (`S_PP`), and the whole run's rate (all prompt and new tokens over the wall time).

use super::kernels::machine;
use super::timing::random_tokens;
use crate::commands::DecodeOpts;
use anyhow::Result;
use longctx_engine::generate::Sampling;
use longctx_engine::sched::{Event, Request, SchedConfig, Scheduler};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name (org/name[:FILE], from the
    /// local Hugging Face cache). Default: SmolLM2-135M-Instruct (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent sequences, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4, 16, 64])]
    concurrency: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 128)]
    new: usize,
    /// Rows (tokens) per forward step: decode rows first, then prompt chunks.
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Softmax temperature each sequence samples at (seeded per sequence); 0 is greedy. A
    /// server's requests sample (the OpenAI API's default is 1). Default: 0.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[command(flatten)]
    decode: DecodeOpts,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    sequences: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    total_tok_s: f64,
    wall_s: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    path: String,
    model: String,
    prompt: usize,
    new: usize,
    temperature: f32,
    rows: Vec<Row>,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.prompt >= 1 && args.new >= 1,
        "--prompt and --new must be at least 1"
    );
    anyhow::ensure!(
        args.concurrency.iter().all(|c| *c >= 1),
        "--concurrency values must be at least 1"
    );
    let sampling = Sampling {
        temperature: args.temperature,
        ..Sampling::default()
    };
    sampling.validate().map_err(|e| {
        anyhow::anyhow!(
            "--{} must be {}, got {}",
            e.field.replace('_', "-"),
            e.range,
            e.value
        )
    })?;
    let path = crate::commands::resolve_model(&args.model)?;
    let m = args.decode.open(&Some(path.clone()))?;
    let vocab = m.model.cfg.vocab as u32;
    let mut rows = vec![];
    let steps: usize = args
        .concurrency
        .iter()
        .map(|b| b * (args.prompt + args.new))
        .sum();
    let bar = crate::commands::Progress::new(steps as u64, "bench batched", "tokens");
    for (k, &b) in args.concurrency.iter().enumerate() {
        let kv = args.decode.kv().with_host_tier();
        let store = m.model.kv_store(&kv)?;
        // Room for every sequence whole: the benchmark measures batching, not preemption.
        let total = b * (args.prompt + args.new).div_ceil(kv.block_tokens) * kv.block_tokens;
        let mut s = Scheduler::new(
            &m.model,
            store,
            SchedConfig {
                max_running: b,
                max_waiting: b,
                step_tokens: args.step_tokens,
                max_context: args.prompt + args.new,
                kv_tokens: total,
                prefix_entries: 0,
                // Throughput: every step takes its whole row budget, on every thread.
                max_slowdown: 0.0,
                prompt_lane: false,
            },
        );
        // Distinct prompts (no shared prefix), a fixed seed per run.
        for i in 0..b {
            let seed = (k * 1000 + i) as u64;
            let prompt = random_tokens(args.prompt, seed, vocab);
            s.submit(Request {
                prompt,
                max_tokens: args.new,
                sampling: Sampling {
                    seed,
                    ..sampling.clone()
                },
                // No stop token: every sequence runs its TG tokens, as llama-batched-bench.
                stop: vec![],
            })?;
        }
        let (mut pp_s, mut tg_s, mut tg_tokens) = (0.0, 0.0, 0u64);
        let t0 = Instant::now();
        while !s.idle() {
            let before = s.stats().prefill_tokens;
            let t = Instant::now();
            let ev = s.step();
            let dt = t.elapsed().as_secs_f64();
            if let Some(Event::Failed { error, .. }) =
                ev.iter().find(|e| matches!(e, Event::Failed { .. }))
            {
                anyhow::bail!("a sequence failed: {error}");
            }
            let new = ev
                .iter()
                .filter(|e| matches!(e, Event::Token { .. }))
                .count() as u64;
            let read = s.stats().prefill_tokens - before;
            bar.inc(read + new);
            if read > 0 {
                pp_s += dt;
            } else {
                tg_s += dt;
                tg_tokens += new;
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let row = Row {
            sequences: b,
            prefill_tok_s: (b * args.prompt) as f64 / pp_s.max(1e-9),
            decode_tok_s: tg_tokens as f64 / tg_s.max(1e-9),
            total_tok_s: total as f64 / wall,
            wall_s: wall,
        };
        if !args.json {
            bar.suspend(|| println!(
                "B {:>3}: prefill {:>8.1} tok/s, decode {:>8.1} tok/s (S_TG), all {:>8.1} tok/s, {:.1} s",
                row.sequences, row.prefill_tok_s, row.decode_tok_s, row.total_tok_s, row.wall_s
            ));
        }
        rows.push(row);
    }
    bar.finish_and_clear();
    if args.json {
        let r = Report {
            machine: machine(),
            threads: rayon::current_num_threads(),
            path: args.decode.describe(),
            model: path.display().to_string(),
            prompt: args.prompt,
            new: args.new,
            temperature: args.temperature,
            rows,
        };
        println!("{}", serde_json::to_string_pretty(&r)?);
    }
    Ok(())
}
