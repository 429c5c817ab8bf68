//! `longctx bench kernels`: the attention cases of the foundation issue, with the machine's
//! read bandwidth measured in the same run for the memory-bound decode case, and its bf16 dot
//! product and f32 FMA peaks for the compute-bound prefill cases.

use super::timing::{fill_random, median_secs, read_bandwidth_gbs};
use crate::commands::Progress;
use anyhow::Result;
use half::bf16;
use longctx_kernels::cpu::{peak_gflops, Peak};
use longctx_kernels::{
    attention, attention_segments_blocks, quantize_blocks_vec, AttnParams, AttnShape, BlockF8,
    BlockQ8, DType, Element, Isa, KvBlock, KvBlockSegment, Mask, QKind, QMatrix,
};
use longctx_rope::{apply_table, Layout, Rope, RopeTable, Scaling};
use serde::Serialize;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Only the smaller cases, with fewer repetitions (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Only the cases whose name is one of these, comma-separated or repeated (causal, full,
    /// decode, decode-smol, decode-moe, rope, gemv-q4, gemv-moe, gemm-q4, gemm-q8); a name that matches none is an error.
    /// Default: every case.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Serialize)]
struct Row {
    case: String,
    dtype: &'static str,
    shape: String,
    median_ms: f64,
    gflops: Option<f64>,
    gbs: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    isa: &'static str,
    read_bandwidth_gbs: f64,
    /// The arithmetic units' peaks in the same run (every thread at once), where the CPU has
    /// them: the yardsticks of the GFLOP/s rows.
    bf16_dot_peak_gflops: Option<f64>,
    f32_fma_peak_gflops: Option<f64>,
    rows: Vec<Row>,
}

struct Case {
    name: &'static str,
    shape: AttnShape,
    mask: Mask,
}

fn prefill(name: &'static str, l: usize, h: usize, d: usize, mask: Mask) -> Case {
    Case {
        name,
        shape: AttnShape {
            n_q: l,
            n_kv: l,
            h_q: h,
            h_kv: h,
            d,
        },
        mask,
    }
}

fn cases(quick: bool) -> Vec<Case> {
    let decode = Case {
        name: "decode",
        shape: AttnShape {
            n_q: 1,
            n_kv: if quick { 16384 } else { 131072 },
            h_q: 32,
            h_kv: 8,
            d: 128,
        },
        mask: Mask::Causal,
    };
    if quick {
        return vec![prefill("causal", 1024, 8, 64, Mask::Causal), decode];
    }
    vec![
        prefill("causal", 4096, 8, 64, Mask::Causal),
        prefill("causal", 4096, 8, 128, Mask::Causal),
        prefill("causal", 16384, 4, 64, Mask::Causal),
        prefill("causal", 16384, 4, 128, Mask::Causal),
        prefill("full", 4096, 8, 64, Mask::None),
        decode,
        // SmolLM2's decode shape (GQA 3, d 64), over a KV larger than the L3.
        Case {
            name: "decode-smol",
            shape: AttnShape {
                n_q: 1,
                n_kv: 65536,
                h_q: 9,
                h_kv: 3,
                d: 64,
            },
            mask: Mask::Causal,
        },
        // The 0.55B Llama-4-shaped MoE's decode (GQA 4, d 64) at a short context, its KV
        // within the caches: what a step costs beyond its bytes.
        Case {
            name: "decode-moe",
            shape: AttnShape {
                n_q: 1,
                n_kv: 2048,
                h_q: 16,
                h_kv: 4,
                d: 64,
            },
            mask: Mask::Causal,
        },
    ]
}

fn time_case<T: Element>(c: &Case, reps: usize) -> Result<Row> {
    let s = c.shape;
    let q: Vec<T> = fill_random(s.n_q * s.h_q * s.d, 1);
    let k: Vec<T> = fill_random(s.n_kv * s.h_kv * s.d, 2);
    let v: Vec<T> = fill_random(s.n_kv * s.h_kv * s.d, 3);
    let mut out = vec![T::default(); q.len()];
    let mut lse = vec![0f32; s.n_q * s.h_q];
    let params = AttnParams::new(&s, c.mask);
    let mut result = Ok(());
    let secs = median_secs(reps, || {
        if let Err(e) = attention(&q, &k, &v, s, &params, &mut out, &mut lse) {
            result = Err(e);
        }
    });
    result?;
    let causal = matches!(c.mask, Mask::Causal) && s.n_q > 1;
    let flops = s.flops() * if causal { 0.5 } else { 1.0 };
    let kv_bytes = 2 * s.n_kv * s.h_kv * s.d * T::DTYPE.size_bytes();
    let decode = s.n_q == 1;
    Ok(Row {
        case: c.name.to_string(),
        dtype: T::DTYPE.name(),
        shape: format!(
            "n_q={} n_kv={} h_q={} h_kv={} d={}",
            s.n_q, s.n_kv, s.h_q, s.h_kv, s.d
        ),
        median_ms: secs * 1e3,
        gflops: (!decode).then_some(flops / secs / 1e9),
        gbs: decode.then_some(kv_bytes as f64 / secs / 1e9),
    })
}

/// A decode case over a block KV (q8_0 or FP8, 8-bit blocks read in place), f32 queries.
fn time_case_blocks<B: KvBlock + Default>(c: &Case, reps: usize) -> Result<Row> {
    let s = c.shape;
    let q: Vec<f32> = fill_random(s.n_q * s.h_q * s.d, 1);
    let blocks = |seed| {
        let x = fill_random::<f32>(s.n_kv * s.h_kv * s.d, seed);
        quantize_blocks_vec::<B>("bench kernels", &x)
    };
    let (k, v) = (blocks(2)?, blocks(3)?);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; s.n_q * s.h_q];
    let params = AttnParams::new(&s, c.mask);
    let seg = [KvBlockSegment {
        k: &k,
        v: &v,
        pos: 0,
    }];
    let mut result = Ok(());
    let secs = median_secs(reps, || {
        if let Err(e) = attention_segments_blocks(&q, &seg, s, &params, &mut out, &mut lse) {
            result = Err(e);
        }
    });
    result?;
    let kv_bytes = 2 * B::KV_DTYPE.row_bytes(s.n_kv * s.h_kv * s.d);
    Ok(Row {
        case: c.name.to_string(),
        dtype: B::KV_DTYPE.name(),
        shape: format!(
            "n_q={} n_kv={} h_q={} h_kv={} d={}",
            s.n_q, s.n_kv, s.h_q, s.h_kv, s.d
        ),
        median_ms: secs * 1e3,
        gflops: None,
        gbs: Some(kv_bytes as f64 / secs / 1e9),
    })
}

/// Decode cases (one query) also run over q8_0 and FP8 KVs.
fn has_block_rows(c: &Case) -> bool {
    c.shape.n_q == 1 && c.shape.d.is_multiple_of(32)
}

pub fn run(args: Args) -> Result<()> {
    let reps = if args.quick { 2 } else { args.reps };
    // A name that matches no case is a typo, not a request to run nothing.
    let mut known: Vec<&str> = vec![];
    for name in cases(args.quick)
        .iter()
        .map(|c| c.name)
        .chain(["rope", "gemv-q4", "gemv-moe", "gemm-q4", "gemm-q8"])
    {
        // Several cases share a name (causal at four sizes): listed once.
        if !known.contains(&name) {
            known.push(name);
        }
    }
    if let Some(bad) = args.only.iter().find(|o| !known.contains(&o.as_str())) {
        anyhow::bail!(
            "--only {bad}: no such case (the cases: {})",
            known.join(", ")
        );
    }
    let wanted = |c: &Case| args.only.is_empty() || args.only.iter().any(|o| o == c.name);
    let named = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    // Rows to time: each attention case in f32 and bf16, rope, gemv, and gemm per batch.
    let gemm_ms: &[usize] = if args.quick { &[4] } else { &[4, 16, 64, 160] };
    let steps = cases(args.quick)
        .iter()
        .filter(|c| wanted(c))
        .map(|c| 2 + 2 * usize::from(has_block_rows(c)))
        .sum::<usize>()
        + usize::from(named("rope"))
        + usize::from(named("gemv-q4"))
        + usize::from(named("gemv-moe"))
        + if named("gemm-q4") { gemm_ms.len() } else { 0 }
        + if named("gemm-q8") { gemm_ms.len() } else { 0 };
    let bar = Progress::new(steps as u64, "bench kernels", "rows");
    let bw = read_bandwidth_gbs(if args.quick { 256 << 20 } else { 1 << 30 });
    let probe = Duration::from_millis(if args.quick { 50 } else { 300 });
    let dot_peak = peak_gflops(Peak::Bf16Dot, probe);
    let fma_peak = peak_gflops(Peak::F32Fma, probe);
    let mut rows = Vec::new();
    // Each row printed (table) and counted as it is timed.
    let push = |row: Row, rows: &mut Vec<Row>| {
        if !args.json {
            bar.suspend(|| print_row(&row, rows.is_empty()));
        }
        rows.push(row);
        bar.inc(1);
    };
    for c in cases(args.quick).into_iter().filter(wanted) {
        for dt in [DType::F32, DType::BF16] {
            let row = match dt {
                DType::BF16 => time_case::<bf16>(&c, reps)?,
                _ => time_case::<f32>(&c, reps)?,
            };
            push(row, &mut rows);
        }
        if has_block_rows(&c) {
            push(time_case_blocks::<BlockQ8>(&c, reps)?, &mut rows);
            push(time_case_blocks::<BlockF8>(&c, reps)?, &mut rows);
        }
    }
    if wanted(&Case {
        name: "rope",
        shape: cases(true)[0].shape,
        mask: Mask::None,
    }) {
        let row = time_rope(if args.quick { 1024 } else { 8192 }, reps)?;
        push(row, &mut rows);
    }
    if wanted(&Case {
        name: "gemv-q4",
        shape: cases(true)[0].shape,
        mask: Mask::None,
    }) {
        let row = time_q4(if args.quick { 4096 } else { 49152 }, 2048, 1, reps)?;
        push(row, &mut rows);
    }
    if named("gemv-moe") {
        let row = if args.quick {
            time_moe_chain(2, 8192, reps)?
        } else {
            time_moe_chain(8, 49152, reps)?
        };
        push(row, &mut rows);
    }
    if wanted(&Case {
        name: "gemm-q4",
        shape: cases(true)[0].shape,
        mask: Mask::None,
    }) {
        // A batched decode step or a prompt chunk through one MLP projection (an expert's
        // gate|up of the Llama-4-shaped benchmark MoE: [2048, 1024]); the weights stay in L2.
        for &m in gemm_ms {
            let row = time_q4(2048, 1024, m, reps)?;
            push(row, &mut rows);
        }
    }
    if wanted(&Case {
        name: "gemm-q8",
        shape: cases(true)[0].shape,
        mask: Mask::None,
    }) {
        // The same product from 8-bit blocks: what the fast path makes of bf16 and f16
        // weights (the benchmark MoE's bf16 file), whose offset the kernel adds in integers.
        for &m in gemm_ms {
            let row = time_q8(2048, 1024, m, reps)?;
            push(row, &mut rows);
        }
    }
    bar.finish_and_clear();
    let report = Report {
        machine: machine(),
        threads: rayon::current_num_threads(),
        isa: Isa::detect().name(),
        read_bandwidth_gbs: bw,
        bf16_dot_peak_gflops: dot_peak,
        f32_fma_peak_gflops: fma_peak,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "\n{} | {} threads | {} | streaming read {:.1} GB/s",
            report.machine, report.threads, report.isa, bw
        );
        let peaks = [("bf16", dot_peak, "bf16 dot"), ("f32", fma_peak, "f32 FMA")];
        for (dtype, peak, unit) in peaks {
            let Some(p) = peak else { continue };
            println!("{unit} peak {p:.0} GFLOP/s");
            for r in report.rows.iter().filter(|r| r.dtype == dtype) {
                if let Some(g) = r.gflops {
                    println!(
                        "{} {} {}: {g:.1} GFLOP/s = {:.0}% of the {unit} peak",
                        r.case,
                        r.dtype,
                        r.shape,
                        100.0 * g / p
                    );
                }
            }
        }
        for r in report.rows.iter().filter(|r| r.gbs.is_some()) {
            println!(
                "{} {}: {:.1} GB/s = {:.0}% of the read bandwidth",
                r.case,
                r.dtype,
                r.gbs.unwrap_or(0.0),
                100.0 * r.gbs.unwrap_or(0.0) / bw
            );
        }
    }
    Ok(())
}

