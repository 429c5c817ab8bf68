//! The fused decode step over a q8_0 KV on AVX-512 VNNI integer dot products: the blocks
//! are read as the integers they are, never widened to f32.
//!
//! Widened in registers (`vpmovsxbd`, `vcvtdq2ps`, a multiply per 16 values) and multiplied
//! by f32 FMAs, the q8_0 step took 2.5-2.9x the time of the bf16 step while reading 56% of
//! its bytes (`bench kernels --only decode-smol`): bound by instructions. Here:
//! - scores: the queries are quantised once per work item to 16-bit integers per 32-block
//!   ([`QueryQ8`]: two signed bytes, `x = 256 hi + lo`, so the scores keep ~2^-15 of the
//!   block's largest query value, where llama.cpp's 8-bit query keeps 2^-8); sixteen keys'
//!   blocks are transposed in registers so that each 32-bit lane holds four values of one
//!   key, and `vpdpbusd` against a broadcast word of the query sums them with keys in lanes
//!   (no horizontal sums). The keys are made unsigned by flipping their sign bit (`k + 128`),
//!   whose excess `128 sum(x)` is subtracted through the accumulator's start value.
//! - `O += P V`: each row's probabilities times the keys' V scales are rounded to 15-bit
//!   integers against their largest in the tile (2^-16 of it), V's bytes sign-extended to 16 bits and
//!   paired key by key, and `vpdpwssd` takes two keys a lane.
//!
//! Both products are exact in 32-bit integers; the two roundings (query to 16 bits, the
//! probabilities to 15 bits) are each 2^-16 of their largest term.

use super::avx512::{exp2, prefetch_rows};
use crate::kvq8::QueryQ8;
use crate::BlockQ8;
use std::arch::x86_64::*;

/// Keys per step.
const TILE: usize = super::Ops::DECODE_TILE;
/// Blocks per head row the step takes (head dims up to 256).
pub(super) const MAX_BLOCKS: usize = 8;

/// Sixteen keys' 32-byte blocks as eight vectors of two keys each (`z[i]`: key `2i` in the
/// low half, `2i + 1` in the high) transposed into eight columns: lane `j` of `c[t]` is
/// bytes `4t..4t + 4` of key `j`. Three rounds of `vpermt2d`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16x8(z: &[__m512i; 8]) -> [__m512i; 8] {
    let idx = |first: [i32; 4], step: i32, width: i32| {
        // Lanes `first[g] + w + step * 0..` of group g: four groups of `width` lanes.
        let mut x = [0i32; 16];
        for (g, f) in first.iter().enumerate() {
            for w in 0..(16 / 4) {
                x[g * 4 + w] = f + (w as i32 / width) * step + (w as i32 % width);
            }
        }
        _mm512_loadu_si512(x.as_ptr().cast())
    };
    // Round 1: (2 keys x 8 words) pairs -> 4 keys x 4 words: lane 4 key + word.
    let l1 = idx([0, 8, 16, 24], 0, 4);
    let h1 = idx([4, 12, 20, 28], 0, 4);
    // Round 2: 4 keys x 4 words pairs -> 8 keys x 2 words: lane 2 key + word.
    let l2 = idx([0, 8, 16, 24], 4, 2);
    let h2 = idx([2, 10, 18, 26], 4, 2);
    // Round 3: 8 keys x 2 words pairs -> 16 keys x 1 word.
    let l3 = idx([0, 8, 16, 24], 2, 1);
    let h3 = idx([1, 9, 17, 25], 2, 1);
    let p = |a, i, b| _mm512_permutex2var_epi32(a, i, b);
    let mut a = [_mm512_setzero_si512(); 8];
    for i in 0..4 {
        a[i] = p(z[2 * i], l1, z[2 * i + 1]); // keys 4i.., words 0..4
        a[4 + i] = p(z[2 * i], h1, z[2 * i + 1]); // words 4..8
    }
    let mut b = [_mm512_setzero_si512(); 8];
    for w in 0..2 {
        for k in 0..2 {
            let (x, y) = (a[4 * w + 2 * k], a[4 * w + 2 * k + 1]);
            b[4 * w + k] = p(x, l2, y); // keys 8k.., words 4w + 0..2
            b[4 * w + 2 + k] = p(x, h2, y); // words 4w + 2..4
        }
    }
    let mut c = [_mm512_setzero_si512(); 8];
    for w in 0..4 {
        let (x, y) = (b[2 * w], b[2 * w + 1]);
        c[2 * w] = p(x, l3, y);
        c[2 * w + 1] = p(x, h3, y);
    }
    c
}

