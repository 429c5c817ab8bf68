//! `longctx eval passkey`: passkey retrieval over context lengths and depths.

use crate::units;
use anyhow::Result;
use longctx_engine::apps::passkey::{correct, key_for, prompt};
use longctx_engine::config::rope_override;
use longctx_engine::generate::{complete, Sampler, Sampling};
use longctx_engine::{KvOptions, Runner};
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum EvalCommand {
    /// Passkey retrieval: a 5-digit key hidden in filler text, asked for at the end.
    Passkey(Args),
}

#[derive(clap::Args)]
pub struct Args {
    /// A .gguf file, a Hugging Face model directory or hub name. Default: SmolLM2-135M-Instruct
    /// (fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths in tokens, comma-separated (k = 1024), each at least 64.
    #[arg(long, value_delimiter = ',', default_value = "1k,2k,4k,8k")]
    lengths: Vec<String>,
    /// Depths of the key in percent of the filler (0 to 100), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    depths: Vec<usize>,
    /// RoPE scaling past the trained length: none, linear, ntk, dynamic, yarn.
    #[arg(long, default_value = "none")]
    rope_scaling: String,
    /// Context extension factor of --rope-scaling (a multiple of the trained length).
    #[arg(long, default_value_t = 1.0)]
    rope_factor: f64,
    /// Seed of the keys.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// KV cache element type: f32, bf16, q8 (llama.cpp's q8_0) or fp8 (E4M3, a power-of-two
    /// scale per 32), to measure what a smaller KV costs in retrieval. The weights stay f32
    /// (the exact path).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: super::KvDtype,
    /// Print the cells and accuracy as one JSON object on stdout. Default: off (a table).
    #[arg(long)]
    json: bool,
    /// Write a heat map of the cells to this SVG file. Default: none.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Serialize)]
struct Cell {
    length: usize,
    prompt_tokens: usize,
    depth: usize,
    key: u32,
    answer: String,
    correct: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    rope: String,
    kv_dtype: &'static str,
    cells: Vec<Cell>,
    accuracy: f64,
}

pub fn run(cmd: EvalCommand) -> Result<()> {
    let EvalCommand::Passkey(args) = cmd;
    let lengths = units::token_list(&args.lengths, 64)?;
    anyhow::ensure!(
        args.depths.iter().all(|d| *d <= 100),
        "--depths are percentages, 0 to 100"
    );
    let path = super::resolve_model(&args.model)?;
    let m = longctx_engine::load(&path)?;
    let rope = rope_override(&m.model.cfg, &args.rope_scaling, args.rope_factor)?;
    let trained = m.model.cfg.max_position;
    if let Some(longest) = lengths.iter().copied().filter(|l| *l > trained).max() {
        if args.rope_scaling == "none" {
            eprintln!(
                "warning: --lengths up to {longest} tokens pass the model's trained {trained}; \
                 expect misses there, or add --rope-scaling dynamic --rope-factor {}",
                longest.div_ceil(trained)
            );
        }
    }
    let mut runner = Runner::new(&m.model);
    runner.rope = Some(rope.clone());
    let bar = super::Progress::new(
        (lengths.len() * args.depths.len()) as u64,
        "passkey",
        "cells",
    );
    let mut cells = vec![];
    for &length in &lengths {
        for &depth in &args.depths {
            let key = key_for(length, depth, args.seed);
            let ids = prompt(&m.tokenizer, length, depth, key)?;
            let store = m.model.kv_store(&KvOptions {
                dtype: args.kv_dtype.dtype(),
                ..KvOptions::default()
            })?;
            let mut sampler = Sampler::new(Sampling::default());
            let job = Runner {
                rope: runner.rope.clone(),
                ..Runner::new(&m.model)
            }
            .for_length(ids.len() + 8);
            let out = complete(&job, &store, &ids, 8, &mut sampler, &[], |_| Ok(()))?;
            let answer = m.tokenizer.decode(&out.tokens)?;
            cells.push(Cell {
                length,
                prompt_tokens: ids.len(),
                depth,
                key,
                correct: correct(&answer, key),
                answer,
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let accuracy = cells.iter().filter(|c| c.correct).count() as f64 / cells.len().max(1) as f64;
    let report = Report {
        model: path.display().to_string(),
        rope: format!("{:?}", rope.scaling),
        kv_dtype: args.kv_dtype.dtype().name(),
        cells,
        accuracy,
    };
    if let Some(p) = &args.plot {
        heat_map(&report, &lengths, &args.depths, p)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "passkey retrieval, {}, RoPE {}, KV {}",
        report.model, report.rope, report.kv_dtype
    );
    print!("{:>8}", "length");
    for d in &args.depths {
        print!(" {:>5}%", d);
    }
    println!();
    for &l in &lengths {
        print!("{:>8}", l);
        for &d in &args.depths {
            let c = report
                .cells
                .iter()
                .find(|c| c.length == l && c.depth == d)
                .expect("every cell ran");
            print!(" {:>6}", if c.correct { "yes" } else { "no" });
        }
        println!();
    }
    println!("accuracy {:.0}%", report.accuracy * 100.0);
    Ok(())
}

fn heat_map(r: &Report, lengths: &[usize], depths: &[usize], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(
        path,
        (
            120 + 90 * depths.len() as u32,
            120 + 50 * lengths.len() as u32,
        ),
    )
    .into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "passkey retrieval, RoPE {}",
                r.rope.split(' ').next().unwrap_or("")
            ),
            ("sans-serif", 16),
        )
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(0..depths.len(), 0..lengths.len())?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("depth %")
        .y_desc("context tokens")
        .x_labels(depths.len())
        .y_labels(lengths.len())
        .x_label_formatter(&|i| depths.get(*i).map(|d| d.to_string()).unwrap_or_default())
        .y_label_formatter(&|i| lengths.get(*i).map(|l| l.to_string()).unwrap_or_default())
        .draw()?;
    chart.draw_series(r.cells.iter().map(|c| {
        let x = depths.iter().position(|d| *d == c.depth).unwrap_or(0);
        let y = lengths.iter().position(|l| *l == c.length).unwrap_or(0);
        let color = if c.correct {
            GREEN.mix(0.7)
        } else {
            RED.mix(0.7)
        };
        Rectangle::new([(x, y), (x + 1, y + 1)], color.filled())
    }))?;
    root.present()?;
    Ok(())
}
