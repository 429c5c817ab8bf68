//! `longctx bench scaling`: chunked prefill at growing context lengths (time, tokens/s,
//! ms/token, peak RSS, KV bytes per tier) and decode speed at each length as its depth, with
//! a log-log plot that shows linear and quadratic growth at a glance. With `--peer
//! llama.cpp=PATH`, llama.cpp's `llama-bench` runs the same lengths on the same GGUF in the
//! same run, alternating with ours length by length, and the plot sets both side by side.

use super::e2e::argmax;
use super::kernels::machine;
use super::peer::Peer;
use crate::commands::Progress;
use crate::units;
use anyhow::{Context, Result};
use longctx_chunked_prefill::{prefill, Chunking, PrefillOptions};
use longctx_engine::config::rope_override;
use longctx_engine::random::{random_model, tiny_llama4_config, tiny_llama4_local_config};
use longctx_engine::{KvOptions, Logits, Model, Runner};
use longctx_kvstore::{Budgets, Policy};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face directory, `tiny-llama4` (Llama 4 architecture at hidden
    /// 128 with random weights) or `tiny-llama4-local` (the same, every layer chunked-local).
    /// Default: SmolLM2-135M-Instruct.
    #[arg(long)]
    model: Option<String>,
    /// Context lengths (k = 1024, m = 1024^2).
    #[arg(long, value_delimiter = ',', default_value = "1k,2k,4k,8k")]
    lengths: Vec<String>,
    /// Tokens per chunk (default: planned from --activation-budget).
    #[arg(long)]
    chunk: Option<usize>,
    /// Activation memory the chunk planner may use.
    #[arg(long, default_value = "256MiB")]
    activation_budget: String,
    /// KV device-tier budget, with a unit; what does not fit spills down a tier, to disk last.
    #[arg(long, default_value = "64GiB")]
    kv_device: String,
    /// KV host-tier budget, with a unit (0 for none).
    #[arg(long, default_value = "0")]
    kv_host: String,
    /// KV disk-tier budget, with a unit.
    #[arg(long, default_value = "1TiB")]
    kv_disk: String,
    /// KV element type: f32, bf16, q8 (llama.cpp's q8_0) or fp8 (E4M3, a power-of-two scale
    /// per 32).
    #[arg(long, default_value = "f32")]
    kv_dtype: String,
    /// Where KV spill files go. Default: a folder in the system's temporary directory.
    #[arg(long)]
    spill_dir: Option<PathBuf>,
    /// RoPE scaling past the trained length: none, linear, ntk, dynamic, yarn.
    #[arg(long, default_value = "none")]
    rope_scaling: String,
    /// Context extension factor of --rope-scaling (a multiple of the trained length).
    #[arg(long, default_value_t = 1.0)]
    rope_factor: f64,
    /// Print one JSON object on stdout instead of a table. Default: off.
    #[arg(long)]
    json: bool,
    /// Write a log-log plot (SVG): prefill time against length; with --peer, prefill tok/s,
    /// decode tok/s and peak RSS against length for both. Default: none.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Decode steps timed after each prefill (its length is their depth); 0 skips decode.
    #[arg(long, default_value_t = 16)]
    decode_tokens: usize,
    /// Weights the products read: f32 (the exact path), bf16, or quant (the GGUF's blocks
    /// times int8 activations; with --kv-dtype bf16, the fast path `generate` runs).
    #[arg(long, default_value = "f32")]
    decode_weights: String,
    /// The peer measured beside us, `llama.cpp=PATH` (PATH: the llama-bench binary or a
    /// llama.cpp folder with build/bin/llama-bench): `llama-bench -fa 1 -r 1` prefill at each
    /// length and decode at each depth on the same GGUF (--model must be one), in this run.
    /// Default: none (ours only).
    #[arg(long)]
    peer: Option<String>,
}

#[derive(Serialize)]
struct Row {
    tokens: usize,
    chunk: usize,
    seconds: f64,
    tokens_per_s: f64,
    ms_per_token: f64,
    peak_rss_mib: f64,
    kv_device_bytes: u64,
    kv_host_bytes: u64,
    kv_disk_bytes: u64,
    /// Decode tok/s at this depth (absent with --decode-tokens 0).
    decode_tok_s: Option<f64>,
    /// The peer at this length, when one was named.
    peer: Option<PeerRow>,
}

#[derive(Serialize)]
struct PeerRow {
    prefill_tok_s: f64,
    decode_tok_s: Option<f64>,
    /// The larger of its two runs' peak RSS (prefill, decode at this depth).
    peak_rss_mib: f64,
}

#[derive(Serialize)]
struct Report {
    machine: String,
    threads: usize,
    model: String,
    rope: String,
    kv_dtype: String,
    decode_weights: String,
    /// `llama.cpp (PATH)` when a peer ran.
    peer: Option<String>,
    rows: Vec<Row>,
}

