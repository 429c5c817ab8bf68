//! AVX2 + FMA versions of the attention's two hot loops, for CPUs without AVX-512 (Zen 2/3,
//! Intel before Ice Lake): a register-blocked f32 micro-kernel (6 rows x 16 columns, 12
//! accumulators of the 16 registers) and the online-softmax step with a vector exp2.
//! The plain-Rust loops compiled for AVX2 ran 11 GFLOP/s on Zen 3: a libm call per exp2 and
//! no fused multiply-adds (LLVM does not contract `a * b + c` on its own).

use std::arch::x86_64::*;

const MR: usize = 6;

/// Lanes of the 8-column vector starting at column `c0` that lie below `n`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn lanes_below(c0: usize, n: usize) -> __m256i {
    let r = n.saturating_sub(c0).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(r),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// `C[R, 8NV] (+)= A[R, k] * B[k, 8NV]`. Unless `WHOLE`, B is loaded under `mask` and the
/// lanes outside it are stored as zeros.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn kern<const R: usize, const NV: usize, const WHOLE: bool>(
    k: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    b: *const f32,
    ldb: usize,
    mask: [__m256i; 2],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; R];
    if accumulate {
        for (i, row) in acc.iter_mut().enumerate() {
            for (v, x) in row.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(c.add(i * ldc + v * 8));
            }
        }
    }
    for kk in 0..k {
        let bp = b.add(kk * ldb);
        let mut bv = [_mm256_setzero_ps(); NV];
        for (v, x) in bv.iter_mut().enumerate() {
            *x = if WHOLE {
                _mm256_loadu_ps(bp.add(v * 8))
            } else {
                _mm256_maskload_ps(bp.add(v * 8), mask[v])
            };
        }
        let ap = a.add(kk * aks);
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i * ars));
            for (x, bj) in row.iter_mut().zip(bv.iter()) {
                *x = _mm256_fmadd_ps(av, *bj, *x);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (v, x) in row.iter().enumerate() {
            let x = if WHOLE {
                *x
            } else {
                _mm256_and_ps(*x, _mm256_castsi256_ps(mask[v]))
            };
            _mm256_storeu_ps(c.add(i * ldc + v * 8), x);
        }
    }
}

/// Same contract as [`super::portable::gemm`]: columns `n..` up to the next multiple of 16
/// are written as zeros.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the pointers valid for the strides and sizes given.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
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
    for c0 in (0..n).step_by(16) {
        let whole = c0 + 16 <= n;
        let mask = [lanes_below(c0, n), lanes_below(c0 + 8, n)];
        let mut i = 0;
        while i < m {
            let r = MR.min(m - i);
            let (ap, bp, cp) = (a.add(i * ars), b.add(c0), c.add(i * ldc + c0));
            macro_rules! go {
                ($($r:literal),*) => {
                    match (r, whole) {
                        $(
                            ($r, true) => kern::<$r, 2, true>(k, ap, ars, aks, bp, ldb, mask, cp, ldc, accumulate),
                            ($r, false) => kern::<$r, 2, false>(k, ap, ars, aks, bp, ldb, mask, cp, ldc, accumulate),
                        )*
                        _ => unreachable!("row blocks hold 1..=MR rows"),
                    }
                };
            }
            go!(1, 2, 3, 4, 5, 6);
            i += r;
        }
    }
}

/// 2^x for x <= 0, to within about an f32 rounding; 0 below -126 and for -inf.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn exp2(x: __m256) -> __m256 {
    let x = _mm256_max_ps(x, _mm256_set1_ps(-127.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm256_sub_ps(x, n); // in [-0.5, 0.5]
    const C: [f32; 8] = super::EXP2_TAYLOR;
    let mut p = _mm256_set1_ps(C[7]);
    for &ci in C[..7].iter().rev() {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(ci));
    }
    // 2^n from its exponent bits; n = -127 gives the bits of 0.
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// Same contract as [`super::portable::softmax_tile`]; `ncols` must be a multiple of 8.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_tile(
    st: &mut [f32],
    kt: usize,
    ncols: usize,
    ld: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    assert!(ncols.is_multiple_of(8) && ncols <= ld && m.len() >= ncols && l.len() >= ncols);
    assert!(alpha.len() >= ncols && (kt == 0 || st.len() >= (kt - 1) * ld + ncols));
    let s = st.as_mut_ptr();
    let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
    for c0 in (0..ncols).step_by(8) {
        let mut mx = ninf;
        for j in 0..kt {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(s.add(j * ld + c0)));
        }
        let m_old = _mm256_loadu_ps(m.as_ptr().add(c0));
        let m_new = _mm256_max_ps(m_old, mx);
        // Columns with no unmasked key so far use 0 as reference: exp2(-inf) = 0, no NaN.
        let empty = _mm256_cmp_ps::<_CMP_EQ_OQ>(m_new, ninf);
        let mref = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), empty);
        let a = exp2(_mm256_sub_ps(m_old, mref));
        let mut sum = _mm256_setzero_ps();
        for j in 0..kt {
            let ptr = s.add(j * ld + c0);
            let p = exp2(_mm256_sub_ps(_mm256_loadu_ps(ptr), mref));
            _mm256_storeu_ps(ptr, p);
            sum = _mm256_add_ps(sum, p);
        }
        let l_old = _mm256_loadu_ps(l.as_ptr().add(c0));
        _mm256_storeu_ps(l.as_mut_ptr().add(c0), _mm256_fmadd_ps(l_old, a, sum));
        _mm256_storeu_ps(m.as_mut_ptr().add(c0), m_new);
        _mm256_storeu_ps(alpha.as_mut_ptr().add(c0), a);
    }
}

