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
