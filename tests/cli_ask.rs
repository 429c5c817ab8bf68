//! `longctx ask`'s KV snapshots are reused only for the model they were made with.

use std::path::Path;
use std::process::Command;

/// `ask` with its own LONGCTX_HOME (snapshots and hash memos go there, removed after).
fn ask(model: &Path, repo: &Path, home: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .env("LONGCTX_HOME", home)
        .args([
            "ask",
            "--max-tokens",
            "2",
            "--max-context",
            "2048",
            "--model",
        ])
        .arg(model)
        .arg("--repo")
        .arg(repo)
        .arg("What does this file say?")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    err
}

/// A GGUF of the same size whose weights differ only past its metadata (SmolLM2's is 1.77
/// MB) once reused the first file's prefilled KV and answered as that model would.
#[test]
fn a_snapshot_is_never_reused_for_other_weights() {
    let original = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let dir = std::env::temp_dir().join(format!("longctx-ask-snap-{}", std::process::id()));
    let repo = dir.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    // Unique text, so no earlier run's snapshot matches.
    let nonce: u64 = rand::random();
    std::fs::write(
        repo.join("notes.txt"),
        format!("The secret word is {nonce}.\n"),
    )
    .unwrap();
    let (a, b) = (dir.join("a.gguf"), dir.join("b.gguf"));
    std::fs::copy(&original, &a).unwrap();
    // b: a's bytes with the first bytes of one attention tensor changed, same size.
    let g = longctx_engine::gguf::Gguf::open(&a).unwrap();
    let t = &g.tensors["blk.0.attn_v.weight"];
    let mut bytes = std::fs::read(&a).unwrap();
    for x in &mut bytes[t.start as usize..][..4096] {
        *x = x.wrapping_add(17);
    }
    std::fs::write(&b, &bytes).unwrap();
    drop(g);
    let home = dir.join("home");
    let first = ask(&a, &repo, &home);
    assert!(!first.contains("reusing"), "{first}");
    let again = ask(&a, &repo, &home);
    assert!(
        again.contains("reusing"),
        "the same model reuses its snapshot: {again}"
    );
    let other = ask(&b, &repo, &home);
    assert!(
        !other.contains("reusing"),
        "other weights reused a's KV: {other}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ask` on this repository, with its own LONGCTX_HOME; returns (answer, stderr).
fn ask_here(model: &Path, home: &Path, question: &str, extra: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .env("LONGCTX_HOME", home)
        .arg("ask")
        .args(extra)
        .arg("--model")
        .arg(model)
        .arg("--repo")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .arg(question)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    (String::from_utf8_lossy(&out.stdout).to_string(), err)
}

/// The sentences of `text` of four words or more that occur twice.
fn repeated_sentences(text: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    text.split(['.', '!', '?', '\n'])
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| s.split(' ').count() >= 4)
        .filter(|s| !seen.insert(s.clone()))
        .collect()
}

/// The README's own question once packed five files of 151, none of `ring/`, and answered
/// with one sentence repeated to the token limit; a second question prefilled everything
/// again. Now the packing (named on stderr) holds the ring attention and LSE merge code, the
/// answer repeats no sentence, and another question on the same repository reuses the
/// cached prefix.
#[test]
fn the_readme_question_packs_the_ring_and_merge_code_and_a_second_question_reuses_the_kv() {
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let home = std::env::temp_dir().join(format!("longctx-ask-readme-{}", std::process::id()));
    let (answer, err) = ask_here(
        &model,
        &home,
        "How does ring attention merge partial results?",
        &[],
    );
    let packed = err
        .lines()
        .find(|l| l.starts_with("packed "))
        .unwrap_or_else(|| panic!("no file list on stderr: {err}"));
    assert!(
        packed.contains("kernels/src/attention/merge.rs ")
            && (packed.contains("ring/src/attend.rs ") || packed.contains("ring/src/prefill.rs ")),
        "{packed}"
    );
    assert!(!answer.trim().is_empty(), "{err}");
    let again = repeated_sentences(&answer);
    assert!(again.is_empty(), "repeated {again:?} in {answer}");

    let (_, err) = ask_here(
        &model,
        &home,
        "What happens in merge_into when neither part saw a key?",
        // Only the reuse is checked here: a short answer.
        &["--max-tokens", "16"],
    );
    let reused: usize = err
        .lines()
        .find_map(|l| l.strip_prefix("reusing "))
        .and_then(|l| l.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the second question reused nothing: {err}"));
    assert!(reused >= 256, "{err}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn repeated_sentences_are_found() {
    assert_eq!(
        repeated_sentences("It merges by lse. It is exact.\nIt merges by lse. Ok. Ok."),
        ["It merges by lse"]
    );
    assert!(repeated_sentences("One two three four. One two three five.").is_empty());
}

/// Every question once left a ~350 MB snapshot that nothing capped (four questions: 1.4 GB).
/// Under `--kv-cache-limit` the least recently used go, and stderr says so; a limit without
/// a unit is refused.
#[test]
fn the_snapshot_cache_is_capped_least_recently_used_first() {
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let dir = std::env::temp_dir().join(format!("longctx-ask-cap-{}", std::process::id()));
    let home = dir.join("home");
    let run = |text: &str, limit: &str| {
        let repo = dir.join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("notes.txt"), text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_longctx"))
            .env("LONGCTX_HOME", &home)
            .args(["ask", "--max-tokens", "2", "--max-context", "1024"])
            .args(["--kv-cache-limit", limit, "--model"])
            .arg(&model)
            .arg("--repo")
            .arg(&repo)
            .arg("What does this file say?")
            .output()
            .unwrap()
    };
    let nonce: u64 = rand::random();
    let snapshots = || std::fs::read_dir(home.join("kv")).unwrap().count();
    let first = run(&format!("The first secret is {nonce}.\n"), "1GB");
    assert!(first.status.success());
    assert_eq!(snapshots(), 1);
    // A second repository text under a cap that holds one snapshot: the first goes.
    let second = run(&format!("The second secret is {nonce}, another.\n"), "1MB");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("evicted 1 least recently used snapshot"),
        "{err}"
    );
    assert_eq!(snapshots(), 1);
    let bad = run("x\n", "4");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        err.contains("--kv-cache-limit") && err.contains("needs a unit"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A repository that fits goes in whole, in path order, whatever the question: a different
/// question reuses all of the first one's prefix.
#[test]
fn a_repository_that_fits_is_one_prefix_for_every_question() {
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let dir = std::env::temp_dir().join(format!("longctx-ask-whole-{}", std::process::id()));
    let (repo, home) = (dir.join("repo"), dir.join("home"));
    std::fs::create_dir_all(repo.join("src")).unwrap();
    let nonce: u64 = rand::random();
    std::fs::write(repo.join("README.md"), format!("Project {nonce}.\n")).unwrap();
    std::fs::write(repo.join("src/ring.rs"), "fn ring_attention() {}\n").unwrap();
    std::fs::write(repo.join("src/store.rs"), "struct KvStore;\n").unwrap();
    let ask = |q: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .env("LONGCTX_HOME", &home)
            .args([
                "ask",
                "--max-tokens",
                "2",
                "--max-context",
                "1024",
                "--model",
            ])
            .arg(&model)
            .arg("--repo")
            .arg(&repo)
            .arg(q)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{err}");
        err
    };
    let first = ask("What does ring_attention do?");
    assert!(
        first.contains("packed 3 of 3 files")
            && first.contains("the whole repository, in path order")
            && first.contains("README.md")
            && first.contains("src/store.rs"),
        "{first}"
    );
    let second = ask("Where is the KvStore?");
    let line = second
        .lines()
        .find(|l| l.starts_with("reusing "))
        .unwrap_or_else(|| panic!("no reuse: {second}"));
    let n: Vec<&str> = line.split(' ').collect();
    // "reusing N of N prefix tokens ..."
    assert_eq!(n[1], n[3], "{line}");
    let _ = std::fs::remove_dir_all(&dir);
}
