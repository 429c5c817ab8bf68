//! `longctx bench gpu`: the GPU self-test (every CUDA kernel against the CPU kernel or a
//! float64 reference on fresh random inputs) and our bf16 flash-attention forward timed at the
//! shapes `scripts/gpu-check.sh` also gives PyTorch's SDPA.

use anyhow::{bail, Result};
use longctx_kernels::cuda::{
    bench_attention, self_test, BenchCase, Gpu, Scope, CHECK_LSE_TOL, CHECK_TOL,
};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Only the correctness checks.
    #[arg(long)]
    check_only: bool,
    /// Only the timings.
    #[arg(long)]
    bench_only: bool,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 10)]
    reps: usize,
    /// One timing case (a smoke run).
    #[arg(long)]
    quick: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    ordinal: usize,
    /// Only small bf16 checks of every kernel, no timings (for compute-sanitizer).
    #[arg(long)]
    small: bool,
    /// Seed of the checks' random inputs (default: drawn from the clock; the run prints it,
    /// so a failing draw can be rerun).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Serialize)]
struct Check {
    name: String,
    /// Norm-wise relative error (null when the case did not run).
    rel_err: Option<f64>,
    /// The worst row's relative error.
    row_err: Option<f64>,
    /// Attention: the largest absolute LSE error.
    lse_abs: Option<f64>,
    tol: f64,
    lse_tol: f64,
    pass: bool,
    /// Why the case did not run or finish.
    error: Option<String>,
}

#[derive(Serialize)]
struct Timing {
    l: usize,
    batch: usize,
    heads: usize,
    d: usize,
    causal: bool,
    ms: f64,
    tflops: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    /// The checks' seed (`--seed` reruns the same inputs).
    seed: Option<u64>,
    checks: Vec<Check>,
    timings: Vec<Timing>,
}

/// The cases of the issue: bf16, L = 4K and 16K, D = 64 and 128, causal and not, with
/// batch x heads filling the GPU (16K tokens a batch, 2048 model dims: FlashAttention's own
/// benchmark shapes).
pub fn cases(quick: bool) -> Vec<BenchCase> {
    let mut v = Vec::new();
    for l in [4096, 16384] {
        for d in [64, 128] {
            for causal in [false, true] {
                v.push(BenchCase {
                    l,
                    batch: 16384 / l,
                    heads: 2048 / d,
                    d,
                    causal,
                });
            }
        }
    }
    if quick {
        v.retain(|c| c.l == 4096 && c.d == 128 && c.causal);
    }
    v
}

/// The NCCL transport on one GPU: a group of one rank exchanging with itself through the
/// same two grouped rounds (lengths, then payloads) a ring step uses.
fn nccl_check(ordinal: usize) -> Check {
    use longctx_ring::{bootstrap::RankEnv, nccl::Nccl, Transport};
    let name = "nccl transport: self-exchange, world 1 (lengths + payload rounds)".to_string();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29517);
    let env = RankEnv {
        rank: 0,
        world: 1,
        master_addr: "127.0.0.1".into(),
        master_port: port,
    };
    let run = || -> Result<bool> {
        let mut t = Nccl::connect(&env, ordinal, std::time::Duration::from_secs(30))?;
        let msg: Vec<u8> = (0..3_000_017u32).map(|i| (i * 7 + 3) as u8).collect();
        t.start_exchange(0, bytes::Bytes::from(msg.clone()), 0)?;
        let got = t.finish_exchange(0)?;
        t.send(0, bytes::Bytes::from_static(b""))?;
        let empty = t.recv(0)?;
        Ok(got[..] == msg[..] && empty.is_empty())
    };
    let ok = match run() {
        Ok(ok) => ok,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            false
        }
    };
    Check {
        name,
        rel_err: None,
        row_err: None,
        lse_abs: None,
        tol: 0.0,
        lse_tol: 0.0,
        pass: ok,
        error: (!ok).then(|| "the exchange failed or returned other bytes".to_string()),
    }
}

/// A random Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads of 64, 3 KV
/// heads, vocabulary 49,152).
fn smollm2_shaped() -> Result<longctx_engine::ModelConfig> {
    Ok(longctx_engine::ModelConfig::from_hf_json(
        &serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "intermediate_size": 1536, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": true,
        })
        .to_string(),
    )?)
}

