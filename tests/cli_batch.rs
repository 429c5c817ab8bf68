//! `longctx batch` killed with SIGKILL mid-run and rerun: every job answered exactly once,
//! every line whole; malformed lines become error records and the batch goes on.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_killed_batch_resumes_without_losing_or_duplicating_lines() {
    let dir = std::env::temp_dir().join(format!("longctx-batch-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("jobs.jsonl");
    let output = dir.join("results.jsonl");
    let _ = std::fs::remove_file(&output);
    let mut jobs: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"id": "j{i}", "prompt": "Count to {i}.", "max_tokens": 24}}"#))
        .collect();
    jobs.insert(3, "this is not JSON".into());
    std::fs::write(&input, jobs.join("\n") + "\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_longctx");
    let args = |c: &mut Command| {
        c.args(["batch", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output);
    };
    // Fetch the model first so the timing below is the batch's own.
    assert!(Command::new(bin)
        .args(["fetch-model", "smollm2"])
        .status()
        .unwrap()
        .success());
    let mut cmd = Command::new(bin);
    args(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let t = Instant::now();
    let lines = || {
        std::fs::read_to_string(&output)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    while lines() < 3 && t.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kill must land mid-run: some records written, the child still working. Otherwise
    // the rerun below would test nothing.
    let at_kill = lines();
    assert!(at_kill >= 3, "no progress in 120 s ({at_kill} records)");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the batch finished before it could be killed ({at_kill} records)"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let after_kill = lines();
    assert!(after_kill < 11, "every record was written before the kill");
    let mut cmd = Command::new(bin);
    args(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let mut ids = HashSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every line is whole JSON");
        let id = v["id"].as_str().unwrap().to_string();
        assert!(ids.insert(id.clone()), "{id} appears twice");
        if id == "line:4" {
            assert!(v["error"].as_str().unwrap().contains("malformed"));
        } else {
            assert!(v["output"].is_string(), "{line}");
        }
    }
    assert_eq!(ids.len(), 11, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `batch --concurrency 8` killed with SIGKILL at 10 random moments, each kill followed by a
/// rerun (itself the next one killed), then a last run to the end: every id exactly once,
/// every line whole JSON, whatever the moments were.
#[test]
fn concurrent_jobs_survive_ten_kills_at_random_moments() {
    use rand::Rng;
    let dir = std::env::temp_dir().join(format!("longctx-batch-kills-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("jobs.jsonl"), dir.join("results.jsonl"));
    let _ = std::fs::remove_file(&output);
    let n = 40;
    let jobs: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id": "k{i}", "prompt": "Write about the number {i}.", "max_tokens": {}}}"#,
                // Work for about 4 s (the whole batch ran in 1.2 s with 16-48 tokens a job,
                // too little for three kills at random moments to land mid-run).
                48 + i % 3 * 48
            )
        })
        .collect();
    std::fs::write(&input, jobs.join("\n") + "\n").unwrap();
    let bin = env!("CARGO_BIN_EXE_longctx");
    let cmd = || {
        let mut c = Command::new(bin);
        c.args(["batch", "--concurrency", "8", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .stderr(std::process::Stdio::null());
        c
    };
    assert!(Command::new(bin)
        .args(["fetch-model", "smollm2"])
        .status()
        .unwrap()
        .success());
    let mut rng = rand::rng();
    let mut kills = 0;
    while kills < 10 {
        let mut child = cmd().spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(150..900)));
        if child.try_wait().unwrap().is_some() {
            // Finished before this moment: no kill to count; the jobs are all done.
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    let out = cmd().output().unwrap();
    assert!(out.status.success());
    let text = std::fs::read_to_string(&output).unwrap();
    let mut ids = HashSet::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("every line is whole JSON");
        let id = v["id"].as_str().unwrap().to_string();
        assert!(v["output"].is_string(), "{line}");
        assert!(ids.insert(id.clone()), "{id} appears twice");
    }
    assert_eq!(ids.len(), n, "{text}");
    // The kills landed while there was work: at least a few of them mid-run.
    assert!(kills >= 3, "the batch finished after {kills} kills");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_is_one_clear_line_and_a_failure() {
    let bin = env!("CARGO_BIN_EXE_longctx");
    let one_line_error = |args: &[&str], needle: &str| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("");
        assert!(
            last.starts_with("error: ") && last.contains(needle),
            "{args:?}: {err}"
        );
    };
    one_line_error(
        &["bench", "kernels", "--only", "foo"],
        "--only foo: no such case",
    );
    one_line_error(
        &[
            "generate",
            "--prompt",
            "hello",
            "--max-context",
            "8",
            "--max-tokens",
            "16",
        ],
        // The prompt and the new tokens said apart (once "prompt of 17 tokens").
        "plus 16 new tokens exceeds the limit of 8",
    );
    // The largest --max-tokens: once wrapped past the limit check and streamed until killed.
    let max = u64::MAX.to_string();
    one_line_error(
        &[
            "generate",
            "--prompt",
            "hello",
            "--max-context",
            "3",
            "--max-tokens",
            &max,
        ],
        "exceeds the limit",
    );
    let here = env!("CARGO_MANIFEST_DIR");
    one_line_error(
        &[
            "ask",
            "--repo",
            here,
            "--max-tokens",
            &max,
            "--include",
            "README.md",
            "q?",
        ],
        "exceeds the limit",
    );
    one_line_error(&["ask", "--repo", "/no/such/repo", "q?"], "/no/such/repo");
    let empty = std::env::temp_dir().join(format!("longctx-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    one_line_error(
        &["ask", "--repo", empty.to_str().unwrap(), "q?"],
        "no text files",
    );
    one_line_error(
        &[
            "batch",
            "--input",
            "/no/such.jsonl",
            "--output",
            "/tmp/x.jsonl",
        ],
        "/no/such.jsonl",
    );
    one_line_error(&["perplexity", "--file", "/no/such.txt"], "/no/such.txt");
    let _ = std::fs::remove_dir_all(&empty);
}

/// Ids keyed by their JSON text, repeated ids and bad bytes as error records with line
/// numbers, and input == output refused.
#[test]
fn ids_duplicates_and_bad_lines_each_get_their_own_record() {
    let dir = std::env::temp_dir().join(format!("longctx-batch-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("jobs.jsonl"), dir.join("out.jsonl"));
    let _ = std::fs::remove_file(&output);
    let mut bytes = Vec::new();
    bytes.extend(br#"{"id": 7, "prompt": "Hi", "max_tokens": 1}"#);
    bytes.extend(b"\n");
    bytes.extend(br#"{"id": "7", "prompt": "Hi", "max_tokens": 1}"#);
    bytes.extend(b"\n");
    bytes.extend(b"{\"id\": \"x\", \"prompt\": \"\xff\xfe\"}\n");
    bytes.extend(br#"{"id": 7, "prompt": "again", "max_tokens": 1}"#);
    bytes.extend(b"\n");
    std::fs::write(&input, bytes).unwrap();
    let bin = env!("CARGO_BIN_EXE_longctx");
    let run = |out: &std::path::Path| {
        Command::new(bin)
            .args(["batch", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(out)
            .output()
            .unwrap()
    };
    let r = run(&output);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = std::fs::read_to_string(&output).unwrap();
    let recs: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 4, "{text}");
    // Jobs run concurrently: records come in any order, each found by its id.
    let rec = |id: serde_json::Value| {
        recs.iter()
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("no record {id} in {text}"))
    };
    assert!(rec(serde_json::json!(7))["output"].is_string(), "{text}");
    assert!(rec(serde_json::json!("7"))["output"].is_string(), "{text}");
    assert!(
        rec(serde_json::json!("line:3"))["error"]
            .as_str()
            .unwrap()
            .contains("line 3: not UTF-8"),
        "{text}"
    );
    let e = rec(serde_json::json!("line:4"))["error"].as_str().unwrap();
    assert!(
        e.contains("line 4") && e.contains("repeats line 1"),
        "{text}"
    );
    // A rerun finds every record and adds none.
    assert!(run(&output).status.success());
    assert_eq!(std::fs::read_to_string(&output).unwrap(), text);
    // --input equal to --output: refused, the jobs file untouched.
    let before = std::fs::read(&input).unwrap();
    let r = run(&input);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("same file"));
    assert_eq!(std::fs::read(&input).unwrap(), before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A "prompt" job is read as `generate` reads its prompt: without the chat template unless
/// the job says `"chat": true` (batch once wrapped every prompt, so the same prompt answered
/// "Paris." in one and something else in the other). Compared by prompt tokens.
#[test]
fn prompt_jobs_take_the_chat_template_as_generate_does() {
    let bin = env!("CARGO_BIN_EXE_longctx");
    let prompt = "The capital of France is";
    let generate_tokens = |chat: bool| -> u64 {
        let mut cmd = Command::new(bin);
        cmd.args([
            "generate",
            "--prompt",
            prompt,
            "--max-tokens",
            "1",
            "--json",
        ]);
        if chat {
            cmd.arg("--chat");
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
        v["prompt_tokens"].as_u64().unwrap()
    };
    let dir = std::env::temp_dir().join(format!("longctx-batch-chat-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (input, output) = (dir.join("jobs.jsonl"), dir.join("out.jsonl"));
    let _ = std::fs::remove_file(&output);
    let job = |id: &str, chat: &str| {
        format!(r#"{{"id": "{id}", "prompt": "{prompt}", "max_tokens": 1{chat}}}"#)
    };
    std::fs::write(
        &input,
        [
            job("plain", ""),
            job("off", r#", "chat": false"#),
            job("on", r#", "chat": true"#),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = Command::new(bin)
        .args(["batch", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let tokens = |id: &str| -> u64 {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["id"] == id)
            .unwrap_or_else(|| panic!("no {id} in {text}"))["prompt_tokens"]
            .as_u64()
            .unwrap()
    };
    let (plain, chat) = (generate_tokens(false), generate_tokens(true));
    assert!(chat > plain, "the template adds tokens: {chat} vs {plain}");
    assert_eq!(tokens("plain"), plain, "{text}");
    assert_eq!(tokens("off"), plain, "{text}");
    assert_eq!(tokens("on"), chat, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
