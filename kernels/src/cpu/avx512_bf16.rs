//! The prefill attention tiles over a bf16 KV on the bf16 dot-product unit (`vdpbf16ps`:
//! two bf16 products per f32 lane and instruction, twice the f32 FMA's rate).
//!
//! `vdpbf16ps` sums the products of adjacent bf16 pairs, so both operands are laid out in
//! pairs along the reduced dimension:
//! - scores `S^T[kt, rows] = K . Q^T` reduce over `d`: a K row is already pairs (read in
//!   place, one 32-bit pair broadcast per key), `Q^T` is packed once per work item as
//!   `[d / 2, rows]` pairs;
//! - `O[rows, d] += P . V` reduces over keys: the softmax step writes `P` rounded to bf16
//!   as `[kt / 2, rows]` pairs of consecutive keys, and each V tile is packed `[kt / 2, d]`
//!   the same way (once for every row block over the tile).
//!
//! Rounding P to bf16 is the path's one extra error (2^-9 relative per probability, as
//! FlashAttention's bf16 P on a GPU); scores, the softmax and the output stay f32.

use std::arch::x86_64::*;

/// Keys (score rows) per register block: `6 x NV` accumulators for `NV <= 4` row vectors.
const JB: usize = 6;
/// Output rows per register block of the `P V` product.
const RB: usize = 6;
/// Keys ahead that the packing of V asks for in L1.
const V_AHEAD: usize = 24;

/// `st[j * 16NV + r] = scale * sum_p K[j, 2p..2p + 2] . qw[p * 16NV + r]` for `j < kt` and
/// `r < 16NV`, `p < d / 2`.
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL and AVX512_BF16; `qw` holds `d / 2` rows of `16NV`
/// pairs; `k` `kt` rows of `d` bf16 at stride `ldk`; `st` `kt` rows of `16NV`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn scores<const NV: usize>(
    kt: usize,
    d: usize,
    qw: *const u32,
    k: *const u16,
    ldk: usize,
    scale: f32,
    st: *mut f32,
) {
    let mut j = 0;
    while j + JB <= kt {
        // The next block's key rows into L1 while this one computes (they come from L2,
        // where the caller prefetched the tile; the broadcasts stalled on them).
        for jj in j + JB..(j + 2 * JB).min(kt) {
            prefetch_l1(k.add(jj * ldk), d * 2);
        }
        score_keys::<JB, NV>(d, qw, k.add(j * ldk), ldk, scale, st.add(j * 16 * NV));
        j += JB;
    }
    let (kr, sr) = (k.add(j * ldk), st.add(j * 16 * NV));
    match kt - j {
        0 => {}
        1 => score_keys::<1, NV>(d, qw, kr, ldk, scale, sr),
        2 => score_keys::<2, NV>(d, qw, kr, ldk, scale, sr),
        3 => score_keys::<3, NV>(d, qw, kr, ldk, scale, sr),
        4 => score_keys::<4, NV>(d, qw, kr, ldk, scale, sr),
        _ => score_keys::<5, NV>(d, qw, kr, ldk, scale, sr),
    }
}

/// `J` keys of [`scores`], their `J x NV` sums in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
// Index loops over constant bounds: the form in which the accumulators stay in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn score_keys<const J: usize, const NV: usize>(
    d: usize,
    qw: *const u32,
    k: *const u16,
    ldk: usize,
    scale: f32,
    st: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; J];
    for p in 0..d / 2 {
        let mut qv = [_mm512_setzero_si512(); NV];
        for v in 0..NV {
            qv[v] = _mm512_loadu_si512(qw.add(p * 16 * NV + 16 * v).cast());
        }
        for j in 0..J {
            let pair = k.add(j * ldk + 2 * p).cast::<i32>().read_unaligned();
            let kb: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for v in 0..NV {
                acc[j][v] = _mm512_dpbf16_ps(
                    acc[j][v],
                    kb,
                    std::mem::transmute::<__m512i, __m512bh>(qv[v]),
                );
            }
        }
    }
    let s = _mm512_set1_ps(scale);
    for j in 0..J {
        for v in 0..NV {
            _mm512_storeu_ps(st.add(j * 16 * NV + 16 * v), _mm512_mul_ps(acc[j][v], s));
        }
    }
}

