//! `longctx ask`: a question about a repository, answered from its files.

use crate::commands::{progress_bar, StreamPrinter};
use anyhow::{Context, Result};
use longctx_chunked_prefill::{prefill, Checkpoints, ChunkModel, Chunking, PrefillOptions};
use longctx_engine::apps::ask::{
    cached_packings, collect_files, common_prefix, pack, snapshot_dir, write_index, PackIndex,
    Packed, PackedFile,
};
use longctx_engine::config::rope_override;
use longctx_engine::generate::{generate, Sampler, Sampling};
use longctx_engine::{fetch, KvOptions, Logits, Runner};
use longctx_kvstore::{cache, KvStore, SeqId, SnapshotMeta};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The repository to read: a directory whose text files answer the question (required).
    #[arg(long)]
    repo: PathBuf,
    /// The question to answer from the repository's files (required; quote it; `-` reads it
    /// from stdin).
    question: String,
    /// More instructions for the model, after ask's own system message (which says how the
    /// files are laid out). Default: none.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// A .gguf file, a Hugging Face model directory or hub name (org/name[:FILE], from the
    /// local Hugging Face cache). Default: SmolLM2-135M-Instruct (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt plus answer budget in tokens (default: the model's trained context).
    #[arg(long)]
    max_context: Option<usize>,
    /// Longest answer in tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Only files matching these globs (gitignore syntax; repeat the flag for more).
    /// Default: every text file not ignored by the repository's .gitignore.
    #[arg(long)]
    include: Vec<String>,
    /// Leave out files matching these globs (gitignore syntax; repeat the flag for more).
    /// Default: none beyond .gitignore, binaries and --max-file-bytes.
    #[arg(long)]
    exclude: Vec<String>,
    /// Files larger than this, in bytes, are skipped.
    #[arg(long, default_value_t = 256 * 1024)]
    max_file_bytes: u64,
    /// RoPE scaling to run past the trained length: none, linear, ntk, dynamic, yarn.
    #[arg(long, default_value = "none")]
    rope_scaling: String,
    /// Context extension factor of --rope-scaling (a multiple of the trained length).
    #[arg(long, default_value_t = 1.0)]
    rope_factor: f64,
    /// Neither read nor write the KV snapshot of the repository.
    #[arg(long)]
    no_cache: bool,
    /// Disk the KV snapshots in $LONGCTX_HOME/kv may take, with a unit (4GiB, 500MB); past
    /// it the least recently used go.
    #[arg(long, default_value = "4GiB", value_name = "SIZE")]
    kv_cache_limit: String,
    #[command(flatten)]
    decode: super::DecodeOpts,
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
    #[command(flatten)]
    stats: super::StatsOpts,
}

pub fn run(mut args: Args) -> Result<()> {
    let t0 = Instant::now();
    if args.question == "-" {
        args.question = super::input::prompt_text(Some("-"), None)?;
    }
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    anyhow::ensure!(!args.question.trim().is_empty(), "the question is empty");
    let cache_limit = crate::units::bytes(&args.kv_cache_limit)
        .map_err(|e| anyhow::anyhow!("--kv-cache-limit: {e}"))?;
    // A repetition penalty by default: SmolLM2-135M repeated one sentence to the token
    // limit without it.
    let sampling = args.sampling.resolve(&Sampling::answering())?;
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
    let kv_root = home.join("kv");
    // Earlier packings of this model whose KV is on disk: the packer may start with their
    // files, so their KV serves this question too.
    let priors = if args.no_cache {
        vec![]
    } else {
        cached_packings(&kv_root, &fingerprint)
    };
    let prior_files: Vec<Vec<PackedFile>> = priors.iter().map(|(_, ix)| ix.files.clone()).collect();
    let packed = pack(
        &m.tokenizer,
        &files,
        &args.question,
        budget,
        args.max_tokens,
        &prior_files,
        args.system.as_deref(),
    )?;
    report_packing(&packed, files.len(), skipped.len());
    let snap = snapshot_dir(&home, &fingerprint, &packed.prefix);
    let meta = SnapshotMeta {
        fingerprint: &fingerprint,
        tokens: &packed.prefix,
    };
    // From here the time to the first token runs: the snapshot's load or the prefill, the
    // question, the first token.
    let mut clock = super::Clock::start_after(t0);
    // The cached prompt sharing the longest prefix with this one.
    let cached = priors
        .iter()
        .map(|(dir, ix)| (dir, ix, common_prefix(&ix.tokens, &packed.prefix)))
        .filter(|(_, _, n)| *n >= MIN_REUSE || *n == packed.prefix.len())
        .max_by_key(|(_, _, n)| *n)
        .and_then(|(dir, ix, n)| {
            load_prefix(&store, dir, &fingerprint, &ix.tokens, n).map(|seq| (seq, n, dir))
        });
    // Prompt tokens whose KV this run did not compute (a snapshot, an interrupted prefill).
    let reused;
    let seq = match cached {
        Some((seq, n, dir)) => {
            reused = n;
            eprintln!(
                "reusing {n} of {} prefix tokens from the KV cache ({})",
                packed.prefix.len(),
                dir.display()
            );
            if n < packed.prefix.len() {
                prefill_rest(&runner, &store, seq, &packed.prefix, n)?;
            }
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
            reused = done.resumed_from;
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
            done.seq
        }
    };
    // The prefix's KV, kept (copy-on-write) while the question and answer extend `seq`, is
    // saved after the answer: writing it first would delay the first token.
    let to_save = (!args.no_cache && reused < packed.prefix.len())
        .then(|| store.fork(seq))
        .transpose()?;
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
    clock.prefilled();
    let mut sampler = Sampler::new(sampling);
    let mut printer = StreamPrinter::default();
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
            clock.token();
            printer.push(&m.tokenizer, t)
        },
    )?;
    printer.finish(&m.tokenizer.decode(&out.tokens)?);
    let prompt = packed.prefix.len() + packed.suffix.len();
    let mut stats = clock.finish(
        prompt - reused,
        reused,
        out.tokens.len(),
        super::KvBytes::of(&store),
    );
    stats.experts = m.model.expert_stats();
    super::print_run_stats(&stats, args.stats.json);
    if let Some(saved) = to_save {
        let ix = PackIndex {
            fingerprint: fingerprint.clone(),
            files: packed.included.clone(),
            tokens: packed.prefix.clone(),
        };
        let r = store
            .save_snapshot(saved, &snap, &meta)
            .map_err(anyhow::Error::from)
            .and_then(|_| Ok(write_index(&snap, &ix)?));
        if let Err(e) = r {
            eprintln!("warning: could not save the KV snapshot: {e}");
        }
        let _ = store.free(saved);
    }
    if !args.no_cache {
        let _ = cache::touch(&snap);
        evict(&kv_root, cache_limit, &snap);
    }
    Ok(())
}

