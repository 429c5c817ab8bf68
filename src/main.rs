//! The `longctx` command.

mod bench;
mod commands;
mod units;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "longctx",
    version,
    about = "Long-context runtime for Llama-4-class models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure parts of the runtime.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Download a model into the cache ($LONGCTX_HOME, default ~/.cache/longctx).
    FetchModel {
        /// The model: smollm2.
        name: String,
    },
    /// Ask a question about a repository: its files are packed into the prompt, prefilled
    /// once, and the KV kept for the next question.
    Ask(commands::ask::Args),
    /// Run JSONL jobs (prompts, or questions about documents) into a JSONL results file;
    /// a rerun skips the ids already answered.
    Batch(commands::batch::Args),
    /// Evaluations of long-context ability.
    Eval {
        #[command(subcommand)]
        what: commands::eval::EvalCommand,
    },
    /// Generate text from a prompt.
    Generate(commands::generate::Args),
    /// Capacity planning: does a context fit a GPU configuration, and what to change if not.
    Plan(commands::plan::Args),
    /// Perplexity of a model on a text file.
    Perplexity(commands::perplexity::Args),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::FetchModel { name } => commands::fetch_model(&name),
        Command::Ask(args) => commands::ask::run(args),
        Command::Batch(args) => commands::batch::run(args),
        Command::Eval { what } => commands::eval::run(what),
        Command::Generate(args) => commands::generate::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Plan(args) => commands::plan::run(args),
    }
}
