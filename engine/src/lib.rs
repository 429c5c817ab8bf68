//! longctx-engine: the models and the applications built on them.
//!
//! It will own the Llama 4 text mixture-of-experts model and the dense Llama family (configs
//! validated from Hugging Face config.json, weights from safetensors and GGUF), the
//! tokenizer, sampling and generation, and the user-facing jobs: codebase Q&A, batch jobs,
//! context-scaling evaluation and capacity planning. Nothing is implemented yet: see the
//! models issue and the applications issue.
