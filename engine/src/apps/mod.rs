//! What users run on a model: codebase Q&A, batch jobs, the passkey evaluation and the
//! capacity planner. The command-line front ends live in the `longctx` binary.

pub mod ask;
pub mod batch;
pub mod passkey;
pub mod plan;
pub mod rank;
