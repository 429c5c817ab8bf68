//! longctx-chunked-prefill: prompts of any length, chunk by chunk.
//!
//! It owns the driver that feeds a prompt through a model in chunks (a size given, or picked
//! by a planner from an activation-memory budget), each chunk running every layer, appending
//! its KV to the KV store and attending to all KV before it, with progress events,
//! cancellation, and checkpoints (a KV snapshot and the position) from which a killed prefill
//! resumes instead of starting over. Memory is bounded by the chunk and the KV store's tier
//! budgets, never by the prompt.
//!
//! The model is anything that implements [`ChunkModel`] (the engine implements it for its
//! models), so this crate sits below the engine, beside the KV store.

mod driver;

pub use driver::{
    plan_chunk, prefill, Checkpoints, ChunkModel, Chunking, PrefillError, PrefillOptions,
    Prefilled, Progress,
};

#[cfg(test)]
mod tests;
