//! `longctx bench serving`: what a server's users feel, through the scheduler.
//! - Prefix reuse: two questions on one document; the second's time to first token and the
//!   prompt tokens it took from the prefix cache.
//! - Latency under load: S streams decoding, then a long prompt arrives; its time to first
//!   token against the same prompt on an idle model, and the streams' inter-token latency
//!   before and while it is read.

use super::timing::random_tokens;
use crate::commands::DecodeOpts;
use anyhow::Result;
use longctx_engine::generate::Sampling;
use longctx_engine::sched::{Event, Request, RequestId, SchedConfig, Scheduler};
use longctx_engine::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name. Default: SmolLM2-135M-Instruct
    /// (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Document tokens for the prefix-reuse case.
    #[arg(long, default_value_t = 8000)]
    document: usize,
    /// Streams decoding in the latency case.
    #[arg(long, default_value_t = 16)]
    streams: usize,
    /// Tokens of the prompt that arrives while they decode.
    #[arg(long, default_value_t = 4096)]
    long_prompt: usize,
    /// Rows (tokens) per forward step: decode rows first, then prompt chunks.
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// While requests decode, a step reads only as many prompt rows as keep it within this
    /// many times the time of its decode rows alone (0: only the row budget limits it).
    #[arg(long, default_value_t = 3.0)]
    max_slowdown: f64,
    /// Reads a prompt in shared steps with the decoding requests, on every thread, instead
    /// of in a lane of its own beside them (half the threads each; the default with two or
    /// more threads).
    #[arg(long)]
    no_prompt_lane: bool,
    #[command(flatten)]
    decode: DecodeOpts,
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: Sampling::default(),
        stop: vec![],
    }
}

/// Steps until `id` has its first token: the seconds it took.
fn first_token(s: &mut Scheduler, id: RequestId) -> Result<f64> {
    let t = Instant::now();
    loop {
        for e in s.step() {
            match e {
                Event::Token { id: i, .. } if i == id => return Ok(t.elapsed().as_secs_f64()),
                Event::Failed { error, .. } => anyhow::bail!("{error}"),
                _ => {}
            }
        }
    }
}

fn drain(s: &mut Scheduler) {
    while !s.idle() {
        s.step();
    }
}

fn scheduler<'m>(m: &'m Model, a: &Args, context: usize, prefix: usize) -> Result<Scheduler<'m>> {
    let kv = a.decode.kv().with_host_tier();
    Ok(Scheduler::new(
        m,
        m.kv_store(&kv)?,
        SchedConfig {
            max_running: a.streams + 2,
            max_waiting: a.streams + 2,
            step_tokens: a.step_tokens,
            max_context: context,
            kv_tokens: context.div_ceil(kv.block_tokens) * kv.block_tokens * (a.streams + 2),
            prefix_entries: prefix,
            max_slowdown: a.max_slowdown,
            prompt_lane: !a.no_prompt_lane,
        },
    ))
}

