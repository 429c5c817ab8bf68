//! The one table of stored element formats: every tensor type a GGUF or safetensors file
//! holds that this build reads (floats, llama.cpp's 32-element blocks, its 256-element
//! k-quant super-blocks, and the non-linear IQ4 formats). For each: elements and bytes per
//! block, and dequantisation to f32 exactly as ggml computes it (`dequantize_row_*` in
//! ggml-quants.c), so the exact path multiplies by the values llama.cpp and transformers
//! (through gguf-py) see. The GGUF loader, the stored-weight products and the quantised
//! decode path all read this table; no other file knows a block layout.
//!
//! Named `Format`, not `DType`: [`crate::DType`] is the KV store's element type (f32, bf16,
//! f16), which every kernel can also write; a `Format` is read only.

mod float;
mod iquant;
mod kquant;
mod legacy;
mod stored;

pub(crate) use iquant::IQ4_LEVELS;
pub(crate) use kquant::{q3_k_scales, sub_block as q4_k_sub_block};
pub use stored::{Blob, StoredRows};

use crate::KernelError;

/// A stored element format, by ggml's name.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
}

/// Every format, in ggml's type-id order (for tests and tables).
pub const ALL: [Format; 15] = [
    Format::F32,
    Format::F16,
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::Q8_0,
    Format::Q2_K,
    Format::Q3_K,
    Format::Q4_K,
    Format::Q5_K,
    Format::Q6_K,
    Format::IQ4_NL,
    Format::IQ4_XS,
    Format::BF16,
];

/// Elements of a k-quant super-block (`QK_K`).
pub const QK_K: usize = 256;

impl Format {
    /// From ggml's type id (`enum ggml_type`); `None` for the types this build does not read.
    pub fn from_ggml(id: u32) -> Option<Format> {
        Some(match id {
            0 => Format::F32,
            1 => Format::F16,
            2 => Format::Q4_0,
            3 => Format::Q4_1,
            6 => Format::Q5_0,
            7 => Format::Q5_1,
            8 => Format::Q8_0,
            10 => Format::Q2_K,
            11 => Format::Q3_K,
            12 => Format::Q4_K,
            13 => Format::Q5_K,
            14 => Format::Q6_K,
            20 => Format::IQ4_NL,
            23 => Format::IQ4_XS,
            30 => Format::BF16,
            _ => return None,
        })
    }

