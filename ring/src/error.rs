//! The ring crate's one error type.

/// What can go wrong in a ring. A failed or vanished peer becomes one of these on every rank
/// (directly, or because a neighbour that saw it stops too), never a hang.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// A peer's end of a link is gone (it failed, returned, or disconnected).
    #[error("rank {rank}: peer {peer} is gone ({what})")]
    PeerGone {
        rank: usize,
        peer: usize,
        what: &'static str,
    },
    /// A peer sent nothing within the timeout.
    #[error("rank {rank}: nothing from peer {peer} within {secs:.1} s (stalled or dead peer?)")]
    Timeout { rank: usize, peer: usize, secs: f64 },
    /// A message that does not have the size the layout says it must.
    #[error("rank {rank}: malformed message from {peer}: {reason}")]
    Malformed {
        rank: usize,
        peer: usize,
        reason: String,
    },
    /// The transport cannot run here (no GPU, no NCCL) or its library failed.
    #[error("ring transport unavailable: {0}")]
    Unavailable(String),
    /// Inputs that do not fit the layout or each other.
    #[error("ring: {0}")]
    Shape(String),
    #[error(transparent)]
    Kernel(#[from] longctx_kernels::KernelError),
}