/// The CUDA backend: every op against float64, then whole models against the CPU backend (the same random weights, the
/// same 37-token prompt and 4 greedy decode steps, every logit): SmolLM2's shape, and
/// Llama 4's (MoE, NoPE layer, chunked attention, QK-norm).
fn model_checks(ordinal: usize, cache: std::path::PathBuf) -> Vec<Check> {
    use longctx_engine::backend::{Cpu, Cuda};
    use longctx_engine::random::{random_model, tiny_llama4_config};
    const TOL: f64 = 5e-2;
    type Config = fn() -> Result<longctx_engine::ModelConfig>;
    let cases: [(&str, Config); 2] = [
        (
            "model: random SmolLM2-shaped Llama, logits cuda vs cpu",
            smollm2_shaped,
        ),
        (
            "model: random Llama 4 (MoE, NoPE, chunked), logits cuda vs cpu",
            || Ok(tiny_llama4_config()),
        ),
    ];
    let prompt: Vec<u32> = (0..37).map(|i| (i * 97 + 5) % 1000).collect();
    let kv = longctx_engine::KvOptions::default();
    let mut out = Vec::new();
    let gpu = Cuda::new(ordinal, Some(cache));
    // Every op of the CUDA backend, the same body the CPU backend's unit test runs.
    let seed = longctx_kernels::cuda::fresh_seed();
    match gpu
        .as_ref()
        .map_err(|e| e.to_string())
        .and_then(|g| longctx_engine::backend::check::check_ops(g, seed).map_err(|e| e.to_string()))
    {
        Ok(checks) => out.extend(checks.into_iter().map(|c| Check {
            name: format!("backend op (cuda, seed {seed}): {}", c.name),
            pass: c.pass(),
            rel_err: c.err.is_finite().then_some(c.err),
            row_err: None,
            lse_abs: None,
            tol: c.tol,
            lse_tol: 0.0,
            error: None,
        })),
        Err(e) => out.push(Check {
            name: format!("backend ops (cuda, seed {seed})"),
            pass: false,
            rel_err: None,
            row_err: None,
            lse_abs: None,
            tol: 0.0,
            lse_tol: 0.0,
            error: Some(e),
        }),
    }
    for (name, cfg) in cases {
        let run = || -> Result<f64> {
            let gpu = gpu.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
            let model = random_model(cfg()?, 7)?;
            let want = model.run_on(&Cpu, &prompt, 4, &kv)?;
            let got = model.run_on(gpu, &prompt, 4, &kv)?;
            Ok(longctx_engine::backend::check::rel_error(&got, &want))
        };
        let (err, error) = match run() {
            Ok(e) => (Some(e), None),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        out.push(Check {
            name: name.into(),
            pass: error.is_none() && err.is_some_and(|e| e <= TOL),
            rel_err: err,
            row_err: None,
            lse_abs: None,
            tol: TOL,
            lse_tol: 0.0,
            error,
        });
    }
    out
}

pub fn run(args: Args) -> Result<()> {
    let cache = longctx_engine::fetch::home().join("cuda");
    let gpu = Gpu::new(args.ordinal, Some(cache))?;
    let mut report = Report {
        device: gpu.info.to_string(),
        seed: None,
        checks: Vec::new(),
        timings: Vec::new(),
    };
    if !args.json {
        println!("{}", report.device);
    }
    if !args.bench_only {
        let scope = if args.small {
            Scope::Small
        } else {
            Scope::Full
        };
        let t = self_test(&gpu, args.seed, scope);
        report.seed = Some(t.seed);
        let finite = |x: f64| x.is_finite().then_some(x);
        for r in t.rows {
            report.checks.push(Check {
                pass: r.pass(),
                rel_err: finite(r.rel_err),
                row_err: finite(r.row_err),
                lse_abs: r.lse_abs.and_then(finite),
                tol: r.tol,
                lse_tol: r.lse_tol,
                name: r.name,
                error: r.error,
            });
        }
        if !args.small {
            report.checks.push(nccl_check(args.ordinal));
            let cache = longctx_engine::fetch::home().join("cuda");
            report.checks.extend(model_checks(args.ordinal, cache));
        }
        if !args.json {
            println!("seed {} (--seed {} reruns these inputs)", t.seed, t.seed);
            println!(
                "\n{:<96} {:>9} {:>9} {:>9}  result",
                "check", "rel err", "worst row", "lse abs"
            );
            let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2e}"));
            for c in &report.checks {
                let verdict = match (&c.error, c.pass) {
                    (Some(e), _) => format!("ERROR {e}"),
                    (None, true) => "ok".into(),
                    (None, false) => "FAIL".into(),
                };
                println!(
                    "{:<96} {:>9} {:>9} {:>9}  {verdict}",
                    c.name,
                    num(c.rel_err),
                    num(c.row_err),
                    num(c.lse_abs)
                );
            }
            println!("bounds: rel err and worst row {CHECK_TOL:.0e}, lse abs {CHECK_LSE_TOL:.0e}");
        }
    }
    if !args.check_only && !args.small {
        for case in cases(args.quick) {
            let ms = bench_attention(&gpu, case, args.reps)?;
            report.timings.push(Timing {
                l: case.l,
                batch: case.batch,
                heads: case.heads,
                d: case.d,
                causal: case.causal,
                ms,
                tflops: case.flops() / (ms * 1e-3) / 1e12,
            });
        }
        if !args.json {
            println!(
                "\n{:>6} {:>5} {:>5} {:>4} {:>7} {:>10} {:>9}",
                "L", "batch", "heads", "D", "causal", "ms", "TFLOP/s"
            );
            for t in &report.timings {
                println!(
                    "{:>6} {:>5} {:>5} {:>4} {:>7} {:>10.3} {:>9.1}",
                    t.l, t.batch, t.heads, t.d, t.causal, t.ms, t.tflops
                );
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    let failed = report.checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        bail!("{failed} of {} GPU checks failed", report.checks.len());
    }
    Ok(())
}
