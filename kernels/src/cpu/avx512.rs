//! AVX-512F versions of the attention inner loops: a register-blocked f32 micro-kernel
//! (6 rows x 64 columns of accumulators) and a vectorised online-softmax step with an exp2
//! accurate to f32 rounding.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

const MR: usize = 6;
const MAX_NV: usize = 4;

/// The lanes of the last 16-wide vector of a row of `n` values.
#[inline]
fn tail_mask(n: usize) -> __mmask16 {
    match n % 16 {
        0 => 0xFFFF,
        r => (1u16 << r) - 1,
    }
}

/// `acc[MR, NV*16] (+)= A[MR, k] * B[k, NV*16]`, the last vector of B masked by `tail`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kern<const R: usize, const NV: usize>(
    k: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    b: *const f32,
    ldb: usize,
    tail: __mmask16,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(c.add(i * ldc + v * 16));
            }
        }
    }
    for kk in 0..k {
        let bp = b.add(kk * ldb);
        let mut bv = [_mm512_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = if v + 1 == NV {
                _mm512_maskz_loadu_ps(tail, bp.add(v * 16))
            } else {
                _mm512_loadu_ps(bp.add(v * 16))
            };
        }
        let ap = a.add(kk * aks);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(i * ars));
            for (x, bj) in row.iter_mut().zip(bv.iter()) {
                *x = _mm512_fmadd_ps(av, *bj, *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(i * ldc + v * 16), *x);
        }
    }
}

macro_rules! dispatch {
    ($r:expr, $nv:expr, $($args:expr),*) => {
        match ($r, $nv) {
            (1, 1) => kern::<1, 1>($($args),*), (1, 2) => kern::<1, 2>($($args),*),
            (1, 3) => kern::<1, 3>($($args),*), (1, 4) => kern::<1, 4>($($args),*),
            (2, 1) => kern::<2, 1>($($args),*), (2, 2) => kern::<2, 2>($($args),*),
            (2, 3) => kern::<2, 3>($($args),*), (2, 4) => kern::<2, 4>($($args),*),
            (3, 1) => kern::<3, 1>($($args),*), (3, 2) => kern::<3, 2>($($args),*),
            (3, 3) => kern::<3, 3>($($args),*), (3, 4) => kern::<3, 4>($($args),*),
            (4, 1) => kern::<4, 1>($($args),*), (4, 2) => kern::<4, 2>($($args),*),
            (4, 3) => kern::<4, 3>($($args),*), (4, 4) => kern::<4, 4>($($args),*),
            (5, 1) => kern::<5, 1>($($args),*), (5, 2) => kern::<5, 2>($($args),*),
            (5, 3) => kern::<5, 3>($($args),*), (5, 4) => kern::<5, 4>($($args),*),
            (6, 1) => kern::<6, 1>($($args),*), (6, 2) => kern::<6, 2>($($args),*),
            (6, 3) => kern::<6, 3>($($args),*), (6, 4) => kern::<6, 4>($($args),*),
            _ => unreachable!("micro-kernel block {}x{}", $r, $nv),
        }
    };
}

/// Same contract as [`super::portable::gemm`].
///
/// # Safety
/// The CPU must have AVX-512F; the pointers must be valid for the strides and sizes given.
#[target_feature(enable = "avx512f")]
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let nvec = n.div_ceil(16);
    let tail = tail_mask(n);
    let mut v0 = 0;
    while v0 < nvec {
        let nv = MAX_NV.min(nvec - v0);
        let mask = if v0 + nv == nvec { tail } else { 0xFFFF };
        let mut i = 0;
        while i < m {
            let r = MR.min(m - i);
            dispatch!(
                r,
                nv,
                k,
                a.add(i * ars),
                ars,
                aks,
                b.add(v0 * 16),
                ldb,
                mask,
                c.add(i * ldc + v0 * 16),
                ldc,
                accumulate
            );
            i += r;
        }
        v0 += nv;
    }
}

/// 2^x to within an f32 rounding: 0 for x <= -200 and for -inf, +inf from 128 on.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp2(x: __m512) -> __m512 {
    let x = _mm512_max_ps(x, _mm512_set1_ps(-200.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n); // in [-0.5, 0.5]
    const C: [f32; 8] = super::EXP2_TAYLOR;
    let mut p = _mm512_set1_ps(C[7]);
    for &ci in C[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ci));
    }
    _mm512_scalef_ps(p, n)
}

/// Same contract as [`super::portable::silu_mul_into`], with `e^-g` within an ulp or two of
/// libm's: see [`exp_accurate`]. The tail too goes through the vector code (masked), so a
/// value's result does not depend on where it sits in the slice: a batched step, whose rows
/// lie at other offsets than alone, gives each row the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let (o, g, u) = (out.as_mut_ptr(), gate.as_ptr(), up.as_ptr());
    let one = _mm512_set1_ps(1.0);
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let gv = _mm512_maskz_loadu_ps(k, g.add(i));
        let e = exp_accurate(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        let r = _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u.add(i)));
        _mm512_mask_storeu_ps(o.add(i), k, r);
        i += 16;
    }
}

/// Same contract as [`super::portable::exp_scaled_into`], `e^y` by [`exp_accurate`]; the
/// tail masked, as in [`silu_mul_into`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn exp_scaled_into(out: &mut [f32], x: &[f32], shift: f32, div: f32) {
    let n = out.len().min(x.len());
    let (o, xp) = (out.as_mut_ptr(), x.as_ptr());
    let (sh, dv) = (_mm512_set1_ps(shift), _mm512_set1_ps(div));
    let mut i = 0;
    while i < n {
        let k = tail_mask((n - i).min(16));
        let y = _mm512_div_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, xp.add(i)), sh), dv);
        _mm512_mask_storeu_ps(o.add(i), k, exp_accurate(y));
        i += 16;
    }
}

