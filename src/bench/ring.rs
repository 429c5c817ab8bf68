//! `longctx bench ring`: ring attention over P simulated devices on this one machine.
//!
//! Each rank's step is really computed (the kernel on that rank's queries and the step's KV
//! shard, timed with all threads, as if each device were this CPU); the ring's timeline then
//! follows from those times and a link of the given latency and bandwidth
//! ([`longctx_ring::schedule`]). Efficiency is the single-device time over P, divided by the
//! ring's time; balance is the largest rank's work over the mean.

use super::kernels::machine;
use super::timing::{fill_random, median_secs};
use anyhow::Result;
use half::bf16;
use longctx_kernels::Mask;
use longctx_ring::partition::{gather_rows, tokens};
use longctx_ring::schedule::{link, simulate};
use longctx_ring::{attend_runs, layout, steps_needed, AttnSpec, Partition, Run};
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Ranks in the ring.
    #[arg(long, default_value_t = 8)]
    ranks: usize,
    /// Sequence length in tokens.
    #[arg(long, default_value_t = 16384)]
    seq: usize,
    /// Query heads (each of --head-dim).
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// KV heads (grouped-query attention).
    #[arg(long, default_value_t = 2)]
    kv_heads: usize,
    /// Head dimension (elements per head).
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// causal, none, or chunked (Llama 4's chunked-local, see --chunk).
    #[arg(long, default_value = "causal")]
    mask: String,
    /// Chunk of the chunked mask, in tokens.
    #[arg(long, default_value_t = 8192)]
    chunk: usize,
    /// Link bandwidth, GB/s, each direction.
    #[arg(long, default_value_t = 25.0)]
    bandwidth: f64,
    /// Link latency, microseconds.
    #[arg(long, default_value_t = 10.0)]
    latency: f64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// sim: each step computed here and the ring's timeline simulated over the link model;
    /// threads: a real ring, ranks as threads exchanging shards through the in-process
    /// transport; nccl: this process is one rank of a torchrun-style group (`RANK`,
    /// `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`; GPU `LOCAL_RANK`), shards over NCCL. The
    /// real rings check every rank's rows against the single-device kernel.
    #[arg(long, default_value = "sim")]
    transport: String,
}

#[derive(Serialize)]
struct StepRow {
    step: usize,
    compute_max_ms: f64,
    compute_mean_ms: f64,
    transfer_ms: f64,
    /// Longest any rank started this step late because its shard was still on the wire.
    transfer_wait_ms: f64,
    /// No rank waited on the wire.
    hidden: bool,
}

#[derive(Serialize)]
struct PartitionRow {
    partition: &'static str,
    steps: usize,
    ring_ms: f64,
    ideal_ms: f64,
    efficiency: f64,
    /// Mean per-rank compute over the ring's time: what imbalance and exposed transfers cost,
    /// apart from the kernel's speed on shards versus on the whole sequence.
    ring_efficiency: f64,
    /// Max over mean of the (query, key) pairs each rank computes.
    balance_work: f64,
    /// Max over mean of each rank's measured compute time.
    balance_time: f64,
    per_step: Vec<StepRow>,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    ranks: usize,
    seq: usize,
    shape: String,
    mask: String,
    bandwidth_gbs: f64,
    latency_us: f64,
    shard_mib: f64,
    single_device_ms: f64,
    partitions: Vec<PartitionRow>,
}

fn balance(v: &[f64]) -> f64 {
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    v.iter().cloned().fold(0.0, f64::max) / mean
}

