//! `longctx bench kvstore`: the KV store's two measurements.
//!
//! 1. Streaming one layer's KV from the disk tier (cold page cache), beside a plain
//!    sequential read loop over the same spill file in the same command.
//! 2. Attention of a prefill chunk over a long KV with a quarter of it in the device tier and
//!    the rest on disk, for the keep-newest policy and LRU, beside the same KV all resident.

use super::kernels::machine;
use super::timing::fill_random;
use anyhow::{Context, Result};
use half::bf16;
use longctx_kernels::{AttnParams, AttnShape, DType, Mask};
use longctx_kvstore::{
    attend, Budgets, KvConfig, KvStore, Policy, Retention, SeqId, StreamOptions,
};
use serde::Serialize;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Tokens streamed from the disk tier (8 KV heads x 128 x bf16: 4 KiB per token).
    #[arg(long, default_value_t = 1 << 20)]
    stream_tokens: usize,
    /// Tokens of KV the attention case reads.
    #[arg(long, default_value_t = 1 << 18)]
    attn_tokens: usize,
    /// Queries in the attention case's prefill chunk (40 query heads, Scout's).
    #[arg(long, default_value_t = 64)]
    queries: usize,
    /// Share of the attention KV that fits the device tier, 0 to 1 (the rest is on disk).
    #[arg(long, default_value_t = 0.25)]
    device_fraction: f64,
    /// Blocks read ahead of use.
    #[arg(long, default_value_t = 8)]
    prefetch: usize,
    /// Timed repetitions (median reported); the page cache is dropped before each.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where the spill files go (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

const BLOCK_TOKENS: usize = 256;
const H_KV: usize = 8;
const D: usize = 128;
const H_Q: usize = 40;

#[derive(Serialize)]
struct StreamReport {
    tokens: usize,
    bytes: u64,
    raw_read_gbs: f64,
    store_stream_gbs: f64,
    ratio: f64,
    /// Every run: this virtual disk moves between two speeds from run to run.
    raw_runs_gbs: Vec<f64>,
    stream_runs_gbs: Vec<f64>,
}

#[derive(Serialize)]
struct AttnRow {
    config: String,
    median_ms: f64,
    vs_resident: f64,
    spill_reads: u64,
    spill_writes: u64,
    promotions: u64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    block_tokens: usize,
    prefetch: usize,
    stream: StreamReport,
    attention_shape: String,
    attention: Vec<AttnRow>,
}

fn config(dir: &Path, budgets: Budgets, policy: Policy) -> KvConfig {
    KvConfig {
        block_tokens: BLOCK_TOKENS,
        h_kv: H_KV,
        d: D,
        dtype: DType::BF16,
        layers: vec![Retention::Full],
        budgets,
        policy,
        spill_dir: dir.to_path_buf(),
    }
}

