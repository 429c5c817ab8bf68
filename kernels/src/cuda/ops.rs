//! Host side of the small ops (RMSNorm, RoPE, SwiGLU, residual add, MoE gather/combine) and
//! the cuBLAS projections.

use super::source::Variant;
use super::{grid_x, narrow, Gpu, GpuElem, GpuError};
use crate::attention::check_len;
use crate::KernelError;
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};

const THREADS: u32 = 256;

/// One thread an element.
fn grid_for(op: &'static str, n: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (
            grid_x(op, "blocks", n.div_ceil(THREADS as usize).max(1))?,
            1,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// One block a row.
fn rows_cfg(op: &'static str, rows: usize) -> Result<LaunchConfig, GpuError> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(op, "rows", rows)?, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

impl Gpu {
    /// `y = x / rms(x) * w` per row of `n` (w None: weightless, Llama 4's QK-norm).
    pub fn rms_norm<T: GpuElem>(
        &self,
        x: &CudaView<T>,
        w: Option<&CudaSlice<T>>,
        y: &mut CudaViewMut<T>,
        n: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda rms_norm";
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("{} elements are not rows of {n}", x.len()),
            }
            .into());
        }
        check_len(OP, "y", x.len(), y.len())?;
        if let Some(w) = w {
            check_len(OP, "w", n, w.len())?;
        }
        let rows = x.len() / n;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "rms_norm")?;
        let (n_i, null): (i32, u64) = (narrow(OP, "n", n)?, 0);
        let cfg = rows_cfg(OP, rows)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x);
        match w {
            Some(w) => b.arg(w),
            None => b.arg(&null),
        };
        b.arg(y).arg(&n_i).arg(&eps);
        // SAFETY: matches rms_norm's signature; lengths checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Rotates `x: [tokens, heads, d]` in place, token `t` at `positions[t]`, by the angles
    /// `pos * inv_freq[i]` (`inv_freq.len()` = rotary dim / 2), times `factor` (YaRN's
    /// attention factor, else 1). `interleaved`: Llama 4's pairs; else rotate-half.
    #[allow(clippy::too_many_arguments)]
    pub fn rope<T: GpuElem>(
        &self,
        x: &mut CudaViewMut<T>,
        positions: &CudaSlice<i64>,
        inv_freq: &CudaSlice<f64>,
        heads: usize,
        d: usize,
        interleaved: bool,
        factor: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda rope";
        let tokens = positions.len();
        let half = inv_freq.len();
        check_len(OP, "x", tokens * heads * d, x.len())?;
        if 2 * half > d {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("rotary dim {} > head_dim {d}", 2 * half),
            }
            .into());
        }
        let total = tokens * heads * half;
        if total == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "rope_apply")?;
        let (t_i, h_i, d_i, half_i, il): (i32, i32, i32, i32, i32) = (
            narrow(OP, "tokens", tokens)?,
            narrow(OP, "heads", heads)?,
            narrow(OP, "head_dim", d)?,
            narrow(OP, "rotary dim / 2", half)?,
            interleaved as i32,
        );
        let cfg = grid_for(OP, total)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(positions).arg(inv_freq);
        b.arg(&t_i)
            .arg(&h_i)
            .arg(&d_i)
            .arg(&half_i)
            .arg(&il)
            .arg(&factor);
        // SAFETY: matches rope_apply's signature; lengths checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out[r] = silu(gate[r]) * up[r]` for `rows` rows of `n`, where `gu` holds each row's
    /// gate then up (`[rows, 2n]`, a fused projection's output).
    pub fn silu_mul<T: GpuElem>(
        &self,
        gu: &CudaView<T>,
        out: &mut CudaViewMut<T>,
        rows: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda silu_mul";
        check_len(OP, "gate_up", rows * 2 * n, gu.len())?;
        check_len(OP, "out", rows * n, out.len())?;
        if rows * n == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "silu_mul")?;
        let up = gu.slice(n..);
        let (r_i, n_i, ld): (i32, i32, i32) = (
            narrow(OP, "rows", rows)?,
            narrow(OP, "n", n)?,
            narrow(OP, "2n", 2 * n)?,
        );
        let cfg = grid_for(OP, rows * n)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(gu).arg(&up).arg(out).arg(&r_i).arg(&n_i).arg(&ld);
        // SAFETY: matches silu_mul's signature; the last up row ends at gu's end.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y += x`.
    pub fn add<T: GpuElem>(&self, y: &mut CudaViewMut<T>, x: &CudaView<T>) -> Result<(), GpuError> {
        const OP: &str = "cuda add";
        check_len(OP, "x", y.len(), x.len())?;
        if y.is_empty() {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "add_inplace")?;
        let cfg = grid_for(OP, y.len())?;
        let n: i64 = narrow(OP, "length", y.len())?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(y).arg(x).arg(&n);
        // SAFETY: matches add_inplace's signature.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// MoE dispatch: `out[j] = x[rows[j]] * scale[j]` (rows of `n`).
    pub fn moe_gather<T: GpuElem>(
        &self,
        x: &CudaView<T>,
        rows: &[i32],
        scale: Option<&[f32]>,
        out: &mut CudaViewMut<T>,
        n: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda moe_gather";
        check_len(OP, "out", rows.len() * n, out.len())?;
        let tokens = x.len().checked_div(n).unwrap_or(0);
        if let Some(r) = rows.iter().find(|&&r| r < 0 || r as usize >= tokens) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("row {r} outside the {tokens} tokens"),
            }
            .into());
        }
        if let Some(s) = scale {
            check_len(OP, "scale", rows.len(), s.len())?;
        }
        if rows.is_empty() || n == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "moe_gather")?;
        let rows_dev = self.stream.clone_htod(rows)?;
        let scale_dev = scale.map(|s| self.stream.clone_htod(s)).transpose()?;
        let (n_i, null): (i32, u64) = (narrow(OP, "n", n)?, 0);
        let cfg = rows_cfg(OP, rows.len())?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&rows_dev);
        match &scale_dev {
            Some(s) => b.arg(s),
            None => b.arg(&null),
        };
        b.arg(out).arg(&n_i);
        // SAFETY: matches moe_gather's signature; every row index checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// MoE combine: `y[t] += sum_k w[t, k] * e[slot[t, k]]` (slot -1: none), no atomics.
    pub fn moe_combine<T: GpuElem>(
        &self,
        e: &CudaView<T>,
        slot: &[i32],
        w: &[f32],
        top_k: usize,
        y: &mut CudaViewMut<T>,
        n: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda moe_combine";
        let tokens = y.len().checked_div(n).unwrap_or(0);
        check_len(OP, "slot", tokens * top_k, slot.len())?;
        check_len(OP, "w", tokens * top_k, w.len())?;
        let slots = e.len().checked_div(n).unwrap_or(0);
        if let Some(s) = slot.iter().find(|&&s| s >= 0 && s as usize >= slots) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("slot {s} outside the {slots} expert rows"),
            }
            .into());
        }
        if tokens == 0 || top_k == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "moe_combine")?;
        let slot_dev = self.stream.clone_htod(slot)?;
        let w_dev = self.stream.clone_htod(w)?;
        let (k_i, n_i): (i32, i32) = (narrow(OP, "top_k", top_k)?, narrow(OP, "n", n)?);
        let cfg = rows_cfg(OP, tokens)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(e)
            .arg(&slot_dev)
            .arg(&w_dev)
            .arg(y)
            .arg(&k_i)
            .arg(&n_i);
        // SAFETY: matches moe_combine's signature; every slot checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `out[r] = silu(gate[r]) * up[r]` for `rows` rows of `n` from separate buffers.
    pub fn silu_mul_pair<T: GpuElem>(
        &self,
        gate: &CudaView<T>,
        up: &CudaView<T>,
        out: &mut CudaViewMut<T>,
        rows: usize,
        n: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda silu_mul";
        check_len(OP, "gate", rows * n, gate.len())?;
        check_len(OP, "up", rows * n, up.len())?;
        check_len(OP, "out", rows * n, out.len())?;
        if rows * n == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "silu_mul")?;
        let (r_i, n_i): (i32, i32) = (narrow(OP, "rows", rows)?, narrow(OP, "n", n)?);
        let cfg = grid_for(OP, rows * n)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(gate).arg(up).arg(out).arg(&r_i).arg(&n_i).arg(&n_i);
        // SAFETY: matches silu_mul's signature (rows `n` apart); lengths checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x[r] = x[r] / rms(x[r])` in place, rows of `n`.
    pub fn rms_norm_in_place<T: GpuElem>(
        &self,
        x: &mut CudaViewMut<T>,
        n: usize,
        eps: f32,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda rms_norm_inplace";
        if n == 0 || !x.len().is_multiple_of(n) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("{} elements are not rows of {n}", x.len()),
            }
            .into());
        }
        let rows = x.len() / n;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "rms_norm_inplace")?;
        let n_i: i32 = narrow(OP, "n", n)?;
        let cfg = rows_cfg(OP, rows)?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&n_i).arg(&eps);
        // SAFETY: matches rms_norm_inplace's signature; whole rows checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x[r] *= scale[r]`, rows of `n`.
    pub fn scale_rows<T: GpuElem>(
        &self,
        x: &mut CudaViewMut<T>,
        scale: &[f32],
        n: usize,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda scale_rows";
        check_len(OP, "x", scale.len() * n, x.len())?;
        if scale.is_empty() || n == 0 {
            return Ok(());
        }
        let f = self.function(Variant::ops(T::DTYPE), "scale_rows")?;
        let s = self.stream.clone_htod(scale)?;
        let n_i: i32 = narrow(OP, "n", n)?;
        let cfg = rows_cfg(OP, scale.len())?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(x).arg(&s).arg(&n_i);
        // SAFETY: matches scale_rows's signature; lengths checked.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// A projection through cuBLAS: `y[m, n] = x[m, k] . w^T` with `w` `[n, k]` (Hugging
    /// Face's Linear layout), f32 accumulation.
    pub fn linear<T: GpuElem>(
        &self,
        x: &CudaView<T>,
        w: &CudaView<T>,
        y: &mut CudaViewMut<T>,
        (m, k, n): (usize, usize, usize),
    ) -> Result<(), GpuError>
    where
        cudarc::cublas::CudaBlas: Gemm<T>,
    {
        const OP: &str = "cuda linear";
        check_len(OP, "x", m * k, x.len())?;
        check_len(OP, "w", n * k, w.len())?;
        check_len(OP, "y", m * n, y.len())?;
        if m * n == 0 {
            return Ok(());
        }
        // Row-major y = x w^T is column-major y^T = w^T' x^T': A = w (k x n, transposed),
        // B = x (k x m), C = y^T (n x m).
        let (m_i, k_i, n_i): (i32, i32, i32) = (
            narrow(OP, "m", m)?,
            narrow(OP, "k", k)?,
            narrow(OP, "n", n)?,
        );
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n_i,
            n: m_i,
            k: k_i,
            alpha: T::from_f32(1.0),
            lda: k_i,
            ldb: k_i,
            beta: T::from_f32(0.0),
            ldc: n_i,
        };
        // SAFETY: dimensions and lengths checked above.
        unsafe { self.blas()?.gemm(cfg, w, x, y) }.map_err(|e| GpuError::Blas(e.to_string()))
    }
}
