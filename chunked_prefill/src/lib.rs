//! longctx-chunked-prefill: prompts of any length, chunk by chunk.
//!
//! It will own the driver that feeds a prompt through the model in chunks whose size a planner
//! picks from an activation-memory budget, each chunk attending to all KV before it, with
//! progress events, cancellation and checkpoints from which a killed prefill resumes.
//! Nothing is implemented yet: see the chunked prefill issue.
