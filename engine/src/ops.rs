//! The dense ops of a forward pass on the CPU: linear layers (the kernels crate's matmul on
//! weights transposed once at load), RMSNorm, SwiGLU.

use crate::weights::Tensor;
use crate::Result;
use longctx_kernels::{matmul, matvec_bf16, QKind, QMatrix, Weight};

/// A linear layer without bias, its weight stored input-major (`[in, out]`), and optionally a
/// bf16 or a block-quantised copy that one-token (decode) products stream instead.
pub struct Linear {
    wt: Vec<f32>,
    wt_bf16: Option<Vec<u16>>,
    wt_q: Option<Box<QMatrix>>,
    /// The GGUF blocks this weight came from, until the quantised copy is made of them.
    blocks: Option<(QKind, Vec<u8>)>,
    pub inp: usize,
    pub out: usize,
}

impl Linear {
    /// From a Hugging Face `[out, in]` weight.
    pub fn from_out_in(t: Tensor) -> Linear {
        let (out, inp) = (t.shape[0], t.shape[1]);
        let mut wt = vec![0f32; out * inp];
        // Blocked transpose: both sides stay in cache.
        const B: usize = 64;
        for o0 in (0..out).step_by(B) {
            for i0 in (0..inp).step_by(B) {
                for o in o0..(o0 + B).min(out) {
                    for i in i0..(i0 + B).min(inp) {
                        wt[i * out + o] = t.data[o * inp + i];
                    }
                }
            }
        }
        Linear {
            wt,
            wt_bf16: None,
            wt_q: None,
            blocks: t.blocks,
            inp,
            out,
        }
    }

    /// Keeps a block-quantised copy for one-row products: the GGUF file's own blocks when
    /// the weight came in Q4_0 / Q4_1 / Q8_0, else the f32 weight quantised to 8 bits.
    pub fn enable_quant_decode(&mut self) -> Result<()> {
        let q = match self.blocks.take() {
            Some((kind, bytes)) => QMatrix::from_gguf(kind, &bytes, self.out, self.inp)?,
            None => {
                let mut w = vec![0f32; self.out * self.inp];
                for i in 0..self.inp {
                    for o in 0..self.out {
                        w[o * self.inp + i] = self.wt[i * self.out + o];
                    }
                }
                QMatrix::quantize_q8(&w, self.out, self.inp)?
            }
        };
        self.wt_q = Some(Box::new(q));
        Ok(())
    }

    /// Keeps a bf16 copy for one-row products (rounded to nearest even).
    pub fn enable_bf16_decode(&mut self) {
        self.wt_bf16 = Some(
            self.wt
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect(),
        );
    }

    /// The block-quantised copy, once [`Linear::enable_quant_decode`] made it.
    pub fn quant(&self) -> Option<&QMatrix> {
        self.wt_q.as_deref()
    }

    /// `y[m, out] = x[m, in] . W^T`.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        if let (1, Some(q)) = (m, &self.wt_q) {
            return Ok(q.gemv(x, y)?);
        }
        if let (1, Some(b)) = (m, &self.wt_bf16) {
            return Ok(matvec_bf16(x, b, self.out, y)?);
        }
        Ok(matmul(x, m, Weight::new(&self.wt, self.inp, self.out), y)?)
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
    fn linear_transposes_a_hugging_face_weight() {
        let mut rng = rand::rng();
        let (m, inp, out) = (3, 70, 130);
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let x: Vec<f32> = (0..m * inp).map(|_| rng.random_range(-1.0..1.0)).collect();
        let lin = Linear::from_out_in(Tensor::new(vec![out, inp], w.clone()));
        let mut y = vec![0f32; m * out];
        lin.forward(&x, m, &mut y).unwrap();
        for r in 0..m {
            for o in 0..out {
                let want: f64 = (0..inp)
                    .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                    .sum();
                assert!((y[r * out + o] as f64 - want).abs() < 1e-4);
            }
        }
    }
}