/// Asks for the `bytes` from `p` in L1, a line at a time; a hint only.
#[inline(always)]
unsafe fn prefetch_l1<T>(p: *const T, bytes: usize) {
    let p = p.cast::<i8>();
    for off in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
    }
}

/// Word `i` of the result of `cvtne2ps_pbh(hi, lo)` to move to word `i` of the pairs:
/// `lo[m]` to word `2m`, `hi[m]` to word `2m + 1`.
const PAIR_ONE: [u16; 32] = {
    let mut a = [0u16; 32];
    let mut m = 0;
    while m < 16 {
        a[2 * m] = m as u16;
        a[2 * m + 1] = 16 + m as u16;
        m += 1;
    }
    a
};

/// Interleave of two 32-word rows `a`, `b` (`permutex2var_epi16`): words `c0 + m` of each to
/// the pair `m`, for the half starting at word `c0` (0 or 16).
const fn pair_two(c0: u16) -> [u16; 32] {
    let mut a = [0u16; 32];
    let mut m = 0;
    while m < 16 {
        a[2 * m] = c0 + m as u16;
        a[2 * m + 1] = 32 + c0 + m as u16;
        m += 1;
    }
    a
}
const PAIR_LO: [u16; 32] = pair_two(0);
const PAIR_HI: [u16; 32] = pair_two(16);

/// 2^x for the probabilities the `P V` product rounds to bf16 (8 bits), in three steps:
/// the fraction `f = x - floor(x)` by `vreduceps`, a degree-4 polynomial for 2^f on [0, 1)
/// (a minimax fit with its constant term pinned to 1: within 3e-6 relative, where a bf16
/// rounding is 2e-3; exactly 1 at 0, so an unchanged running max rescales nothing), and
/// `vscalefps`, which multiplies by 2^floor(x) itself. No clamp: -inf reduces to 0 and
/// scales to 0, as does any x below -150.
#[target_feature(enable = "avx512f,avx512dq")]
#[inline]
unsafe fn exp2_short(x: __m512) -> __m512 {
    let f = _mm512_reduce_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(x);
    const C: [f32; 5] = [
        1.0,
        0.693_044_84,
        0.241_280_14,
        0.052_242_603,
        0.013_426_605,
    ];
    let mut p = _mm512_set1_ps(C[4]);
    for &ci in C[..4].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, x)
}

