//! longctx-rope: rotary position embeddings and their long-context scalings.
//!
//! It owns the inverse-frequency schedules (default, linear, static NTK-aware, dynamic NTK,
//! YaRN, llama3) as Hugging Face `transformers` defines them in `modeling_rope_utils.py`,
//! parsed from a `config.json` (the legacy `rope_scaling` dict or the newer
//! `rope_parameters`), and their application to q/k buffers `[n, h, d]` in both layouts:
//! interleaved pairs (Meta's Llama 4, complex multiplication) and rotate-half (Hugging Face
//! Llama, SmolLM2). Angles are `pos * inv_freq` in f64, reduced modulo 2π before sin/cos, so
//! positions near 10M are exact; a window of positions gets a cos/sin table built by exact
//! anchors and f64 angle-addition steps, and nothing ever builds a 10M x d table.

mod apply;
mod config;
mod error;
mod schedule;

pub use apply::{apply, apply_table, Layout, RopeTable};
pub use config::from_config_json;
pub use error::RopeError;
pub use schedule::{DynamicNtk, Rope, Scaling};

#[cfg(test)]
mod tests;
