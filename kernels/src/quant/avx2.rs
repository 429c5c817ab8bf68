//! The quantised products on CPUs with AVX2 but no AVX-512 VNNI (Zen 2/3, Intel before Ice
//! Lake): the same 16-row groups, each taken as two halves of 8 rows (one 256-bit vector is
//! 8 rows x 4 weights). `vpdpbusd` is emulated as llama.cpp's AVX2 code does:
//! `vpmaddubsw` (unsigned weight x signed activation byte pairs to i16) then `vpmaddwd` by
//! ones (i16 pairs to i32). The i16 sums of several vectors are added before the widening
//! while they cannot overflow: 4-bit weights (pairs at most 2 x 15 x 127) over all eight
//! vectors of a block, 5-bit over four, 6-bit over two. Q8_0 and Iq4 (its levels looked up
//! as signed bytes) take the signed form (`|q| x sign(a, q)`, pairs at most 2 x 128 x 127),
//! so their offset term is not applied.

use super::{Act, QKind, QMatrix, G, PREFETCH, QK, WORD_PACKED, WORD_Q8};
use crate::formats::IQ4_LEVELS;
use std::arch::x86_64::*;

/// Weight families of [`QMatrix::half_avx2`] (a constant, so its inner loop has no branch
/// on the kind): 4-bit (Q4_0, Q4_1), 5-bit (Q5_0, Q5_1), Q6, Q8_0, Iq4, and the 2-bit
/// planes of Q2_16 and Q3_16.
const Q4: u8 = 0;
const Q5: u8 = 1;
const Q6K: u8 = 2;
const Q8: u8 = 3;
const NL: u8 = 4;
const Q16: u8 = 5;

/// Activations per pass over a group's blocks: `J` f32 and `J` i32 accumulators and the
/// unpacked weights fit the 16 vector registers.
pub(super) const TILE: usize = 4;

/// Whether this CPU runs the AVX2 products (AVX2, FMA and F16C), and `LONGCTX_ISA` does not
/// lower the choice below AVX2.
pub(super) fn available() -> bool {
    static A: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *A.get_or_init(|| {
        std::env::var_os("LONGCTX_NO_AVX2_QUANT").is_none()
            && crate::Isa::detect() >= crate::Isa::Avx2
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// Bytes `0xFF` where bit `k` of `m` is set, for the 32 bytes `k` of a vector.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bytes_from_bits(m: u32) -> __m256i {
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(m as i32),
        _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        ),
    );
    // Every bit but bit k % 8 of byte k set: the byte is all ones exactly when that bit is.
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi64x(-1))
}

