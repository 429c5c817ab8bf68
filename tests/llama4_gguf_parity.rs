//! A random Llama 4 (16 experts top-1, a dense layer between MoE ones, NoPE every 4th layer,
//! QK-norm, Scout's llama3 RoPE scaling) converted to GGUF by llama.cpp's
//! `convert_hf_to_gguf.py` (architecture `llama4`: `ffn_gate_inp`, `ffn_*_exps`,
//! `ffn_*_shexp`, `rope_freqs`): `longctx perplexity` on the f32 GGUF equals transformers'
//! mean NLL on the safetensors original. Made outside the repo by
//! `tests/reference/llama4_gguf.py`; without the files (CI) the test says it is skipped.

mod common;

use serde_json::Value;
use std::path::PathBuf;

#[test]
fn llama4_gguf_from_the_converter_matches_transformers() {
    let dir = std::env::var_os("LONGCTX_LLAMA4_RANDOM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/longctx/llama4-random")
        });
    let path = dir.join("llama4-f32.gguf");
    if !path.exists() {
        longctx_kernels::testing::skipped(
            "llama4_gguf_from_the_converter_matches_transformers",
            "no converted random Llama 4 (tests/reference/llama4_gguf.py makes it)",
        );
        return;
    }
    let g: Value =
        serde_json::from_str(include_str!("reference/llama4_gguf_goldens.json")).unwrap();
    let v = common::perplexity_json(Some(&path));
    assert_eq!(v["tokens"], g["tokens"]);
    let (a, b) = (
        v["mean_nll"].as_f64().unwrap(),
        g["mean_nll"].as_f64().unwrap(),
    );
    eprintln!(
        "mean NLL {a} vs transformers {b}: {:.1e}",
        (a / b - 1.0).abs()
    );
    assert!(
        (a / b - 1.0).abs() < 2e-4,
        "mean NLL {a} vs transformers {b}"
    );
}
