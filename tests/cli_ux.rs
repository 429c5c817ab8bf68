//! What a new user meets first (issue 18): errors in one line with each cause once, token
//! limits that say prompt and new tokens apart, progress on long runs without a terminal.

use std::process::{Command, Output};

fn longctx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(args)
        .output()
        .unwrap()
}

/// A failure: exit status 1, one `error:` line, the OS's cause said at most once (it was
/// once "I/O error reading /nonexistent: No such file or directory (os error 2): No such
/// file or directory (os error 2)").
fn one_error(args: &[&str], needle: &str) -> String {
    let out = longctx(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} succeeded: {err}");
    let last = err.lines().last().unwrap_or("").to_string();
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "{args:?}: {err}"
    );
    assert!(
        last.matches("os error").count() <= 1,
        "doubled cause: {last}"
    );
    assert!(
        last.matches("No such file or directory").count() <= 1,
        "doubled cause: {last}"
    );
    last
}

#[test]
fn errors_name_the_file_and_say_each_cause_once() {
    let empty = std::env::temp_dir().join(format!("longctx-ux-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    // A model that is nowhere: what to give instead is said.
    let missing = one_error(
        &["generate", "--model", "/nonexistent", "--prompt", "hi"],
        "/nonexistent",
    );
    assert!(missing.contains("give a .gguf file"), "{missing}");
    one_error(&["perplexity", "--file", "/nonexistent"], "/nonexistent");
    one_error(
        &["batch", "--input", "/nonexistent", "--output", "/tmp/x"],
        "/nonexistent",
    );
    one_error(&["ask", "--repo", "/nonexistent", "q?"], "/nonexistent");
    // A file given as the repository: said so, not blamed on the model's config.
    let file = one_error(&["ask", "--repo", "Cargo.toml", "q?"], "is not a directory");
    assert!(!file.contains("model config"), "{file}");
    // A directory that is not a model: the file it lacks is named.
    one_error(
        &["generate", "--model", empty, "--prompt", "hi"],
        "config.json",
    );
    let _ = std::fs::remove_dir(empty);
}

/// `--max-tokens 9000` on a one-token prompt once said "prompt of 9001 tokens exceeds the
/// limit": the prompt and the new tokens are said apart.
#[test]
fn token_limits_say_prompt_and_new_tokens_apart() {
    let last = one_error(
        &["generate", "--prompt", "Hi", "--max-tokens", "9000"],
        "plus 9000 new tokens exceeds the limit of 8192",
    );
    assert!(last.contains("a prompt of 1 token plus"), "{last}");
}

/// Without a terminal, a long run prints plain progress lines (perplexity once ran silent);
/// LONGCTX_PROGRESS_SECS=0 makes every step due, so a short run shows them here.
#[test]
fn progress_lines_without_a_terminal() {
    let dir = std::env::temp_dir().join(format!("longctx-ux-ppl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("t.txt");
    std::fs::write(
        &text,
        "The quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["perplexity", "--ctx", "128", "--chunk", "64", "--file"])
        .arg(&text)
        .env("LONGCTX_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("perplexity: "))
        .collect();
    assert!(lines.len() >= 2, "{err}");
    assert!(lines.last().unwrap().contains(" tokens (100%)"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "kernels", "--quick", "--json", "--only", "rope"])
        // The global --threads sizes the pool the kernels run on, after the subcommand too.
        .args(["--threads", "1"])
        .env("LONGCTX_PROGRESS_SECS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("bench kernels: 1/1 rows (100%)"), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"], 1, "{v}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A reader that stops early (`longctx generate ... | head -c 1`) ends the command quietly, as
/// any Unix filter: no panic about a broken pipe on stderr.
#[test]
fn a_closed_stdout_ends_the_command_without_a_panic() {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "generate",
            "--stream",
            "--prompt",
            "Count: 1, 2, 3,",
            "--max-tokens",
            "200",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(!err.contains("panicked"), "{err}");
    // Killed by SIGPIPE (no exit code) or, had it finished first, a clean exit.
    assert!(
        status.code().is_none() || status.success(),
        "{status}: {err}"
    );
}