impl QMatrix {
    /// [`QMatrix::rows_vnni`] on AVX2: rows `r0..r0 + len` (`r0` a group's first) times every
    /// activation of `acts`, row `r0 + i`'s product with activation `j` to `y[j * stride + i]`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C present; `y` valid for writes at `j * stride + i` for every
    /// `j < acts.len()`, `i < len`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows_avx2(
        &self,
        acts: &[&Act],
        r0: usize,
        len: usize,
        y: *mut f32,
        stride: usize,
    ) {
        debug_assert!(r0.is_multiple_of(G));
        const PANEL: usize = 64;
        for (p, panel) in acts.chunks(PANEL).enumerate() {
            let mut i = 0;
            while i < len {
                let lanes = (len - i).min(G);
                let g = (r0 + i) / G;
                for (t, tile) in panel.chunks(TILE).enumerate() {
                    let out = y.add((p * PANEL + t * TILE) * stride + i);
                    for h in 0..lanes.div_ceil(8) {
                        let n = (lanes - 8 * h).min(8);
                        let o = out.add(8 * h);
                        let f = match self.kind {
                            QKind::Q4_0 | QKind::Q4_1 => Self::half_for::<Q4>,
                            QKind::Q5_0 | QKind::Q5_1 => Self::half_for::<Q5>,
                            QKind::Q6 => Self::half_for::<Q6K>,
                            QKind::Q8_0 => Self::half_for::<Q8>,
                            QKind::Iq4 => Self::half_for::<NL>,
                            QKind::Q2_16 | QKind::Q3_16 => Self::half_for::<Q16>,
                        };
                        f(self, tile, g, h, o, stride, n);
                    }
                }
                i += lanes;
            }
        }
    }

    /// [`QMatrix::half_avx2`] for 1 to [`TILE`] activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_for<const K: u8>(
        &self,
        acts: &[&Act],
        g: usize,
        h: usize,
        out: *mut f32,
        stride: usize,
        lanes: usize,
    ) {
        match acts.len() {
            1 => self.half_avx2::<1, K>(acts, g, h, out, stride, lanes),
            2 => self.half_avx2::<2, K>(acts, g, h, out, stride, lanes),
            3 => self.half_avx2::<3, K>(acts, g, h, out, stride, lanes),
            _ => self.half_avx2::<4, K>(acts, g, h, out, stride, lanes),
        }
    }

    /// Rows `8h..8h + 8` of group `g` times `J` activations, weights of family `K`; the first
    /// `lanes` rows stored, activation j's at `out + j * stride`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    #[allow(clippy::needless_range_loop)]
    unsafe fn half_avx2<const J: usize, const K: u8>(
        &self,
        acts: &[&Act],
        g: usize,
        h: usize,
        out: *mut f32,
        stride: usize,
        lanes: usize,
    ) {
        let nb = self.nb();
        let kind = self.kind;
        let (qb, per) = (kind.qbytes() * G, kind.scales_per_block() * G);
        let (has_min, q8, nl) = (kind.has_min(), K == Q8, K == NL);
        // Signed weights: Q8_0's and Iq4's.
        let signed = q8 || nl;
        // Halves with their own scales: Q6, Q2_16, Q3_16.
        let (halves, q16) = (K == Q6K || K == Q16, K == Q16);
        #[allow(non_snake_case)]
        let Q6 = K == Q6K;
        let packed = !q8;
        let words = if packed { WORD_PACKED } else { WORD_Q8 };
        // Vectors whose i16 products are summed before widening (see the module docs).
        let run = match K {
            Q4 => 8,
            Q5 | Q16 => 4,
            Q6K => 2,
            _ => 1,
        };
        let levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_LEVELS.as_ptr().cast()));
        let low = _mm256_set1_epi8(0x0f);
        let plane_bit = kind.plane_bit();
        let (three, bit) = (_mm256_set1_epi8(3), _mm256_set1_epi8(plane_bit as i8));
        let pair_bits = _mm256_set1_epi8(0x30);
        let flip = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let offset = _mm256_set1_ps(kind.offset());
        let mut acc = [_mm256_setzero_ps(); J];
        let a: [*const i8; J] = std::array::from_fn(|j| acts[j].a.as_ptr());
        let s: [*const f32; J] = std::array::from_fn(|j| acts[j].s.as_ptr());
        let ss: [*const f32; J] = std::array::from_fn(|j| acts[j].ssum.as_ptr());
        let hs: [*const i32; J] = std::array::from_fn(|j| acts[j].hsum.as_ptr());
        let (qend, send) = (self.q.as_ptr_range().end, self.scales.as_ptr_range().end);
        for b in 0..nb {
            let blk = g * nb + b;
            let wp = self.q.as_ptr().add(blk * qb);
            let sp = self.scales.as_ptr().add(blk * per);
            let ahead = wp.wrapping_add(PREFETCH);
            if h == 0 && ahead < qend {
                for l in 0..qb / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l).cast());
                }
                let sa = sp.wrapping_add(PREFETCH / qb * per);
                if sa < send {
                    _mm_prefetch::<_MM_HINT_T0>(sa.cast());
                }
            }
            let mut w = [_mm256_setzero_si256(); 8];
            // Q8_0: w holds |q| (once per block, not per activation) and qs the signed q.
            let mut qs = [_mm256_setzero_si256(); 8];
            if q16 {
                // Vector t's values are bits 2 (t % 4).. of chunk t / 4's bytes.
                let l = [
                    _mm256_loadu_si256(wp.add(32 * h).cast()),
                    _mm256_loadu_si256(wp.add(64 + 32 * h).cast()),
                ];
                for (t, wt) in w.iter_mut().enumerate() {
                    let v = l[t / 4];
                    let at = match t % 4 {
                        0 => v,
                        1 => _mm256_srli_epi16::<2>(v),
                        2 => _mm256_srli_epi16::<4>(v),
                        _ => _mm256_srli_epi16::<6>(v),
                    };
                    *wt = _mm256_and_si256(at, three);
                }
            } else if packed {
                for c in 0..4 {
                    let l = _mm256_loadu_si256(wp.add(64 * c + 32 * h).cast());
                    w[2 * c] = _mm256_and_si256(l, low);
                    w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(l), low);
                }
                if Q6 {
                    let hp = self.hi2.as_ptr().add(blk * 128 + 32 * h);
                    let hv = [
                        _mm256_loadu_si256(hp.cast()),
                        _mm256_loadu_si256(hp.add(64).cast()),
                    ];
                    for (t, wt) in w.iter_mut().enumerate() {
                        let v = hv[t / 4];
                        let at = match t % 4 {
                            0 => _mm256_slli_epi16::<4>(v),
                            1 => _mm256_slli_epi16::<2>(v),
                            2 => v,
                            _ => _mm256_srli_epi16::<2>(v),
                        };
                        *wt = _mm256_or_si256(*wt, _mm256_and_si256(at, pair_bits));
                    }
                }
                if nl {
                    // Signed levels, taken as Q8_0's are.
                    for (wt, qt) in w.iter_mut().zip(qs.iter_mut()) {
                        *qt = _mm256_shuffle_epi8(levels, *wt);
                        *wt = _mm256_abs_epi8(*qt);
                    }
                }
            } else {
                for (c, (wt, qt)) in w.iter_mut().zip(qs.iter_mut()).enumerate() {
                    // Signed q: the products take |q| and the activation's sign flipped.
                    let l = _mm256_loadu_si256(wp.add(64 * c + 32 * h).cast());
                    *qt = _mm256_xor_si256(l, flip);
                    *wt = _mm256_abs_epi8(*qt);
                }
            }
            if plane_bit != 0 {
                // Q5's fifth bits, Q3_16's third: this half's 32 bits of each vector's mask.
                let hp = self.hi.as_ptr().add(blk * 8);
                for (t, wt) in w.iter_mut().enumerate() {
                    let bits = (*hp.add(t) >> (32 * h)) as u32;
                    *wt = _mm256_or_si256(*wt, _mm256_and_si256(bytes_from_bits(bits), bit));
                }
            }
            // Q2_16 and Q3_16: per half, `d` and `m` from the sub-scale bytes and the
            // super-block's scales (see `group_vnni`).
            let (dv, mv, m16) = if q16 {
                let su = self
                    .sup
                    .as_ptr()
                    .add((g * nb.div_ceil(8) + b / 8) * 2 * G + 8 * h);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(su.cast()));
                let words = _mm256_cvtepu16_epi32(_mm_loadu_si128(sp.add(8 * h).cast()));
                let byte = [
                    _mm256_and_si256(words, _mm256_set1_epi32(0xff)),
                    _mm256_srli_epi32::<8>(words),
                ];
                if plane_bit != 0 {
                    let off = _mm256_set1_epi32(32);
                    let dh = byte
                        .map(|x| _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(x, off))));
                    let m4 = _mm256_set1_ps(-4.0);
                    let mh = [_mm256_mul_ps(dh[0], m4), _mm256_mul_ps(dh[1], m4)];
                    (dh[0], dh[1], mh)
                } else {
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(su.add(G).cast()));
                    let neg = _mm256_sub_ps(_mm256_setzero_ps(), dmin);
                    let low4 = _mm256_set1_epi32(0x0f);
                    let dh = byte
                        .map(|x| _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(x, low4))));
                    let mh = byte
                        .map(|x| _mm256_mul_ps(neg, _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(x))));
                    (dh[0], dh[1], mh)
                }
            } else {
                let dv = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(8 * h).cast()));
                let mv = if has_min || halves {
                    _mm256_cvtph_ps(_mm_loadu_si128(sp.add(G + 8 * h).cast()))
                } else {
                    _mm256_mul_ps(dv, offset)
                };
                (dv, mv, [_mm256_setzero_ps(); 2])
            };
            for j in 0..J {
                let mut dot = [_mm256_setzero_si256(); 2];
                let mut part = [_mm256_setzero_si256(); 2];
                for t in 0..8 {
                    let word = a[j]
                        .add(b * QK + 4 * words[t])
                        .cast::<i32>()
                        .read_unaligned();
                    let x = _mm256_set1_epi32(word);
                    let prod = if signed {
                        _mm256_maddubs_epi16(w[t], _mm256_sign_epi8(x, qs[t]))
                    } else {
                        _mm256_maddubs_epi16(w[t], x)
                    };
                    // Q6, Q2_16 and Q3_16 keep elements 0..16 (even vectors) and 16..32 (odd) apart.
                    let k = if halves { t % 2 } else { 0 };
                    let step = if halves { t / 2 } else { t };
                    part[k] = if step % run == 0 {
                        prod
                    } else {
                        _mm256_add_epi16(part[k], prod)
                    };
                    if (step + 1) % run == 0 {
                        dot[k] = _mm256_add_epi32(dot[k], _mm256_madd_epi16(part[k], ones));
                    }
                }
                let sv = _mm256_set1_ps(*s[j].add(b));
                if q16 {
                    let sj = *s[j].add(b);
                    let sum = |k: usize| _mm256_set1_ps(sj * *hs[j].add(2 * b + k) as f32);
                    let [m_lo, m_hi] = m16;
                    let lo = _mm256_cvtepi32_ps(dot[0]);
                    let hi = _mm256_cvtepi32_ps(dot[1]);
                    acc[j] = _mm256_fmadd_ps(lo, _mm256_mul_ps(dv, sv), acc[j]);
                    acc[j] = _mm256_fmadd_ps(hi, _mm256_mul_ps(mv, sv), acc[j]);
                    acc[j] = _mm256_fmadd_ps(m_lo, sum(0), acc[j]);
                    acc[j] = _mm256_fmadd_ps(m_hi, sum(1), acc[j]);
                    continue;
                }
                if Q6 {
                    let off = |k: usize| _mm256_set1_epi32(32 * *hs[j].add(2 * b + k));
                    let lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[0], off(0)));
                    let hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(dot[1], off(1)));
                    acc[j] = _mm256_fmadd_ps(lo, _mm256_mul_ps(dv, sv), acc[j]);
                    acc[j] = _mm256_fmadd_ps(hi, _mm256_mul_ps(mv, sv), acc[j]);
                    continue;
                }
                let ds = _mm256_mul_ps(dv, sv);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[0]), ds, acc[j]);
                if !signed {
                    acc[j] = _mm256_fmadd_ps(mv, _mm256_set1_ps(*ss[j].add(b)), acc[j]);
                }
            }
        }
        let mut tmp = [0f32; 8];
        for (j, v) in acc.iter().enumerate() {
            if lanes == 8 {
                _mm256_storeu_ps(out.add(j * stride), *v);
            } else {
                _mm256_storeu_ps(tmp.as_mut_ptr(), *v);
                std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(j * stride), lanes);
            }
        }
    }
}

