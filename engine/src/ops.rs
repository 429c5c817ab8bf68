//! The dense ops of a forward pass on the CPU: linear layers (the kernels crate's products
//! straight from the stored weights), RMSNorm, SwiGLU.

use crate::weights::Tensor;
use crate::Result;
use longctx_kernels::{matmul, matmul_stored, matvec_bf16, Blob, QMatrix, StoredRows, Weight};

/// Which copies of its weights a model's products read (`Model::enable_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copies {
    /// The stored blocks, dequantised in tiles as they are multiplied.
    Stored,
    /// f32 copies, input-major: the exact path.
    F32,
    /// bf16 copies for one-row products, the stored blocks for prompts.
    Bf16Decode,
    /// Block-quantised copies times int8 activations: the fast path.
    Quant,
}

/// A linear layer without bias: its `[out, in]` weight as the file stores it (borrowing the
/// mapped file, in the file's format), multiplied straight from there, and optionally a bf16
/// or a block-quantised copy that one-token (decode) products stream instead.
pub struct Linear {
    w: Tensor,
    /// The exact path's f32 copy, input-major (what [`matmul`] reads at full speed).
    wt: Option<Vec<f32>>,
    wt_bf16: Option<Vec<u16>>,
    wt_q: Option<Box<QMatrix>>,
    pub inp: usize,
    pub out: usize,
}

impl Linear {
    /// From a Hugging Face `[out, in]` weight (rows of whole blocks, checked at load).
    pub fn from_out_in(t: Tensor) -> Result<Linear> {
        let (out, inp) = (t.shape[0], t.shape[1]);
        t.rows()?;
        Ok(Linear {
            w: t,
            wt: None,
            wt_bf16: None,
            wt_q: None,
            inp,
            out,
        })
    }

    /// The weight as the file stores it.
    pub fn stored(&self) -> &Tensor {
        &self.w
    }

    /// A new layer over the same stored bytes, with none of this one's copies.
    pub fn stored_copy(&self) -> Result<Linear> {
        Linear::from_out_in(self.w.clone())
    }

    /// Bytes of the copies this layer keeps beside the stored weight (f32, bf16, quantised).
    pub fn copy_bytes(&self) -> u64 {
        let f = self.wt.as_ref().map_or(0, |w| 4 * w.len());
        let b = self.wt_bf16.as_ref().map_or(0, |w| 2 * w.len());
        let q = self.wt_q.as_ref().map_or(0, |q| q.bytes());
        (f + b + q) as u64
    }

    /// Bytes a one-row (decode) product reads: the copy it streams, else the stored weight.
    pub fn row_read_bytes(&self) -> u64 {
        if let Some(q) = &self.wt_q {
            return q.bytes() as u64;
        }
        if let Some(b) = &self.wt_bf16 {
            return 2 * b.len() as u64;
        }
        match &self.wt {
            Some(w) => 4 * w.len() as u64,
            None => self.w.data.len() as u64,
        }
    }

    /// Whether some product reads the stored weight itself (no f32 or quantised copy: the
    /// bf16 copy serves one-row products only), so that its file pages stay in use.
    pub fn reads_stored(&self) -> bool {
        self.wt_q.is_none() && self.wt.is_none()
    }

    /// Prepares the copies that `copies` asks for.
    pub fn prepare(&mut self, copies: Copies) -> Result<()> {
        match copies {
            Copies::Stored => Ok(()),
            Copies::F32 => self.enable_f32(),
            Copies::Bf16Decode => self.enable_bf16_decode(),
            Copies::Quant => self.enable_quant_decode(),
        }
    }

    /// A float weight whose rows cannot be cut into the 8-bit blocks of 32 (a block format's
    /// rows always can: the file stores them so).
    fn unblockable(&self) -> bool {
        self.w.format.is_float() && !self.inp.is_multiple_of(32)
    }

