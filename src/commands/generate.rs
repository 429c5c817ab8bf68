//! `longctx generate`.

use crate::commands::StreamPrinter;
use anyhow::Result;
use longctx_engine::generate::{generate, Sampler, Sampling};
use longctx_engine::Logits;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name (org/name[:FILE], from the
    /// local Hugging Face cache). Default: SmolLM2-135M-Instruct (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text; `-` reads it from stdin. One of --prompt and --file is required.
    #[arg(long, required_unless_present = "file", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from this file (`-`: stdin) instead of --prompt. Default: none.
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template. Default: off (the prompt as given).
    #[arg(long)]
    chat: bool,
    /// A system message before the prompt; implies --chat. Default: none.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// New tokens to generate at most (fewer if the model ends its answer).
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Print tokens as they come. Default: off (the whole text at the end).
    #[arg(long)]
    stream: bool,
    /// Prompt plus new tokens allowed, in tokens. Default: the model's trained context.
    #[arg(long)]
    max_context: Option<usize>,
    #[command(flatten)]
    decode: super::DecodeOpts,
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    stats: super::StatsOpts,
}

pub fn run(args: Args) -> Result<()> {
    let t0 = std::time::Instant::now();
    // Every penalty off unless asked for: generate samples the model as it is.
    let sampling = args.sampling.resolve(&Sampling::default())?;
    // Read before the model loads: a missing file fails at once.
    let prompt = super::input::prompt_text(args.prompt.as_deref(), args.file.as_deref())?;
    let m = args.decode.open(&args.model)?;
    let text = match &args.system {
        Some(sys) => m
            .tokenizer
            .render_chat(&[("system", sys), ("user", &prompt)])?,
        None if args.chat => m.tokenizer.render_chat(&[("user", &prompt)])?,
        None => prompt,
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
    // The time to the first token counts the prefill (it once counted only the sampling).
    let mut clock = super::Clock::start_after(t0);
    let logits = m
        .model
        .forward(&ids, 0, &store, seq, Logits::Last, None, 4)?;
    clock.prefilled();
    let mut sampler = Sampler::new(sampling);
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
            clock.token();
            if args.stream {
                printer.push(&m.tokenizer, t)?;
            }
            Ok(())
        },
    )?;
    printer.finish(&m.tokenizer.decode(&out.tokens)?);
    let mut stats = clock.finish(ids.len(), 0, out.tokens.len(), super::KvBytes::of(&store));
    stats.experts = m.model.expert_stats();
    super::print_run_stats(&stats, args.stats.json);
    Ok(())
}