/// `e^y` to an ulp or two of libm's `expf` (which rounds correctly): `y = n ln 2 + r` with
/// `ln 2` in two parts (Cody and Waite, Cephes' constants), so `r` carries no error from
/// `|y|`, then a degree-7 Taylor polynomial on `|r| <= ln 2 / 2` (error 2e-8) and `2^n` by
/// `vscalefps`. As `expf`: +inf above ~88.7 and for +inf, 0 below ~-103.9 and for -inf (`y`
/// is clamped to +-200 first so that `n` stays small), NaN for NaN.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp_accurate(y: __m512) -> __m512 {
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512: n * LN2_HI is exact for |n| < 2^15
    const LN2_LO: f32 = -2.121_944_4e-4;
    let yc = _mm512_min_ps(
        _mm512_max_ps(y, _mm512_set1_ps(-200.0)),
        _mm512_set1_ps(200.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(yc, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), yc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    const C: [f32; 8] = [
        1.0,
        1.0,
        0.5,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
    ];
    let mut p = _mm512_set1_ps(C[7]);
    for &ci in C[..7].iter().rev() {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(ci));
    }
    let e = _mm512_scalef_ps(p, n);
    // The clamps sent a NaN to -200 (max takes its second operand): NaN in, NaN out.
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(y, y);
    _mm512_mask_mov_ps(e, nan, y)
}

/// Same contract as [`super::portable::softmax_tile`]; `ncols` must be a multiple of 16.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_tile(
    st: &mut [f32],
    kt: usize,
    ncols: usize,
    ld: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    assert!(ncols.is_multiple_of(16) && ncols <= ld && m.len() >= ncols && l.len() >= ncols);
    assert!(alpha.len() >= ncols && (kt == 0 || st.len() >= (kt - 1) * ld + ncols));
    let s = st.as_mut_ptr();
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    for c0 in (0..ncols).step_by(16) {
        let mut mx = ninf;
        for j in 0..kt {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(s.add(j * ld + c0)));
        }
        let m_old = _mm512_loadu_ps(m.as_ptr().add(c0));
        let m_new = _mm512_max_ps(m_old, mx);
        // Columns with no unmasked key so far use 0 as reference: exp2(-inf) = 0, no NaN.
        let empty = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(m_new, ninf);
        let mref = _mm512_mask_mov_ps(m_new, empty, _mm512_setzero_ps());
        let a = exp2(_mm512_sub_ps(m_old, mref));
        let mut sum = _mm512_setzero_ps();
        for j in 0..kt {
            let ptr = s.add(j * ld + c0);
            let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(ptr), mref));
            _mm512_storeu_ps(ptr, p);
            sum = _mm512_add_ps(sum, p);
        }
        let l_old = _mm512_loadu_ps(l.as_ptr().add(c0));
        _mm512_storeu_ps(l.as_mut_ptr().add(c0), _mm512_fmadd_ps(l_old, a, sum));
        _mm512_storeu_ps(m.as_mut_ptr().add(c0), m_new);
        _mm512_storeu_ps(alpha.as_mut_ptr().add(c0), a);
    }
}

/// Scores of `R` query rows against `kt` keys (see [`scores_dot`]), with the `R`
/// accumulators held in registers.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_rows<const R: usize, T: super::RowElem>(
    kt: usize,
    d: usize,
    q: *const f32,
    k: *const T,
    ldk: usize,
    st: *mut f32,
    ldst: usize,
) {
    let nvec = d.div_ceil(16);
    let tail = tail_mask(d);
    for j in 0..kt {
        let kr = k.add(j * ldk);
        let mut acc = [_mm512_setzero_ps(); R];
        for c in 0..nvec {
            let m = if c + 1 == nvec { tail } else { 0xFFFF };
            // K widened in registers (bf16: a shift), never through memory.
            let kv = if m == 0xFFFF {
                T::load16(kr.add(c * 16))
            } else {
                T::load_tail(kr.add(c * 16), d % 16)
            };
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm512_maskz_loadu_ps(m, q.add(r * d + c * 16));
                *a = _mm512_fmadd_ps(qv, kv, *a);
            }
        }
        let mut s = [0f32; 16];
        for (x, a) in s.iter_mut().zip(acc.iter()) {
            *x = _mm512_reduce_add_ps(*a);
        }
        _mm512_storeu_ps(st.add(j * ldst), _mm512_loadu_ps(s.as_ptr()));
    }
}

/// Butterfly step: lanes 0-7 of the result are partial sums of `a`, lanes 8-15 of `b`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold_halves(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x44>(a, b),
        _mm512_shuffle_f32x4::<0xEE>(a, b),
    )
}

/// Butterfly step on two [`fold_halves`] results: 128-bit quarter `q` holds four partial sums
/// of the `q`-th of the four vectors folded in.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold_quarters(a: __m512, b: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xDD>(a, b),
    )
}

/// Sums of eight vectors, `out[j] = sum(v[j])`, by a transposing butterfly: 23 shuffles
/// and adds instead of eight full horizontal reductions.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce8(v: &[__m512; 8]) -> [f32; 8] {
    let mut t = [0f32; 16];
    _mm512_storeu_ps(t.as_mut_ptr(), reduce8_lanes(v));
    [t[0], t[4], t[8], t[12], t[2], t[6], t[10], t[14]]
}

/// Sums of four vectors, `out[j] = sum(v[j])`, by the first steps of [`reduce8`]'s butterfly.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce4(v: &[__m512; 4]) -> [f32; 4] {
    let mut t = [0f32; 16];
    _mm512_storeu_ps(t.as_mut_ptr(), reduce4_lanes(v));
    [t[0], t[4], t[8], t[12]]
}

