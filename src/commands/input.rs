//! Prompts from the command line, a file (`--file PATH`) or stdin (`--prompt -`).

use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;

/// The prompt text: `--prompt TEXT`, `--prompt -` (all of stdin) or `--file PATH` (a file,
/// `-` for stdin too). Clap lets exactly one through.
pub fn prompt_text(prompt: Option<&str>, file: Option<&Path>) -> Result<String> {
    let from_stdin = || -> Result<String> {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the prompt from stdin (not UTF-8 text?)")?;
        Ok(s)
    };
    match (prompt, file) {
        (Some("-"), _) => from_stdin(),
        (Some(p), _) => Ok(p.to_string()),
        (None, Some(f)) if f == Path::new("-") => from_stdin(),
        (None, Some(f)) => {
            let bytes = std::fs::read(f)
                .with_context(|| format!("reading the prompt from {}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not UTF-8 text (invalid byte at offset {})",
                    f.display(),
                    e.utf8_error().valid_up_to()
                )
            })
        }
        (None, None) => {
            anyhow::bail!("give the prompt with --prompt TEXT, --prompt - or --file PATH")
        }
    }
}