/// [`Act::quantize`] 32 floats at a time on AVX2, to the scalar code's bits: the same scale
/// and inverse, products rounded to nearest even (the conversion's default mode).
///
/// # Safety
/// AVX2 present; `a` holds `x.len()` values, `s` and `ssum` `x.len() / 32`, `hsum` twice
/// that.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quantize(
    x: &[f32],
    a: &mut [i8],
    s: &mut [f32],
    ssum: &mut [f32],
    hsum: &mut [i32],
) {
    let sign = _mm256_set1_ps(-0.0);
    let zero = _mm256_setzero_ps();
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (b, xb) in x.chunks_exact(QK).enumerate() {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let abs = |u: __m256| _mm256_andnot_ps(sign, u);
        let m = _mm256_max_ps(
            _mm256_max_ps(abs(v[0]), abs(v[1])),
            _mm256_max_ps(abs(v[2]), abs(v[3])),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
        // x - x is 0 for finite x, NaN for an infinity or a NaN.
        let finite = v.iter().all(|u| {
            _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_sub_ps(*u, *u), zero)) == 0xff
        });
        let scale = if finite { amax / 127.0 } else { f32::NAN };
        let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let q: [__m256i; 4] = std::array::from_fn(|i| _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv)));
        let packed = _mm256_packs_epi16(
            _mm256_packs_epi32(q[0], q[1]),
            _mm256_packs_epi32(q[2], q[3]),
        );
        let bytes = _mm256_permutevar8x32_epi32(packed, order);
        _mm256_storeu_si256(a.as_mut_ptr().add(b * QK).cast(), bytes);
        let hsum8 = |u: __m256i| {
            let h = _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256::<1>(u));
            let h = _mm_add_epi32(h, _mm_shuffle_epi32::<0b01_00_11_10>(h));
            _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32::<0b10_11_00_01>(h)))
        };
        let (h0, h1) = (
            hsum8(_mm256_add_epi32(q[0], q[1])),
            hsum8(_mm256_add_epi32(q[2], q[3])),
        );
        (hsum[2 * b], hsum[2 * b + 1]) = (h0, h1);
        s[b] = scale;
        ssum[b] = scale * (h0 + h1) as f32;
    }
}
