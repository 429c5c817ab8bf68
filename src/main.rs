//! The `longctx` command.

mod bench;
mod commands;
mod serve;
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
    /// Where to compute: auto (the CPU backend, with one line saying whether a GPU is there),
    /// cpu, or cuda (an error naming the reason when no GPU can be used).
    #[arg(long, global = true, value_enum, default_value_t = Device::Auto)]
    device: Device,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
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
    /// An OpenAI-compatible HTTP server (chat and completions, streaming), many requests
    /// batched together.
    Serve(serve::Args),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// A forward pass allocates its per-layer buffers (megabytes each) afresh: by default glibc
/// maps each from the kernel and unmaps it when freed, so every layer pays page faults and
/// zeroing (~8% of a 2K-token prefill). Kept in the heap instead, and the heap not trimmed
/// back after each pass, the same pages are reused.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes glibc's allocator, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// The error and its causes in one line, each cause once: library errors that already say
/// their cause (an I/O error's message includes the OS's) are not followed by it again.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if line.contains(&s) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&s);
    }
    line.replace('\n', " ")
}

/// Checks `--device` against the machine before a command runs. The model forward runs on
/// the CPU backend; the CUDA kernels are run by `bench gpu`.
fn check_device(device: Device, command: &Command) -> Result<()> {
    use bench::BenchCommand as B;
    // The commands that run a model say where; the CPU micro-benchmarks and planning don't.
    let (gpu_command, computes) = match command {
        Command::Bench { what: B::Gpu(_) } => (true, true),
        Command::Bench {
            what: B::E2e(_) | B::Scaling(_),
        } => (false, true),
        Command::Bench { .. } | Command::Plan(_) | Command::FetchModel { .. } => (false, false),
        _ => (false, true),
    };
    if device == Device::Cpu
        || !computes && device == Device::Auto
        || gpu_command && device == Device::Auto
    {
        return Ok(());
    }
    let probe = longctx_kernels::cuda::probe(0);
    match (device, probe) {
        (Device::Cuda, Err(e)) => anyhow::bail!("--device cuda: {e}"),
        (Device::Cuda, Ok(_)) if gpu_command => Ok(()),
        (Device::Cuda, Ok(info)) => anyhow::bail!(
            "--device cuda: {info} is present, but this command runs on the CPU backend only \
             so far (`longctx bench gpu` runs the CUDA kernels)"
        ),
        (_, Err(e)) => {
            eprintln!("device: CPU backend ({e})");
            Ok(())
        }
        (_, Ok(info)) => {
            eprintln!("device: CPU backend ({info} present; `longctx bench gpu` uses it)");
            Ok(())
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    check_device(cli.device, &cli.command)?;
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::FetchModel { name } => commands::fetch_model(&name),
        Command::Ask(args) => commands::ask::run(args),
        Command::Batch(args) => commands::batch::run(args),
        Command::Eval { what } => commands::eval::run(what),
        Command::Generate(args) => commands::generate::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Plan(args) => commands::plan::run(args),
    }
}
