//! `generate`'s closing line on the default model: the time to the first token includes the
//! prefill (it once said "first token 0.00 s" after a 6.6 s prefill), and the prefill speed
//! is printed.

use std::process::Command;

#[test]
fn the_first_token_time_counts_the_prefill() {
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(40);
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["generate", "--prompt", &prompt, "--max-tokens", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let line = err.lines().last().unwrap();
    let number_after = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (prefill, first) = (number_after("prefill "), number_after("first token "));
    assert!(line.contains("tok/s);"), "{line}");
    assert!(prefill > 0.0 && first >= prefill, "{line}");
}

/// The fast path is the default of `generate` and `ask`; `--exact` switches to f32 weights
/// and KV; the two flags exclude each other.
#[test]
fn the_fast_path_is_the_default_and_exact_switches() {
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", "Hello", "--max-tokens", "2"];
        args.extend(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(&args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, err) = run(&[]);
    assert!(
        ok && err.contains("fast path (decode weights quant, KV bf16)"),
        "{err}"
    );
    let (ok, err) = run(&["--exact"]);
    assert!(
        ok && err.contains("exact path (decode weights f32, KV f32)"),
        "{err}"
    );
    let (ok, err) = run(&["--exact", "--kv-dtype", "bf16"]);
    assert!(
        ok && err.contains("mixed path (decode weights f32, KV bf16)"),
        "{err}"
    );
    let (ok, err) = run(&["--exact", "--fast"]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let here = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "ask",
            "--repo",
            &format!("{here}/rope_scaling/src"),
            "--include",
            "lib.rs",
        ])
        .args(["--no-cache", "--max-tokens", "1", "What is this?"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("fast path"), "{err}");
}

/// `--json`: the closing statistics as one JSON object, stderr's last line; stdout keeps the
/// text. The time to the first token is never below the prefill's, and the KV's bytes are
/// given per tier.
#[test]
fn json_statistics_on_stderr() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["generate", "--prompt", "The capital of France is"])
        .args(["--max-tokens", "3", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(
        f("prompt_tokens") >= 5.0 && f("cached_tokens") == 0.0,
        "{v}"
    );
    assert!(
        f("prefill_s") > 0.0 && f("first_token_s") >= f("prefill_s"),
        "{v}"
    );
    assert!(f("prefill_tok_s") > 0.0 && f("setup_s") > 0.0, "{v}");
    assert!(f("new_tokens") <= 3.0 && f("decode_tok_s") >= 0.0, "{v}");
    assert!(v["kv_bytes"]["device"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["kv_bytes"]["disk"], 0, "{v}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("prompt_tokens"));
}
