//! 8-bit floating-point KV values: FP8 E4M3 (OCP's "E4M3FN": 4 exponent bits, bias 7, 3
//! mantissa bits, largest finite 448, no infinities) in blocks of 32 that share a power-of-two
//! scale, as OCP's MXFP8 does. 33 bytes per 32 values, 52% of bf16's 64 (q8_0: 36).
//!
//! Against q8_0 it keeps relative precision across a block's range (3 mantissa bits for
//! small and large values alike, where q8 gives small values few of its 8 bits) and holds
//! the format GPUs compute in. The scale is a power of two, so applying it adds no rounding;
//! it is the smallest that brings the block's largest magnitude within 448 (OCP picks the
//! exponent of the largest value and clips the few values it puts above 448; this choice
//! clips none).

use crate::KernelError;

/// Values per block.
pub const F8_BLOCK: usize = 32;

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Scale exponents kept (the E8M0 byte is `exp + 127`): within them `2^(exp + 8)` is a normal
/// f32, which the widening multiplies by. Magnitudes past `448 * 2^119` (~3e38, near f32's
/// largest) saturate there.
const EXP_MIN: i32 = -127;
const EXP_MAX: i32 = 119;

/// One block: `x[i] ~= e4m3(qs[i]) * 2^(e - 127)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BlockF8 {
    /// The shared scale's exponent, biased by 127 (OCP's E8M0).
    pub e: u8,
    pub qs: [u8; F8_BLOCK],
}

// SAFETY: repr(C) of 33 bytes, align 1, no padding; every bit pattern is a valid value.
unsafe impl bytemuck::Zeroable for BlockF8 {}
unsafe impl bytemuck::Pod for BlockF8 {}

impl BlockF8 {
    /// The scale as an f32 (`2^(e - 127)`; `e = 0` gives 2^-127, a subnormal).
    pub fn scale(&self) -> f32 {
        (self.e as f64 - 127.0).exp2() as f32
    }

    /// What the widening multiplies an E4M3 value read as f16 bits by: `2^(e - 127 + 8)`
    /// (see [`e4m3_as_f16_bits`]), always a normal f32.
    #[inline(always)]
    pub fn f16_factor(&self) -> f32 {
        // A crafted byte past the largest kept exponent is read as that one.
        f32::from_bits(((self.e as u32).min((EXP_MAX + 127) as u32) + 8) << 23)
    }
}

/// The E4M3 code nearest `x` (ties to an even mantissa), saturating at +-448; NaN gives 0.
pub fn e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Subnormals (below 2^-6) are multiples of 2^-9: the code is the multiple itself, and
    // 8 (the smallest normal) comes out right too.
    if a < 2f32.powi(-6) {
        return sign | round_even(a * 512.0) as u8;
    }
    let bits = a.to_bits();
    let exp = (bits >> 23) as i32 - 127; // -6..=8
                                         // Round the 23-bit mantissa to 3 bits, ties to even; a carry bumps the exponent.
    let m = bits & 0x7F_FFFF;
    let keep = m >> 20;
    let rest = m & 0xF_FFFF;
    let up = rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1);
    let code = (((exp + 7) as u32) << 3) + keep + up as u32;
    sign | code.min(0x7E) as u8
}

/// The value of an E4M3 code (0x7F and 0xFF, NaN, are never written; read as 480).
pub fn e4m3_to_f32(c: u8) -> f32 {
    half::f16::from_bits(e4m3_as_f16_bits(c)).to_f32() * 256.0
}

/// An E4M3 code as the bits of the f16 that is its value times 2^-8: E4M3's exponent field
/// and mantissa land in f16's (bias 15 against 7, hence the factor), subnormals included, and
/// the sign moves to bit 15. Shifting the sign-extended code left by 7 puts every field in
/// place with a copy of the sign at bit 14, which the mask clears: two instructions a lane.
#[inline(always)]
pub fn e4m3_as_f16_bits(c: u8) -> u16 {
    (((c as i8 as i16) << 7) as u16) & 0xBFFF
}

