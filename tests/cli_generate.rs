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
