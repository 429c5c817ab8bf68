//! The commands that run a model: fetch-model, generate, perplexity.

pub mod ask;
pub mod batch;
pub mod eval;
pub mod generate;
pub mod perplexity;
pub mod plan;

use anyhow::{Context, Result};
use longctx_engine::{fetch, load, Loaded};
use std::path::PathBuf;

/// `--model`: a .gguf file or a Hugging Face directory; the default model when absent.
pub fn resolve_model(model: &Option<PathBuf>) -> Result<PathBuf> {
    match model {
        Some(p) => {
            anyhow::ensure!(p.exists(), "model {} does not exist", p.display());
            Ok(p.clone())
        }
        None => Ok(fetch::smollm2(&mut |m| eprintln!("{m}"))?),
    }
}

pub fn open(model: &Option<PathBuf>) -> Result<Loaded> {
    let path = resolve_model(model)?;
    load(&path).with_context(|| format!("loading {}", path.display()))
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

/// A progress bar on stderr (drawn only on a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("a valid template"),
    );
    bar.set_prefix(what.to_string());
    bar
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