/// Peak resident memory since the last reset, from /proc (0 where there is none).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn reset_peak_rss() {
    // "5" resets the peak RSS counter (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub fn run(args: Args) -> Result<()> {
    let lengths = units::token_list(&args.lengths, 1)?;
    let budgets = Budgets {
        device: units::bytes(&args.kv_device)?,
        host: units::bytes(&args.kv_host)?,
        disk: units::bytes(&args.kv_disk)?,
    };
    let dtype = crate::commands::KvDtype::parse(&args.kv_dtype)?;
    let activation = units::bytes(&args.activation_budget)?;
    let peer = args
        .peer
        .as_deref()
        .map(|p| Peer::parse(p).map(|p| p.with_kv(dtype)))
        .transpose()?;
    // The peer runs with as many threads as our pool (the global --threads).
    let threads = rayon::current_num_threads();
    let mut gguf = None;
    let (mut model, name): (Model, String) = match args.model.as_deref() {
        Some("tiny-llama4") => (
            random_model(tiny_llama4_config(), 1)?,
            "tiny-llama4 (random)".into(),
        ),
        Some("tiny-llama4-local") => (
            random_model(tiny_llama4_local_config(), 1)?,
            "tiny-llama4-local (random, every layer chunked-local)".into(),
        ),
        m => {
            let path = crate::commands::resolve_model(&m.map(PathBuf::from))?;
            let loaded = longctx_engine::load(&path)
                .with_context(|| format!("loading {}", path.display()))?;
            let name = path.display().to_string();
            gguf = Some(path);
            (loaded.model, name)
        }
    };
    // The peer reads the same file, so it must be a GGUF (not a random model or a directory).
    let peer_model = match (&peer, &gguf) {
        (None, _) => None,
        (Some(_), Some(p)) if p.extension().is_some_and(|e| e == "gguf") => Some(p.clone()),
        (Some(_), _) => anyhow::bail!("--peer needs --model to be a .gguf file the peer can read"),
    };
    use crate::commands::{prepare, DecodeWeights};
    let weights = match args.decode_weights.as_str() {
        "f32" => DecodeWeights::F32,
        "bf16" => DecodeWeights::Bf16,
        "quant" => DecodeWeights::Quant,
        w => anyhow::bail!("--decode-weights {w}: expected f32, bf16 or quant"),
    };
    prepare(&mut model, weights)?;
    let rope = rope_override(&model.cfg, &args.rope_scaling, args.rope_factor)?;
    let spill_dir = args.spill_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("longctx-scaling-{}", std::process::id()))
    });
    let mut rows = vec![];
    for &n in &lengths {
        let runner = Runner {
            rope: Some(rope.clone()),
            ..Runner::new(&model)
        }
        .for_length(n + args.decode_tokens);
        let vocab = model.cfg.vocab as u64;
        let tokens: Vec<u32> = (0..n as u64)
            .map(|i| (i.wrapping_mul(2654435761) % (vocab - 3) + 3) as u32)
            .collect();
        let store = model.kv_store(&KvOptions {
            dtype,
            budgets,
            policy: Policy::KeepNewest,
            spill_dir: spill_dir.clone(),
            ..KvOptions::default()
        })?;
        let chunking = match args.chunk {
            Some(c) => Chunking::Fixed(c),
            None => Chunking::Budget(activation),
        };
        let opts = PrefillOptions {
            chunking,
            checkpoints: None,
        };
        let bar = Progress::new(n as u64, &format!("prefill of {n}"), "tokens");
        reset_peak_rss();
        let done = prefill(
            &runner,
            &store,
            &tokens,
            &opts,
            &AtomicBool::new(false),
            |p| {
                bar.set_position(p.done as u64);
                bar.set_message(format!(
                    "KV device {} MiB, disk {} MiB",
                    p.kv_bytes[0] >> 20,
                    p.kv_bytes[2] >> 20
                ));
            },
        )?;
        bar.finish_and_clear();
        // Decode at this depth: greedy steps after the prompt, timed together.
        let decode_tok_s = if args.decode_tokens > 0 {
            let mut next = argmax(&done.logits);
            let t = Instant::now();
            for i in 0..args.decode_tokens {
                let l = model.forward(
                    &[next],
                    n + i,
                    &store,
                    done.seq,
                    Logits::Last,
                    runner.rope.as_ref(),
                    runner.prefetch,
                )?;
                next = argmax(&l);
            }
            Some(args.decode_tokens as f64 / t.elapsed().as_secs_f64())
        } else {
            None
        };
        let u = store.usage();
        let peak = peak_rss_mib();
        drop(store);
        // The peer right after us at the same length: alternating, so a machine that drifts
        // during the run drifts for both.
        let peer_row = match (&peer, &peer_model) {
            (Some(p), Some(f)) => {
                eprintln!("{n} tokens: {} ...", p.bench.display());
                let (prefill_tok_s, rss_p) = p.prefill(f, threads, n)?;
                let (decode_tok_s, rss_d) = if args.decode_tokens > 0 {
                    let (ts, rss) = p.decode(f, threads, n, args.decode_tokens)?;
                    (Some(ts), rss)
                } else {
                    (None, 0.0)
                };
                Some(PeerRow {
                    prefill_tok_s,
                    decode_tok_s,
                    peak_rss_mib: rss_p.max(rss_d),
                })
            }
            _ => None,
        };
        rows.push(Row {
            tokens: n,
            chunk: done.chunk,
            seconds: done.seconds,
            tokens_per_s: n as f64 / done.seconds,
            ms_per_token: done.seconds * 1e3 / n as f64,
            peak_rss_mib: peak,
            kv_device_bytes: u.bytes[0],
            kv_host_bytes: u.bytes[1],
            kv_disk_bytes: u.bytes[2],
            decode_tok_s,
            peer: peer_row,
        });
        if !args.json {
            let r = rows.last().unwrap();
            eprintln!(
                "{:>9} tokens: {:.2} s, {:.1} tok/s, decode {}, peak RSS {:.0} MiB",
                r.tokens,
                r.seconds,
                r.tokens_per_s,
                opt_ts(r.decode_tok_s),
                r.peak_rss_mib
            );
        }
    }
    let _ = std::fs::remove_dir_all(&spill_dir);
    let report = Report {
        machine: machine(),
        threads: rayon::current_num_threads(),
        model: name,
        rope: format!("{:?}", rope.scaling),
        kv_dtype: args.kv_dtype.clone(),
        decode_weights: args.decode_weights.clone(),
        peer: peer
            .as_ref()
            .map(|p| format!("{} ({})", p.name, p.bench.display())),
        rows,
    };
    if let Some(p) = &args.plot {
        if report.peer.is_some() {
            plot_side_by_side(&report, p)?;
        } else {
            plot(&report, p)?;
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} ({} threads), {}, RoPE {}, KV {}, weights {}",
        report.machine,
        report.threads,
        report.model,
        report.rope,
        report.kv_dtype,
        report.decode_weights
    );
    println!(
        "{:>9} {:>6} {:>10} {:>10} {:>8} {:>10} {:>10} {:>12} {:>12}",
        "tokens",
        "chunk",
        "seconds",
        "tok/s",
        "ms/tok",
        "decode t/s",
        "peak MiB",
        "KV dev MiB",
        "KV disk MiB"
    );
    for r in &report.rows {
        println!(
            "{:>9} {:>6} {:>10.2} {:>10.1} {:>8.3} {:>10} {:>10.0} {:>12.1} {:>12.1}",
            r.tokens,
            r.chunk,
            r.seconds,
            r.tokens_per_s,
            r.ms_per_token,
            opt_ts(r.decode_tok_s),
            r.peak_rss_mib,
            r.kv_device_bytes as f64 / 1048576.0,
            r.kv_disk_bytes as f64 / 1048576.0
        );
    }
    if let Some(name) = &report.peer {
        println!("beside {name}, same file, same threads, alternating by length:");
        println!(
            "{:>9} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7} {:>10} {:>10}",
            "tokens",
            "prefill t/s",
            "peer",
            "ratio",
            "decode t/s",
            "peer",
            "ratio",
            "peak MiB",
            "peer MiB"
        );
        for r in &report.rows {
            let Some(p) = &r.peer else { continue };
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            println!(
                "{:>9} {:>12.1} {:>12.1} {:>7} {:>12} {:>12} {:>7} {:>10.0} {:>10.0}",
                r.tokens,
                r.tokens_per_s,
                p.prefill_tok_s,
                ratio(Some(r.tokens_per_s), Some(p.prefill_tok_s)),
                opt_ts(r.decode_tok_s),
                opt_ts(p.decode_tok_s),
                ratio(r.decode_tok_s, p.decode_tok_s),
                r.peak_rss_mib,
                p.peak_rss_mib
            );
        }
    }
    Ok(())
}