/// Scores of few rows, `J` keys at a time (8 for up to 3 rows, 4 for up to 6: the `R x J`
/// accumulators stay in registers): each K chunk loaded (and widened) once for all rows, and
/// one butterfly per row per `J` keys in place of a horizontal sum per row per key. `d` must
/// be a multiple of 16. Returns how many keys were done (a multiple of `J`).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn dot_rows_grouped<const R: usize, const J: usize, T: super::RowElem>(
    kt: usize,
    d: usize,
    q: *const f32,
    k: *const T,
    ldk: usize,
    st: *mut f32,
    ldst: usize,
) -> usize {
    let nvec = d / 16;
    let mut j0 = 0;
    while j0 + J <= kt {
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        for c in 0..nvec {
            let mut qv = [_mm512_setzero_ps(); R];
            for (r, x) in qv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(q.add(r * d + c * 16));
            }
            for j in 0..J {
                let kv = T::load16(k.add((j0 + j) * ldk + c * 16));
                for (a, qr) in acc.iter_mut().zip(&qv) {
                    a[j] = _mm512_fmadd_ps(*qr, kv, a[j]);
                }
            }
        }
        for j in 0..J {
            _mm512_storeu_ps(st.add((j0 + j) * ldst), _mm512_setzero_ps());
        }
        for (r, a) in acc.iter().enumerate() {
            let mut sums = [0f32; 8];
            match J {
                8 => sums = reduce8(a[..].try_into().expect("J is 8")),
                4 => sums[..4].copy_from_slice(&reduce4(a[..].try_into().expect("J is 4"))),
                _ => unreachable!("groups of 4 or 8 keys"),
            }
            for (j, v) in sums.iter().take(J).enumerate() {
                *st.add((j0 + j) * ldst + r) = *v;
            }
        }
        j0 += J;
    }
    j0
}

/// `o[r, 0..d] += sum_j p[j * ldp + r] * v[j, 0..d]` for `R` rows: the V chunk of a key is
/// loaded (and widened) once for all rows, the outputs of 64 dims a pass held in registers.
/// `d` must be a multiple of 16.
///
/// # Safety
/// The CPU must have AVX-512F; `p` holds `kt` rows at stride `ldp`, `v` `kt` rows of `d` at
/// stride `ldv`, `o` `R` rows of `d` at stride `ldo`.
#[target_feature(enable = "avx512f")]
pub unsafe fn pv_rows<const R: usize, T: super::RowElem>(
    kt: usize,
    d: usize,
    p: *const f32,
    ldp: usize,
    v: *const T,
    ldv: usize,
    o: *mut f32,
    ldo: usize,
) {
    const W: usize = 4;
    let nvec = d / 16;
    let mut c0 = 0;
    while c0 < nvec {
        let w = W.min(nvec - c0);
        let mut acc = [[_mm512_setzero_ps(); W]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (c, x) in a.iter_mut().enumerate().take(w) {
                *x = _mm512_loadu_ps(o.add(r * ldo + (c0 + c) * 16));
            }
        }
        for j in 0..kt {
            let vr = v.add(j * ldv + c0 * 16);
            let mut vv = [_mm512_setzero_ps(); W];
            for (c, x) in vv.iter_mut().enumerate().take(w) {
                *x = T::load16(vr.add(c * 16));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let pr = _mm512_set1_ps(*p.add(j * ldp + r));
                for c in 0..w {
                    a[c] = _mm512_fmadd_ps(pr, vv[c], a[c]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (c, x) in a.iter().enumerate().take(w) {
                _mm512_storeu_ps(o.add(r * ldo + (c0 + c) * 16), *x);
            }
        }
        c0 += w;
    }
}

/// Same contract as [`super::portable::scores_dot`].
///
/// # Safety
/// The CPU must have AVX-512F; the pointers must be valid for the sizes and strides given.
#[target_feature(enable = "avx512f")]
pub unsafe fn scores_dot<T: super::RowElem>(
    rows: usize,
    kt: usize,
    d: usize,
    q: *const f32,
    k: *const T,
    ldk: usize,
    st: *mut f32,
    ldst: usize,
) {
    // Few rows (decode with a small GQA group): keys eight at a time, the rest one by one.
    let done = match (rows, d % 16) {
        (1, 0) => dot_rows_grouped::<1, 8, T>(kt, d, q, k, ldk, st, ldst),
        (2, 0) => dot_rows_grouped::<2, 8, T>(kt, d, q, k, ldk, st, ldst),
        (3, 0) => dot_rows_grouped::<3, 8, T>(kt, d, q, k, ldk, st, ldst),
        (4, 0) => dot_rows_grouped::<4, 4, T>(kt, d, q, k, ldk, st, ldst),
        (5, 0) => dot_rows_grouped::<5, 4, T>(kt, d, q, k, ldk, st, ldst),
        (6, 0) => dot_rows_grouped::<6, 4, T>(kt, d, q, k, ldk, st, ldst),
        _ => 0,
    };
    let (kt, k, st) = (kt - done, k.add(done * ldk), st.add(done * ldst));
    macro_rules! rows {
        ($($r:literal)*) => {
            match rows {
                $($r => dot_rows::<$r, T>(kt, d, q, k, ldk, st, ldst),)*
                _ => unreachable!("scores_dot takes at most 16 rows, got {rows}"),
            }
        };
    }
    rows!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
}

/// Same contract as [`super::portable::widen_bf16`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i + 16 <= n {
        let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
        let w = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h));
        _mm512_storeu_ps(d.add(i), _mm512_castsi512_ps(w));
        i += 16;
    }
    super::portable::widen_bf16(&src[i..n], &mut dst[i..n]);
}

/// Same contract as [`super::portable::dequant_q8`]: each block's 32 bytes sign-extended
/// (`vpmovsxbd`), converted (`vcvtdq2ps`) and multiplied by the broadcast scale.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dequant_q8(src: &[crate::kvq8::BlockQ8], dst: &mut [f32]) {
    let whole = src.len().min(dst.len() / 32);
    let d = dst.as_mut_ptr();
    for (i, b) in src[..whole].iter().enumerate() {
        let s = _mm512_set1_ps(b.scale);
        let p = b.qs.as_ptr() as *const __m128i;
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1))));
        _mm512_storeu_ps(d.add(i * 32), _mm512_mul_ps(lo, s));
        _mm512_storeu_ps(d.add(i * 32 + 16), _mm512_mul_ps(hi, s));
    }
    super::portable::dequant_q8(&src[whole..], &mut dst[whole * 32..]);
}

