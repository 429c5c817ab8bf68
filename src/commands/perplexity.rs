//! `longctx perplexity`: every token after the first scored given all before it, in
//! non-overlapping windows of `--ctx` tokens (each scored after its first token).

use anyhow::{Context, Result};
use longctx_engine::generate::nll;
use longctx_engine::{KvOptions, Logits};
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to score.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens (default: the model's trained context).
    #[arg(long)]
    ctx: Option<usize>,
    /// Tokens per forward pass inside a window (bounds activation memory).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
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
    // The exact path at full speed: f32 copies of the weights.
    m.model.enable_f32_weights()?;
    let ids = m.tokenizer.encode(&text)?;
    anyhow::ensure!(
        ids.len() >= 2,
        "{} has fewer than two tokens",
        args.file.display()
    );
    let ctx = args.ctx.unwrap_or(m.model.cfg.max_position);
    anyhow::ensure!(ctx >= 2, "--ctx must be at least 2");
    let store = m.model.kv_store(&KvOptions::default())?;
    let (mut total, mut scored) = (0f64, 0usize);
    let vocab = m.model.cfg.vocab;
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
        }
        store.free(seq)?;
    }
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