/// The online-softmax step of a score tile whose probabilities go to [`pv`]: `st` holds the
/// scores key-major (`kt` rows of `ld` f32, log2 units, masked keys -inf), `ncols` (a multiple
/// of 16, at most `ld`) columns of them. Updates the running max `m`, sum `l` and rescale
/// `alpha` of each column as [`super::avx512::softmax_tile`] does, and writes the
/// probabilities straight to `pw` as bf16 pairs of consecutive keys (`[kt.div_ceil(2), ld]`,
/// a missing last key zero): one pass, no f32 probabilities stored.
///
/// # Safety
/// The CPU must have AVX-512F/BW/DQ and AVX512_BF16; `st` valid for `kt` rows of `ld`, `m`, `l`,
/// `alpha` for `ncols` values, `pw` for `kt.div_ceil(2) * ld` pairs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512dq")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn softmax_pairs(
    st: *const f32,
    kt: usize,
    ncols: usize,
    ld: usize,
    m: *mut f32,
    l: *mut f32,
    alpha: *mut f32,
    pw: *mut u32,
) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let one = _mm512_loadu_si512(PAIR_ONE.as_ptr().cast());
    let np = kt.div_ceil(2);
    for c0 in (0..ncols).step_by(16) {
        // Two chains for the max and the sums (a single one waits on each add).
        let (mut mx0, mut mx1) = (ninf, ninf);
        let mut j = 0;
        while j + 1 < kt {
            mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st.add(j * ld + c0)));
            mx1 = _mm512_max_ps(mx1, _mm512_loadu_ps(st.add((j + 1) * ld + c0)));
            j += 2;
        }
        if j < kt {
            mx0 = _mm512_max_ps(mx0, _mm512_loadu_ps(st.add(j * ld + c0)));
        }
        let m_old = _mm512_loadu_ps(m.add(c0));
        let m_new = _mm512_max_ps(m_old, _mm512_max_ps(mx0, mx1));
        // Columns with no unmasked key so far use 0 as reference: exp2(-inf) = 0, no NaN.
        let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, ninf);
        let mref = _mm512_mask_mov_ps(m_new, empty, _mm512_setzero_ps());
        let a = exp2_short(_mm512_sub_ps(m_old, mref));
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for p in 0..np {
            let e0 = exp2_short(_mm512_sub_ps(
                _mm512_loadu_ps(st.add(2 * p * ld + c0)),
                mref,
            ));
            let e1 = if 2 * p + 1 < kt {
                exp2_short(_mm512_sub_ps(
                    _mm512_loadu_ps(st.add((2 * p + 1) * ld + c0)),
                    mref,
                ))
            } else {
                _mm512_setzero_ps()
            };
            s0 = _mm512_add_ps(s0, e0);
            s1 = _mm512_add_ps(s1, e1);
            let x: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
            _mm512_storeu_si512(pw.add(p * ld + c0).cast(), _mm512_permutexvar_epi16(one, x));
        }
        let l_old = _mm512_loadu_ps(l.add(c0));
        _mm512_storeu_ps(l.add(c0), _mm512_fmadd_ps(l_old, a, _mm512_add_ps(s0, s1)));
        _mm512_storeu_ps(m.add(c0), m_new);
        _mm512_storeu_ps(alpha.add(c0), a);
    }
}

/// V's tile of `kt` rows of `d` bf16 at stride `ldv` packed for [`pv`] into `vw`: pairs of
/// consecutive keys, `[kt.div_ceil(2), dp]` (`dp`, the next multiple of 16 of `d`), columns
/// past `d` and a missing last key zero; `vw` grown as needed.
///
/// # Safety
/// The CPU must have AVX-512F/BW and AVX512_BF16; `v` valid for `kt` rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn pack_v(kt: usize, d: usize, v: *const u16, ldv: usize, vw: &mut Vec<u32>) {
    let np = kt.div_ceil(2);
    let dp = d.next_multiple_of(16);
    if vw.len() < np * dp {
        vw.resize(np * dp, 0);
    }
    let (ilo, ihi) = (
        _mm512_loadu_si512(PAIR_LO.as_ptr().cast()),
        _mm512_loadu_si512(PAIR_HI.as_ptr().cast()),
    );
    for p in 0..np {
        let a = v.add(2 * p * ldv);
        let b = (2 * p + 1 < kt).then(|| v.add((2 * p + 1) * ldv));
        // Rows a few pairs ahead into L1, from L2 where the caller prefetched the tile: at
        // a KV row stride of 1-2 KiB a whole tile's rows share a few L1 sets, so they are
        // asked for shortly before use, not all at once.
        if 2 * p + V_AHEAD + 1 < kt {
            prefetch_l1(v.add((2 * p + V_AHEAD) * ldv), d * 2);
            prefetch_l1(v.add((2 * p + V_AHEAD + 1) * ldv), d * 2);
        }
        for c in (0..dp).step_by(32) {
            let n = (d - c).min(32);
            let mask = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
            let (ra, rb) = match b {
                Some(b) if n == 32 => (
                    _mm512_loadu_si512(a.add(c).cast()),
                    _mm512_loadu_si512(b.add(c).cast()),
                ),
                Some(b) => (
                    _mm512_maskz_loadu_epi16(mask, a.add(c).cast()),
                    _mm512_maskz_loadu_epi16(mask, b.add(c).cast()),
                ),
                None => (
                    _mm512_maskz_loadu_epi16(mask, a.add(c).cast()),
                    _mm512_setzero_si512(),
                ),
            };
            let dst = vw.as_mut_ptr().add(p * dp + c);
            _mm512_storeu_si512(dst.cast(), _mm512_permutex2var_epi16(ra, ilo, rb));
            if c + 16 < dp {
                _mm512_storeu_si512(dst.add(16).cast(), _mm512_permutex2var_epi16(ra, ihi, rb));
            }
        }
    }
}

