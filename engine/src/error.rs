//! The engine's one error type.

use std::path::PathBuf;

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error("I/O error {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that is truncated, corrupt or crafted: never read past, never trusted.
    #[error("{path}: not a valid {format} file: {reason}")]
    BadFile {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// A well-formed file this build cannot use (a tensor type, an architecture).
    #[error("{0}")]
    Unsupported(String),
    /// A config that is inconsistent or lacks a field.
    #[error("model config: {0}")]
    Config(String),
    /// A user's input that cannot be used as given (a repository that is not a directory, a
    /// bad glob); the message says what and why.
    #[error("{0}")]
    Input(String),
    #[error("weight {name}: {reason}")]
    Weight { name: String, reason: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The scheduler's queue is full.
    #[error("{0} requests are already waiting; try again later")]
    Busy(usize),
    /// A batched step that is not well formed (the same sequence twice).
    #[error("batch: {0}")]
    Batch(String),
    /// The prompt and the new tokens asked for do not fit the context limit.
    #[error(
        "a prompt of {} plus {} exceeds the limit of {limit}; raise --max-context, lower \
         --max-tokens or shorten the prompt",
        count(.prompt, "token"),
        count(.new, "new token")
    )]
    PromptTooLong {
        prompt: usize,
        new: usize,
        limit: usize,
    },
    /// A NaN or infinity in the activations: broken weights or config, never sampled from.
    #[error(
        "the model computed NaN or infinity, first in {at} at position {pos}: its weights or \
         config are broken"
    )]
    NonFinite { at: String, pos: usize },
    /// A caller's callback asked generation to stop (Ctrl-C in `chat`): not a failure.
    #[error("stopped")]
    Stopped,
    #[error(transparent)]
    Kernel(#[from] longctx_kernels::KernelError),
    #[error(transparent)]
    Gpu(#[from] longctx_kernels::cuda::GpuError),
    #[error(transparent)]
    Kv(#[from] longctx_kvstore::KvError),
    #[error(transparent)]
    Rope(#[from] longctx_rope::RopeError),
    #[error(transparent)]
    Prefill(#[from] longctx_chunked_prefill::PrefillError),
}

impl EngineError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// `1 token`, `9000 new tokens`.
fn count(n: &usize, what: &str) -> String {
    format!("{n} {what}{}", if *n == 1 { "" } else { "s" })
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