    /// The stored weight's rows (an error once [`Linear::drop_stored`] freed them).
    fn rows(&self) -> Result<StoredRows<'_>> {
        self.w.rows()
    }

    /// Frees the stored weight where it is owned memory no product reads any more (a routed
    /// expert split from a fused checkpoint, once its quantised or f32 copies are made): a
    /// product that would still read it is then an error, never a misread.
    pub fn drop_stored(&mut self) {
        self.w.data = Blob::from_vec(Vec::new());
    }

    /// Keeps a block-quantised copy for one-row products ([`QMatrix::from_stored`]: the
    /// file's own blocks where the kernel reads them, else the nearest layout it does).
    /// A float weight whose rows are not whole blocks of 32 (a small model's odd width) keeps
    /// bf16 copies for one-row products instead, as the fast path's other bf16 products.
    pub fn enable_quant_decode(&mut self) -> Result<()> {
        if self.unblockable() {
            return self.enable_bf16_decode();
        }
        self.wt_q = Some(Box::new(QMatrix::from_stored(self.rows()?)?));
        // The fast path reads the repacked copy only: the file's pages need not stay too.
        self.w.data.release_pages();
        Ok(())
    }

    /// Keeps an f32 copy, input-major, for every product: the exact path's speed (products
    /// straight from the stored blocks dequantise as they go) at 4 bytes a weight.
    pub fn enable_f32(&mut self) -> Result<()> {
        let w = self.w.to_f32()?;
        let mut wt = vec![0f32; w.len()];
        // Blocked transpose: both sides stay in cache.
        const B: usize = 64;
        for o0 in (0..self.out).step_by(B) {
            for i0 in (0..self.inp).step_by(B) {
                for o in o0..(o0 + B).min(self.out) {
                    for i in i0..(i0 + B).min(self.inp) {
                        wt[i * self.out + o] = w[o * self.inp + i];
                    }
                }
            }
        }
        self.wt = Some(wt);
        Ok(())
    }

    /// Keeps a bf16 copy for one-row products (rounded to nearest even), input-major.
    pub fn enable_bf16_decode(&mut self) -> Result<()> {
        let w = self.w.to_f32()?;
        let mut t = vec![0u16; w.len()];
        for o in 0..self.out {
            for i in 0..self.inp {
                t[i * self.out + o] = half::bf16::from_f32(w[o * self.inp + i]).to_bits();
            }
        }
        self.wt_bf16 = Some(t);
        Ok(())
    }

    /// The block-quantised copy, once [`Linear::enable_quant_decode`] made it.
    pub fn quant(&self) -> Option<&QMatrix> {
        self.wt_q.as_deref()
    }

    /// Drops the block-quantised copy (once a stacked copy of it serves the products).
    pub fn drop_quant(&mut self) {
        self.wt_q = None;
    }

    /// `y[m, out] = x[m, in] . W^T`: from the block-quantised copy when there is one (the
    /// fast path), else the bf16 copy for one row, the f32 copy, or the stored blocks.
    pub fn forward(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<()> {
        if let Some(q) = self.wt_q.as_deref() {
            return Ok(q.gemm(x, m, y)?);
        }
        if let (1, Some(b)) = (m, &self.wt_bf16) {
            return Ok(matvec_bf16(x, b, self.out, y)?);
        }
        if let Some(wt) = &self.wt {
            return Ok(matmul(x, m, Weight::new(wt, self.inp, self.out), y)?);
        }
        Ok(matmul_stored(x, m, self.rows()?, y)?)
    }
}

/// RMSNorm of each row of `x` (`[rows, dim]`) into `y`: `x / sqrt(mean(x^2) + eps) * w`;
/// `w = None` is Llama 4's weightless QK-norm.
pub fn rms_norm(x: &[f32], w: Option<&[f32]>, eps: f32, dim: usize, y: &mut [f32]) {
    for (xr, yr) in x.chunks_exact(dim).zip(y.chunks_exact_mut(dim)) {
        let ms = sum_squares(xr) / dim as f32;
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

/// The sum of the squares of `x` in 16 running sums: one sum in order is a chain of
/// dependent adds (~0.6 us a 576-wide row, 3% of a 16-sequence decode step, serial).
fn sum_squares(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let tail: f32 = it.remainder().iter().map(|v| v * v).sum();
    acc.iter().sum::<f32>() + tail
}

/// RMSNorm without a weight, each row of `x` in place (Llama 4's QK-norm).
pub fn rms_norm_in_place(x: &mut [f32], eps: f32, dim: usize) {
    for r in x.chunks_exact_mut(dim) {
        let ms = sum_squares(r) / dim as f32;
        let s = 1.0 / (ms + eps).sqrt();
        r.iter_mut().for_each(|v| *v *= s);
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
        let lin = Linear::from_out_in(Tensor::new(vec![out, inp], w.clone())).unwrap();
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
