//! The safetensors header check on arbitrary bytes: refuse, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = longctx_engine::weights::parse_safetensors_header(data);
});
