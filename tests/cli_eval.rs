//! `eval passkey` on the default model: one cell per length and depth, the KV type it ran
//! with in its JSON, and a bad depth refused.

use std::process::Command;

fn passkey(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "eval",
            "passkey",
            "--lengths",
            "96,128",
            "--depths",
            "0,100",
        ])
        .args(["--json"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn passkey_runs_on_each_kv_type_and_says_which() {
    for (kv, name) in [
        ("f32", "f32"),
        ("bf16", "bf16"),
        ("q8", "q8_0"),
        ("fp8", "fp8_e4m3"),
    ] {
        let out = passkey(&["--kv-dtype", kv]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kv}: {err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["kv_dtype"], name, "{kv}");
        let cells = v["cells"].as_array().unwrap();
        assert_eq!(cells.len(), 4, "{kv}");
        for c in cells {
            let key = c["key"].as_u64().unwrap();
            assert!((10_000..100_000).contains(&key), "{c}");
            assert!(c["prompt_tokens"].as_u64().unwrap() <= 128, "{c}");
        }
    }
    let out = passkey(&["--depths", "101"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("percentages"),
        "{err}"
    );
}
