//! Helpers shared by the end-to-end tests.
// Each test binary compiles this module and uses only some of it.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd` to its end and returns its output; a failure panics with its stderr.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

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

/// The committed random Llama 4 (4 experts, fused as transformers saves them) with a
/// word-level tokenizer over its 300 ids and a chat template, in a directory of its own.
pub fn tiny_llama4_with_tokenizer(tag: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama4_tiny_a");
    let dir = std::env::temp_dir().join(format!("longctx-experts-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut vocab = vec![
        "\"<unk>\":0".to_string(),
        "\"<s>\":1".into(),
        "\"</s>\":2".into(),
    ];
    vocab.extend((3..300).map(|k| format!("\"w{k}\":{k}")));
    let tok = format!(
        r#"{{"version":"1.0","added_tokens":[],"normalizer":null,
            "pre_tokenizer":{{"type":"WhitespaceSplit"}},"post_processor":null,"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"<unk>"}}}}"#,
        vocab.join(",")
    );
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        // A chat template of the plainest kind: `chat` needs one.
        r#"{"bos_token":"<s>","eos_token":"</s>","add_bos_token":true,
            "chat_template":"{% for m in messages %}{{ m['content'] }} {% endfor %}"}"#,
    )
    .unwrap();
    dir
}
