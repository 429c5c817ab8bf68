//! `longctx batch`: JSONL jobs in, one JSONL result line per job out, resumable.

use anyhow::{Context, Result};
use longctx_engine::apps::batch::{error_record, id_value, line_id, parse_job, Job, Results, Task};
use longctx_engine::generate::Sampling;
use longctx_engine::sched::{Event, Request, RequestId, SchedConfig, Scheduler};
use longctx_engine::{EngineError, Loaded};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Jobs file (JSONL; `-` reads stdin), one object per line: {"id", "prompt"} or {"id",
    /// "document" | "document_path", "question"}, optional "max_tokens", "temperature" and
    /// "chat" (true: the model's chat template; default false for a prompt, as `generate`,
    /// true for a document question, as `ask`).
    #[arg(long)]
    input: PathBuf,
    /// Results file (JSONL), appended one line per job; ids already there are skipped.
    #[arg(long)]
    output: PathBuf,
    /// A .gguf file, a Hugging Face model directory or hub name. Default: SmolLM2-135M-Instruct
    /// (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt plus answer budget in tokens. Default: the model's trained context.
    #[arg(long)]
    max_context: Option<usize>,
    /// Answer length in tokens when a job does not say ("max_tokens").
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Jobs answered at once, batched in each forward step (continuous batching). Jobs on
    /// the same document reuse its KV (the prefix cache).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[command(flatten)]
    decode: super::DecodeOpts,
    /// Every job's sampling; a job's own "temperature" wins.
    #[command(flatten)]
    sampling: super::sampling::SamplingArgs,
}

/// A job made ready for the scheduler: its prompt tokens and request.
fn prepare(
    m: &Loaded,
    job: &Job,
    limit: usize,
    default_max: usize,
    base: &Sampling,
) -> Result<Request, EngineError> {
    // A prompt is taken as `generate` takes it: as written unless the job says "chat": true
    // (batch once applied the template to every prompt, so the same prompt answered
    // differently here and in `generate`). A document question is wrapped, as `ask` wraps
    // it, unless "chat": false; a model without a template then gets plain text, which an
    // explicit "chat": true refuses.
    let text = match &job.task {
        Task::Prompt(p) if job.chat == Some(true) => m.tokenizer.render_chat(&[("user", p)])?,
        Task::Prompt(p) => p.clone(),
        Task::Document { document, question } => {
            let user = format!("Document:\n{document}\n\nQuestion: {question}");
            let plain = format!("{user}\nAnswer:");
            match job.chat {
                Some(false) => plain,
                Some(true) => m.tokenizer.render_chat(&[
                    ("system", "Answer the question from the document."),
                    ("user", &user),
                ])?,
                None => m
                    .tokenizer
                    .render_chat(&[
                        ("system", "Answer the question from the document."),
                        ("user", &user),
                    ])
                    .unwrap_or(plain),
            }
        }
    };
    let ids = m.tokenizer.encode(&text)?;
    let max_tokens = job.max_tokens.unwrap_or(default_max);
    // Saturating: a "max_tokens" near usize::MAX must not wrap past the check.
    let needed = ids.len().saturating_add(max_tokens);
    if needed > limit {
        return Err(EngineError::PromptTooLong {
            prompt: ids.len(),
            new: max_tokens,
            limit,
        });
    }
    if ids.is_empty() {
        return Err(EngineError::Batch("the prompt is empty".into()));
    }
    Ok(Request {
        prompt: ids,
        max_tokens,
        sampling: Sampling {
            temperature: job.temperature.unwrap_or(base.temperature),
            ..base.clone()
        },
        stop: m.stop_tokens(),
    })
}

