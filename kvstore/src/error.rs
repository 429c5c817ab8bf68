//! The KV store's one error type.

use crate::{SeqId, Tier};
use std::path::PathBuf;

/// What can go wrong in the KV store. Every variant leaves the store consistent: an operation
/// that fails changes nothing a later read could see half-done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The configuration itself is unusable.
    #[error("invalid KV store configuration: {0}")]
    Config(String),
    /// Every tier that could take a block is full.
    #[error(
        "KV budget exhausted: the {tier} tier holds {used} of {budget} bytes and a block needs \
         {needed} more, with no lower tier to spill to; raise the {tier} budget or free sequences"
    )]
    BudgetExhausted {
        tier: Tier,
        needed: u64,
        used: u64,
        budget: u64,
    },
    #[error("unknown sequence {0:?}")]
    UnknownSeq(SeqId),
    #[error("layer {layer} out of range: the store has {layers} layers")]
    NoLayer { layer: usize, layers: usize },
    /// Tokens requested that the sequence does not hold.
    #[error("tokens {start}..{end} of layer {layer} are not held: it holds {held_from}..{len}")]
    OutOfRange {
        layer: usize,
        start: usize,
        end: usize,
        held_from: usize,
        len: usize,
    },
    /// Wrong element type or a buffer that does not match the configured shape.
    #[error("{op}: {reason}")]
    Shape { op: &'static str, reason: String },
    /// A spilled block or a snapshot page read back with a different checksum.
    #[error(
        "checksum mismatch in {what}: stored {stored:016x}, read {read:016x} (corrupted file?)"
    )]
    Checksum {
        what: String,
        stored: u64,
        read: u64,
    },
    #[error("I/O error {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] longctx_kernels::KernelError),
    /// A snapshot that is truncated, corrupt, of another format version, or made for another
    /// model, layout or prompt.
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
}

impl KvError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KvError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = KvError> = std::result::Result<T, E>;