/// `y[0..n] += sum_r x[r] * B[r, 0..n]` over `x.len()` rows of `B` (row stride `ld`, elements
/// widened to f32 as they are loaded), four rows at a time so `y` is loaded and stored once per
/// four rows of `B` streamed; the last `n % 16` columns are done in scalar code.
///
/// # Safety
/// The CPU must have AVX-512F; `b` must be valid for `(x.len() - 1) * ld + n` elements and
/// `y` for `n`.
#[target_feature(enable = "avx512f")]
pub unsafe fn axpy_rows<T: super::RowElem>(
    y: &mut [f32],
    x: &[f32],
    b: *const T,
    ld: usize,
    n: usize,
) {
    let full = n / 16 * 16;
    let yp = y.as_mut_ptr();
    let mut r = 0;
    while r + 4 <= x.len() {
        let xs = [
            _mm512_set1_ps(x[r]),
            _mm512_set1_ps(x[r + 1]),
            _mm512_set1_ps(x[r + 2]),
            _mm512_set1_ps(x[r + 3]),
        ];
        let rows = [
            b.add(r * ld),
            b.add((r + 1) * ld),
            b.add((r + 2) * ld),
            b.add((r + 3) * ld),
        ];
        let mut j = 0;
        while j < full {
            let mut acc = _mm512_loadu_ps(yp.add(j));
            for (xv, row) in xs.iter().zip(rows.iter()) {
                acc = _mm512_fmadd_ps(*xv, T::load16(row.add(j)), acc);
            }
            _mm512_storeu_ps(yp.add(j), acc);
            j += 16;
        }
        r += 4;
    }
    while r < x.len() {
        let (xv, row) = (_mm512_set1_ps(x[r]), b.add(r * ld));
        let mut j = 0;
        while j < full {
            let acc = _mm512_fmadd_ps(xv, T::load16(row.add(j)), _mm512_loadu_ps(yp.add(j)));
            _mm512_storeu_ps(yp.add(j), acc);
            j += 16;
        }
        r += 1;
    }
    for (rr, xr) in x.iter().enumerate() {
        for j in full..n {
            *yp.add(j) += xr * (*b.add(rr * ld + j)).to_f32();
        }
    }
}

/// Keys per call of [`decode_tile_bf16`].
const DECODE_TILE: usize = super::Ops::DECODE_TILE;

/// One 16-key step of decode attention over a bf16 KV for `R` query rows, fused: scores by
/// bf16 dot products (`vdpbf16ps`: the products of bf16 queries and keys are exact in f32, so
/// this is the f32 dot product of the same values, without widening K), laid out row-major
/// (keys in lanes), so the online softmax takes one exp2 per row per 16 keys instead of one
/// per key; then `O = alpha O + P V` on the bf16 dot product too (see [`pv_pass_dp`]: P
/// rounded to bf16, 2^-9 of `|P| |V|` as the prefill tiles), the output rows in registers. Up to 64 dims the
/// scores take keys in pairs ([`scores_pairs`]); wider, `J` keys share a butterfly reduction
/// (8 for up to 3 rows, 4 for 4-6: `R x J` accumulators in registers, [`scores_groups`]).
///
/// State as [`softmax_tile`] keeps it: `m` (running max, log2 units), `l` (sum of exp2),
/// `o` rows at stride `ldo`, all un-normalised. `d` must be a multiple of 32.
///
/// `ahead.0 > 0` prefetches this head's K and V rows that many keys on (those below
/// `ahead.1`, the rows that exist from `k`), a group of keys' worth before each group's
/// scores: spread so, the prefetches of wide rows (2 KiB and more a key) do not fill the
/// miss buffers in one burst and stall the tile behind them (as one burst per head and
/// tile did: `bench kernels --only decode` 17.8-19.3 GB/s before, 23.7 after).
///
/// # Safety
/// The CPU must have AVX-512F/BW and AVX512_BF16; `q` holds `R` rows of `d` bf16 bits, `k`
/// and `v` 16 rows of `d` at stride `ld`; `m` and `l` `R` values; `o` `R` rows of `d`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_tile_bf16<const R: usize, const J: usize>(
    d: usize,
    q: *const u16,
    scale2: f32,
    k: *const u16,
    v: *const u16,
    ld: usize,
    ahead: (usize, usize),
    m: *mut f32,
    l: *mut f32,
    o: *mut f32,
    ldo: usize,
) {
    // Scores, keys in lanes in the order `place_group::<J>` leaves them (`J` = 8 for pairs).
    let (p, alpha) = if d <= 64 {
        let u = scores_pairs::<R>(d, q, k, ld, ahead, v);
        softmax16::<R, 8>(&u, scale2, m, l)
    } else {
        let u = scores_groups::<R, J>(d, q, k, ld, ahead, v);
        softmax16::<R, J>(&u, scale2, m, l)
    };
    // P rounded to bf16 (as the prefill tiles take it), as pairs of consecutive keys, the
    // bf16 dot product's operands.
    let mut pp = [[0u32; DECODE_TILE / 2]; R];
    for (pr, x) in pp.iter_mut().zip(&p) {
        _mm256_storeu_si256(
            pr.as_mut_ptr().cast(),
            std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(*x)),
        );
    }
    // O = alpha O + P V, 64 dims a pass (32 for a last one of 96).
    let chunks = d / 32;
    let mut c0 = 0;
    while c0 < chunks {
        if chunks - c0 >= 2 {
            pv_pass_dp::<R, 2>(c0, &pp, &alpha, v, ld, o, ldo);
            c0 += 2;
        } else {
            pv_pass_dp::<R, 1>(c0, &pp, &alpha, v, ld, o, ldo);
            c0 += 1;
        }
    }
}