fn round_even(x: f32) -> f32 {
    let r = x.round();
    if (r - x).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// The block's scale exponent: the smallest `k` with `amax / 2^k <= 448`, kept within the
/// range the widening can multiply by (an all-zero block gets the smallest).
fn scale_exp(amax: f32) -> i32 {
    if amax == 0.0 || !amax.is_finite() {
        return if amax.is_finite() { EXP_MIN } else { EXP_MAX };
    }
    // log2 of a ratio computed in f64 is exact enough to pick the exponent; check and step.
    let mut k = (amax as f64 / E4M3_MAX as f64).log2().ceil() as i32;
    if (amax as f64) > E4M3_MAX as f64 * (k as f64).exp2() {
        k += 1;
    }
    if k > EXP_MIN && (amax as f64) <= E4M3_MAX as f64 * ((k - 1) as f64).exp2() {
        k -= 1;
    }
    k.clamp(EXP_MIN, EXP_MAX)
}

/// Quantises `src` into `dst`, 32 values a block (`src.len() == 32 * dst.len()`).
pub fn quantize_f8(src: &[f32], dst: &mut [BlockF8]) -> Result<(), KernelError> {
    super::attention::check_len("quantize_f8", "src", dst.len() * F8_BLOCK, src.len())?;
    for (b, x) in dst.iter_mut().zip(src.chunks_exact(F8_BLOCK)) {
        let amax = x
            .iter()
            .fold(0f32, |m, v| if v.is_nan() { m } else { m.max(v.abs()) });
        let k = scale_exp(amax);
        b.e = (k + 127) as u8;
        // 2^-k is a normal f32 for every kept k, and multiplying by it is exact.
        let inv = (-k as f64).exp2() as f32;
        for (q, v) in b.qs.iter_mut().zip(x) {
            *q = e4m3_from_f32(*v * inv);
        }
    }
    Ok(())
}

/// A whole quantised buffer: `x.len()` must be a multiple of 32.
pub fn quantize_f8_vec(x: &[f32]) -> Result<Vec<BlockF8>, KernelError> {
    crate::element::quantize_blocks_vec("quantize_f8", x)
}

/// Widens `src` into `dst` (`dst.len() == 32 * src.len()`, else the shorter decides) with the
/// best instruction set of this CPU.
pub fn dequantize_f8(src: &[BlockF8], dst: &mut [f32]) {
    crate::cpu::dequant_f8(crate::Isa::detect(), src, dst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Isa;
    use rand::{Rng, SeedableRng};

    /// Every finite E4M3 magnitude, from the definition: subnormals `m * 2^-9`, normals
    /// `(1 + m / 8) * 2^(e - 7)`.
    fn magnitudes() -> Vec<f64> {
        (0u8..0x7F)
            .map(|c| {
                let (e, m) = ((c >> 3) as i32, (c & 7) as f64);
                if e == 0 {
                    m * 2f64.powi(-9)
                } else {
                    (1.0 + m / 8.0) * 2f64.powi(e - 7)
                }
            })
            .collect()
    }

    #[test]
    fn every_code_widens_to_its_value_and_back() {
        let mags = magnitudes();
        assert_eq!(mags[0x7E], 448.0);
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            let want = mags[(c & 0x7F) as usize] * if c & 0x80 != 0 { -1.0 } else { 1.0 };
            let got = e4m3_to_f32(c);
            assert_eq!(got as f64, want, "code {c:#x}");
            if c != 0x80 {
                assert_eq!(e4m3_from_f32(got), c, "code {c:#x}");
            }
        }
    }

    #[test]
    fn encoding_rounds_to_the_nearest_code_ties_to_even() {
        let mags = magnitudes();
        let mut rng = rand::rngs::StdRng::seed_from_u64(81);
        let mut xs: Vec<f32> = (0..20_000)
            .map(|_| rng.random_range(0.0f32..1.0) * 2f32.powi(rng.random_range(-12..10)))
            .collect();
        // Midpoints between neighbours (ties), and values past the largest.
        for w in mags.windows(2) {
            xs.push(((w[0] + w[1]) / 2.0) as f32);
        }
        xs.extend([448.0, 449.0, 464.0, 1e6, 0.0, 1e-30]);
        for x in xs {
            for x in [x, -x] {
                let c = e4m3_from_f32(x);
                let got = mags[(c & 0x7F) as usize];
                let a = (x as f64).abs();
                let best = mags
                    .iter()
                    .map(|m| (m - a).abs())
                    .fold(f64::INFINITY, f64::min);
                if a <= 448.0 {
                    assert_eq!((got - a).abs(), best, "{x}: code {c:#x}");
                    let ties = mags.iter().filter(|m| (*m - a).abs() == best).count();
                    if ties == 2 {
                        assert_eq!(c & 1, 0, "{x}: a tie goes to the even mantissa");
                    }
                } else {
                    assert_eq!(c & 0x7F, 0x7E, "{x} saturates");
                }
                assert_eq!(c & 0x80 != 0, x.is_sign_negative(), "{x}: sign");
            }
        }
        assert_eq!(e4m3_from_f32(f32::NAN), 0);
    }

    #[test]
    fn blocks_hold_each_value_within_half_a_step() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(82);
        for amp in [1e-30f32, 1e-6, 0.01, 1.0, 300.0, 1e5, 1e38] {
            let mut x: Vec<f32> = (0..7 * 32)
                .map(|_| rng.random_range(-1.0f32..1.0) * amp)
                .collect();
            x[..32].fill(0.0);
            let q = quantize_f8_vec(&x).unwrap();
            let mut got = vec![0f32; x.len()];
            for isa in Isa::all_available() {
                crate::cpu::dequant_f8(isa, &q, &mut got);
                for (i, (g, v)) in got.iter().zip(&x).enumerate() {
                    let b = &q[i / 32];
                    let s = b.scale() as f64;
                    // The largest value of the block is at most 448 after the scale; E4M3
                    // keeps 3 mantissa bits (half a step: 1/16 relative) down to 2^-6, and
                    // steps of 2^-9 below.
                    let err = (*g as f64 - *v as f64).abs();
                    let bound = ((*v as f64).abs() / 16.0).max(s * 2f64.powi(-10)) * 1.0001;
                    assert!(err <= bound, "{isa:?} amp {amp} [{i}]: {v} read as {g}");
                    let want = e4m3_to_f32(b.qs[i % 32]) as f64 * s;
                    assert_eq!(*g as f64, want as f32 as f64, "{isa:?} [{i}]");
                }
                assert!(got[..32].iter().all(|v| *v == 0.0));
            }
            // The block's largest value is never clipped: within half a step of itself.
            for (b, xs) in q.iter().zip(x.chunks(32)).skip(1) {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(
                    amax as f64 / b.scale() as f64 <= 448.0 * 1.0000001,
                    "amp {amp}"
                );
                let scaled = amax as f64 / b.scale() as f64;
                assert!(
                    scaled > 224.0 || b.e == 0,
                    "amp {amp}: the scale is not the smallest"
                );
            }
        }
    }

    #[test]
    fn a_length_not_of_whole_blocks_is_refused() {
        assert!(quantize_f8_vec(&[1.0; 33]).is_err());
        let mut b = [BlockF8::default(); 2];
        assert!(quantize_f8(&[0.0; 63], &mut b).is_err());
        assert_eq!(std::mem::size_of::<BlockF8>(), 33);
    }
}