fn print_row(r: &Row, header: bool) {
    if header {
        println!(
            "{:<8} {:<5} {:<40} {:>11} {:>9} {:>7}",
            "case", "dtype", "shape", "median ms", "GFLOP/s", "GB/s"
        );
    }
    let opt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
    println!(
        "{:<8} {:<5} {:<40} {:>11.2} {:>9} {:>7}",
        r.case,
        r.dtype,
        r.shape,
        r.median_ms,
        opt(r.gflops),
        opt(r.gbs)
    );
}

/// RoPE apply (Scout's llama3 schedule, interleaved layout) of q `[n, 40, 128]` and k
/// `[n, 8, 128]` in bf16 at position 10,000,000: the cos/sin table of the window is built once
/// and used for both. GB/s counts the bytes read and written.
fn time_rope(n: usize, reps: usize) -> Result<Row> {
    let rope = Rope::new(
        500000.0,
        128,
        Scaling::Llama3 {
            factor: 16.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_pos: 8192,
        },
    )?;
    let pos0 = 10_000_000;
    let mut q: Vec<bf16> = fill_random(n * 40 * 128, 4);
    let mut k: Vec<bf16> = fill_random(n * 8 * 128, 5);
    let mut result = Ok(());
    let secs = median_secs(reps, || {
        let table = RopeTable::for_rope(&rope, pos0 + n, pos0, n);
        let r = apply_table(&mut q, (n, 40, 128), pos0, &table, Layout::Interleaved)
            .and_then(|_| apply_table(&mut k, (n, 8, 128), pos0, &table, Layout::Interleaved));
        if let Err(e) = r {
            result = Err(e);
        }
    });
    result?;
    let bytes = 2 * (q.len() + k.len()) * 2;
    Ok(Row {
        case: "rope".into(),
        dtype: "bf16",
        shape: format!("q [{n}, 40, 128] k [{n}, 8, 128] @ 10M"),
        median_ms: secs * 1e3,
        gflops: None,
        gbs: Some(bytes as f64 / secs / 1e9),
    })
}

