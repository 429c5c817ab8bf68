//! The kernels crate's one error type.

/// What can go wrong when a kernel is called.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer's length does not match the shape it was given with.
    #[error("{op}: buffer `{buffer}` has {got} elements, the shape needs {expected}")]
    ShapeMismatch {
        op: &'static str,
        buffer: &'static str,
        expected: usize,
        got: usize,
    },
    /// The shape itself is not supported (head_dim, head ratio, zero sizes).
    #[error("{op}: unsupported shape: {reason}")]
    Unsupported { op: &'static str, reason: String },
}