/// `O[rows, 0..d] += P V` for a tile of `kt` keys: `pw` holds P as [`softmax_pairs`] wrote
/// it (bf16 pairs of consecutive keys, `kt.div_ceil(2)` rows of `ldp >= rows` pairs), `vw`
/// the tile's V as [`pack_v`] packed it, `o` `rows` rows of `dp` at stride `ldo` (`dp`, the
/// next multiple of 16 of `d`, columns), each first scaled by its row's `alpha` (the softmax
/// step's rescale, folded into the accumulators' loads).
///
/// # Safety
/// The CPU must have AVX-512F/BW/VL and AVX512_BF16; the pointers valid for those sizes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn pv(
    rows: usize,
    kt: usize,
    d: usize,
    pw: *const u32,
    ldp: usize,
    vw: *const u32,
    alpha: *const f32,
    o: *mut f32,
    ldo: usize,
) {
    let np = kt.div_ceil(2);
    let dp = d.next_multiple_of(16);
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(RB);
        let (pr, or, ar) = (pw.add(r), o.add(r * ldo), alpha.add(r));
        let mut c = 0;
        while c < dp / 16 {
            let w = (dp / 16 - c).min(4);
            let (vc, oc) = (vw.add(c * 16), or.add(c * 16));
            macro_rules! go {
                ($($r:literal),*) => {
                    match (n, w) {
                        $(
                            ($r, 4) => pv_block::<$r, 4>(np, pr, ldp, vc, dp, ar, oc, ldo),
                            ($r, 3) => pv_block::<$r, 3>(np, pr, ldp, vc, dp, ar, oc, ldo),
                            ($r, 2) => pv_block::<$r, 2>(np, pr, ldp, vc, dp, ar, oc, ldo),
                            ($r, _) => pv_block::<$r, 1>(np, pr, ldp, vc, dp, ar, oc, ldo),
                        )*
                        _ => unreachable!("row blocks hold 1..=RB rows"),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6);
            c += w;
        }
        r += n;
    }
}

/// `R` rows by `16W` columns of [`pv`]'s product, the accumulators in registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn pv_block<const R: usize, const W: usize>(
    np: usize,
    pw: *const u32,
    ldp: usize,
    vw: *const u32,
    ldv: usize,
    alpha: *const f32,
    o: *mut f32,
    ldo: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); W]; R];
    for r in 0..R {
        let a = _mm512_set1_ps(*alpha.add(r));
        for c in 0..W {
            acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * ldo + 16 * c)), a);
        }
    }
    for p in 0..np {
        let mut vv = [_mm512_setzero_si512(); W];
        for c in 0..W {
            vv[c] = _mm512_loadu_si512(vw.add(p * ldv + 16 * c).cast());
        }
        for r in 0..R {
            let pb: __m512bh = std::mem::transmute(_mm512_set1_epi32(*pw.add(p * ldp + r) as i32));
            for c in 0..W {
                acc[r][c] = _mm512_dpbf16_ps(
                    acc[r][c],
                    pb,
                    std::mem::transmute::<__m512i, __m512bh>(vv[c]),
                );
            }
        }
    }
    for r in 0..R {
        for c in 0..W {
            _mm512_storeu_ps(o.add(r * ldo + 16 * c), acc[r][c]);
        }
    }
}
