//! Portable versions of the attention inner loops: plain Rust that LLVM vectorises, compiled
//! once for the baseline target and once with AVX2 + FMA enabled.

/// `c[m, n] (+)= sum_k a[i*ars + k*aks] * b[k*ldb + j]`, for `j < n`. The columns of `c` past
/// `n` up to the next multiple of 16 are written as zeros (callers size `ldc` for that).
///
/// # Safety
/// The pointers must be valid for the strides and sizes given.
#[inline(always)]
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
    const NB: usize = 16;
    const MR: usize = 4;
    let mut j0 = 0;
    while j0 < n {
        let nw = NB.min(n - j0);
        let mut i0 = 0;
        while i0 < m {
            let mr = MR.min(m - i0);
            let mut acc = [[0f32; NB]; MR];
            if accumulate {
                for (i, row) in acc.iter_mut().enumerate().take(mr) {
                    for (jj, x) in row.iter_mut().enumerate().take(nw) {
                        *x = *c.add((i0 + i) * ldc + j0 + jj);
                    }
                }
            }
            for kk in 0..k {
                let mut bv = [0f32; NB];
                for (jj, x) in bv.iter_mut().enumerate().take(nw) {
                    *x = *b.add(kk * ldb + j0 + jj);
                }
                for (i, row) in acc.iter_mut().enumerate().take(mr) {
                    let av = *a.add((i0 + i) * ars + kk * aks);
                    for (x, bj) in row.iter_mut().zip(bv.iter()) {
                        *x += av * bj;
                    }
                }
            }
            for (i, row) in acc.iter().enumerate().take(mr) {
                for (jj, x) in row.iter().enumerate() {
                    *c.add((i0 + i) * ldc + j0 + jj) = if jj < nw { *x } else { 0.0 };
                }
            }
            i0 += mr;
        }
        j0 += NB;
    }
}

/// One online-softmax step over a score tile stored key-major: `st[j * ld + col]` for
/// `j < kt`, `col < ncols`. Scores are in log2 units. Updates the running max `m` and sum `l`
/// per column, replaces the scores by `2^(s - m)` and writes each column's rescale factor.
#[inline(always)]
pub fn softmax_tile(
    st: &mut [f32],
    kt: usize,
    ncols: usize,
    ld: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    let mut mx = vec![f32::NEG_INFINITY; ncols];
    for j in 0..kt {
        for (x, s) in mx.iter_mut().zip(&st[j * ld..j * ld + ncols]) {
            *x = x.max(*s);
        }
    }
    let mut mref = vec![0f32; ncols];
    for c in 0..ncols {
        let m_new = m[c].max(mx[c]);
        // A column that has seen no unmasked key yet keeps m = -inf; 0 as its reference
        // gives exp2(-inf) = 0 instead of NaN.
        mref[c] = if m_new == f32::NEG_INFINITY {
            0.0
        } else {
            m_new
        };
        alpha[c] = (m[c] - mref[c]).exp2();
        m[c] = m_new;
    }
    let mut sum = vec![0f32; ncols];
    for j in 0..kt {
        let row = &mut st[j * ld..j * ld + ncols];
        for c in 0..ncols {
            let p = (row[c] - mref[c]).exp2();
            row[c] = p;
            sum[c] += p;
        }
    }
    for c in 0..ncols {
        l[c] = l[c] * alpha[c] + sum[c];
    }
}

/// Scores by dot products, for few rows: `st[j * ldst + r] = q[r, :] . k[j, :]` for
/// `r < rows`, `j < kt`; columns `rows..16` of `st` are set to 0. `q` is `[rows, d]`, `k`
/// has rows of `d` values at stride `ldk`.
///
/// # Safety
/// The pointers must be valid for the sizes and strides given; `rows <= 16 <= ldst`.
#[inline(always)]
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
    // K widened a chunk at a time (any d: the exact path's one-row product passes whole
    // weight rows of thousands).
    const CH: usize = 256;
    let mut kbuf = [0f32; CH];
    for j in 0..kt {
        let mut acc = [[0f32; 8]; 16];
        for c0 in (0..d).step_by(CH) {
            let n = CH.min(d - c0);
            let src = std::slice::from_raw_parts(k.add(j * ldk + c0), n);
            for (x, y) in kbuf.iter_mut().zip(src) {
                *x = y.to_f32();
            }
            let kr = &kbuf[..n];
            for (r, a) in acc.iter_mut().enumerate().take(rows) {
                let qr = std::slice::from_raw_parts(q.add(r * d + c0), n);
                // Eight partial sums so the loop vectorises (d is a multiple of 8 here; a
                // tail is summed alone).
                let (qc, kc) = (qr.chunks_exact(8), kr.chunks_exact(8));
                let (qt, kt_) = (qc.remainder(), kc.remainder());
                for (qc, kc) in qc.zip(kc) {
                    for i in 0..8 {
                        a[i] += qc[i] * kc[i];
                    }
                }
                for (x, y) in qt.iter().zip(kt_) {
                    a[0] += x * y;
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            *st.add(j * ldst + r) = if r < rows { a.iter().sum() } else { 0.0 };
        }
    }
}

/// bf16 bit patterns widened to f32 (a shift into the top half).
#[inline(always)]
pub fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((*s as u32) << 16);
    }
}

/// q8 blocks widened to f32, `scale * q`, 32 values a block (as far as `dst` goes).
pub fn dequant_q8(src: &[crate::kvq8::BlockQ8], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_mut(32)) {
        for (o, q) in out.iter_mut().zip(&b.qs) {
            *o = b.scale * *q as f32;
        }
    }
}

/// FP8 blocks widened to f32, `e4m3(q) * 2^scale`, 32 values a block (as far as `dst` goes);
/// through f16 as the AVX-512 loop, so both give the same bits.
pub fn dequant_f8(src: &[crate::kvf8::BlockF8], dst: &mut [f32]) {
    for (b, out) in src.iter().zip(dst.chunks_mut(32)) {
        let s = b.f16_factor();
        for (o, q) in out.iter_mut().zip(&b.qs) {
            *o = half::f16::from_bits(crate::kvf8::e4m3_as_f16_bits(*q)).to_f32() * s;
        }
    }
}

/// Same contract as [`super::avx512::axpy_rows`], any CPU.
///
/// # Safety
/// `b` must be valid for `(x.len() - 1) * ld + n` elements; `y.len() >= n`.
pub unsafe fn axpy_rows<T: super::RowElem>(
    y: &mut [f32],
    x: &[f32],
    b: *const T,
    ld: usize,
    n: usize,
) {
    for (r, xr) in x.iter().enumerate() {
        let row = std::slice::from_raw_parts(b.add(r * ld), n);
        for (yj, bj) in y[..n].iter_mut().zip(row) {
            *yj += xr * bj.to_f32();
        }
    }
}

/// `out = e^((x - shift) / div)`, libm's `expf`; equal lengths.
pub fn exp_scaled_into(out: &mut [f32], x: &[f32], shift: f32, div: f32) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = ((*v - shift) / div).exp();
    }
}

/// `out = SiLU(gate) * up`, libm's `expf`; equal lengths.
pub fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = *g / (1.0 + (-*g).exp()) * u;
    }
}
