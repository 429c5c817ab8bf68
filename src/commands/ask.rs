//! `longctx ask`: a question about a repository, answered from its files.

use crate::commands::{progress_bar, StreamPrinter};
use anyhow::{Context, Result};
use longctx_chunked_prefill::{prefill, Checkpoints, Chunking, PrefillOptions};
use longctx_engine::apps::ask::{collect_files, pack, snapshot_dir};
use longctx_engine::config::rope_override;
use longctx_engine::generate::{generate, Sampler, Sampling};
use longctx_engine::{fetch, KvOptions, Logits, Runner};
use longctx_kvstore::SnapshotMeta;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The repository to read.
    #[arg(long)]
    repo: PathBuf,
    /// The question.
    question: String,
    /// A .gguf file or a Hugging Face directory (default: SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt plus answer budget in tokens (default: the model's trained context).
    #[arg(long)]
    max_context: Option<usize>,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Only files matching these globs (gitignore syntax).
    #[arg(long)]
    include: Vec<String>,
    /// Leave out files matching these globs.
    #[arg(long)]
    exclude: Vec<String>,
    /// Files larger than this are skipped.
    #[arg(long, default_value_t = 256 * 1024)]
    max_file_bytes: u64,
    /// RoPE scaling to run past the trained length: none, linear, ntk, dynamic, yarn.
    #[arg(long, default_value = "none")]
    rope_scaling: String,
    #[arg(long, default_value_t = 1.0)]
    rope_factor: f64,
    /// Neither read nor write the KV snapshot of the repository.
    #[arg(long)]
    no_cache: bool,
    #[command(flatten)]
    decode: super::DecodeOpts,
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    anyhow::ensure!(!args.question.trim().is_empty(), "the question is empty");
    let m = args.decode.open(&args.model)?;
    let cfg = &m.model.cfg;
    let budget = args.max_context.unwrap_or(cfg.max_position);
    let rope = rope_override(cfg, &args.rope_scaling, args.rope_factor)?;
    if budget > cfg.max_position && args.rope_scaling == "none" {
        eprintln!(
            "warning: --max-context {budget} is past the model's trained {} tokens; \
             consider --rope-scaling dynamic --rope-factor {}",
            cfg.max_position,
            budget.div_ceil(cfg.max_position)
        );
    }
    let (files, skipped) = collect_files(
        &args.repo,
        &args.include,
        &args.exclude,
        args.max_file_bytes,
    )
    .with_context(|| format!("reading {}", args.repo.display()))?;
    anyhow::ensure!(
        !files.is_empty(),
        "no text files to read in {} ({} skipped)",
        args.repo.display(),
        skipped.len()
    );
    let packed = pack(
        &m.tokenizer,
        &files,
        &args.question,
        budget,
        args.max_tokens,
    )?;
    eprintln!(
        "{} files packed into {} prompt tokens ({} skipped as binary, huge or unreadable)",
        packed.included.len(),
        packed.prefix.len() + packed.suffix.len(),
        skipped.len()
    );
    if !packed.left_out.is_empty() {
        let shown: Vec<&str> = packed
            .left_out
            .iter()
            .take(10)
            .map(|s| s.as_str())
            .collect();
        eprintln!(
            "left out for lack of room ({} files, least relevant last): {}{}",
            packed.left_out.len(),
            shown.join(", "),
            if packed.left_out.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
    }

    let home = fetch::home();
    let store = m.model.kv_store(&KvOptions {
        spill_dir: home.join("spill"),
        ..args.decode.kv()
    })?;
    // Dynamic NTK fixed at the context budget: the same for every question, so the KV of the
    // files is reusable.
    let runner = Runner {
        rope: Some(rope),
        ..Runner::new(&m.model)
    }
    .for_length(budget);
    let rope = runner.rope.clone().expect("set above");
    // What the snapshot's KV depends on: the model's content, the RoPE override, the KV
    // element type and block size.
    let kvc = store.config();
    let fingerprint = format!(
        "{}|{:?}|kv {:?} bt {}",
        m.fingerprint, rope, kvc.dtype, kvc.block_tokens
    );
    let snap = snapshot_dir(&home, &fingerprint, &packed.prefix);
    let meta = SnapshotMeta {
        fingerprint: &fingerprint,
        tokens: &packed.prefix,
    };
    let cached = if args.no_cache {
        None
    } else {
        store.load_snapshot(&snap, &meta).ok()
    };
    let seq = match cached {
        Some(seq) => {
            eprintln!(
                "reusing the prefilled KV of this repository ({} tokens) from {}",
                packed.prefix.len(),
                snap.display()
            );
            seq
        }
        None => {
            let bar = progress_bar(packed.prefix.len() as u64, "prefill");
            // A long prefill checkpoints every few chunks and on Ctrl-C, so an interrupted
            // one resumes where it stopped.
            let partial = snap.with_extension("partial");
            let opts = PrefillOptions {
                // Chunks of 1024 keep Ctrl-C prompt and cost little speed.
                chunking: Chunking::Fixed(1024),
                checkpoints: (!args.no_cache).then(|| Checkpoints {
                    dir: partial.clone(),
                    every: 4,
                    fingerprint: fingerprint.clone(),
                }),
            };
            let cancel = Arc::new(AtomicBool::new(false));
            let flag = cancel.clone();
            // Ignore a failure to install (a handler may exist already): Ctrl-C then just kills.
            let _ = ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed));
            let done = prefill(&runner, &store, &packed.prefix, &opts, &cancel, |p| {
                bar.set_position(p.done as u64)
            });
            bar.finish_and_clear();
            let done = done?;
            if let Some(e) = &done.checkpoint_error {
                eprintln!("warning: prefill checkpoints are off ({e}); an interrupted prefill starts over");
            }
            let _ = std::fs::remove_dir_all(&partial);
            let computed = packed.prefix.len() - done.resumed_from;
            eprintln!(
                "prefilled {computed} tokens in {:.1} s ({:.0} tok/s){}",
                done.seconds,
                computed as f64 / done.seconds,
                if done.resumed_from > 0 {
                    format!(
                        ", resuming an interrupted prefill at token {}",
                        done.resumed_from
                    )
                } else {
                    String::new()
                }
            );
            if !args.no_cache {
                if let Err(e) = store.save_snapshot(done.seq, &snap, &meta) {
                    eprintln!("warning: could not save the KV snapshot: {e}");
                }
            }
            done.seq
        }
    };
    let pos = packed.prefix.len();
    let logits = m.model.forward(
        &packed.suffix,
        pos,
        &store,
        seq,
        Logits::Last,
        Some(&rope),
        4,
    )?;
    let mut sampler = Sampler::new(Sampling::default());
    let mut printer = StreamPrinter::default();
    let mut ttft = None;
    let out = generate(
        &m.model,
        &store,
        seq,
        pos + packed.suffix.len(),
        &logits,
        args.max_tokens,
        &mut sampler,
        &m.stop_tokens(),
        Some(&rope),
        4,
        |t| {
            ttft.get_or_insert(t0.elapsed().as_secs_f64());
            printer.push(&m.tokenizer, t)
        },
    )?;
    printer.finish(&m.tokenizer.decode(&out.tokens)?);
    eprintln!(
        "time to first token {:.2} s; {} answer tokens at {:.1} tok/s",
        ttft.unwrap_or(t0.elapsed().as_secs_f64()),
        out.tokens.len(),
        out.tokens.len().saturating_sub(1) as f64 / out.decode_s.max(1e-9)
    );
    Ok(())
}
