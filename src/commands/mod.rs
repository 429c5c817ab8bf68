//! The commands that run a model: fetch-model, generate, perplexity.

pub mod ask;
pub mod batch;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod input;
pub mod perplexity;
pub mod plan;
pub mod progress;
pub mod sampling;
pub mod stats;

// Every run over a few seconds reports progress through this (a bar on a terminal, plain
// lines elsewhere).
pub use progress::{progress_bar, Progress};
// Every command that generates ends with `print_run_stats(&clock.finish(..), json)`: the
// same timings (first token counting the prefill) and KV bytes per tier, `--json` included.
pub use stats::{print_run_stats, Clock, KvBytes, StatsOpts};

use anyhow::Result;
use longctx_engine::{fetch, load, Loaded};
use std::path::PathBuf;

/// `--model`: a .gguf file or a Hugging Face directory, else a hub name (`org/name`,
/// `org/name:FILE`) found offline in the Hugging Face cache; the default model when absent.
/// A path that exists wins over a hub name.
pub fn resolve_model(model: &Option<PathBuf>) -> Result<PathBuf> {
    use longctx_engine::hub;
    match model {
        Some(p) if p.exists() => Ok(p.clone()),
        Some(p) => {
            let root = hub::cache_root(|k| std::env::var_os(k));
            match p.to_str().map(|s| hub::resolve(&root, s)) {
                Some(Ok(Some(found))) => {
                    eprintln!("model {}: {}", p.display(), found.display());
                    Ok(found)
                }
                Some(Err(e)) => Err(e.into()),
                _ => anyhow::bail!(
                    "model {} does not exist: give a .gguf file, a Hugging Face model directory, \
                     or org/name of a model in the Hugging Face cache ({}); without --model the \
                     default model is fetched",
                    p.display(),
                    root.display()
                ),
            }
        }
        None => Ok(fetch::smollm2(&mut |m| eprintln!("{m}"))?),
    }
}

pub fn open(model: &Option<PathBuf>) -> Result<Loaded> {
    let path = resolve_model(model)?;
    // Most load errors name the file already; the others (a directory's parts) get it here.
    load(&path).map_err(|e| {
        let shown = path.display().to_string();
        if e.to_string().contains(&shown) {
            anyhow::Error::from(e)
        } else {
            anyhow::Error::from(e).context(format!("loading {shown}"))
        }
    })
}

/// Which numeric path a command runs: the fast one by default (the GGUF's own weight blocks,
/// other weights in 8 bits, times int8 activations; a bf16 KV cache), `--exact` for f32
/// weights and KV (what `perplexity` and the parity tests use). On the fast path every product
/// (decode steps, prompt chunks) takes int8 activations, as llama.cpp's CPU backend does.
#[derive(clap::Args, Clone, Debug)]
pub struct DecodeOpts {
    /// The exact path: f32 decode weights and an f32 KV cache. Default: off (the fast path).
    #[arg(long, conflicts_with = "fast")]
    pub exact: bool,
    /// The fast path: quantised decode weights and a bf16 KV cache. Default: on (it is the
    /// default path; the flag only says so).
    #[arg(long)]
    pub fast: bool,
    /// KV cache element type, overriding the path's: f32 (exact), bf16 (half the bytes a
    /// decode step reads), q8 (llama.cpp's q8_0: 8-bit integers with a scale per 32, 56% of
    /// bf16's bytes) or fp8 (E4M3 floats with a power-of-two scale per 32, as OCP's MXFP8:
    /// 52%); q8 and fp8 need head dims a multiple of 32. Default: bf16, f32 with --exact.
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtype>,
    /// Weights one-token products read, overriding the path's: f32 (exact), bf16 (rounded,
    /// half the bytes) or quant (a GGUF file's own blocks, every format, times int8
    /// activations, as llama.cpp does; float weights quantised to 8 bits). Default: quant,
    /// f32 with --exact.
    #[arg(long, value_enum)]
    pub decode_weights: Option<DecodeWeights>,
    /// Keep at most this many bytes of routed experts in memory (e.g. 2GiB; Llama 4 MoE
    /// models): the others stay in the model file, are read when a token is routed to them
    /// (the next layer's likely experts read ahead) and leave least recently used first.
    /// The answer is the same as without a budget; the closing statistics give the bytes
    /// read, the hit rate and the resident peak. Default: every expert resident.
    #[arg(long, value_parser = crate::units::bytes)]
    pub expert_budget: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
    Q8,
    Fp8,
}

impl KvDtype {
    /// The KV store's element type.
    pub fn dtype(self) -> longctx_kernels::DType {
        match self {
            KvDtype::F32 => longctx_kernels::DType::F32,
            KvDtype::Bf16 => longctx_kernels::DType::BF16,
            KvDtype::Q8 => longctx_kernels::DType::Q8_0,
            KvDtype::Fp8 => longctx_kernels::DType::F8E4M3,
        }
    }