/// Eight consecutive elements widened to f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load8<T: super::RowElem>(p: *const T) -> __m256 {
    match T::f32_ptr(p) {
        Some(f) => _mm256_loadu_ps(f),
        None => {
            // bf16 bits: a shift into the top half of each lane.
            let h = _mm_loadu_si128(p.cast());
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
}

/// The sums of four vectors, in lanes 0..4.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn sum4(a: &[__m256; 4]) -> __m128 {
    let h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
}

/// Scores of `R` rows against keys `J` at a time (`J` of 1 or 4), the `R x J` accumulators
/// in registers, K loaded (and widened) once for the rows.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn dot_block<const R: usize, const J: usize, T: super::RowElem>(
    j0: usize,
    d: usize,
    q: *const f32,
    k: *const T,
    ldk: usize,
    st: *mut f32,
    ldst: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    for c in (0..d).step_by(8) {
        let mut kv = [_mm256_setzero_ps(); J];
        for j in 0..J {
            kv[j] = load8(k.add((j0 + j) * ldk + c));
        }
        for r in 0..R {
            let qv = _mm256_loadu_ps(q.add(r * d + c));
            for j in 0..J {
                acc[r][j] = _mm256_fmadd_ps(qv, kv[j], acc[r][j]);
            }
        }
    }
    for r in 0..R {
        let mut s = [0f32; 4];
        _mm_storeu_ps(s.as_mut_ptr(), sum4(&acc[r]));
        for j in 0..J {
            *st.add((j0 + j) * ldst + r) = s[j];
        }
    }
}

/// Same contract as [`super::portable::scores_dot`]; `d` must be a multiple of 8.
///
/// # Safety
/// The CPU must have AVX2 and FMA; the pointers valid for the sizes and strides given.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
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
    for j in 0..kt {
        for r in rows..16 {
            *st.add(j * ldst + r) = 0.0;
        }
    }
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(2);
        let (qr, sr) = (q.add(r * d), st.add(r));
        let mut j = 0;
        while j + 4 <= kt {
            match n {
                1 => dot_block::<1, 4, T>(j, d, qr, k, ldk, sr, ldst),
                _ => dot_block::<2, 4, T>(j, d, qr, k, ldk, sr, ldst),
            }
            j += 4;
        }
        while j < kt {
            match n {
                1 => dot_block::<1, 1, T>(j, d, qr, k, ldk, sr, ldst),
                _ => dot_block::<2, 1, T>(j, d, qr, k, ldk, sr, ldst),
            }
            j += 1;
        }
        r += n;
    }
}

/// `o[r, 0..d] += sum_j p[j * ldp + r] * v[j, 0..d]` for `R` rows, 16 columns a pass with
/// the `R x 2` accumulators in registers; `d` must be a multiple of 16.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `p` holds `kt` rows at stride `ldp`, `v` `kt` rows of `d`
/// at stride `ldv`, `o` `R` rows of `d` at stride `ldo`.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
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
    for c0 in (0..d).step_by(16) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for r in 0..R {
            for c in 0..2 {
                acc[r][c] = _mm256_loadu_ps(o.add(r * ldo + c0 + 8 * c));
            }
        }
        for j in 0..kt {
            let vr = v.add(j * ldv + c0);
            let vv = [load8(vr), load8(vr.add(8))];
            for r in 0..R {
                let pr = _mm256_broadcast_ss(&*p.add(j * ldp + r));
                for c in 0..2 {
                    acc[r][c] = _mm256_fmadd_ps(pr, vv[c], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..2 {
                _mm256_storeu_ps(o.add(r * ldo + c0 + 8 * c), acc[r][c]);
            }
        }
    }
}

/// Same contract as [`super::portable::axpy_rows`]: four rows of `B` a pass, so `y` is
/// loaded and stored once per four rows streamed.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `b` valid for `(x.len() - 1) * ld + n` elements, `y` for
/// `n`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn axpy_rows<T: super::RowElem>(
    y: &mut [f32],
    x: &[f32],
    b: *const T,
    ld: usize,
    n: usize,
) {
    let full = n / 8 * 8;
    let yp = y.as_mut_ptr();
    let mut r = 0;
    while r + 4 <= x.len() {
        let xs: [__m256; 4] = std::array::from_fn(|i| _mm256_set1_ps(x[r + i]));
        let rows: [*const T; 4] = std::array::from_fn(|i| b.add((r + i) * ld));
        let mut j = 0;
        while j < full {
            let mut acc = _mm256_loadu_ps(yp.add(j));
            for (xv, row) in xs.iter().zip(rows.iter()) {
                acc = _mm256_fmadd_ps(*xv, load8(row.add(j)), acc);
            }
            _mm256_storeu_ps(yp.add(j), acc);
            j += 8;
        }
        r += 4;
    }
    while r < x.len() {
        let (xv, row) = (_mm256_set1_ps(x[r]), b.add(r * ld));
        let mut j = 0;
        while j < full {
            let acc = _mm256_fmadd_ps(xv, load8(row.add(j)), _mm256_loadu_ps(yp.add(j)));
            _mm256_storeu_ps(yp.add(j), acc);
            j += 8;
        }
        r += 1;
    }
    for (rr, xr) in x.iter().enumerate() {
        for j in full..n {
            *yp.add(j) += xr * (*b.add(rr * ld + j)).to_f32();
        }
    }
}

/// Same contract as [`super::portable::widen_bf16`].
///
/// # Safety
/// The CPU must have AVX2.
#[target_feature(enable = "avx2")]
pub unsafe fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), load8(src.as_ptr().add(i)));
    }
    super::portable::widen_bf16(&src[full..n], &mut dst[full..n]);
}
