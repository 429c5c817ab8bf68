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
    /// Threads the kernels compute with (the global rayon pool), at least 1. Default: all
    /// cores (rayon's choice; RAYON_NUM_THREADS is honoured when the flag is absent).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
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
    /// Measure parts of the runtime (kernels, KV store, ring, end to end, batching, GPU).
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
    /// Download a model into the cache ($LONGCTX_HOME, default ~/.cache/longctx).
    FetchModel {
        /// The model to fetch: smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, ~90 MB).
        name: String,
    },
    /// Ask a question about a repository, answered from its files.
    ///
    /// Its files are packed into the prompt, prefilled once, and the KV kept for the next
    /// question.
    Ask(commands::ask::Args),
    /// Run JSONL jobs (prompts, or questions about documents) into a JSONL results file.
    ///
    /// Jobs run concurrently through one scheduler; a rerun skips the ids already answered.
    Batch(commands::batch::Args),
    /// Chat with the model on its chat template, turn by turn.
    ///
    /// The history is kept and only new turns are computed; reads a terminal or, line by
    /// line, a pipe.
    Chat(commands::chat::Args),
    /// Evaluations of long-context ability (passkey retrieval).
    Eval {
        #[command(subcommand)]
        what: commands::eval::EvalCommand,
    },
    /// Generate text from a prompt (or a file, or stdin).
    Generate(commands::generate::Args),
    /// Capacity planning: does a context fit a GPU configuration, and what to change if not.
    Plan(commands::plan::Args),
    /// Perplexity of a model on a text file.
    Perplexity(commands::perplexity::Args),
    /// An OpenAI-compatible HTTP server (chat and completions, streaming).
    ///
    /// Many requests are batched together in each forward step (continuous batching).
    Serve(serve::Args),
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Chat(_)) {
        quiet_on_closed_stdout();
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// `longctx generate ... | head` closes our stdout early: Rust ignores SIGPIPE, so the next
/// `print!` would panic ("failed printing to stdout"). As other Unix filters do, the command
/// ends quietly instead (SIGPIPE's default action). Not for `serve`, whose sockets report a
/// closed peer as an error of that request, nor `chat`, whose Ctrl-C handling (the ctrlc
/// crate's wake-up pipe, written from the signal handler) exits from its own thread: a pipe
/// closed at exit must not turn into a kill by SIGPIPE instead of the exit status 130.
fn quiet_on_closed_stdout() {
    #[cfg(unix)]
    // SAFETY: restores a signal's default disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
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

/// `--threads N`: the size of the one rayon pool every kernel runs on, set before any of
/// them starts (the pool can be built once per process).
fn set_threads(threads: Option<usize>) -> Result<()> {
    let Some(n) = threads else {
        return Ok(());
    };
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("--threads {n}: cannot set up the thread pool ({e})"))
}

/// Checks `--device` against the machine before a command runs: `cuda` with a GPU runs
/// every model a command opens on the CUDA backend (`bench gpu` runs the kernels' own
/// checks); `auto` stays on the CPU backend and says whether a GPU is there.
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
        (Device::Cuda, Ok(info)) => {
            // The model runs on the CUDA backend (weights in bf16 on the GPU; the KV and
            // attention still on the host in this first version).
            eprintln!("device: {info}");
            commands::use_cuda(0);
            Ok(())
        }
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
    set_threads(cli.threads)?;
    check_device(cli.device, &cli.command)?;
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::FetchModel { name } => commands::fetch_model(&name),
        Command::Ask(args) => commands::ask::run(args),
        Command::Batch(args) => commands::batch::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Eval { what } => commands::eval::run(what),
        Command::Generate(args) => commands::generate::run(args),
        Command::Perplexity(args) => commands::perplexity::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Plan(args) => commands::plan::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every command (auto help/version aside), as "longctx sub --flag".
    fn arguments() -> Vec<(String, clap::Arg)> {
        fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
            for a in cmd.get_arguments() {
                if !matches!(a.get_id().as_str(), "help" | "version") {
                    out.push((format!("{path} --{}", a.get_id()), a.clone()));
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, &format!("{path} {}", s.get_name()), out);
            }
        }
        // Built, so each argument's action and value count are final (a `Vec` option takes
        // values only once built).
        let mut cli = Cli::command();
        cli.build();
        let mut out = vec![];
        walk(&cli, "longctx", &mut out);
        out
    }

    /// Every flag says what it is in more than a word, and an option that takes a value with
    /// no default shown by clap says its default itself (several were blank or one word:
    /// `generate --prompt`, `--model` of batch/perplexity/eval, `--rope-factor`, `--json`).
    #[test]
    fn every_argument_has_a_help_line_with_its_default() {
        let mut bad = vec![];
        for (name, a) in arguments() {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            if help.split_whitespace().count() < 3 {
                bad.push(format!("{name}: help {help:?} is blank or a word or two"));
                continue;
            }
            let takes_value = a.get_num_args().is_some_and(|n| n.takes_values());
            let says_default = help.to_lowercase().contains("default")
                || help.contains("required")
                || help.contains("Required");
            if takes_value
                && !a.is_positional()
                && !a.is_required_set()
                && a.get_default_values().is_empty()
                && !says_default
            {
                bad.push(format!(
                    "{name}: takes a value but says no default: {help:?}"
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "arguments without a useful help:\n{}",
            bad.join("\n")
        );
    }

    /// `longctx --help` lists each command with one line, and README's command list names
    /// every command `--help` lists (bench's and eval's subcommands included).
    #[test]
    fn commands_have_one_line_and_the_readme_lists_them() {
        let readme = include_str!("../README.md");
        let cli = Cli::command();
        let mut missing = vec![];
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(
                !about.is_empty() && !about.contains('\n') && about.len() <= 100,
                "{name}: its line in --help is {about:?}"
            );
            if !readme.contains(&format!("longctx {name}")) {
                missing.push(format!("longctx {name}"));
            }
            for s in sub.get_subcommands() {
                let about = s.get_about().map(|a| a.to_string()).unwrap_or_default();
                assert!(
                    !about.is_empty() && !about.contains('\n'),
                    "{name} {}: {about:?}",
                    s.get_name()
                );
                // `longctx bench kernels|kvstore|...` names several on one line.
                let listed = readme.lines().any(|l| {
                    l.contains(&format!("longctx {name} "))
                        && l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                            .any(|w| w == s.get_name())
                });
                if !listed {
                    missing.push(format!("longctx {name} {}", s.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "README.md does not list: {missing:?}");
    }

    /// `--threads` is one global flag (bench's own `--threads` once differed per command):
    /// accepted before or after any command.
    #[test]
    fn threads_is_global() {
        for args in [
            &["longctx", "--threads", "3", "plan"][..],
            &["longctx", "plan", "--threads", "3"][..],
            &["longctx", "bench", "kernels", "--threads", "3"][..],
            &["longctx", "generate", "--prompt", "x", "--threads", "3"][..],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(cli.threads, Some(3), "{args:?}");
        }
        let e = set_threads(Some(0)).unwrap_err().to_string();
        assert_eq!(e, "--threads must be at least 1");
    }

    /// An I/O error says its OS cause once (it once read "I/O error reading /nonexistent: No
    /// such file or directory (os error 2): No such file or directory (os error 2)").
    #[test]
    fn one_line_says_each_cause_once() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::from(longctx_engine::EngineError::Io {
            op: "reading",
            path: "/nonexistent".into(),
            source: io(),
        });
        let line = one_line(&e);
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        let e = anyhow::Error::from(io()).context("reading /nonexistent");
        let line = one_line(&e.context("loading the model"));
        assert_eq!(line.matches("not found").count(), 1, "{line}");
        assert!(
            line.starts_with("loading the model: reading /nonexistent"),
            "{line}"
        );
    }

    /// scripts/test.sh keeps only the last lines of cuda-check.sh's stdout: the one-time
    /// 306 MB wheel download must report on stderr, in full (it was hidden behind `tail`).
    #[test]
    fn the_cuda_wheel_download_is_visible() {
        let script = include_str!("../scripts/cuda-check.sh");
        // The pip command: from its first line through its continuation lines.
        let mut pip = String::new();
        for l in script.lines().skip_while(|l| !l.contains("pip install")) {
            pip.push_str(l);
            if !l.ends_with('\\') {
                break;
            }
        }
        assert!(!pip.is_empty(), "no pip install in cuda-check.sh");
        assert!(!pip.contains("--quiet") && pip.contains(">&2"), "{pip}");
    }
}