pub fn run(a: Args) -> Result<()> {
    let m = a.decode.open(&a.model)?;
    let vocab = m.model.cfg.vocab as u32;
    let ctx = m.model.cfg.max_position;
    anyhow::ensure!(
        a.document + 40 <= ctx,
        "--document must leave room in the context"
    );
    anyhow::ensure!(
        a.long_prompt + 600 <= ctx,
        "--long-prompt must fit the context"
    );
    println!(
        "{} threads, {}, step {} rows, max slowdown {}, prompt lane {}",
        rayon::current_num_threads(),
        a.decode.describe(),
        a.step_tokens,
        a.max_slowdown,
        if a.no_prompt_lane { "off" } else { "on" }
    );

    // Five phases, each a few seconds to minutes: two questions, a long prompt alone, the
    // streams starting, the long prompt under load.
    let bar = crate::commands::Progress::new(5, "bench serving", "phases");
    // Prefix reuse: a document, then two questions on it.
    let mut s = scheduler(&m.model, &a, ctx, 16)?;
    let doc = random_tokens(a.document, 1, vocab);
    let q = |i: u64| [doc.clone(), random_tokens(20, 100 + i, vocab)].concat();
    let first = s.submit(request(q(1), 8))?;
    let t1 = first_token(&mut s, first)?;
    drain(&mut s);
    bar.inc(1);
    let second = s.submit(request(q(2), 8))?;
    let t2 = first_token(&mut s, second)?;
    drain(&mut s);
    bar.inc(1);
    let st = s.stats();
    bar.suspend(|| {
        println!(
            "prefix reuse, {}-token document: first question {:.3} s to its first token, second \
         {:.3} s ({:.1}% of the first), {} of its {} prompt tokens from the cache",
            a.document,
            t1,
            t2,
            100.0 * t2 / t1,
            st.cached_tokens,
            a.document + 20
        )
    });

    // Latency under load.
    let long = random_tokens(a.long_prompt, 7, vocab);
    // The prompt alone, timed before and after the loaded case (this machine's speed drifts
    // by tens of percent within minutes): the ratio is to their mean.
    let idle = |a: &Args| -> Result<f64> {
        let mut s = scheduler(&m.model, a, ctx, 0)?;
        let alone = s.submit(request(long.clone(), 1))?;
        let t = first_token(&mut s, alone)?;
        drain(&mut s);
        Ok(t)
    };
    let idle_before = idle(&a)?;
    bar.inc(1);
    let mut s = scheduler(&m.model, &a, ctx, 0)?;
    let mut streams = vec![];
    for i in 0..a.streams {
        streams.push(s.submit(request(
            random_tokens(512, 1000 + i as u64, vocab),
            100_000.min(ctx - 600),
        ))?);
    }
    // Until every stream decodes, then the steady inter-token latency.
    let mut started = std::collections::HashSet::new();
    while started.len() < a.streams {
        for e in s.step() {
            if let Event::Token { id, .. } = e {
                started.insert(id);
            }
        }
    }
    bar.inc(1);
    // The streams' tokens as they come out (a step in two lanes gives several rounds of
    // them): each stream's gaps between tokens, timed at the events.
    let mut last: std::collections::HashMap<RequestId, Instant> =
        streams.iter().map(|id| (*id, Instant::now())).collect();
    let mut gaps = (0usize, 0f64, 0f64);
    let mut on_token = |id: RequestId, gaps: &mut (usize, f64, f64)| {
        if let Some(t) = last.get_mut(&id) {
            let now = Instant::now();
            let g = now.duration_since(*t).as_secs_f64();
            *t = now;
            *gaps = (gaps.0 + 1, gaps.1 + g, gaps.2.max(g));
        }
    };
    // Ten tokens a stream before.
    while gaps.0 < 10 * a.streams {
        s.step_with(&mut |e| {
            if let Event::Token { id, .. } = e {
                on_token(id, &mut gaps);
            }
        });
    }
    let itl = gaps.1 / gaps.0 as f64;
    let id = s.submit(request(long.clone(), 1))?;
    let t = Instant::now();
    let mut during = (0usize, 0f64, 0f64);
    let mut loaded_ttft = None;
    while loaded_ttft.is_none() {
        s.step_with(&mut |e| {
            if let Event::Token { id: i, .. } = e {
                if i == id {
                    loaded_ttft = Some(t.elapsed().as_secs_f64());
                } else {
                    on_token(i, &mut during);
                }
            }
        });
    }
    let loaded_ttft = loaded_ttft.expect("the loop ends on it");
    let (during, worst) = (during.1 / during.0.max(1) as f64, during.2);
    drop(s);
    let idle_after = idle(&a)?;
    let idle_ttft = (idle_before + idle_after) / 2.0;
    bar.inc(1);
    bar.finish_and_clear();
    println!(
        "latency under load, {} streams decoding, a {}-token prompt arrives: its first token \
         after {:.2} s ({:.2}x its {:.2} s on an idle model, {:.2} s before and {:.2} s after); \
         the streams' inter-token latency {:.1} ms before, {:.1} ms mean ({:.2}x) and {:.1} ms \
         worst while it is read",
        a.streams,
        a.long_prompt,
        loaded_ttft,
        loaded_ttft / idle_ttft,
        idle_ttft,
        idle_before,
        idle_after,
        itl * 1e3,
        during * 1e3,
        during / itl,
        worst * 1e3
    );
    Ok(())
}
