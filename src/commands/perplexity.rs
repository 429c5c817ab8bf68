//! `longctx perplexity`: every token after the first scored given all before it, in
//! non-overlapping windows of `--ctx` tokens (each scored after its first token).

use anyhow::{Context, Result};
use longctx_engine::generate::nll;
use longctx_engine::{KvOptions, Logits};
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name. Default: SmolLM2-135M-Instruct
    /// (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text file to score (UTF-8). Required.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens. Default: the model's trained context.
    #[arg(long)]
    ctx: Option<usize>,
    /// Tokens per forward pass inside a window (bounds activation memory).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// KV cache element type: f32 (exact), bf16 or q8 (llama.cpp's q8_0), to measure what a
    /// smaller KV costs in accuracy (the weights stay f32).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: super::KvDtype,
    /// Print the result as one JSON object on stdout (tokens, mean_nll, perplexity).
    /// Default: off (three lines of text).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    tokens: usize,
    mean_nll: f64,
    perplexity: f64,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.chunk >= 1, "--chunk must be at least 1");
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("reading {}", args.file.display()))?;
    let mut m = super::open(&args.model)?;
    // The exact path at full speed: f32 copies of the weights (on the CPU).
    super::prepare(&mut m.model, super::DecodeWeights::F32)?;
    let ids = m.tokenizer.encode(&text)?;
    anyhow::ensure!(
        ids.len() >= 2,
        "{} has fewer than two tokens",
        args.file.display()
    );
    let ctx = args.ctx.unwrap_or(m.model.cfg.max_position);
    anyhow::ensure!(ctx >= 2, "--ctx must be at least 2");
    let store = m.model.kv_store(&KvOptions {
        dtype: args.kv_dtype.dtype(),
        ..KvOptions::default()
    })?;
    let (mut total, mut scored) = (0f64, 0usize);
    let vocab = m.model.cfg.vocab;
    let bar = super::Progress::new(ids.len() as u64, "perplexity", "tokens");
    let mut done = 0u64;
    for window in ids.chunks(ctx) {
        let seq = store.create_seq();
        let mut pos = 0;
        for part in window.chunks(args.chunk) {
            let logits = m
                .model
                .forward(part, pos, &store, seq, Logits::All, None, 4)?;
            for (i, row) in logits.chunks_exact(vocab).enumerate() {
                if let Some(next) = window.get(pos + i + 1) {
                    total += nll(row, *next);
                    scored += 1;
                }
            }
            pos += part.len();
            done += part.len() as u64;
            bar.set_position(done);
        }
        store.free(seq)?;
    }
    bar.finish_and_clear();
    anyhow::ensure!(scored > 0, "no token to score");
    let mean = total / scored as f64;
    let r = Report {
        tokens: scored,
        mean_nll: mean,
        perplexity: mean.exp(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "tokens scored: {}\nmean NLL: {:.6} nats\nperplexity: {:.4}",
            r.tokens, r.mean_nll, r.perplexity
        );
    }
    Ok(())
}