/// A job in the scheduler.
struct InFlight {
    id: String,
    tokens: Vec<u32>,
    start: Instant,
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    // Every penalty off unless asked for, as in `generate`.
    let sampling = args.sampling.resolve(&Sampling::default())?;
    anyhow::ensure!(
        !same_file(&args.input, &args.output),
        "--input and --output are the same file ({}): the results would be appended to the jobs",
        args.input.display()
    );
    let bytes = if args.input == std::path::Path::new("-") {
        let mut b = vec![];
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut b).context("reading stdin")?;
        b
    } else {
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?
    };
    // Line by line: one line that is not UTF-8 is that line's error record, not the file's.
    let lines: Vec<Result<&str, String>> = bytes
        .split(|b| *b == b'\n')
        .map(|l| {
            std::str::from_utf8(l.strip_suffix(b"\r").unwrap_or(l))
                .map_err(|e| format!("not UTF-8 text ({e})"))
        })
        .collect();
    let mut results = Results::open(&args.output)
        .with_context(|| format!("opening {}", args.output.display()))?;
    let base = args
        .input
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let jobs: Vec<(usize, &Result<&str, String>)> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(|(i, l)| (i + 1, l))
        .collect();
    // Ids of this input and the line each was first seen on: a repeat is its own error.
    let mut first_line: HashMap<String, usize> = HashMap::new();
    let m = args.decode.open(&args.model)?;
    let kv = args.decode.kv().with_host_tier();
    let limit = args.max_context.unwrap_or(m.model.cfg.max_position);
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let bar = super::Progress::new(jobs.len() as u64, "batch", "jobs");
    let (mut ok, mut failed, mut skipped) = (0, 0, 0);
    let store = m.model.kv_store(&kv)?;
    let mut sched = Scheduler::new(
        &m.model,
        store,
        SchedConfig {
            max_running: args.concurrency,
            max_waiting: 2 * args.concurrency,
            max_context: limit,
            // Throughput over latency: every step takes its whole row budget, on every
            // thread.
            max_slowdown: 0.0,
            prompt_lane: false,
            kv_tokens: limit
                .div_ceil(kv.block_tokens)
                .saturating_mul(kv.block_tokens)
                .saturating_mul(args.concurrency),
            ..SchedConfig::default()
        },
    );
    let mut flight: HashMap<RequestId, InFlight> = HashMap::new();
    let mut pending = jobs.into_iter();
    let write = |results: &mut Results, record: &serde_json::Value| -> Result<()> {
        results
            .write(record)
            .with_context(|| format!("writing {}", results.path().display()))
    };
    loop {
        // Keep the scheduler's queue full: parse and submit jobs until it is.
        while flight.len() < 2 * args.concurrency {
            let Some((line_no, line)) = pending.next() else {
                break;
            };
            let parsed = match line {
                Ok(l) => parse_job(l, line_no, &base),
                Err(e) => Err(longctx_engine::apps::batch::BadJob {
                    id: line_id(line_no),
                    error: e.clone(),
                }),
            };
            // A repeated id: this line gets an error record of its own ("line:N"), the
            // first keeps the id.
            let parsed = match parsed {
                Ok(job) => match first_line.get(&job.id) {
                    Some(&first) => Err(longctx_engine::apps::batch::BadJob {
                        id: line_id(line_no),
                        error: format!("id {} repeats line {first}; not run", job.id),
                    }),
                    None => {
                        first_line.insert(job.id.clone(), line_no);
                        Ok(job)
                    }
                },
                Err(bad) => Err(bad),
            };
            let (id, req) = match parsed {
                Err(bad) => (bad.id, Err(format!("line {line_no}: {}", bad.error))),
                Ok(job) => {
                    let req = prepare(&m, &job, limit, args.max_tokens, &sampling)
                        .map_err(|e| e.to_string());
                    (job.id, req)
                }
            };
            if results.done.contains(&id) {
                skipped += 1;
                bar.inc(1);
                continue;
            }
            let submitted = req.and_then(|r| sched.submit(r).map_err(|e| e.to_string()));
            match submitted {
                Ok(rid) => {
                    flight.insert(
                        rid,
                        InFlight {
                            id,
                            tokens: vec![],
                            start: Instant::now(),
                        },
                    );
                }
                Err(e) => {
                    failed += 1;
                    bar.inc(1);
                    write(&mut results, &error_record(&id, &e))?;
                }
            }
        }
        if sched.idle() {
            break;
        }
        for ev in sched.step() {
            match ev {
                Event::Admitted { .. } => {}
                Event::Token { id, token } => {
                    if let Some(f) = flight.get_mut(&id) {
                        f.tokens.push(token);
                    }
                }
                Event::Done { id, usage, .. } => {
                    let Some(f) = flight.remove(&id) else {
                        continue;
                    };
                    bar.inc(1);
                    let record = match m.tokenizer.decode(&f.tokens) {
                        Ok(text) => {
                            ok += 1;
                            json!({
                                "id": id_value(&f.id),
                                "output": text,
                                "prompt_tokens": usage.prompt_tokens,
                                "cached_tokens": usage.cached_tokens,
                                "tokens": f.tokens.len(),
                                "seconds": f.start.elapsed().as_secs_f64(),
                            })
                        }
                        Err(e) => {
                            failed += 1;
                            error_record(&f.id, &e.to_string())
                        }
                    };
                    write(&mut results, &record)?;
                }
                Event::Failed { id, error } => {
                    let Some(f) = flight.remove(&id) else {
                        continue;
                    };
                    failed += 1;
                    bar.inc(1);
                    write(&mut results, &error_record(&f.id, &error))?;
                }
            }
        }
    }
    bar.finish_and_clear();
    let experts = m
        .model
        .expert_stats()
        .map_or(String::new(), |e| format!("; {}", e.sentence()));
    eprintln!(
        "batch: {ok} done, {failed} failed (error records), {skipped} skipped as already in \
         {}{experts}",
        args.output.display()
    );
    Ok(())
}

/// Whether two paths name one file (the second may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| -> Option<PathBuf> {
        p.canonicalize().ok().or_else(|| {
            let dir = p
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            Some(dir.canonicalize().ok()?.join(p.file_name()?))
        })
    };
    matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}
