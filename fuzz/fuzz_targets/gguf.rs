//! The GGUF header parser on arbitrary bytes: it may refuse them, never panic or read out of
//! bounds.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = longctx_engine::gguf::parse_header(data);
});