/// The weight product on GGUF Q4_1 blocks (`QMatrix::gemv` for one row, `QMatrix::gemm` for
/// `m`: int8 activations, VNNI where the CPU has it) of a `[rows, cols]` matrix of random
/// blocks; for one row 63 MB at the full size (past a 32 MiB L3, so it streams from memory as
/// a model's weights do). GB/s counts the weight bytes the product reads, once per call.
fn time_q4(rows: usize, cols: usize, m: usize, reps: usize) -> Result<Row> {
    let kind = QKind::Q4_1;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut bytes = Vec::with_capacity(rows * cols / 32 * kind.block_bytes());
    for _ in 0..rows * cols / 32 {
        let r = next();
        let d = half::f16::from_f32(0.001 + (r % 1000) as f32 * 4e-5);
        let m = half::f16::from_f32(-0.1 + ((r >> 16) % 1000) as f32 * 2e-4);
        bytes.extend_from_slice(&d.to_le_bytes());
        bytes.extend_from_slice(&m.to_le_bytes());
        bytes.extend((0..2).flat_map(|_| next().to_le_bytes()));
    }
    let w = QMatrix::from_gguf(kind, &bytes, rows, cols)?;
    drop(bytes);
    time_gemm(
        &w,
        m,
        reps,
        if m == 1 { "gemv-q4" } else { "gemm-q4" },
        "q4_1",
    )
}