    /// `--kv-dtype` as the benchmarks take it (a string, kept in their JSON).
    pub fn parse(s: &str) -> Result<longctx_kernels::DType> {
        use clap::ValueEnum;
        KvDtype::from_str(s, true)
            .map(KvDtype::dtype)
            .map_err(|_| anyhow::anyhow!("--kv-dtype {s}: expected f32, bf16, q8 or fp8"))
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeWeights {
    F32,
    Bf16,
    Quant,
}

/// Set once by `--device cuda` (after the probe found a GPU): every model a command opens
/// runs its steps on the CUDA backend.
static CUDA: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Makes every later model run on CUDA device `ordinal`.
pub fn use_cuda(ordinal: usize) {
    let _ = CUDA.set(ordinal);
}

/// Prepares `model`'s weights for a run: on `--device cuda`, the CUDA backend (which
/// uploads the stored weights itself); else the CPU copies `weights` names.
pub fn prepare(model: &mut longctx_engine::Model, weights: DecodeWeights) -> Result<()> {
    if let Some(&ordinal) = CUDA.get() {
        let cache = longctx_engine::fetch::home().join("cuda");
        let cuda = longctx_engine::backend::Cuda::new(ordinal, Some(cache))?;
        model.use_cuda(cuda)?;
        eprintln!("device: {}", model.device());
        return Ok(());
    }
    match weights {
        DecodeWeights::F32 => model.enable_f32_weights()?,
        DecodeWeights::Bf16 => model.enable_bf16_decode()?,
        DecodeWeights::Quant => model.enable_quant_decode()?,
    }
    Ok(())
}

impl DecodeOpts {
    /// Opens the model and prepares the decode weights asked for.
    pub fn open(&self, model: &Option<PathBuf>) -> Result<Loaded> {
        let mut m = open(model)?;
        eprintln!("{}", self.describe());
        if let Some(b) = self.expert_budget {
            m.model
                .set_expert_budget(b)
                .map_err(|e| anyhow::anyhow!("--expert-budget: {e}"))?;
        }
        prepare(&mut m.model, self.path().0)?;
        Ok(m)
    }

    /// The decode weights and KV type: the path's, each overridable.
    fn path(&self) -> (DecodeWeights, KvDtype) {
        let (w, kv) = if self.exact {
            (DecodeWeights::F32, KvDtype::F32)
        } else {
            (DecodeWeights::Quant, KvDtype::Bf16)
        };
        (
            self.decode_weights.unwrap_or(w),
            self.kv_dtype.unwrap_or(kv),
        )
    }

    /// The path in words, for stderr: `fast (decode weights quant, KV bf16)`.
    pub fn describe(&self) -> String {
        let (w, kv) = self.path();
        let name = match (w, kv) {
            (DecodeWeights::F32, KvDtype::F32) => "exact",
            (DecodeWeights::Quant, KvDtype::Bf16) => "fast",
            _ => "mixed",
        };
        format!(
            "{name} path (decode weights {}, KV {})",
            format!("{w:?}").to_lowercase(),
            format!("{kv:?}").to_lowercase()
        )
    }

    /// The KV store options of the path.
    pub fn kv(&self) -> longctx_engine::KvOptions {
        longctx_engine::KvOptions {
            dtype: self.path().1.dtype(),
            ..longctx_engine::KvOptions::default()
        }
    }
}

/// `longctx fetch-model smollm2`.
pub fn fetch_model(name: &str) -> Result<()> {
    anyhow::ensure!(
        name == "smollm2",
        "unknown model {name:?}: the one fetchable model is smollm2"
    );
    let p = fetch::smollm2(&mut |m| eprintln!("{m}"))?;
    println!("{}", p.display());
    Ok(())
}

/// Prints generated tokens as they come, only whole characters (a multi-byte character may
/// span tokens).
#[derive(Default)]
pub struct StreamPrinter {
    tokens: Vec<u32>,
    shown: String,
}

impl StreamPrinter {
    pub fn push(&mut self, tok: &longctx_engine::Tokenizer, t: u32) -> longctx_engine::Result<()> {
        use std::io::Write;
        self.tokens.push(t);
        let text = tok.decode(&self.tokens)?;
        if text.len() > self.shown.len() && !text.ends_with('\u{FFFD}') {
            print!("{}", &text[self.shown.len()..]);
            let _ = std::io::stdout().flush();
            self.shown = text;
        }
        Ok(())
    }

    /// Prints what is left of `text` (the whole answer) and a newline.
    pub fn finish(&self, text: &str) {
        println!("{}", text.get(self.shown.len()..).unwrap_or(""));
    }
}