/// `512`, `4K`, `1.5K`, `128K`, `1M`: context lengths as people write them.
fn tokens_label(x: f64) -> String {
    let (v, unit) = if x >= 1048576.0 {
        (x / 1048576.0, "M")
    } else if x >= 1024.0 {
        (x / 1024.0, "K")
    } else {
        (x, "")
    };
    if (v - v.round()).abs() < 0.05 {
        format!("{v:.0}{unit}")
    } else {
        format!("{v:.1}{unit}")
    }
}

fn opt_ts(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.1}"))
}

/// Three log-log panels against context length, ours and the peer's on each: prefill tok/s,
/// decode tok/s at that depth, peak RSS.
fn plot_side_by_side(r: &Report, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let peer_name = r.peer.as_deref().unwrap_or("peer");
    let peer_name = peer_name
        .split(" (")
        .next()
        .unwrap_or(peer_name)
        .to_string();
    type Get = fn(&Row) -> Option<(f64, f64)>;
    let panels: [(&str, Get, Get); 3] = [
        (
            "prefill tok/s",
            |x| Some((x.tokens as f64, x.tokens_per_s)),
            |x| x.peer.as_ref().map(|p| (x.tokens as f64, p.prefill_tok_s)),
        ),
        (
            "decode tok/s",
            |x| x.decode_tok_s.map(|d| (x.tokens as f64, d)),
            |x| {
                x.peer
                    .as_ref()
                    .and_then(|p| p.decode_tok_s)
                    .map(|d| (x.tokens as f64, d))
            },
        ),
        (
            "peak RSS MiB",
            |x| Some((x.tokens as f64, x.peak_rss_mib)),
            |x| x.peer.as_ref().map(|p| (x.tokens as f64, p.peak_rss_mib)),
        ),
    ];
    let root = SVGBackend::new(path, (1500, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(
        &format!(
            "{} vs {peer_name}, {} ({} threads, KV {}, weights {})",
            "longctx",
            std::path::Path::new(&r.model)
                .file_name()
                .map_or(r.model.clone(), |f| f.to_string_lossy().into_owned()),
            r.threads,
            r.kv_dtype,
            r.decode_weights
        ),
        ("sans-serif", 16),
    )?;
    for (area, (title, ours, peer)) in root.split_evenly((1, 3)).iter().zip(panels) {
        let a: Vec<(f64, f64)> = r.rows.iter().filter_map(ours).collect();
        let b: Vec<(f64, f64)> = r.rows.iter().filter_map(peer).collect();
        let all: Vec<&(f64, f64)> = a.iter().chain(&b).filter(|p| p.1 > 0.0).collect();
        if all.is_empty() {
            continue;
        }
        let (x0, x1) = (
            all.iter().map(|p| p.0).fold(f64::MAX, f64::min) / 1.3,
            all.iter().map(|p| p.0).fold(0.0, f64::max) * 1.3,
        );
        let (y0, y1) = (
            all.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 2.0,
            all.iter().map(|p| p.1).fold(0.0, f64::max) * 2.0,
        );
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 15))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            // Base 2 on x: the lengths are powers of two, so each gets its own tick.
            .build_cartesian_2d((x0..x1).log_scale().base(2.0), (y0..y1).log_scale())?;
        chart
            .configure_mesh()
            .x_desc("context tokens")
            .y_desc(title)
            .x_label_formatter(&|x| tokens_label(*x))
            .y_label_formatter(&|y| {
                if *y >= 10.0 {
                    format!("{y:.0}")
                } else {
                    format!("{y:.1}")
                }
            })
            .draw()?;
        for (pts, color, name) in [(&a, BLUE, "longctx"), (&b, RED, peer_name.as_str())] {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Prefill seconds and ms/token against tokens, both axes logarithmic, with slope-1 and
/// slope-2 guides through the first point.
fn plot(r: &Report, path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let pts: Vec<(f64, f64)> = r
        .rows
        .iter()
        .map(|x| (x.tokens as f64, x.seconds))
        .collect();
    anyhow::ensure!(!pts.is_empty(), "nothing to plot");
    let (x0, x1) = (
        pts.iter().map(|p| p.0).fold(f64::MAX, f64::min) / 1.5,
        pts.iter().map(|p| p.0).fold(0.0, f64::max) * 1.5,
    );
    let (y0, y1) = (
        pts.iter().map(|p| p.1).fold(f64::MAX, f64::min).max(1e-4) / 3.0,
        pts.iter().map(|p| p.1).fold(0.0, f64::max) * 3.0,
    );
    let root = SVGBackend::new(path, (800, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("prefill time vs context, {}", r.model),
            ("sans-serif", 18),
        )
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("context tokens")
        .y_desc("prefill seconds")
        .draw()?;
    let (px, py) = pts[0];
    let guide = |k: i32| {
        (0..=40).map(move |i| {
            let x = x0 * (x1 / x0).powf(i as f64 / 40.0);
            (x, py * (x / px).powi(k))
        })
    };
    chart
        .draw_series(LineSeries::new(guide(1), BLUE.mix(0.3)))?
        .label("linear")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.mix(0.3)));
    chart
        .draw_series(LineSeries::new(guide(2), RED.mix(0.3)))?
        .label("quadratic")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.mix(0.3)));
    chart
        .draw_series(LineSeries::new(pts.clone(), BLACK.stroke_width(2)))?
        .label("measured")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, BLACK.filled())))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}
