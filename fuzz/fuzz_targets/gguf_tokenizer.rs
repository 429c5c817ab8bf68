//! The tokenizer rebuilt from a GGUF's metadata, on arbitrary bytes: it may refuse them, never
//! panic; a tokenizer it builds encodes and decodes a text. Seed it with the tiny byte-level
//! and SentencePiece GGUFs: `mkdir -p corpus/gguf_tokenizer && cp ../tests/reference/tiny_*.gguf
//! corpus/gguf_tokenizer/ && RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_tokenizer
//! corpus/gguf_tokenizer -- -max_total_time=120 -max_len=16384`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(meta) = longctx_engine::gguf::parse_metadata(data) else {
        return;
    };
    if let Ok(tok) = longctx_engine::Tokenizer::from_gguf_metadata(&meta) {
        if let Ok(ids) = tok.encode("hello world 12345 caf\u{e9} \u{6771}\u{4eac}\n<think>") {
            let _ = tok.decode(&ids);
        }
    }
});