/// [`time_q4`] for Q8_0 blocks quantised from random f32 weights.
fn time_q8(rows: usize, cols: usize, m: usize, reps: usize) -> Result<Row> {
    let w = QMatrix::quantize_q8(&fill_random(rows * cols, 7), rows, cols)?;
    time_gemm(&w, m, reps, "gemm-q8", "q8_0")
}

/// One decode token's chain of weight products on the benchmark MoE's Q8_0 copies (what the
/// fast path makes of its bf16 file): per layer q|k|v, o, the router, the shared expert's
/// gate|up and down, one routed expert's gate|up and down (hidden 1024, 16 heads and 4 KV
/// heads of 64, experts of 1024, shared 2048), then the LM head (`vocab` x 1024), every
/// matrix distinct so they stream from memory as a model's do (~135 MB at 8 layers). Each
/// product's input is the previous one's output (cut or repeated to its width), as in a step.
/// GB/s counts every matrix's bytes once per token: the rate decode's products reach
/// between the step's other work.
fn time_moe_chain(layers: usize, vocab: usize, reps: usize) -> Result<Row> {
    let shapes: &[(usize, usize)] = &[
        (1536, 1024),
        (1024, 1024),
        (16, 1024),
        (4096, 1024),
        (1024, 2048),
        (2048, 1024),
        (1024, 1024),
    ];
    let mut mats = Vec::new();
    for l in 0..layers {
        for (i, &(r, c)) in shapes.iter().enumerate() {
            let seed = 100 + (l * shapes.len() + i) as u64;
            mats.push(QMatrix::quantize_q8(&fill_random(r * c, seed), r, c)?);
        }
    }
    mats.push(QMatrix::quantize_q8(
        &fill_random(vocab * 1024, 99),
        vocab,
        1024,
    )?);
    let bytes: usize = mats.iter().map(|w| w.bytes()).sum();
    let mut x: Vec<f32> = fill_random(4096, 6);
    let mut y = vec![0f32; vocab.max(4096)];
    let mut result = Ok(());
    // In the pool, as a model's step runs (each product's split then needs no hand-off).
    let secs = median_secs(reps.max(5), || {
        rayon::scope(|_| {
            for w in &mats {
                x.resize(w.cols(), 0.01);
                if let Err(e) = w.gemv(&x, &mut y[..w.rows()]) {
                    result = Err(e);
                }
                // The next input: this output, scaled back to a norm's range.
                let n = w.rows().min(4096);
                let s = 1.0 / (y[..n].iter().map(|v| v.abs()).sum::<f32>() / n as f32 + 1e-6);
                x.clear();
                x.extend(y[..n].iter().map(|v| v * s));
            }
        })
    });
    result?;
    let flops: usize = mats.iter().map(|w| 2 * w.rows() * w.cols()).sum();
    Ok(Row {
        case: "gemv-moe".into(),
        dtype: "q8_0",
        shape: format!("{layers} layers + head, {} products x 1 row", mats.len()),
        median_ms: secs * 1e3,
        gflops: Some(flops as f64 / secs / 1e9),
        gbs: Some(bytes as f64 / secs / 1e9),
    })
}

/// `w` times `m` random activation rows (int8 per block), timed.
fn time_gemm(w: &QMatrix, m: usize, reps: usize, case: &str, dtype: &'static str) -> Result<Row> {
    let (rows, cols) = (w.rows(), w.cols());
    let x: Vec<f32> = fill_random(m * cols, 6);
    let mut y = vec![0f32; m * rows];
    let mut result = Ok(());
    let secs = median_secs(reps, || {
        if let Err(e) = w.gemm(&x, m, &mut y) {
            result = Err(e);
        }
    });
    result?;
    Ok(Row {
        case: case.into(),
        dtype,
        shape: format!("[{rows}, {cols}] x {m} int8 rows"),
        median_ms: secs * 1e3,
        gflops: Some(2.0 * (m * rows * cols) as f64 / secs / 1e9),
        gbs: Some(w.bytes() as f64 / secs / 1e9),
    })
}

/// The CPU model, from /proc/cpuinfo where there is one.
pub fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