/// Prefetches the K and V rows `rows` of this head shifted `ahead.0` keys on (rows of `T` at
/// stride `ld` from `k` and `v`, `lines` cache lines each), those below `ahead.1`; nothing
/// when `ahead.0` is 0: see [`decode_tile_bf16`].
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn prefetch_rows<T>(
    rows: std::ops::Range<usize>,
    (k, v, ld): (*const T, *const T, usize),
    lines: usize,
    ahead: (usize, usize),
) {
    if ahead.0 == 0 {
        return;
    }
    for row in rows.map(|r| r + ahead.0).filter(|&r| r < ahead.1) {
        // Pointers only formed (wrapping) and prefetched: a prefetch never faults.
        let (kr, vr) = (
            k.wrapping_add(row * ld).cast::<i8>(),
            v.wrapping_add(row * ld).cast::<i8>(),
        );
        for x in 0..lines {
            _mm_prefetch::<_MM_HINT_T1>(kr.wrapping_add(64 * x));
            _mm_prefetch::<_MM_HINT_T1>(vr.wrapping_add(64 * x));
        }
    }
}

/// [`decode_tile_bf16`]'s scores for `d` <= 64, eight keys a group as four pairs: a pair's
/// two keys share a vector, 16 dims of one in its low half and of the other in its high half
/// against the query's 16 dims in both, so each key's sum is spread over 8 lanes, not 16,
/// and [`sum_pairs`] (11 instructions a row) sums a group. At d 64 the butterflies over 16
/// lanes cost as much as the products: SmolLM2's step (GQA 3) and the MoE's (GQA 4) 10-17%
/// faster (criterion `decode_smol_4k`, `decode_moe_2k`, one thread); at d 128 building the
/// pairs costs more than it saves (15-25% slower).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn scores_pairs<const R: usize>(
    d: usize,
    q: *const u16,
    k: *const u16,
    ld: usize,
    ahead: (usize, usize),
    v: *const u16,
) -> [__m512; R] {
    let mut u = [_mm512_setzero_ps(); R];
    for g in 0..DECODE_TILE / 8 {
        prefetch_rows(g * 8..(g + 1) * 8, (k, v, ld), (2 * d).div_ceil(64), ahead);
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for h in 0..d / 16 {
            let mut kp = [_mm512_setzero_si512(); 4];
            for (p, x) in kp.iter_mut().enumerate() {
                let key = |i: usize| _mm256_loadu_si256(k.add((g * 8 + i) * ld + 16 * h).cast());
                *x = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(key(2 * p)), key(2 * p + 1));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(q.add(r * d + 16 * h).cast()));
                let qh: __m512bh = std::mem::transmute(qh);
                for (x, kx) in a.iter_mut().zip(&kp) {
                    *x = _mm512_dpbf16_ps(*x, qh, std::mem::transmute::<__m512i, __m512bh>(*kx));
                }
            }
        }
        for (ur, a) in u.iter_mut().zip(&acc) {
            *ur = blend_group::<8>(*ur, sum_pairs(a), g);
        }
    }
    u
}

/// [`decode_tile_bf16`]'s scores for wider heads: each group of `J` keys' vectors summed by
/// a butterfly ([`place_group`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn scores_groups<const R: usize, const J: usize>(
    d: usize,
    q: *const u16,
    k: *const u16,
    ld: usize,
    ahead: (usize, usize),
    v: *const u16,
) -> [__m512; R] {
    let mut u = [_mm512_setzero_ps(); R];
    for g in 0..DECODE_TILE / J {
        prefetch_rows(g * J..(g + 1) * J, (k, v, ld), (2 * d).div_ceil(64), ahead);
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        for c in 0..d / 32 {
            let mut qv = [_mm512_setzero_si512(); R];
            for (r, x) in qv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(q.add(r * d + c * 32).cast());
            }
            for j in 0..J {
                let kv: __m512bh = std::mem::transmute(_mm512_loadu_si512(
                    k.add((g * J + j) * ld + c * 32).cast(),
                ));
                for (a, qr) in acc.iter_mut().zip(&qv) {
                    a[j] =
                        _mm512_dpbf16_ps(a[j], std::mem::transmute::<__m512i, __m512bh>(*qr), kv);
                }
            }
        }
        for (ur, a) in u.iter_mut().zip(&acc) {
            *ur = place_group::<J>(*ur, a, g);
        }
    }
    u
}

