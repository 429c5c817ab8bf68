//! A GGUF's byte-level BPE tokenizer split the way its `tokenizer.ggml.pre` says (Llama 3's
//! `llama-bpe`, Llama 4's `llama4`, Qwen's, Mistral's tekken, GPT-2's for anything else), with
//! control tokens special and user-defined ones whole: token ids equal to transformers' for a
//! tiny vocabulary whose merges cross every place where those splits differ. Goldens and the
//! GGUF from `tests/reference/gguf_pretokenizer_goldens.py`.

use longctx_engine::gguf::{Gguf, Value};
use longctx_engine::Tokenizer;
use std::path::Path;

#[test]
fn gguf_split_by_pre_tokenizer_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("gguf_pretokenizer_goldens.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut g = Gguf::open(&dir.join("tiny_bpe.gguf")).unwrap();
    let (mut seen, mut all) = (std::collections::HashSet::new(), vec![]);
    for case in golden["cases"].as_array().unwrap() {
        let pre = case["pre"].as_str().unwrap();
        g.metadata
            .insert("tokenizer.ggml.pre".into(), Value::String(pre.into()));
        let tok = Tokenizer::from_gguf(&g).unwrap();
        for (text, want) in texts.iter().zip(case["ids"].as_array().unwrap()) {
            let want: Vec<u32> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let got = tok.encode(text).unwrap();
            assert_eq!(got, want, "pre {pre:?}, text {text:?}");
            // Decoding skips the special token only.
            let back = tok.decode(&got).unwrap();
            assert_eq!(back, text.replace("<|endoftext|>", ""), "pre {pre:?}");
            all.push(got);
        }
        seen.insert(std::mem::take(&mut all));
    }
    // The goldens tell the splits apart: six families, six tokenisations.
    assert_eq!(seen.len(), 6);
}

/// A SentencePiece-kind GGUF (`tokenizer.ggml.model = llama`, pieces with scores, byte
/// fallback, no merges): ids (with the BOS it adds by default), and decoded texts, equal to
/// transformers'.
#[test]
fn gguf_sentencepiece_matches_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gguf_spm_goldens.json")).unwrap())
            .unwrap();
    let g = Gguf::open(&dir.join("tiny_spm.gguf")).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    assert_eq!(tok.add_bos, golden["add_bos_token"].as_bool().unwrap());
    let bos = tok.bos.clone().unwrap();
    assert_eq!(bos.1, golden["bos"].as_str().unwrap());
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let mut want: Vec<u32> = vec![bos.0];
        want.extend(
            case["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32),
        );
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "text {text:?}");
        assert_eq!(
            tok.decode(&got).unwrap(),
            case["decoded"].as_str().unwrap(),
            "text {text:?}"
        );
    }
}