/// Appends `tokens` tokens of random KV, 16 blocks at a time.
fn fill(store: &KvStore, seq: SeqId, tokens: usize) -> Result<()> {
    let step = 16 * BLOCK_TOKENS;
    let row = H_KV * D;
    let k: Vec<bf16> = fill_random(step * row, 11);
    let v: Vec<bf16> = fill_random(step * row, 12);
    let mut done = 0;
    while done < tokens {
        let n = step.min(tokens - done);
        store.append(seq, 0, &k[..n * row], &v[..n * row])?;
        done += n;
    }
    Ok(())
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn bench_stream(args: &Args, dir: &Path) -> Result<StreamReport> {
    let budgets = Budgets {
        device: 0,
        host: 0,
        disk: u64::MAX,
    };
    let store = KvStore::new(config(dir, budgets, Policy::KeepNewest))?;
    let seq = store.create_seq();
    fill(&store, seq, args.stream_tokens)?;
    let bytes = (args.stream_tokens * 2 * H_KV * D * 2) as u64;
    let spill = store.spill_path().context("the disk tier holds the KV")?;
    let (mut raw, mut ours) = (vec![], vec![]);
    let raw_read = || -> Result<f64> {
        // A plain sequential read loop over the same file.
        store.drop_os_cache()?;
        let mut f = std::fs::File::open(&spill)?;
        let mut buf = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut total = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok(total as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    let stream = || -> Result<f64> {
        store.drop_os_cache()?;
        let t = Instant::now();
        let mut total = 0u64;
        let opts = StreamOptions {
            prefetch: args.prefetch,
            ..Default::default()
        };
        for b in store.stream::<bf16>(seq, 0, opts)? {
            let b = b?;
            total += (b.k().len() + b.v().len()) as u64 * 2;
        }
        Ok(total as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    // Alternate which goes first: the virtual disk's host-side cache favours the second.
    for rep in 0..args.reps.max(1) {
        if rep % 2 == 0 {
            raw.push(raw_read()?);
            ours.push(stream()?);
        } else {
            ours.push(stream()?);
            raw.push(raw_read()?);
        }
    }
    Ok(StreamReport {
        tokens: args.stream_tokens,
        bytes,
        raw_read_gbs: median(raw.clone()),
        store_stream_gbs: median(ours.clone()),
        ratio: median(ours.clone()) / median(raw.clone()),
        raw_runs_gbs: raw,
        stream_runs_gbs: ours,
    })
}

fn bench_attention(args: &Args, dir: &Path) -> Result<(String, Vec<AttnRow>)> {
    let n_kv = args.attn_tokens;
    let n_q = args.queries.min(n_kv);
    let total = (n_kv.div_ceil(BLOCK_TOKENS) * 2 * BLOCK_TOKENS * H_KV * D * 2) as u64;
    let device = (total as f64 * args.device_fraction) as u64;
    let q: Vec<bf16> = fill_random(n_q * H_Q * D, 13);
    let shape = AttnShape {
        n_q,
        n_kv,
        h_q: H_Q,
        h_kv: H_KV,
        d: D,
    };
    // The chunk's queries are the last n_q positions of the KV (causal, as in chunked prefill).
    let params = AttnParams::new(&shape, Mask::Causal);
    let mut out = vec![0f32; n_q * H_Q * D];
    let mut lse = vec![0f32; n_q * H_Q];
    let mut rows = vec![];
    let mut resident_ms = f64::NAN;
    let configs = [
        ("all resident", u64::MAX, Policy::KeepNewest),
        ("keep-newest + prefetch", device, Policy::KeepNewest),
        ("LRU + prefetch", device, Policy::Lru),
    ];
    let bar = crate::commands::Progress::new(configs.len() as u64, "bench kvstore", "configs");
    for (name, device, policy) in configs {
        let budgets = Budgets {
            device,
            host: 0,
            disk: u64::MAX,
        };
        let store = KvStore::new(config(dir, budgets, policy))?;
        let seq = store.create_seq();
        fill(&store, seq, n_kv)?;
        let before = store.usage();
        let opts = StreamOptions {
            prefetch: args.prefetch,
            ..Default::default()
        };
        let mut times = vec![];
        for _ in 0..args.reps.max(1) {
            store.drop_os_cache()?;
            let t = Instant::now();
            attend(&store, seq, 0, &q, H_Q, &params, opts, &mut out, &mut lse)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median(times);
        if resident_ms.is_nan() {
            resident_ms = ms;
        }
        let after = store.usage();
        let reps = args.reps.max(1) as u64;
        rows.push(AttnRow {
            config: name.to_string(),
            median_ms: ms,
            vs_resident: ms / resident_ms,
            spill_reads: (after.spill_reads - before.spill_reads) / reps,
            spill_writes: (after.spill_writes - before.spill_writes) / reps,
            promotions: (after.promotions - before.promotions) / reps,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let shape = format!(
        "{n_q} queries x {H_Q} heads over {n_kv} keys, {H_KV} KV heads, d {D}, bf16, causal; \
         device tier {:.0}% of {:.2} GiB, rest on disk",
        args.device_fraction * 100.0,
        total as f64 / (1u64 << 30) as f64
    );
    Ok((shape, rows))
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(
        args.stream_tokens >= 1 && args.attn_tokens >= 1,
        "--stream-tokens and --attn-tokens must be at least 1"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.device_fraction),
        "--device-fraction must be within 0..=1"
    );
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("longctx-bench-kv-{}", std::process::id()))
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = (|| -> Result<Report> {
        let stream = bench_stream(&args, &dir)?;
        let (attention_shape, attention) = bench_attention(&args, &dir)?;
        Ok(Report {
            machine: machine(),
            threads: rayon::current_num_threads(),
            block_tokens: BLOCK_TOKENS,
            prefetch: args.prefetch,
            stream,
            attention_shape,
            attention,
        })
    })();
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let r = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "machine: {}, {} threads, blocks of {} tokens, prefetch {}",
        r.machine, r.threads, r.block_tokens, r.prefetch
    );
    let s = &r.stream;
    println!(
        "stream {} tokens ({:.2} GiB) from the disk tier: {:.2} GB/s; raw sequential read of \
         the same file: {:.2} GB/s; ratio {:.0}%",
        s.tokens,
        s.bytes as f64 / (1u64 << 30) as f64,
        s.store_stream_gbs,
        s.raw_read_gbs,
        s.ratio * 100.0
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  runs (GB/s): stream {}; raw {}",
        runs(&s.stream_runs_gbs),
        runs(&s.raw_runs_gbs)
    );
    println!("attention: {}", r.attention_shape);
    println!(
        "{:<24} {:>10} {:>12} {:>12} {:>12} {:>11}",
        "config", "median ms", "vs resident", "disk reads", "disk writes", "promotions"
    );
    for a in &r.attention {
        println!(
            "{:<24} {:>10.1} {:>11.2}x {:>12} {:>12} {:>11}",
            a.config, a.median_ms, a.vs_resident, a.spill_reads, a.spill_writes, a.promotions
        );
    }
    Ok(())
}
