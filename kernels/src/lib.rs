//! longctx-kernels: the compute core of longctx.
//!
//! It owns exact attention (flash-attention forward with the log-sum-exp, causal /
//! chunked-local / full masks at absolute positions, GQA, split-KV decode, and the LSE merge
//! that ring attention and decode build on) and the CPU backend's vector code, with run-time
//! selection of AVX-512, AVX2 or portable loops, and the CUDA backend ([`cuda`]: the same
//! attention on tensor cores, split-KV decode, the small ops of a forward pass, cuBLAS). Storage is f32, bf16 or f16; arithmetic is
//! f32. Every kernel is tested against the naive float64 reference in
//! [`attention::reference`].

pub mod attention;
pub mod cpu;
pub mod cuda;
mod element;
mod error;
pub mod formats;
pub mod kvf8;
pub mod kvq8;
pub mod matmul;
pub mod quant;
pub mod testing;

pub use attention::{
    attention, attention_segments, attention_segments_blocks, attention_segments_blocks_split,
    attention_segments_split, attention_with, merge, merge_into, AttnParams, AttnShape, CpuOptions,
    KvBlockSegment, KvSegment, KvSegmentQ8, Mask, Strategy,
};
pub use cpu::Isa;
pub use element::{quantize_blocks_vec, DType, Element, KvBlock, KvUnit};
pub use error::KernelError;
pub use formats::{Blob, Format, StoredRows};
pub use kvf8::{dequantize_f8, quantize_f8, quantize_f8_vec, BlockF8, F8_BLOCK};
pub use kvq8::{dequantize_q8, quantize_q8, quantize_q8_vec, BlockQ8, Q8_BLOCK};
pub use matmul::{matmul, matmul_stored, matvec_bf16, Weight};
pub use quant::{QKind, QMatrix};
