//! The dense ops of a forward pass on the CPU: matrix products (the `gemm` crate's AVX-512
//! kernels), RMSNorm, SwiGLU.

/// A weight matrix as a product needs it: `out x inp`, stored either as Hugging Face linear
/// layers store it (`[out, inp]`, row-major) or transposed (`[inp, out]`, Llama 4's fused
/// experts), possibly as a column window of a wider matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub out: usize,
    pub inp: usize,
    /// Element `(o, i)` is at `o * out_stride + i * in_stride`.
    pub out_stride: usize,
    pub in_stride: usize,
}

impl<'a> MatRef<'a> {
    /// `[out, inp]` row-major.
    pub fn out_in(data: &'a [f32], out: usize, inp: usize) -> MatRef<'a> {
        assert_eq!(data.len(), out * inp, "weight of the wrong size");
        MatRef {
            data,
            out,
            inp,
            out_stride: inp,
            in_stride: 1,
        }
    }

    /// Columns `c0..c0 + out` of an `[inp, width]` row-major matrix.
    pub fn in_out(data: &'a [f32], inp: usize, width: usize, c0: usize, out: usize) -> MatRef<'a> {
        assert!(
            data.len() == inp * width && c0 + out <= width,
            "weight of the wrong size"
        );
        MatRef {
            data: &data[c0..],
            out,
            inp,
            out_stride: 1,
            in_stride: width,
        }
    }
}

/// `y[m, out] = x[m, inp] . W^T` (overwriting `y`).
pub fn matmul(x: &[f32], m: usize, w: MatRef, y: &mut [f32]) {
    let (k, n) = (w.inp, w.out);
    assert_eq!(x.len(), m * k, "matmul input");
    assert_eq!(y.len(), m * n, "matmul output");
    if m == 0 || n == 0 {
        return;
    }
    // The last element the strides reach must be inside the slice (MatRef's constructors
    // guarantee it; this keeps the unsafe call below honest).
    let last = (n - 1) * w.out_stride + (k - 1) * w.in_stride;
    assert!(last < w.data.len(), "weight strides outside the slice");
    let threads = rayon::current_num_threads();
    // SAFETY: dst is m x n with row stride n; lhs is m x k with row stride k; rhs (k x n) has
    // element (i, j) = W(j, i) at i * in_stride + j * out_stride, all within the slices as
    // checked above.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.data.as_ptr(),
            w.out_stride as isize,
            w.in_stride as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            if threads > 1 {
                gemm::Parallelism::Rayon(threads)
            } else {
                gemm::Parallelism::None
            },
        );
    }
}

/// RMSNorm of each row of `x` (`[rows, dim]`) into `y`: `x / sqrt(mean(x^2) + eps) * w`;
/// `w = None` is Llama 4's weightless QK-norm.
pub fn rms_norm(x: &[f32], w: Option<&[f32]>, eps: f32, dim: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let r = 1.0 / (ms + eps).sqrt();
        match w {
            Some(w) => {
                for ((o, v), g) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * g;
                }
            }
            None => {
                for (o, v) in yr.iter_mut().zip(xr) {
                    *o = v * r;
                }
            }
        }
    }
}

/// `gate = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn matmul_matches_a_naive_product_in_both_layouts() {
        let mut rng = rand::rng();
        let (m, k, n) = (7, 33, 19);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut y = vec![0f32; m * n];
        matmul(&x, m, MatRef::out_in(&w, n, k), &mut y);
        // The same weights stored [k, 2n] with ours in columns n..2n.
        let mut wt = vec![0f32; k * 2 * n];
        for o in 0..n {
            for i in 0..k {
                wt[i * 2 * n + n + o] = w[o * k + i];
            }
        }
        let mut y2 = vec![0f32; m * n];
        matmul(&x, m, MatRef::in_out(&wt, k, 2 * n, n, n), &mut y2);
        for r in 0..m {
            for o in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[o * k + i] as f64)
                    .sum();
                assert!((y[r * n + o] as f64 - want).abs() < 1e-4);
                assert!((y2[r * n + o] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
