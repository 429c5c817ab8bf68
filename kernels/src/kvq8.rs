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

/// One query row's 32-value block quantised for the q8_0 decode step (`cpu::avx512_q8`):
/// `q ~= scale (256 hi + lo)`, `hi` in -127..=127, `lo` in -128..=127 (16 bits: 2^-16 of
/// the block's largest value); `corr` is `-128` times the sum of each part (the step flips
/// the keys' sign bits, `k + 128`, which adds `128 sum` to each product).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
pub(crate) struct QueryQ8 {
    pub(crate) hi: [i8; 32],
    pub(crate) lo: [i8; 32],
    pub(crate) scale: f32,
    pub(crate) corr: [i32; 2],
}

impl QueryQ8 {
    /// Largest magnitude of `256 hi + lo`.
    const MAX: f32 = 127.0 * 256.0;

    /// Quantises 32 query values (already scaled for the softmax).
    pub(crate) fn new(q: &[f32]) -> QueryQ8 {
        debug_assert_eq!(q.len(), 32);
        let amax = q.iter().fold(0f32, |a, x| a.max(x.abs()));
        let mut b = QueryQ8::default();
        if !(amax > 0.0 && amax.is_finite()) {
            // Zero (or a non-finite row: its scores are then zero, as garbage in).
            return b;
        }
        b.scale = amax / Self::MAX;
        let inv = Self::MAX / amax;
        let (mut sh, mut sl) = (0i32, 0i32);
        for (i, x) in q.iter().enumerate() {
            let x = (x * inv).round().clamp(-Self::MAX, Self::MAX) as i32;
            // hi = floor((x + 128) / 256) leaves lo in -128..=127.
            let hi = (x + 128).div_euclid(256);
            let lo = x - 256 * hi;
            b.hi[i] = hi as i8;
            b.lo[i] = lo as i8;
            sh += hi;
            sl += lo;
        }
        b.corr = [-128 * sh, -128 * sl];
        b
    }
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

    /// A query block splits into two signed bytes that rebuild it within half a step (plus f32
    /// rounding) of
    /// 2^-16 of its largest value, with the corrections the step subtracts; zero and
    /// non-finite blocks give zero.
    #[test]
    fn query_blocks_split_into_two_bytes_within_half_a_step() {
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..200 {
            let mag = 10f32.powi(rng.random_range(-4..4));
            let q: Vec<f32> = (0..32)
                .map(|_| rng.random_range(-1.0f32..1.0) * mag)
                .collect();
            let b = QueryQ8::new(&q);
            let amax = q.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(
                (b.scale - amax / (127.0 * 256.0)).abs() <= b.scale * 1e-6,
                "seed {seed}"
            );
            let (mut sh, mut sl) = (0, 0);
            for (i, x) in q.iter().enumerate() {
                let (h, l) = (b.hi[i] as i32, b.lo[i] as i32);
                assert!((-127..=127).contains(&h), "seed {seed}");
                let back = b.scale * (256 * h + l) as f32;
                assert!(
                    (back - x).abs() <= 0.51 * b.scale,
                    "{i}: {back} {x} seed {seed}"
                );
                (sh, sl) = (sh + h, sl + l);
            }
            assert_eq!(b.corr, [-128 * sh, -128 * sl], "seed {seed}");
        }
        for q in [[0f32; 32], [f32::NAN; 32], [f32::INFINITY; 32]] {
            let b = QueryQ8::new(&q);
            assert_eq!(
                (b.scale, b.hi, b.lo, b.corr),
                (0.0, [0; 32], [0; 32], [0, 0])
            );
        }
    }
}
