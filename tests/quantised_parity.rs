//! SmolLM2 requantised by llama.cpp's `llama-quantize` into every k-quant mix people download
//! (Q4_K_M, Q5_K_M, Q6_K, Q3_K_M, Q2_K, IQ4_XS, Q8_0): `longctx perplexity` (the exact path,
//! products straight from the stored blocks) equals transformers' mean NLL on the same file.
//! The files are made outside the repo by `tests/reference/make_quantised.sh` (llama.cpp
//! and transformers); the goldens by `tests/reference/quantised_nll.py`. Without the files
//! (CI) the test says it is skipped; the block formats themselves are checked everywhere by
//! `kernels/src/formats/tests.rs`.

mod common;

use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    std::env::var_os("LONGCTX_QUANTISED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/longctx/quantised")
        })
}

#[test]
fn perplexity_matches_transformers_on_every_quantised_file() {
    let g: Value =
        serde_json::from_str(include_str!("reference/quantised_nll_goldens.json")).unwrap();
    let files = g["files"].as_object().unwrap();
    let present: Vec<_> = files
        .iter()
        .filter(|(q, _)| dir().join(format!("smollm2-{q}.gguf")).exists())
        .collect();
    if present.is_empty() {
        longctx_kernels::testing::skipped(
            "perplexity_matches_transformers_on_every_quantised_file",
            "no quantised SmolLM2 files (tests/reference/make_quantised.sh makes them)",
        );
        return;
    }
    for (q, want) in present {
        let path = dir().join(format!("smollm2-{q}.gguf"));
        let v = common::perplexity_json(Some(&path));
        assert_eq!(v["tokens"], want["tokens"], "{q}");
        let (a, b) = (
            v["mean_nll"].as_f64().unwrap(),
            want["mean_nll"].as_f64().unwrap(),
        );
        let e = (a / b - 1.0).abs();
        eprintln!("{q}: mean NLL {a} vs transformers {b}: {e:.1e}");
        assert!(e < 1e-4, "{q}: mean NLL {a} vs transformers {b}");
    }
}
