//! `longctx generate`.

use crate::commands::StreamPrinter;
use anyhow::Result;
use longctx_engine::generate::{generate, Sampler, Sampling};
use longctx_engine::Logits;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file or a Hugging Face model directory (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print tokens as they come.
    #[arg(long)]
    stream: bool,
    /// Prompt plus new tokens allowed (default: the model's trained context).
    #[arg(long)]
    max_context: Option<usize>,
    #[command(flatten)]
    decode: super::DecodeOpts,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.temperature >= 0.0,
        "--temperature must not be negative"
    );
    anyhow::ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p must be within (0, 1]"
    );
    let m = args.decode.open(&args.model)?;
    let text = if args.chat {
        m.tokenizer.render_chat(&[("user", &args.prompt)])?
    } else {
        args.prompt.clone()
    };
    let ids = m.tokenizer.encode(&text)?;
    anyhow::ensure!(!ids.is_empty(), "the prompt is empty");
    let limit = args.max_context.unwrap_or(m.model.cfg.max_position);
    // Saturating: a --max-tokens near usize::MAX must not wrap past the check.
    let needed = ids.len().saturating_add(args.max_tokens);
    if needed > limit {
        return Err(longctx_engine::EngineError::PromptTooLong {
            prompt: ids.len(),
            new: args.max_tokens,
            limit,
        }
        .into());
    }
    let store = m.model.kv_store(&args.decode.kv())?;
    let seq = store.create_seq();
    let t0 = std::time::Instant::now();
    let logits = m
        .model
        .forward(&ids, 0, &store, seq, Logits::Last, None, 4)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut printer = StreamPrinter::default();
    let out = generate(
        &m.model,
        &store,
        seq,
        ids.len(),
        &logits,
        args.max_tokens,
        &mut sampler,
        &m.stop_tokens(),
        None,
        4,
        |t| {
            if args.stream {
                printer.push(&m.tokenizer, t)?;
            }
            Ok(())
        },
    )?;
    printer.finish(&m.tokenizer.decode(&out.tokens)?);
    // The time to the first token counts the prefill (once it counted only the sampling).
    eprintln!(
        "{} prompt tokens, prefill {:.2} s ({:.1} tok/s); {} new; first token {:.2} s, decode \
         {:.1} tok/s",
        ids.len(),
        prefill_s,
        ids.len() as f64 / prefill_s.max(1e-9),
        out.tokens.len(),
        prefill_s + out.first_token_s,
        out.tokens.len().saturating_sub(1) as f64 / out.decode_s.max(1e-9)
    );
    Ok(())
}
