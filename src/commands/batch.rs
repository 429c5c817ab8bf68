//! `longctx batch`: JSONL jobs in, one JSONL result line per job out, resumable.

use crate::commands::progress_bar;
use anyhow::{Context, Result};
use longctx_engine::apps::batch::{error_record, parse_job, Job, Results, Task};
use longctx_engine::generate::{complete, Sampler, Sampling};
use longctx_engine::{EngineError, Loaded, Runner};
use serde_json::json;
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Jobs, one JSON object per line: {"id", "prompt"} or {"id", "document" |
    /// "document_path", "question"}, with optional "max_tokens" and "temperature".
    #[arg(long)]
    input: PathBuf,
    /// Results, appended one line per job; ids already there are skipped.
    #[arg(long)]
    output: PathBuf,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt plus answer budget in tokens (default: the model's trained context).
    #[arg(long)]
    max_context: Option<usize>,
    /// Answer length when a job does not say.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    decode: super::DecodeOpts,
}

fn run_job(
    m: &Loaded,
    kv: &longctx_engine::KvOptions,
    job: &Job,
    limit: usize,
    default_max: usize,
) -> Result<serde_json::Value, EngineError> {
    let t0 = Instant::now();
    let text = match &job.task {
        Task::Prompt(p) => m
            .tokenizer
            .render_chat(&[("user", p)])
            .or_else(|_| Ok::<_, EngineError>(p.clone()))?,
        Task::Document { document, question } => {
            let user = format!("Document:\n{document}\n\nQuestion: {question}");
            m.tokenizer
                .render_chat(&[
                    ("system", "Answer the question from the document."),
                    ("user", &user),
                ])
                .or_else(|_| Ok::<_, EngineError>(format!("{user}\nAnswer:")))?
        }
    };
    let ids = m.tokenizer.encode(&text)?;
    let max_tokens = job.max_tokens.unwrap_or(default_max);
    // Saturating: a "max_tokens" near usize::MAX must not wrap past the check.
    let needed = ids.len().saturating_add(max_tokens);
    if needed > limit {
        return Err(EngineError::PromptTooLong {
            tokens: needed,
            limit,
        });
    }
    let store = m.model.kv_store(kv)?;
    let mut sampler = Sampler::new(Sampling {
        temperature: job.temperature.unwrap_or(0.0),
        ..Sampling::default()
    });
    let out = complete(
        &Runner::new(&m.model),
        &store,
        &ids,
        max_tokens,
        &mut sampler,
        &m.stop_tokens(),
        |_| Ok(()),
    )?;
    Ok(json!({
        "id": job.id,
        "output": m.tokenizer.decode(&out.tokens)?,
        "prompt_tokens": ids.len(),
        "tokens": out.tokens.len(),
        "seconds": t0.elapsed().as_secs_f64(),
    }))
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    let input = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(input)
        .lines()
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", args.input.display()))?;
    let mut results = Results::open(&args.output)
        .with_context(|| format!("opening {}", args.output.display()))?;
    let base = args
        .input
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let jobs: Vec<(usize, &String)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l))
        .collect();
    let m = args.decode.open(&args.model)?;
    let kv = args.decode.kv();
    let limit = args.max_context.unwrap_or(m.model.cfg.max_position);
    let bar = progress_bar(jobs.len() as u64, "jobs");
    let (mut ok, mut failed, mut skipped) = (0, 0, 0);
    for (line_no, line) in jobs {
        bar.inc(1);
        let record = match parse_job(line, line_no, &base) {
            Err(bad) => {
                if results.done.contains(&bad.id) {
                    skipped += 1;
                    continue;
                }
                failed += 1;
                error_record(&bad.id, &bad.error)
            }
            Ok(job) => {
                if results.done.contains(&job.id) {
                    skipped += 1;
                    continue;
                }
                match run_job(&m, &kv, &job, limit, args.max_tokens) {
                    Ok(r) => {
                        ok += 1;
                        r
                    }
                    Err(e) => {
                        failed += 1;
                        error_record(&job.id, &e.to_string())
                    }
                }
            }
        };
        results
            .write(&record)
            .with_context(|| format!("writing {}", results.path().display()))?;
    }
    bar.finish_and_clear();
    eprintln!(
        "batch: {ok} done, {failed} failed (error records), {skipped} skipped as already in {}",
        args.output.display()
    );
    Ok(())
}
