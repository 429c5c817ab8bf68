//! longctx-engine: the models and what runs them.
//!
//! It owns model configs (Hugging Face `config.json` and GGUF metadata, validated into one
//! typed config), each architecture's tensors and layer kinds as one table (`arch`), weights
//! (GGUF and safetensors mapped and kept as stored; routed experts optionally left in the
//! file under a byte budget, `experts`), the tokenizer (`tokenizers`, built from `tokenizer.json` or from GGUF
//! metadata as transformers builds it) and chat templates (`minijinja`), the forward passes
//! of dense Llama and Llama 4 (MoE) on the kernels crate with the KV in the KV store, sampling,
//! generation and perplexity. The models are proven against transformers (goldens in
//! `tests/reference/`).

pub mod apps;
pub mod arch;
pub mod backend;
pub mod batch;
pub mod config;
mod error;
pub mod experts;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod hub;
pub mod load;
pub mod model;
pub mod ops;
pub mod random;
pub mod runner;
pub mod sched;
pub mod tokenizer;
pub mod weights;

pub use batch::Batch;
pub use config::{Arch, ModelConfig};
pub use error::{EngineError, Result};
pub use load::{load, Loaded};
pub use model::{DecodeBytes, KvOptions, Logits, Model};
pub use runner::Runner;
pub use tokenizer::Tokenizer;