/// One 16-key step of decode attention over a q8_0 KV for `R` query rows, fused (see the
/// module doc): scores, the online softmax as [`super::avx512::decode_tile_bf16`] keeps it
/// (`m` running max in log2 units, `l` the sum, `o` un-normalised rows at stride `ldo`), and
/// `O = alpha O + P V`. `ahead` as there.
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL and AVX512_VNNI; `q` holds `R` rows of `nb` blocks; `k`
/// and `v` 16 rows of `nb` blocks at stride `ld` blocks; `m`, `l` `R` values; `o` `R` rows of
/// `32 nb` at stride `ldo`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_tile_q8<const R: usize>(
    nb: usize,
    q: *const QueryQ8,
    k: *const BlockQ8,
    v: *const BlockQ8,
    ld: usize,
    ahead: (usize, usize),
    m: *mut f32,
    l: *mut f32,
    o: *mut f32,
    ldo: usize,
) {
    // Byte offsets of the 16 keys' blocks (scales at offset 0, values at 4).
    let stride = (ld * std::mem::size_of::<BlockQ8>()) as i32;
    let offs = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(stride),
    );
    let flip = _mm512_set1_epi8(-128);
    let qs = |j: usize, b: usize, x: *const BlockQ8| x.add(j * ld + b).cast::<u8>().add(4);
    let lines = (nb * std::mem::size_of::<BlockQ8>()).div_ceil(64) + 1;
    // Half the rows ahead now, half before `P V`: one burst of them stalled wide rows.
    prefetch_rows(0..TILE / 2, (k, v, ld), lines, ahead);

    debug_assert!(nb <= MAX_BLOCKS);
    // This tile's V rows towards L1 now: their scales are read after the scores.
    let vbytes = nb * std::mem::size_of::<BlockQ8>();
    for j in 0..TILE {
        let row = v.add(j * ld).cast::<i8>();
        _mm_prefetch::<_MM_HINT_T0>(row);
        _mm_prefetch::<_MM_HINT_T0>(row.add(vbytes - 1));
    }

    // Scores, keys in lanes.
    let mut s = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let mut z = [_mm512_setzero_si512(); 8];
        for (i, x) in z.iter_mut().enumerate() {
            let lo = _mm256_loadu_si256(qs(2 * i, b, k).cast());
            let hi = _mm256_loadu_si256(qs(2 * i + 1, b, k).cast());
            *x = _mm512_xor_si512(
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                flip,
            );
        }
        let c = transpose16x8(&z);
        // The keys' scales, gathered once their rows are loaded: gathered first, from
        // lines not yet in the cache, they stalled the step (40% of its samples in a
        // decode at 8K).
        let sk = _mm512_i32gather_ps::<1>(offs, k.add(b).cast());
        for (r, sr) in s.iter_mut().enumerate() {
            let qb = &*q.add(r * nb + b);
            let (hp, lp) = (qb.hi.as_ptr().cast::<i32>(), qb.lo.as_ptr().cast::<i32>());
            let mut ah = _mm512_set1_epi32(qb.corr[0]);
            let mut al = _mm512_set1_epi32(qb.corr[1]);
            for (t, ct) in c.iter().enumerate() {
                ah = _mm512_dpbusd_epi32(ah, *ct, _mm512_set1_epi32(hp.add(t).read_unaligned()));
                al = _mm512_dpbusd_epi32(al, *ct, _mm512_set1_epi32(lp.add(t).read_unaligned()));
            }
            let dot = _mm512_add_epi32(_mm512_slli_epi32::<8>(ah), al);
            let f = _mm512_mul_ps(sk, _mm512_set1_ps(qb.scale));
            *sr = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, *sr);
        }
    }

    // V's scales one by one: a gather of them waited on its lines (36% of the step's
    // samples in a decode at 8K), separate loads overlap their misses with the softmax.
    let mut sv = [_mm512_setzero_ps(); MAX_BLOCKS];
    for (b, x) in sv.iter_mut().enumerate().take(nb) {
        let sc = |j: usize| (*v.add(j * ld + b)).scale;
        *x = _mm512_set_ps(
            sc(15),
            sc(14),
            sc(13),
            sc(12),
            sc(11),
            sc(10),
            sc(9),
            sc(8),
            sc(7),
            sc(6),
            sc(5),
            sc(4),
            sc(3),
            sc(2),
            sc(1),
            sc(0),
        );
    }

    // Online softmax (keys in order in lanes).
    let mut p = [_mm512_setzero_ps(); R];
    let mut alpha = [1f32; R];
    for r in 0..R {
        let (m_old, mx) = (*m.add(r), _mm512_reduce_max_ps(s[r]));
        let m_new = m_old.max(mx);
        if m_new > m_old {
            alpha[r] = _mm512_cvtss_f32(exp2(_mm512_set1_ps(m_old - m_new)));
        }
        let e = exp2(_mm512_sub_ps(s[r], _mm512_set1_ps(m_new)));
        p[r] = e;
        *l.add(r) = *l.add(r) * alpha[r] + _mm512_reduce_add_ps(e);
        *m.add(r) = m_new;
    }

    prefetch_rows(TILE / 2..TILE, (k, v, ld), lines, ahead);

    // O = alpha O + P V, a block (32 dims) at a time.
    let from_halves = [
        _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0),
        _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8),
    ];
    const PMAX: f32 = 32767.0;
    // Each row's P times each block's V scales, as 15-bit integers against the largest
    // (its own: a largest P on a key whose values are near zero, as an attention sink's,
    // must not coarsen the rest), two keys a word pair; `cmax / PMAX` scales them back.
    let mut pp = [[[0i32; TILE / 2]; MAX_BLOCKS]; R];
    let mut cmax = [[0f32; MAX_BLOCKS]; R];
    for b in 0..nb {
        for r in 0..R {
            let c = _mm512_mul_ps(p[r], sv[b]);
            let cm = _mm512_reduce_max_ps(_mm512_abs_ps(c));
            // Below this, `PMAX / cm` would overflow: products under ~4e-34 (p itself
            // subnormal, far below the row's largest 1) are left out.
            if cm > f32::MIN_POSITIVE * PMAX {
                let c = _mm512_mul_ps(c, _mm512_set1_ps(PMAX / cm));
                let w = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(c));
                _mm256_storeu_si256(pp[r][b].as_mut_ptr().cast(), w);
                cmax[r][b] = cm;
            }
        }
    }
    for b in 0..nb {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for i in 0..TILE / 2 {
            let w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qs(2 * i, b, v).cast()));
            let w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(qs(2 * i + 1, b, v).cast()));
            let (lo, hi) = (_mm512_unpacklo_epi16(w0, w1), _mm512_unpackhi_epi16(w0, w1));
            for (a, ppr) in acc.iter_mut().zip(&pp) {
                let pb = _mm512_set1_epi32(ppr[b][i]);
                a[0] = _mm512_dpwssd_epi32(a[0], lo, pb);
                a[1] = _mm512_dpwssd_epi32(a[1], hi, pb);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let f = _mm512_set1_ps(cmax[r][b] / PMAX);
            let ar = _mm512_set1_ps(alpha[r]);
            let (x0, x1) = (_mm512_cvtepi32_ps(a[0]), _mm512_cvtepi32_ps(a[1]));
            let at = o.add(r * ldo + b * 32);
            for (h, fh) in from_halves.iter().enumerate() {
                let x = _mm512_permutex2var_ps(x0, *fh, x1);
                let y = _mm512_mul_ps(_mm512_loadu_ps(at.add(16 * h)), ar);
                _mm512_storeu_ps(at.add(16 * h), _mm512_fmadd_ps(x, f, y));
            }
        }
    }
}
