//! Bytes -> a model config (GGUF metadata or a Hugging Face config.json) -> a tiny model with
//! random weights -> a prefill of three tokens and one decode step. Every stage may refuse
//! its input with an error; none may panic, abort, hang or allocate beyond the sizes the
//! config validated. Configs too big to run a step of quickly are skipped after validation
//! (validation itself runs on every input).
#![no_main]
use longctx_engine::{random::random_model, KvOptions, Logits, ModelConfig};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let cfg = if kind & 1 == 0 {
        let Ok(meta) = longctx_engine::gguf::parse_metadata(rest) else {
            return;
        };
        ModelConfig::from_gguf_metadata(&meta, kind & 2 != 0)
    } else {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        ModelConfig::from_hf_json(text)
    };
    let Ok(cfg) = cfg else {
        return;
    };
    let experts = cfg.moe.as_ref().map_or(1, |m| m.experts * m.intermediate.max(1));
    let width = cfg.hidden.max(cfg.heads * cfg.head_dim).max(cfg.intermediate);
    if cfg.vocab * cfg.hidden > 1 << 18
        || width > 1024
        || cfg.layers > 4
        || cfg.hidden * experts > 1 << 18
    {
        return;
    }
    let Ok(model) = random_model(cfg, 5) else {
        return;
    };
    let Ok(store) = model.kv_store(&KvOptions::default()) else {
        return;
    };
    let seq = store.create_seq();
    let v = model.cfg.vocab as u32;
    let toks = [0, v / 2, v.saturating_sub(1)];
    if model.forward(&toks, 0, &store, seq, Logits::All, None, 0).is_ok() {
        let _ = model.forward(&[1 % v.max(1)], 3, &store, seq, Logits::Last, None, 0);
    }
});