/// Chunks `c0 .. c0 + C` (32 dims each) of [`decode_tile_bf16`]'s `O = alpha O + P V` on the
/// bf16 dot product: two keys' V rows interleaved by `vpunpck{l,h}wd` meet a broadcast pair of
/// their probabilities, one `vdpbf16ps` per 16 dims, two keys at a time. P is rounded to
/// bf16 (2^-9 of `|P| |V|`, as the prefill tiles and FlashAttention's bf16 P on a GPU): it
/// was once split in two bf16 parts to keep f32-exact products (2^-17), which doubled these
/// products; one part measured 6-18% faster (criterion `decode_32k`, `decode_moe_2k`,
/// `decode_smol_4k`, one thread, four alternating rounds). Widening V and an FMA per key
/// took three
/// instructions per 16 dims and key; this takes one. The unpacks leave dims in the order
/// `8L + 4h + k` at lane `4L + k` of half `h`; O is permuted into it when loaded and back when
/// stored (two permutes per 32 dims and row a tile).
// Not inlined: inlined, the pair broadcasts were hoisted out of the passes and spilled.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline(never)]
// Index loops over constant bounds: the form in which the accumulators stay in registers.
#[allow(clippy::needless_range_loop)]
unsafe fn pv_pass_dp<const R: usize, const C: usize>(
    c0: usize,
    pp: &[[u32; DECODE_TILE / 2]; R],
    alpha: &[f32; R],
    v: *const u16,
    ld: usize,
    o: *mut f32,
    ldo: usize,
) {
    let to_half = [
        _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0),
        _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4),
    ];
    let from_halves = [
        _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0),
        _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8),
    ];
    let mut acc = [[[_mm512_setzero_ps(); 2]; C]; R];
    for r in 0..R {
        let ar = _mm512_set1_ps(alpha[r]);
        for c in 0..C {
            let at = o.add(r * ldo + (c0 + c) * 32);
            let (a, b) = (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)));
            for h in 0..2 {
                acc[r][c][h] = _mm512_mul_ps(_mm512_permutex2var_ps(a, to_half[h], b), ar);
            }
        }
    }
    for i in 0..DECODE_TILE / 2 {
        let (va, vb) = (
            v.add(2 * i * ld + c0 * 32),
            v.add((2 * i + 1) * ld + c0 * 32),
        );
        let mut vv = [[_mm512_setzero_si512(); 2]; C];
        for c in 0..C {
            let a = _mm512_loadu_si512(va.add(c * 32).cast());
            let b = _mm512_loadu_si512(vb.add(c * 32).cast());
            vv[c] = [_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b)];
        }
        for r in 0..R {
            let pr: __m512bh = std::mem::transmute(_mm512_set1_epi32(pp[r][i] as i32));
            for c in 0..C {
                for h in 0..2 {
                    let vh: __m512bh = std::mem::transmute(vv[c][h]);
                    acc[r][c][h] = _mm512_dpbf16_ps(acc[r][c][h], pr, vh);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            let at = o.add(r * ldo + (c0 + c) * 32);
            let [lo, hi] = acc[r][c];
            _mm512_storeu_ps(at, _mm512_permutex2var_ps(lo, from_halves[0], hi));
            _mm512_storeu_ps(at.add(16), _mm512_permutex2var_ps(lo, from_halves[1], hi));
        }
    }
}

/// The sums of four pair vectors (vector `p`: key `2p`'s partial sums in lanes 0..8, key
/// `2p + 1`'s in lanes 8..16) as [`reduce8_lanes`] leaves eight keys' sums: key `j` in lanes
/// `L[j]` and `L[j] + 1`, `L = 0, 4, 8, 12, 2, 6, 10, 14`. Quarters first (each then one
/// key's four partials), then pairs of lanes, then neighbours.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn sum_pairs(a: &[__m512; 4]) -> __m512 {
    fold_pairs(fold_quarters(a[0], a[1]), fold_quarters(a[2], a[3]))
}

/// The sums of group `g` of a 16-key decode tile (`J` keys, each `a[j]`'s lanes summed)
/// blended into `s`, the row's scores so far, without leaving registers: [`reduce8_lanes`]
/// leaves key `j` of a group in lanes `L[j]` and `L[j] + 1` (`L = 0, 4, 8, 12, 2, 6, 10, 14`),
/// so group 1 takes the odd lanes; [`reduce4_lanes`] leaves key `q` in every lane of quarter
/// `q`, so group `g` takes lane `g` of each quarter. [`softmax16`] puts the keys in order.
/// (Kept as an array of per-group vectors, the sums of a tile spilled to the stack: 6-14%
/// slower at GQA 4, `cargo bench --bench attention -- decode_moe`.)
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn place_group<const J: usize>(s: __m512, a: &[__m512; J], g: usize) -> __m512 {
    let t = if J == 8 {
        reduce8_lanes(a[..].try_into().expect("J is 8"))
    } else {
        reduce4_lanes(a[..].try_into().expect("J is 4"))
    };
    blend_group::<J>(s, t, g)
}

/// Group `g`'s sums `t`, laid out as [`place_group`] says, blended into the row's scores `s`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn blend_group<const J: usize>(s: __m512, t: __m512, g: usize) -> __m512 {
    match (J, g) {
        (8, 0) => t,
        (8, _) => _mm512_mask_mov_ps(s, 0xAAAA, t),
        _ => _mm512_mask_mov_ps(s, 0x1111 << g, t),
    }
}

/// The online-softmax step of a fused 16-key decode tile: the scores of row `r` are `u[r]`
/// as [`place_group`] left them, times `scale2`; updates `m` and `l`, returns the
/// probabilities (keys in lanes, in order) and each row's rescale factor. Inlined whole: a
/// call passed its results through memory and stalled on them.
///
/// # Safety
/// The CPU must have AVX-512F; `m` and `l` hold `R` values. Only for callers that enable it
/// (`#[inline(always)]` rules out `#[target_feature]`: the intrinsics inline into the caller).
#[inline(always)]
unsafe fn softmax16<const R: usize, const J: usize>(
    u: &[__m512; R],
    scale2: f32,
    m: *mut f32,
    l: *mut f32,
) -> ([__m512; R], [f32; R]) {
    let scale = _mm512_set1_ps(scale2);
    let mut p = [_mm512_setzero_ps(); R];
    let mut alpha = [1f32; R];
    // Lane of key k (see place_group).
    let idx = if J == 8 {
        _mm512_set_epi32(15, 11, 7, 3, 13, 9, 5, 1, 14, 10, 6, 2, 12, 8, 4, 0)
    } else {
        _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0)
    };
    for r in 0..R {
        // Keys 0..16 in lanes 0..16.
        let s = _mm512_permutexvar_ps(idx, u[r]);
        let s = _mm512_mul_ps(s, scale);
        let (m_old, mx) = (*m.add(r), _mm512_reduce_max_ps(s));
        let m_new = m_old.max(mx);
        if m_new > m_old {
            // exp2(-inf) = 0 for the first tile: o and l are zero then anyway.
            alpha[r] = _mm512_cvtss_f32(exp2(_mm512_set1_ps(m_old - m_new)));
        }
        let e = exp2(_mm512_sub_ps(s, _mm512_set1_ps(m_new)));
        p[r] = e;
        *l.add(r) = *l.add(r) * alpha[r] + _mm512_reduce_add_ps(e);
        *m.add(r) = m_new;
    }
    (p, alpha)
}