pub fn run(args: Args) -> Result<()> {
    anyhow::ensure!(args.ranks >= 1, "--ranks must be at least 1");
    anyhow::ensure!(args.seq >= args.ranks, "--seq must be at least --ranks");
    anyhow::ensure!(
        args.bandwidth > 0.0 && args.latency >= 0.0,
        "--bandwidth must be positive and --latency not negative"
    );
    anyhow::ensure!(
        args.kv_heads >= 1 && args.heads.is_multiple_of(args.kv_heads),
        "--heads must be a multiple of --kv-heads"
    );
    let mask = match args.mask.as_str() {
        "causal" => Mask::Causal,
        "none" => Mask::None,
        "chunked" if args.chunk > 0 => Mask::ChunkedLocal { chunk: args.chunk },
        m => anyhow::bail!("--mask {m}: expected causal, none or chunked (with --chunk > 0)"),
    };
    match args.transport.as_str() {
        "sim" => {}
        "threads" | "nccl" => return real_ring(&args, mask),
        t => anyhow::bail!("--transport {t}: expected sim, threads or nccl"),
    }
    let (n, p, d) = (args.seq, args.ranks, args.head_dim);
    let spec = AttnSpec {
        h_q: args.heads,
        h_kv: args.kv_heads,
        d,
        mask,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let (qrow, krow) = (spec.h_q * d, spec.h_kv * d);
    let q: Vec<bf16> = fill_random(n * qrow, 1);
    let k: Vec<bf16> = fill_random(n * krow, 2);
    let v: Vec<bf16> = fill_random(n * krow, 3);

    // One device: the whole sequence as one run.
    let whole = [Run {
        start: 0,
        stride: 1,
        len: n,
        offset: 0,
    }];
    let mut out = vec![0f32; n * qrow];
    let mut lse = vec![0f32; n * spec.h_q];
    let mut err = Ok(0);
    let single = median_secs(3, || {
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        if let Err(e) = attend_runs(&q, &whole, &k, &v, &whole, &spec, &mut out, &mut lse) {
            err = Err(e);
        }
    });
    err?;

    let model = link(args.bandwidth, args.latency);
    let mut rows = vec![];
    let mut shard_mib: f64 = 0.0;
    let bar =
        crate::commands::Progress::new(Partition::ALL.len() as u64, "bench ring", "partitions");
    for partition in Partition::ALL {
        let lay = layout(partition, n, p);
        let steps = steps_needed(&lay, &spec)?;
        let shards: Vec<(Vec<bf16>, Vec<bf16>, Vec<bf16>)> = lay
            .iter()
            .map(|runs| {
                (
                    gather_rows(&q, runs, qrow),
                    gather_rows(&k, runs, krow),
                    gather_rows(&v, runs, krow),
                )
            })
            .collect();
        let bytes: Vec<u64> = lay
            .iter()
            .map(|runs| (2 * tokens(runs) * krow * 2) as u64)
            .collect();
        shard_mib = shard_mib.max(*bytes.iter().max().unwrap() as f64 / (1 << 20) as f64);
        let mut compute = vec![vec![0.0; steps]; p];
        let mut work = vec![0.0; p];
        for r in 0..p {
            let m = tokens(&lay[r]);
            let mut out = vec![0f32; m * qrow];
            let mut lse = vec![f32::NEG_INFINITY; m * spec.h_q];
            for (s, c) in compute[r].iter_mut().enumerate() {
                let src = (r + p - s) % p;
                // Median of three: one step is tens of milliseconds, where this guest's
                // timer noise is a few percent.
                let mut times = vec![];
                let mut pairs = 0;
                for _ in 0..3 {
                    let t = Instant::now();
                    pairs = attend_runs(
                        &shards[r].0,
                        &lay[r],
                        &shards[src].1,
                        &shards[src].2,
                        &lay[src],
                        &spec,
                        &mut out,
                        &mut lse,
                    )?;
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                *c = times[1];
                work[r] += pairs as f64;
            }
        }
        let tl = simulate(&compute, &bytes, &model);
        let per_rank: Vec<f64> = compute.iter().map(|c| c.iter().sum()).collect();
        let per_step = (0..steps)
            .map(|s| {
                let c: Vec<f64> = (0..p).map(|r| tl.slots[r][s].compute).collect();
                StepRow {
                    step: s,
                    compute_max_ms: c.iter().cloned().fold(0.0, f64::max) * 1e3,
                    compute_mean_ms: c.iter().sum::<f64>() / p as f64 * 1e3,
                    transfer_ms: (0..p).map(|r| tl.slots[r][s].transfer).fold(0.0, f64::max) * 1e3,
                    transfer_wait_ms: (0..p)
                        .map(|r| tl.slots[r][s].transfer_wait)
                        .fold(0.0, f64::max)
                        * 1e3,
                    hidden: (0..p).all(|r| tl.slots[r][s].hidden),
                }
            })
            .collect();
        let ideal = single / p as f64;
        rows.push(PartitionRow {
            partition: partition.name(),
            steps,
            ring_ms: tl.total * 1e3,
            ideal_ms: ideal * 1e3,
            efficiency: ideal / tl.total,
            ring_efficiency: per_rank.iter().sum::<f64>() / p as f64 / tl.total,
            balance_work: balance(&work),
            balance_time: balance(&per_rank),
            per_step,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    let report = Report {
        machine: machine(),
        threads: rayon::current_num_threads(),
        ranks: p,
        seq: n,
        shape: format!("h_q {} h_kv {} d {} bf16", spec.h_q, spec.h_kv, spec.d),
        mask: format!("{mask:?}"),
        bandwidth_gbs: args.bandwidth,
        latency_us: args.latency,
        shard_mib,
        single_device_ms: single * 1e3,
        partitions: rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "ring of {} over {} tokens, {}, {}; link {} GB/s, {} us; largest KV shard {:.1} MiB",
        p, n, report.shape, report.mask, args.bandwidth, args.latency, shard_mib
    );
    println!(
        "single device (this CPU, {} threads): {:.1} ms",
        rayon::current_num_threads(),
        report.single_device_ms
    );
    println!(
        "{:<11} {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "partition",
        "steps",
        "ring ms",
        "ideal ms",
        "efficiency",
        "ring eff.",
        "balance work",
        "balance time"
    );
    for r in &report.partitions {
        println!(
            "{:<11} {:>5} {:>10.1} {:>10.1} {:>9.0}% {:>9.0}% {:>12.3} {:>12.3}",
            r.partition,
            r.steps,
            r.ring_ms,
            r.ideal_ms,
            r.efficiency * 100.0,
            r.ring_efficiency * 100.0,
            r.balance_work,
            r.balance_time
        );
    }
    for r in &report.partitions {
        println!("\n{} per step:", r.partition);
        println!(
            "{:>5} {:>16} {:>17} {:>12} {:>12} {:>7}",
            "step", "compute max ms", "compute mean ms", "transfer ms", "wire wait ms", "hidden"
        );
        for s in &r.per_step {
            println!(
                "{:>5} {:>16.2} {:>17.2} {:>12.3} {:>12.3} {:>7}",
                s.step,
                s.compute_max_ms,
                s.compute_mean_ms,
                s.transfer_ms,
                s.transfer_wait_ms,
                if s.hidden { "yes" } else { "no" }
            );
        }
    }
    Ok(())
}

/// One rank's result in a real ring, checked against the single-device kernel.
#[derive(Serialize)]
struct RankRow {
    rank: usize,
    tokens: usize,
    steps: usize,
    compute_ms: f64,
    wait_ms: f64,
    wall_ms: f64,
    /// Largest relative error of the rank's output and LSE rows against one device's.
    max_rel_err: f64,
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(g, w)| ((g - w).abs() / (1.0 + w.abs())) as f64)
        .fold(0.0, f64::max)
}

/// Ring attention over a real transport: zigzag shards (contiguous for an unmasked ring),
/// every rank's output and LSE compared with the single-device kernel's rows.
fn real_ring(args: &Args, mask: Mask) -> Result<()> {
    use longctx_ring::{nccl::Nccl, ring_attention, InProcess, Transport};
    let d = args.head_dim;
    let spec = AttnSpec {
        h_q: args.heads,
        h_kv: args.kv_heads,
        d,
        mask,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let n = args.seq;
    let (qrow, krow) = (spec.h_q * d, spec.h_kv * d);
    // Every rank makes the same sequence (same seeds) and keeps its shard of it.
    let q: Vec<bf16> = fill_random(n * qrow, 1);
    let k: Vec<bf16> = fill_random(n * krow, 2);
    let v: Vec<bf16> = fill_random(n * krow, 3);
    let timeout = std::time::Duration::from_secs(120);
    let run_rank = |t: &mut dyn Transport, lay: &[Vec<Run>]| -> Result<RankRow> {
        let r = t.rank();
        let runs = &lay[r];
        let (qs, ks, vs) = (
            gather_rows(&q, runs, qrow),
            gather_rows(&k, runs, krow),
            gather_rows(&v, runs, krow),
        );
        let t0 = Instant::now();
        let res = ring_attention(t, lay, &qs, &ks, &vs, &spec)?;
        let wall = t0.elapsed().as_secs_f64();
        // The single-device kernel on this rank's queries against the whole sequence.
        let whole = [Run {
            start: 0,
            stride: 1,
            len: n,
            offset: 0,
        }];
        let m = tokens(runs);
        let (mut out, mut lse) = (vec![0f32; m * qrow], vec![f32::NEG_INFINITY; m * spec.h_q]);
        attend_runs(&qs, runs, &k, &v, &whole, &spec, &mut out, &mut lse)?;
        Ok(RankRow {
            rank: r,
            tokens: m,
            steps: res.steps.len(),
            compute_ms: res.steps.iter().map(|s| s.compute_s).sum::<f64>() * 1e3,
            wait_ms: res.steps.iter().map(|s| s.wait_s).sum::<f64>() * 1e3,
            wall_ms: wall * 1e3,
            max_rel_err: max_rel(&res.out, &out).max(max_rel(&res.lse, &lse)),
        })
    };
    let partition = if mask == Mask::None {
        Partition::Contiguous
    } else {
        Partition::Zigzag
    };
    let rows: Vec<RankRow> = if args.transport == "threads" {
        let p = args.ranks;
        let lay = layout(partition, n, p);
        let group = InProcess::group(p, timeout);
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .into_iter()
                .map(|mut t| {
                    let (lay, run_rank) = (&lay, &run_rank);
                    s.spawn(move || run_rank(&mut t, lay))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
                .collect::<Result<Vec<_>>>()
        })?
    } else {
        let local: usize = std::env::var("LOCAL_RANK")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut t = Nccl::from_env(local, timeout)?;
        let lay = layout(partition, n, t.world());
        vec![run_rank(&mut t, &lay)?]
    };
    let worst = rows.iter().map(|r| r.max_rel_err).fold(0.0, f64::max);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{} ring ({}), {n} tokens, h_q {} h_kv {} d {d} bf16, {mask:?}",
            args.transport,
            partition.name(),
            spec.h_q,
            spec.h_kv
        );
        println!(
            "{:>5} {:>7} {:>6} {:>11} {:>9} {:>9} {:>12}",
            "rank", "tokens", "steps", "compute ms", "wait ms", "wall ms", "max rel err"
        );
        for r in &rows {
            println!(
                "{:>5} {:>7} {:>6} {:>11.2} {:>9.2} {:>9.2} {:>12.2e}",
                r.rank, r.tokens, r.steps, r.compute_ms, r.wait_ms, r.wall_ms, r.max_rel_err
            );
        }
    }
    // bf16 inputs: exact products, so f32's bound, unless the kernel's bf16 dot-product tiles
    // round P (2^-9 of |P||V| with |V| < 1, on either side: ring and single device cut the
    // keys into other tiles, so their roundings differ).
    let shape = longctx_kernels::AttnShape {
        n_q: n,
        n_kv: n,
        h_q: spec.h_q,
        h_kv: spec.h_kv,
        d,
    };
    let bound = if longctx_kernels::attention::rounds_p_to_bf16(&shape) {
        5e-3
    } else {
        1e-5
    };
    anyhow::ensure!(
        worst <= bound,
        "ring output differs from the single device by {worst:.2e} (bound {bound:.0e})"
    );
    Ok(())
}
