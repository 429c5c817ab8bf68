//! `--expert-budget` from the command line: a Llama 4 run with routed experts left in the file
//! answers exactly as the unbudgeted run and reports what the cache did; a model without
//! routed experts is one clear error.

mod common;

use common::tiny_llama4_with_tokenizer;
use std::path::Path;
use std::process::Command;

fn generate(model: &Path, extra: &[&str]) -> (bool, String, String) {
    let prompt: Vec<String> = (0..40).map(|i| format!("w{}", 3 + i * 37 % 290)).collect();
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        prompt.join(" "),
        "--max-tokens".into(),
        "12".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(&args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn a_budgeted_run_answers_as_the_unbudgeted_one_and_reports_its_experts() {
    let dir = tiny_llama4_with_tokenizer("same");
    for path in [&[][..], &["--exact"][..]] {
        let (ok, reference, err) = generate(&dir, path);
        assert!(ok, "{err}");
        assert!(!reference.trim().is_empty(), "{err}");
        assert!(
            !err.contains("experts:"),
            "no budget, no expert line: {err}"
        );
        // Smaller than one expert, and room for half of them.
        for budget in ["0", "40KiB"] {
            let mut args = path.to_vec();
            args.extend(["--expert-budget", budget]);
            let (ok, out, err) = generate(&dir, &args);
            assert!(ok, "{err}");
            assert_eq!(out, reference, "{path:?} --expert-budget {budget}");
            let line = err.lines().last().unwrap();
            assert!(line.contains("experts: budget"), "{line}");
            assert!(
                line.contains("MiB read") && line.contains("hit rate"),
                "{line}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_expert_budget_needs_routed_experts_and_a_size() {
    let dir = tiny_llama4_with_tokenizer("bad");
    let (ok, _, err) = generate(&dir, &["--expert-budget", "lots"]);
    assert!(!ok, "{err}");
    assert!(err.contains("--expert-budget"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
    // The default model (SmolLM2) is dense.
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["generate", "--prompt", "Hi", "--max-tokens", "1"])
        .args(["--expert-budget", "1GiB"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let last = err.lines().last().unwrap();
    assert!(
        last.contains("--expert-budget") && last.contains("routed experts"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn batch_and_chat_report_the_expert_cache_too() {
    let dir = tiny_llama4_with_tokenizer("batch");
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        "{\"id\": \"a\", \"prompt\": \"w5 w6 w7 w8\", \"max_tokens\": 4}\n\
         {\"id\": \"b\", \"prompt\": \"w9 w10\", \"max_tokens\": 4}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .arg("batch")
        .arg("--model")
        .arg(&dir)
        .arg("--input")
        .arg(&jobs)
        .arg("--output")
        .arg(dir.join("out.jsonl"))
        .args(["--expert-budget", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("batch: 2 done") && last.contains("experts: budget"),
        "{last}"
    );
    let mut chat = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .arg("chat")
        .arg("--model")
        .arg(&dir)
        .args(["--max-tokens", "4", "--expert-budget", "0"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    chat.stdin.take().unwrap().write_all(b"w5 w6 w7\n").unwrap();
    let out = chat.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("experts: budget"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}