/// [`decode_tile_bf16`] over a block KV (q8_0 [`crate::BlockQ8`] or FP8 [`crate::BlockF8`],
/// a scale per 32 values) with f32 queries: each key block is widened in registers (see
/// [`widen_block`]) and meets the queries by FMA; the online softmax and `O = alpha O + P V`
/// as there, V widened the same way. Reads 36 (q8) or 33 (FP8) bytes per 32 values and writes
/// nothing but the state. `ahead` as [`decode_tile_bf16`] takes it.
///
/// # Safety
/// The CPU must have AVX-512F; `q` holds `R` rows of `d` f32 (`d` a multiple of 32), `k` and
/// `v` 16 rows of `d / 32` blocks at stride `ld` blocks; `m` and `l` `R` values; `o` `R` rows
/// of `d` at stride `ldo`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn decode_tile_blocks<B: crate::KvBlock, const R: usize, const J: usize>(
    d: usize,
    q: *const f32,
    scale2: f32,
    k: *const B,
    v: *const B,
    ld: usize,
    ahead: (usize, usize),
    m: *mut f32,
    l: *mut f32,
    o: *mut f32,
    ldo: usize,
) {
    const G: usize = DECODE_TILE;
    let nb = d / 32;
    // A head's row of blocks, unaligned: one line more than its bytes fill.
    let lines = (nb * std::mem::size_of::<B>()).div_ceil(64) + 1;
    let mut u = [_mm512_setzero_ps(); R];
    for g in 0..G / J {
        // As decode_tile_bf16 prefetches a wide KV: a group's worth of rows at a time.
        prefetch_rows(g * J..(g + 1) * J, (k, v, ld), lines, ahead);
        let mut acc = [[_mm512_setzero_ps(); J]; R];
        for c in 0..nb {
            let mut qv = [[_mm512_setzero_ps(); 2]; R];
            for (r, x) in qv.iter_mut().enumerate() {
                x[0] = _mm512_loadu_ps(q.add(r * d + c * 32));
                x[1] = _mm512_loadu_ps(q.add(r * d + c * 32 + 16));
            }
            for j in 0..J {
                let (lo, hi) = widen_block(k.add((g * J + j) * ld + c));
                for (a, qr) in acc.iter_mut().zip(&qv) {
                    a[j] = _mm512_fmadd_ps(qr[0], lo, a[j]);
                    a[j] = _mm512_fmadd_ps(qr[1], hi, a[j]);
                }
            }
        }
        for (ur, a) in u.iter_mut().zip(&acc) {
            *ur = place_group::<J>(*ur, a, g);
        }
    }
    let (pv, alpha) = softmax16::<R, J>(&u, scale2, m, l);
    let mut p = [[0f32; G]; R];
    for (x, v) in p.iter_mut().zip(&pv) {
        _mm512_storeu_ps(x.as_mut_ptr(), *v);
    }
    let mut c0 = 0;
    while c0 < nb {
        if nb - c0 >= 2 {
            pv_pass_blocks::<B, R, 2>(c0, &p, &alpha, v, ld, o, ldo);
            c0 += 2;
        } else {
            pv_pass_blocks::<B, R, 1>(c0, &p, &alpha, v, ld, o, ldo);
            c0 += 1;
        }
    }
}

/// One block of a KV as two f32 vectors, scaled: the type is known at compile time, so the
/// match folds away.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_block<B: crate::KvBlock>(b: *const B) -> (__m512, __m512) {
    match B::KV_DTYPE {
        // SAFETY: the KV type names the block type (KvBlock is implemented for these two).
        crate::DType::F8E4M3 => widen_f8(&*(b as *const crate::BlockF8)),
        _ => widen_q8(&*(b as *const crate::BlockQ8)),
    }
}

/// One q8 block as two f32 vectors, scaled (`vpmovsxbd`, `vcvtdq2ps`, a multiply).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_q8(b: &crate::BlockQ8) -> (__m512, __m512) {
    let s = _mm512_set1_ps(b.scale);
    let p = b.qs.as_ptr() as *const __m128i;
    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(1))));
    (_mm512_mul_ps(lo, s), _mm512_mul_ps(hi, s))
}

/// One FP8 block as two f32 vectors, scaled: each code sign-extended to 16 bits and shifted
/// left by 7 is the f16 of its value times 2^-8 once the sign's copy at bit 14 is cleared
/// (see [`crate::kvf8::e4m3_as_f16_bits`]); `vcvtph2ps` widens it (subnormals included) and
/// one multiply applies `2^(8 + scale exponent)`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn widen_f8(b: &crate::BlockF8) -> (__m512, __m512) {
    let s = _mm512_set1_ps(b.f16_factor());
    let p = b.qs.as_ptr() as *const __m128i;
    let mask = _mm256_set1_epi16(0xBFFFu16 as i16);
    let lo = _mm256_and_si256(
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p)), 7),
        mask,
    );
    let hi = _mm256_and_si256(
        _mm256_slli_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(1))), 7),
        mask,
    );
    (
        _mm512_mul_ps(_mm512_cvtph_ps(lo), s),
        _mm512_mul_ps(_mm512_cvtph_ps(hi), s),
    )
}

/// FP8 blocks widened to f32 (32 values a block, as far as `dst` goes); see [`widen_f8`].
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn dequant_f8(src: &[crate::BlockF8], dst: &mut [f32]) {
    let whole = src.len().min(dst.len() / 32);
    let d = dst.as_mut_ptr();
    for (i, b) in src[..whole].iter().enumerate() {
        let (lo, hi) = widen_f8(b);
        _mm512_storeu_ps(d.add(i * 32), lo);
        _mm512_storeu_ps(d.add(i * 32 + 16), hi);
    }
    super::portable::dequant_f8(&src[whole..], &mut dst[whole * 32..]);
}