    /// ggml's type id.
    pub fn ggml_id(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q4_0 => 2,
            Format::Q4_1 => 3,
            Format::Q5_0 => 6,
            Format::Q5_1 => 7,
            Format::Q8_0 => 8,
            Format::Q2_K => 10,
            Format::Q3_K => 11,
            Format::Q4_K => 12,
            Format::Q5_K => 13,
            Format::Q6_K => 14,
            Format::IQ4_NL => 20,
            Format::IQ4_XS => 23,
            Format::BF16 => 30,
        }
    }

    /// ggml's name (`Q4_K`), as llama.cpp's tools print it.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "F32",
            Format::F16 => "F16",
            Format::BF16 => "BF16",
            Format::Q4_0 => "Q4_0",
            Format::Q4_1 => "Q4_1",
            Format::Q5_0 => "Q5_0",
            Format::Q5_1 => "Q5_1",
            Format::Q8_0 => "Q8_0",
            Format::Q2_K => "Q2_K",
            Format::Q3_K => "Q3_K",
            Format::Q4_K => "Q4_K",
            Format::Q5_K => "Q5_K",
            Format::Q6_K => "Q6_K",
            Format::IQ4_NL => "IQ4_NL",
            Format::IQ4_XS => "IQ4_XS",
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Format::F32 | Format::F16 | Format::BF16 => 1,
            Format::Q4_0
            | Format::Q4_1
            | Format::Q5_0
            | Format::Q5_1
            | Format::Q8_0
            | Format::IQ4_NL => 32,
            Format::Q2_K
            | Format::Q3_K
            | Format::Q4_K
            | Format::Q5_K
            | Format::Q6_K
            | Format::IQ4_XS => QK_K,
        }
    }

    /// Bytes per block (`sizeof(block_*)` in ggml-common.h).
    pub fn block_bytes(self) -> usize {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::Q4_0 => legacy::Q4_0_BYTES,
            Format::Q4_1 => legacy::Q4_1_BYTES,
            Format::Q5_0 => legacy::Q5_0_BYTES,
            Format::Q5_1 => legacy::Q5_1_BYTES,
            Format::Q8_0 => legacy::Q8_0_BYTES,
            Format::Q2_K => kquant::Q2_K_BYTES,
            Format::Q3_K => kquant::Q3_K_BYTES,
            Format::Q4_K => kquant::Q4_K_BYTES,
            Format::Q5_K => kquant::Q5_K_BYTES,
            Format::Q6_K => kquant::Q6_K_BYTES,
            Format::IQ4_NL => iquant::IQ4_NL_BYTES,
            Format::IQ4_XS => iquant::IQ4_XS_BYTES,
        }
    }

    /// Whether elements are stored one by one (no blocks, no scales).
    pub fn is_float(self) -> bool {
        self.block_elems() == 1
    }

    /// Bytes of `n` elements, or an error when `n` is not whole blocks (or overflows).
    pub fn bytes_of(self, n: usize) -> Result<usize, KernelError> {
        let per = self.block_elems();
        if !n.is_multiple_of(per) {
            return Err(KernelError::Unsupported {
                op: "Format::bytes_of",
                reason: format!("{n} elements are not whole {} blocks of {per}", self.name()),
            });
        }
        (n / per)
            .checked_mul(self.block_bytes())
            .ok_or_else(|| KernelError::Unsupported {
                op: "Format::bytes_of",
                reason: format!("{n} {} elements overflow", self.name()),
            })
    }

    /// Dequantises whole blocks: `out.len()` elements from exactly their bytes in `b`.
    pub fn dequantize(self, b: &[u8], out: &mut [f32]) -> Result<(), KernelError> {
        const OP: &str = "Format::dequantize";
        let need = self.bytes_of(out.len())?;
        crate::attention::check_len(OP, "bytes", need, b.len())?;
        let (per, size) = (self.block_elems(), self.block_bytes());
        match self {
            Format::F32 => float::f32s(b, out),
            Format::F16 => float::f16s(b, out),
            Format::BF16 => float::bf16s(b, out),
            _ => {
                let f: fn(&[u8], &mut [f32]) = match self {
                    Format::Q4_0 => legacy::q4_0,
                    Format::Q4_1 => legacy::q4_1,
                    Format::Q5_0 => legacy::q5_0,
                    Format::Q5_1 => legacy::q5_1,
                    Format::Q8_0 => legacy::q8_0,
                    Format::Q2_K => kquant::q2_k,
                    Format::Q3_K => kquant::q3_k,
                    Format::Q4_K => kquant::q4_k,
                    Format::Q5_K => kquant::q5_k,
                    Format::Q6_K => kquant::q6_k,
                    Format::IQ4_NL => iquant::iq4_nl,
                    Format::IQ4_XS => iquant::iq4_xs,
                    Format::F32 | Format::F16 | Format::BF16 => unreachable!(),
                };
                for (blk, o) in b.chunks_exact(size).zip(out.chunks_exact_mut(per)) {
                    f(blk, o);
                }
            }
        }
        Ok(())
    }

    /// Dequantises `n` elements into a new vector.
    pub fn to_f32(self, b: &[u8], n: usize) -> Result<Vec<f32>, KernelError> {
        let mut out = vec![0f32; n];
        self.dequantize(b, &mut out)?;
        Ok(out)
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The f16 at byte `i` as f32.
#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

#[cfg(test)]
pub(crate) mod tests;
