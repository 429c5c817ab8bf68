//! Exact attention: flash-attention forward with log-sum-exp, split-KV decode, and the
//! merge of partial results.
//!
//! Layouts (row-major, contiguous):
//! - `q`: `[n_q, h_q, d]`, `k` and `v`: `[n_kv, h_kv, d]`, `out`: `[n_q, h_q, d]`;
//! - `lse`: `[n_q, h_q]`, natural log of the sum of `exp(scale * q.k)` over the keys a query
//!   sees; `-inf` (with an output of zeros) for a query that sees no key.
//!
//! Positions are absolute: query `i` sits at `q_pos + i`, key `j` at `k_pos + j`. That one
//! rule covers prefill (queries are the last `n_q` positions of the KV), chunked prefill
//! (a chunk's queries against all earlier KV), ring attention (a KV shard from elsewhere in
//! the sequence) and Llama 4's chunked-local layers.

mod cpu;
mod merge;
pub mod reference;

pub use cpu::{
    attention, attention_segments, attention_segments_blocks, attention_segments_blocks_split,
    attention_segments_split, attention_with, rounds_p_to_bf16, BlockPair, CpuOptions,
    KvBlockSegment, KvSegment, KvSegmentQ8, Strategy,
};
pub use merge::{merge, merge_into};

use crate::KernelError;

/// Which keys a query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Every key.
    None,
    /// Keys at positions `<=` the query's.
    Causal,
    /// Llama 4's chunked attention: a query at position `p` sees keys at positions in
    /// `[floor(p / chunk) * chunk, p]`; chunks are aligned to position 0, not sliding.
    ChunkedLocal { chunk: usize },
}

impl Mask {
    /// The absolute key positions `[lo, hi)` visible from a query at absolute position `p`.
    #[inline]
    pub fn visible(self, p: usize) -> (usize, usize) {
        match self {
            Mask::None => (0, usize::MAX),
            Mask::Causal => (0, p + 1),
            Mask::ChunkedLocal { chunk } => (p / chunk * chunk, p + 1),
        }
    }
}

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub n_q: usize,
    pub n_kv: usize,
    pub h_q: usize,
    pub h_kv: usize,
    pub d: usize,
}

impl AttnShape {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.h_q / self.h_kv.max(1)
    }

    /// FLOPs of the two matrix products over the visible keys, the usual
    /// `4 * n_q * n_kv * d * h_q` (halved by the caller for a causal mask).
    pub fn flops(&self) -> f64 {
        4.0 * self.n_q as f64 * self.n_kv as f64 * self.d as f64 * self.h_q as f64
    }

    pub(crate) fn check(&self, op: &'static str) -> Result<(), KernelError> {
        let bad = |reason: String| Err(KernelError::Unsupported { op, reason });
        if self.h_q == 0 || self.h_kv == 0 || !self.h_q.is_multiple_of(self.h_kv) {
            return bad(format!(
                "h_q ({}) must be a non-zero multiple of h_kv ({})",
                self.h_q, self.h_kv
            ));
        }
        if self.d == 0 || !self.d.is_multiple_of(8) || self.d > 256 {
            return bad(format!(
                "head_dim {} must be a multiple of 8 in 8..=256",
                self.d
            ));
        }
        Ok(())
    }
}

/// How scores are formed and masked.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnParams {
    pub mask: Mask,
    /// Multiplies `q.k` before the softmax; usually `d^-0.5`.
    pub scale: f32,
    /// Absolute position of query 0.
    pub q_pos: usize,
    /// Absolute position of key 0.
    pub k_pos: usize,
}

impl AttnParams {
    /// Scale `d^-0.5`; keys from position 0 and the queries the last `n_q` positions of the
    /// KV (the prefill shape), which for `n_q == n_kv` is ordinary causal self-attention.
    pub fn new(shape: &AttnShape, mask: Mask) -> AttnParams {
        AttnParams {
            mask,
            scale: 1.0 / (shape.d as f32).sqrt(),
            q_pos: shape.n_kv.saturating_sub(shape.n_q),
            k_pos: 0,
        }
    }

    pub fn with_scale(mut self, scale: f32) -> AttnParams {
        self.scale = scale;
        self
    }

    /// Sets the absolute positions of the first query and the first key.
    pub fn at(mut self, q_pos: usize, k_pos: usize) -> AttnParams {
        self.q_pos = q_pos;
        self.k_pos = k_pos;
        self
    }

    /// Key indices `[lo, hi)` (into `k`, clamped to `0..n_kv`) seen by query index `i`.
    #[inline]
    pub fn key_range(&self, i: usize, n_kv: usize) -> (usize, usize) {
        let (lo, hi) = self.mask.visible(self.q_pos + i);
        let lo = lo.saturating_sub(self.k_pos).min(n_kv);
        let hi = hi.saturating_sub(self.k_pos).min(n_kv);
        (lo, hi.max(lo))
    }

    pub(crate) fn check(&self, op: &'static str) -> Result<(), KernelError> {
        if let Mask::ChunkedLocal { chunk: 0 } = self.mask {
            return Err(KernelError::Unsupported {
                op,
                reason: "chunked-local mask with chunk size 0".into(),
            });
        }
        if !self.scale.is_finite() {
            return Err(KernelError::Unsupported {
                op,
                reason: format!("softmax scale {} is not finite", self.scale),
            });
        }
        Ok(())
    }
}

pub(crate) fn check_len(
    op: &'static str,
    buffer: &'static str,
    expected: usize,
    got: usize,
) -> Result<(), KernelError> {
    if expected != got {
        return Err(KernelError::ShapeMismatch {
            op,
            buffer,
            expected,
            got,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