/// Blocks `c0 .. c0 + W` (columns `c0 * 32 ..`) of [`decode_tile_blocks`]'s `O = alpha O + P V`.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn pv_pass_blocks<B: crate::KvBlock, const R: usize, const W: usize>(
    c0: usize,
    p: &[[f32; DECODE_TILE]; R],
    alpha: &[f32; R],
    v: *const B,
    ld: usize,
    o: *mut f32,
    ldo: usize,
) {
    let mut acc = [[[_mm512_setzero_ps(); 2]; W]; R];
    for r in 0..R {
        let ar = _mm512_set1_ps(alpha[r]);
        for c in 0..W {
            for h in 0..2 {
                let at = o.add(r * ldo + (c0 + c) * 32 + h * 16);
                acc[r][c][h] = _mm512_mul_ps(_mm512_loadu_ps(at), ar);
            }
        }
    }
    for j in 0..DECODE_TILE {
        let mut vv = [[_mm512_setzero_ps(); 2]; W];
        for c in 0..W {
            let (lo, hi) = widen_block(v.add(j * ld + c0 + c));
            vv[c] = [lo, hi];
        }
        for r in 0..R {
            let pr = _mm512_set1_ps(p[r][j]);
            for c in 0..W {
                for h in 0..2 {
                    acc[r][c][h] = _mm512_fmadd_ps(pr, vv[c][h], acc[r][c][h]);
                }
            }
        }
    }
    for r in 0..R {
        for c in 0..W {
            for h in 0..2 {
                _mm512_storeu_ps(o.add(r * ldo + (c0 + c) * 32 + h * 16), acc[r][c][h]);
            }
        }
    }
}

/// [`reduce8`]'s butterfly, left in a vector: the sum of `v[j]` at lane
/// `[0, 4, 8, 12, 2, 6, 10, 14][j]`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce8_lanes(v: &[__m512; 8]) -> __m512 {
    let (x01, x23, x45, x67) = (
        fold_halves(v[0], v[1]),
        fold_halves(v[2], v[3]),
        fold_halves(v[4], v[5]),
        fold_halves(v[6], v[7]),
    );
    fold_pairs(fold_quarters(x01, x23), fold_quarters(x45, x67))
}

/// The last two butterfly steps on two [`fold_quarters`] results: their 64-bit halves of
/// each quarter folded (`a`'s to lanes 0-1, `b`'s to 2-3), then each lane with its
/// neighbour, so lanes `2i` and `2i + 1` hold the same sum.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fold_pairs(a: __m512, b: __m512) -> __m512 {
    let u = _mm512_add_ps(
        _mm512_shuffle_ps::<0x44>(a, b),
        _mm512_shuffle_ps::<0xEE>(a, b),
    );
    _mm512_add_ps(u, _mm512_permute_ps::<0xB1>(u))
}

/// [`reduce4`]'s butterfly, left in a vector: the sum of `v[j]` in every lane of quarter `j`.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn reduce4_lanes(v: &[__m512; 4]) -> __m512 {
    let y = fold_quarters(fold_halves(v[0], v[1]), fold_halves(v[2], v[3]));
    let u = _mm512_add_ps(y, _mm512_permute_ps::<0x4E>(y));
    _mm512_add_ps(u, _mm512_permute_ps::<0xB1>(u))
}

/// `vpermt2w` indices of [`transpose32_u16`]'s stage `b`: lanes whose bit `b` is clear keep
/// `a`'s, the others take `b`'s with that bit clear (`hi`: `a`'s with it set, `b`'s kept).
const fn swap_bit_index(b: u16, hi: bool) -> [u16; 32] {
    let mut x = [0u16; 32];
    let mut j = 0;
    while j < 32 {
        let jj = j as u16;
        x[j] = match (jj & b == 0, hi) {
            (true, false) => jj,
            (false, false) => 32 + jj - b,
            (true, true) => jj + b,
            (false, true) => 32 + jj,
        };
        j += 1;
    }
    x
}

const SWAP_INDEX: [[[u16; 32]; 2]; 5] = {
    let mut t = [[[0u16; 32]; 2]; 5];
    let mut s = 0;
    while s < 5 {
        t[s][0] = swap_bit_index(16 >> s, false);
        t[s][1] = swap_bit_index(16 >> s, true);
        s += 1;
    }
    t
};

/// `dst[c * lds + i] = src[i * lss + c]` for `i, c < 32`, 16-bit elements: 32 rows in
/// registers, then for each bit of the index the row and lane bits swapped where they differ
/// (two `vpermt2w` a pair of rows), five times.
///
/// # Safety
/// The CPU must have AVX-512F/BW; `src` valid for 32 rows of 32 elements at stride `lss`,
/// `dst` for 32 rows of 32 at stride `lds` (elements; no alignment needed).
#[target_feature(enable = "avx512f,avx512bw")]
pub unsafe fn transpose32_u16(src: *const u16, lss: usize, dst: *mut u16, lds: usize) {
    let mut r = [_mm512_setzero_si512(); 32];
    for (i, x) in r.iter_mut().enumerate() {
        *x = _mm512_loadu_si512(src.add(i * lss).cast());
    }
    for (s, idx) in SWAP_INDEX.iter().enumerate() {
        let b = 16 >> s;
        let (lo, hi) = (
            _mm512_loadu_si512(idx[0].as_ptr().cast()),
            _mm512_loadu_si512(idx[1].as_ptr().cast()),
        );
        for i in (0..32).filter(|i| i & b == 0) {
            let (x, y) = (r[i], r[i + b]);
            r[i] = _mm512_permutex2var_epi16(x, lo, y);
            r[i + b] = _mm512_permutex2var_epi16(x, hi, y);
        }
    }
    for (c, x) in r.iter().enumerate() {
        _mm512_storeu_si512(dst.add(c * lds).cast(), *x);
    }
}
