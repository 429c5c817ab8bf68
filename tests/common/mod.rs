//! Helpers shared by the end-to-end tests.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// `longctx perplexity --ctx 256 --json` on `tests/reference/ppl.txt` (the default model when
/// `model` is None): its JSON report, the command's stderr in the panic otherwise.
pub fn perplexity_json(model: Option<&Path>) -> Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_longctx"));
    cmd.arg("perplexity");
    if let Some(m) = model {
        cmd.arg("--model").arg(m);
    }
    let out = cmd
        .args(["--ctx", "256", "--json", "--file"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/reference/ppl.txt"
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: {}",
        model.map_or("default model".into(), |m| m.display().to_string()),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