/// A cached prefix shorter than this (and than the prompt's) is not worth reading a
/// snapshot for.
const MIN_REUSE: usize = 256;

/// The first `n` tokens of the snapshot in `dir` (made from `tokens`) as a new sequence;
/// `None`, with a warning, where it cannot be read.
fn load_prefix(
    store: &KvStore,
    dir: &Path,
    fingerprint: &str,
    tokens: &[u32],
    n: usize,
) -> Option<SeqId> {
    let meta = SnapshotMeta {
        fingerprint,
        tokens,
    };
    let seq = match store.load_snapshot(dir, &meta) {
        Ok(seq) => seq,
        Err(e) => {
            eprintln!(
                "warning: the cached KV in {} is unusable ({e}); prefilling",
                dir.display()
            );
            return None;
        }
    };
    if let Err(e) = store.truncate(seq, n) {
        eprintln!("warning: could not cut the cached KV to {n} tokens ({e}); prefilling");
        let _ = store.free(seq);
        return None;
    }
    let _ = cache::touch(dir);
    Some(seq)
}

/// Prefills `prefix[from..]` onto `seq`, which holds the first `from` tokens.
fn prefill_rest(
    runner: &Runner,
    store: &KvStore,
    seq: SeqId,
    prefix: &[u32],
    from: usize,
) -> Result<()> {
    let t = Instant::now();
    let rest = prefix.len() - from;
    let bar = progress_bar(rest as u64, "prefill");
    let mut pos = from;
    // Chunks of 1024, as the fresh prefill takes them.
    for chunk in prefix[from..].chunks(1024) {
        runner.forward_chunk(chunk, pos, store, seq)?;
        pos += chunk.len();
        bar.set_position((pos - from) as u64);
    }
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "prefilled the other {rest} tokens in {secs:.1} s ({:.0} tok/s)",
        rest as f64 / secs.max(1e-9)
    );
    Ok(())
}

/// Which files went in (in prompt order, with their tokens) and which did not.
fn report_packing(p: &Packed, files: usize, skipped: usize) {
    let k = |n: usize| {
        if n >= 1000 {
            format!("{:.1}k", n as f64 / 1000.0)
        } else {
            n.to_string()
        }
    };
    let how = if p.whole_repository {
        "the whole repository, in path order".to_string()
    } else if p.kept_from_cache > 0 {
        format!(
            "the first {} as a cached prompt had them, then by relevance to the question",
            p.kept_from_cache
        )
    } else {
        "by relevance to the question, most relevant last".to_string()
    };
    let list: Vec<String> = p
        .included
        .iter()
        .map(|f| format!("{} {}", f.path, k(f.tokens)))
        .collect();
    eprintln!(
        "packed {} of {files} files into {} prompt tokens ({how}; {skipped} skipped as binary, \
         huge or unreadable): {}",
        p.included.len(),
        p.prefix.len() + p.suffix.len(),
        list.join(", ")
    );
    if !p.left_out.is_empty() {
        let shown: Vec<&str> = p.left_out.iter().take(10).map(|s| s.as_str()).collect();
        eprintln!(
            "left out ({} files, most relevant first): {}{}",
            p.left_out.len(),
            shown.join(", "),
            if p.left_out.len() > 10 { ", ..." } else { "" }
        );
    }
}

/// Holds the snapshot cache under `limit` bytes, least recently used out, and says what went.
fn evict(kv_root: &Path, limit: u64, in_use: &Path) {
    let gone = cache::evict_lru(kv_root, limit, &[in_use]);
    if gone.is_empty() {
        return;
    }
    let bytes: u64 = gone.iter().map(|e| e.bytes).sum();
    let names: Vec<String> = gone
        .iter()
        .map(|e| {
            e.dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        })
        .collect();
    eprintln!(
        "KV cache over its --kv-cache-limit of {:.2} GB: evicted {} least recently used \
         snapshot(s), {:.2} GB ({})",
        limit as f64 / 1e9,
        gone.len(),
        bytes as f64 / 1e9,
        names.join(", ")
    );
}
