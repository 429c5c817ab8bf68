//! 8-bit KV values as llama.cpp's `q8_0`: blocks of 32 values, each a signed byte times the
//! block's scale (`scale = absmax / 127`, `q = round(x / scale)`, as `quantize_row_q8_0`).
//! A KV cache of these reads 36 bytes per 32 values, 56% of bf16's 64, and a decode step is
//! bound by those reads. The scale is kept in f32 (llama.cpp rounds it to f16): 2 bytes more
//! per block buy a dequantisation with no f16 conversion in the attention's inner loop.

use crate::KernelError;

/// Values per block.
pub const Q8_BLOCK: usize = 32;

/// One block of 32 values: `x[i] ~= scale * qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockQ8 {
    pub scale: f32,
    pub qs: [i8; Q8_BLOCK],
}

// SAFETY: repr(C) of an f32 and 32 bytes: 36 bytes, 4-aligned, no padding; every bit pattern
// is a valid value.
unsafe impl bytemuck::Zeroable for BlockQ8 {}
unsafe impl bytemuck::Pod for BlockQ8 {}

/// Quantises `src` into `dst`, 32 values a block (`src.len() == 32 * dst.len()`), rounding as
/// llama.cpp's `quantize_row_q8_0`: half away from zero, an all-zero block gets scale 0.
pub fn quantize_q8(src: &[f32], dst: &mut [BlockQ8]) -> Result<(), KernelError> {
    super::attention::check_len("quantize_q8", "src", dst.len() * Q8_BLOCK, src.len())?;
    for (b, x) in dst.iter_mut().zip(src.chunks_exact(Q8_BLOCK)) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        b.scale = scale;
        for (q, v) in b.qs.iter_mut().zip(x) {
            // `as` saturates (and maps NaN to 0); |v * inv| <= 127 up to rounding anyway.
            *q = (v * inv).round() as i8;
        }
    }
    Ok(())
}

/// A whole quantised buffer: `x.len()` must be a multiple of 32.
pub fn quantize_q8_vec(x: &[f32]) -> Result<Vec<BlockQ8>, KernelError> {
    crate::element::quantize_blocks_vec("quantize_q8", x)
}

/// Widens `src` into `dst` (`dst.len() == 32 * src.len()`, else the shorter decides) with the
/// best instruction set of this CPU.
pub fn dequantize_q8(src: &[BlockQ8], dst: &mut [f32]) {
    crate::cpu::dequant_q8(crate::Isa::detect(), src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;
    use rand::{Rng, SeedableRng};

    /// llama.cpp's `quantize_row_q8_0_ref` with the scale kept in f32, written as plainly as
    /// the C.
    fn reference(x: &[f32]) -> Vec<BlockQ8> {
        let mut out = Vec::new();
        for blk in x.chunks(32) {
            let mut amax = 0.0f32;
            for v in blk {
                amax = amax.max(v.abs());
            }
            let d = amax / ((1 << 7) - 1) as f32;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for j in 0..32 {
                qs[j] = (blk[j] * id).round() as i8;
            }
            out.push(BlockQ8 { scale: d, qs });
        }
        out
    }

    #[test]
    fn quantiser_matches_the_scalar_reference_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        for n in [1usize, 2, 7, 64] {
            let mut x: Vec<f32> = (0..n * 32)
                .map(|_| rng.random_range(-4.0f32..4.0) * 10f32.powi(rng.random_range(-3..3)))
                .collect();
            // An all-zero block, a ties-at-half block and one extreme per block.
            x[..32].fill(0.0);
            if n > 1 {
                for (j, v) in x[32..64].iter_mut().enumerate() {
                    *v = (j as f32 - 16.0) * 0.5;
                }
            }
            let got = quantize_q8_vec(&x).unwrap();
            let want = reference(&x);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.scale.to_bits(), w.scale.to_bits());
                assert_eq!(g.qs, w.qs);
            }
        }
    }

    #[test]
    fn a_length_not_of_whole_blocks_is_refused() {
        assert!(quantize_q8_vec(&[1.0; 33]).is_err());
        let mut b = [BlockQ8::default(); 2];
        assert!(quantize_q8(&[0.0; 63], &mut b).is_err());
    }

    #[test]
    fn dequantisation_is_scale_times_value_on_every_isa() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let x: Vec<f32> = (0..7 * 32)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let q = quantize_q8_vec(&x).unwrap();
        let want: Vec<f32> = q
            .iter()
            .flat_map(|b| b.qs.iter().map(move |v| b.scale * *v as f32))
            .collect();
        for isa in Isa::all_available() {
            let mut got = vec![0f32; x.len()];
            crate::cpu::dequant_q8(isa, &q, &mut got);
            assert_eq!(got, want, "{isa:?}");
            // Within half a step of the input.
            for (i, (g, v)) in got.iter().zip(&x).enumerate() {
                assert!((g - v).abs() <= 0.5 * q[i / 32].scale * 1.0001, "{i}");
            }
        }
    }
}
