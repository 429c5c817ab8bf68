//! `longctx chat` on the default model: in a real terminal (tmux, driven by send-keys and
//! read by capture-pane) and from a pipe. Turns keep the KV of the history (a later turn
//! reuses it), Ctrl-C stops an answer and not the program, `/reset` clears the history.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_longctx");

/// The default model in the cache (fetched on first use), so no turn waits for the fetch.
fn fetch_default_model() {
    let out = Command::new(BIN)
        .args(["fetch-model", "smollm2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The per-turn lines `[prompt N tokens: R reused, M new, ...]`, as (N, R).
fn turn_stats(text: &str) -> Vec<(usize, usize)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("[prompt ")?;
            let (n, rest) = rest.split_once(" tokens: ")?;
            let (r, _) = rest.split_once(" reused")?;
            Some((n.parse().ok()?, r.parse().ok()?))
        })
        .collect()
}

/// A tmux server of its own (`tmux -L NAME`), killed when dropped, the test failing or not.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            // Run from inside tmux, the test still starts its own server.
            .env_remove("TMUX")
            .args(["-L", &self.socket, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap()
    }

    fn pane(&self) -> String {
        // The whole history, not only the visible screen.
        let out = self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", "chat"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend(keys);
        assert!(self.cmd(&args).status.success());
    }

    /// Types `text` literally, then Enter.
    fn type_line(&self, text: &str) {
        assert!(self
            .cmd(&["send-keys", "-t", "chat", "-l", text])
            .status
            .success());
        self.keys(&["Enter"]);
    }

    fn dead(&self) -> bool {
        let out = self.cmd(&["display-message", "-p", "-t", "chat", "#{pane_dead}"]);
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    /// Polls the pane until `done` holds; panics with the pane's text after `secs`.
    fn wait(&self, what: &str, secs: u64, done: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let pane = self.pane();
            if done(&pane) {
                return pane;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(secs),
                "timed out waiting for {what}; the pane:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

#[test]
fn chat_in_a_terminal_keeps_history_stops_on_ctrl_c_and_resets() {
    if Command::new("tmux").arg("-V").output().is_err() {
        longctx_kernels::testing::skipped(
            "chat_in_a_terminal_keeps_history_stops_on_ctrl_c_and_resets",
            "tmux is not installed",
        );
        return;
    }
    fetch_default_model();
    let t = Tmux {
        socket: format!("longctx-chat-test-{}", std::process::id()),
    };
    // A long enough answer limit that the story below is still running when Ctrl-C comes;
    // the factual answers end on their own after a sentence.
    // Under a shell that ignores SIGINT (the chat installs its own handler) and prints the
    // chat's exit status: tmux's own record of it (`pane_dead_status`) was at times never
    // filled in, even seconds after the pane died.
    let chat =
        format!("sh -c 'trap \"\" INT; {BIN} chat --max-tokens 400; echo \"[exit status $?]\"'");
    let started = t.cmd(&[
        "start-server",
        ";",
        "set-option",
        "-g",
        "remain-on-exit",
        "on",
        ";",
        "set-option",
        "-g",
        "history-limit",
        "20000",
        ";",
        "new-session",
        "-d",
        "-s",
        "chat",
        "-x",
        "200",
        "-y",
        "50",
        &chat,
    ]);
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    t.wait("the banner and prompt", 60, |p| {
        p.contains("chat: type a message") && p.trim_end().ends_with('>')
    });

    t.type_line("What is the capital of France?");
    t.wait("the first answer", 60, |p| turn_stats(p).len() == 1);

    // The second turn computes only what the first did not: its history's KV is reused.
    t.type_line("And what is the capital of Italy?");
    let pane = t.wait("the second answer", 60, |p| turn_stats(p).len() == 2);
    let stats = turn_stats(&pane);
    assert!(
        stats[1].1 >= stats[0].0 && stats[1].1 < stats[1].0,
        "the second turn reuses the first's prompt: {stats:?}\n{pane}"
    );

    // Ctrl-C once the story has begun: the answer stops, the chat goes on.
    let question = "Write a very long story about a dragon who learns to fly.";
    t.type_line(question);
    t.wait("the story to begin", 60, |p| {
        p.rsplit(question)
            .next()
            .is_some_and(|after| after.trim().len() > 20)
    });
    t.keys(&["C-c"]);
    let pane = t.wait("the stopped answer", 30, |p| turn_stats(p).len() == 3);
    assert!(pane.contains("[stopped]"), "{pane}");
    assert!(!t.dead(), "Ctrl-C ended the chat:\n{pane}");

    t.type_line("What is 2 + 2?");
    let pane = t.wait("an answer after Ctrl-C", 60, |p| turn_stats(p).len() == 4);
    let stats = turn_stats(&pane);
    assert!(stats[3].1 > 0, "the history is still kept: {stats:?}");

    // /reset: the history and its KV are gone, the next turn computes its whole prompt.
    t.type_line("/reset");
    t.wait("the reset", 30, |p| p.contains("history cleared"));
    t.type_line("Hello!");
    let pane = t.wait("an answer after /reset", 60, |p| turn_stats(p).len() == 5);
    let stats = turn_stats(&pane);
    assert_eq!(stats[4].1, 0, "{stats:?}\n{pane}");
    assert!(stats[4].0 < stats[3].0, "{stats:?}\n{pane}");

    // Ctrl-C at the prompt: a hint, not the end; the second in a row quits.
    t.keys(&["C-c"]);
    t.wait("the hint", 30, |p| {
        p.contains("(Ctrl-C again, Ctrl-D or /exit quits)")
    });
    assert!(!t.dead());
    t.keys(&["C-c"]);
    t.wait("the chat to end", 30, |_| t.dead());
    let pane = t.pane();
    assert!(pane.contains("[exit status 130]"), "{pane}");
}

/// Run with stdin a pipe: each line a turn, the answers on stdout, the stats on stderr.
fn piped(args: &[&str], input: &str) -> (String, String) {
    let mut child = Command::new(BIN)
        .arg("chat")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stderr}");
    (stdout, stderr)
}

#[test]
fn chat_reads_turns_from_a_pipe() {
    // The exact path: the fast path's greedy answer to this question sits on near-ties (its
    // fifth word changed with the rounding of a decode kernel's sums), the exact one does not.
    let (stdout, stderr) = piped(
        &["--max-tokens", "24", "--exact"],
        "What is the capital of France?\nAnd of Italy?\n\n/reset\n/system You are a pirate.\nHello\n\
         /exit\nNever answered\n",
    );
    let stats = turn_stats(&stderr);
    assert_eq!(stats.len(), 3, "{stderr}");
    assert_eq!(stats[0].1, 0, "{stderr}");
    assert!(
        stats[1].1 >= stats[0].0,
        "the second turn reuses the first: {stderr}"
    );
    // /reset, then /system (which resets too): nothing reused.
    assert_eq!(stats[2].1, 0, "{stderr}");
    assert!(
        stderr.contains("history cleared") && stderr.contains("system message set"),
        "{stderr}"
    );
    assert!(stdout.contains("Paris"), "{stdout}");
    // No prompt or banner in a pipe: stdout holds the answers only.
    assert!(
        !stdout.starts_with("> ") && !stderr.contains("chat: type"),
        "{stdout}"
    );
}

/// `--system` sets the system message from the start; an unknown command is said and
/// skipped, not sent to the model; a message past the context is an error for that turn
/// only.
#[test]
fn chat_system_flag_unknown_commands_and_a_too_long_message() {
    let (_, plain) = piped(&["--max-tokens", "4"], "Hi\n");
    let (_, sys) = piped(
        &[
            "--max-tokens",
            "4",
            "--system",
            "You are a helpful assistant who answers every question in one short sentence.",
        ],
        "Hi\n/nonsense\n",
    );
    let (p, s) = (turn_stats(&plain), turn_stats(&sys));
    assert_eq!((p.len(), s.len()), (1, 1), "{plain}\n{sys}");
    assert_ne!(p[0].0, s[0].0, "--system changed nothing: {plain}\n{sys}");
    assert!(sys.contains("unknown command /nonsense"), "{sys}");

    let long = "word ".repeat(300);
    let (_, err) = piped(
        &["--max-tokens", "4", "--max-context", "128"],
        &format!("Hi\n{long}\nAgain\n"),
    );
    assert!(err.contains("error: a message of"), "{err}");
    let stats = turn_stats(&err);
    assert_eq!(stats.len(), 2, "the chat went on: {err}");
    assert!(stats[1].1 > 0, "the history outlived the error: {err}");

    // A history past the context: the oldest exchanges are left out, every turn answered.
    let turns: String = ["cats", "dogs", "birds", "fish", "cows", "ants"]
        .iter()
        .map(|a| format!("Tell me about {a}.\n"))
        .collect();
    let (_, err) = piped(&["--max-tokens", "8", "--max-context", "120"], &turns);
    let stats = turn_stats(&err);
    assert_eq!(stats.len(), 6, "{err}");
    assert!(err.contains("oldest messages are left out"), "{err}");
    assert!(stats.iter().all(|s| s.0 + 8 <= 120), "{err}");
}

/// `--json`: each turn's statistics as one JSON object on stderr, the reused history in
/// `cached_tokens`.
#[test]
fn chat_json_stats_per_turn() {
    let (_, err) = piped(&["--max-tokens", "4", "--json"], "Hi\nAgain\n");
    let turns: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(turns.len(), 2, "{err}");
    assert_eq!(turns[0]["cached_tokens"], 0, "{err}");
    assert!(turns[1]["cached_tokens"].as_u64().unwrap() > 0, "{err}");
    assert!(turns[1]["prompt_tokens"].as_u64().unwrap() > 0, "{err}");
    assert!(turn_stats(&err).is_empty(), "words and JSON both: {err}");
    assert!(err.contains("fast path"), "{err}");
    let (_, err) = piped(&["--max-tokens", "2", "--exact"], "Hi\n");
    assert!(
        err.contains("exact path") && turn_stats(&err).len() == 1,
        "{err}"
    );
}
