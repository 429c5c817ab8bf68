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
        "tokens plus 16 new tokens exceeds the limit of 8",
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
    assert_eq!(recs[0]["id"], serde_json::json!(7));
    assert!(recs[0]["output"].is_string(), "{text}");
    assert_eq!(recs[1]["id"], serde_json::json!("7"));
    assert!(recs[1]["output"].is_string(), "{text}");
    assert_eq!(recs[2]["id"], serde_json::json!("line:3"));
    assert!(
        recs[2]["error"]
            .as_str()
            .unwrap()
            .contains("line 3: not UTF-8"),
        "{text}"
    );
    assert_eq!(recs[3]["id"], serde_json::json!("line:4"));
    let e = recs[3]["error"].as_str().unwrap();
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
