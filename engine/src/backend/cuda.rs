//! The CUDA backend, first version: activations in bf16 on the GPU with f32 arithmetic in
//! the kernels (`kernels/src/cuda/`); each weight uploaded once as bf16 (dequantised from its
//! stored type) and kept while the backend lives; projections through cuBLAS.
//!
//! What it does not do yet, and how it stands in: the KV stays in the host KV store (append
//! copies the step's K and V rows to the host; attention copies q to the host, runs the CPU
//! kernel over the store and copies the result back), block-format weights are not
//! multiplied in their blocks (bf16 copies, 2 bytes a weight), stacked CPU copies are not
//! read (prepare the model with stored weights only), and the finite check reads the
//! residual stream back. It has not run on a GPU yet: the op test body and
//! `longctx bench gpu`'s whole-model rows check it where one is present.
//!
//! One backend per model: weights are keyed by the address of their stored bytes, which
//! stay put for the model's life (routed experts made on demand under an expert budget are
//! refused, since their copies come and go).

use super::Backend;
use crate::batch::Batch;
use crate::ops::Linear;
use crate::weights::Tensor;
use crate::{EngineError, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use longctx_kernels::cuda::{Gpu, GpuError};
use longctx_kernels::{Mask, QMatrix};
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::{Layout, Rope};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Uploaded weights by (address, length) of the host bytes they came from.
type Uploaded = HashMap<(usize, usize), Arc<CudaSlice<bf16>>>;

/// A GPU and the weights uploaded to it.
pub struct Cuda {
    gpu: Gpu,
    weights: Mutex<Uploaded>,
}

/// A driver call's error as the engine's.
fn drv<T>(r: std::result::Result<T, cudarc::driver::DriverError>) -> Result<T> {
    r.map_err(|e| EngineError::Gpu(GpuError::from(e)))
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|v| bf16::from_f32(*v)).collect()
}

fn short(op: &'static str, len: usize, have: usize) -> EngineError {
    EngineError::Batch(format!(
        "{op}: a buffer of {have} values where {len} are needed"
    ))
}

fn fits(op: &'static str, buf: &CudaSlice<bf16>, len: usize) -> Result<()> {
    if buf.len() < len {
        return Err(short(op, len, buf.len()));
    }
    Ok(())
}

impl Cuda {
    /// Opens GPU `ordinal` (PTX cached in `cache_dir`).
    pub fn new(ordinal: usize, cache_dir: Option<std::path::PathBuf>) -> Result<Cuda> {
        Ok(Cuda {
            gpu: Gpu::new(ordinal, cache_dir)?,
            weights: Mutex::new(HashMap::new()),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The bf16 copy of the host values at `key`, made by `make` on first use.
    fn weight(
        &self,
        key: (usize, usize),
        make: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<Arc<CudaSlice<bf16>>> {
        let mut map = self.weights.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = map.get(&key) {
            return Ok(w.clone());
        }
        let host = make()?;
        let dev = Arc::new(drv(self.gpu.stream().clone_htod(&to_bf16(&host)))?);
        map.insert(key, dev.clone());
        Ok(dev)
    }

    fn vector(&self, v: &[f32]) -> Result<Arc<CudaSlice<bf16>>> {
        self.weight((v.as_ptr() as usize, v.len()), || Ok(v.to_vec()))
    }

    fn matrix(&self, t: &Tensor) -> Result<Arc<CudaSlice<bf16>>> {
        let rows = t.rows()?;
        let key = (rows.bytes.as_ptr() as usize, rows.bytes.len());
        self.weight(key, || t.to_f32())
    }

    fn host(&self, buf: &CudaSlice<bf16>, range: Range<usize>) -> Result<Vec<f32>> {
        fits("download", buf, range.end)?;
        let mut h = vec![bf16::ZERO; range.len()];
        if !range.is_empty() {
            drv(self
                .gpu
                .stream()
                .memcpy_dtoh(&buf.slice(range), h.as_mut_slice()))?;
        }
        Ok(h.iter().map(|v| v.to_f32()).collect())
    }

    fn unsupported(what: &str) -> EngineError {
        EngineError::Unsupported(format!("the CUDA backend does not {what} yet"))
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<bf16>;

    fn tolerance(&self) -> f64 {
        1e-2
    }

    fn alloc(&self, len: usize) -> Result<CudaSlice<bf16>> {
        // The driver allocates no empty buffer.
        drv(self.gpu.stream().alloc_zeros::<bf16>(len.max(1)))
    }

    fn upload(&self, host: &[f32], buf: &mut CudaSlice<bf16>) -> Result<()> {
        fits("upload", buf, host.len())?;
        if !host.is_empty() {
            let h = to_bf16(host);
            drv(self
                .gpu
                .stream()
                .memcpy_htod(h.as_slice(), &mut buf.slice_mut(..host.len())))?;
        }
        Ok(())
    }

    fn download_rows(&self, buf: &CudaSlice<bf16>, at: usize, host: &mut [f32]) -> Result<()> {
        host.copy_from_slice(&self.host(buf, at..at + host.len())?);
        Ok(())
    }

    fn embed(&self, table: &Tensor, tokens: &[u32], x: &mut CudaSlice<bf16>) -> Result<()> {
        let rows = table.rows()?;
        let h = rows.cols;
        let mut host = vec![0f32; tokens.len() * h];
        for (row, &t) in host.chunks_exact_mut(h).zip(tokens) {
            let t = t as usize;
            if t >= rows.rows {
                return Err(EngineError::Tokenizer(format!(
                    "token id {t} outside the vocabulary of {}",
                    rows.rows
                )));
            }
            rows.dequantize_row(t, row);
        }
        self.upload(&host, x)
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<bf16>,
        w: Option<&[f32]>,
        eps: f32,
        (rows, dim): (usize, usize),
        y: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let len = rows * dim;
        fits("rms_norm", x, len)?;
        fits("rms_norm", y, len)?;
        let w = w.map(|w| self.vector(w)).transpose()?;
        self.gpu.rms_norm(
            &x.slice(..len),
            w.as_deref(),
            &mut y.slice_mut(..len),
            dim,
            eps,
        )?;
        Ok(())
    }

    fn rms_norm_in_place(
        &self,
        x: &mut CudaSlice<bf16>,
        eps: f32,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        fits("rms_norm", x, rows * dim)?;
        self.gpu
            .rms_norm_in_place(&mut x.slice_mut(..rows * dim), dim, eps)?;
        Ok(())
    }

    fn linear(
        &self,
        w: &Linear,
        x: &CudaSlice<bf16>,
        m: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        fits("linear", x, m * w.inp)?;
        fits("linear", y, m * w.out)?;
        let wd = self.matrix(w.stored())?;
        self.gpu.linear(
            &x.slice(..m * w.inp),
            &wd.as_view(),
            &mut y.slice_mut(..m * w.out),
            (m, w.inp, w.out),
        )?;
        Ok(())
    }

    fn stacked(
        &self,
        _w: &QMatrix,
        _x: &CudaSlice<bf16>,
        _m: usize,
        _y: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        Err(Self::unsupported(
            "multiply the CPU's stacked block copies (load the model with stored weights only)",
        ))
    }

    fn split_qkv(
        &self,
        _qkv: &CudaSlice<bf16>,
        _m: usize,
        _widths: (usize, usize),
        _q: &mut CudaSlice<bf16>,
        _k: &mut CudaSlice<bf16>,
        _v: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        Err(Self::unsupported("split a stacked Q|K|V product"))
    }

    fn silu_mul(
        &self,
        gate: &CudaSlice<bf16>,
        up: &CudaSlice<bf16>,
        len: usize,
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        fits("silu_mul", gate, len)?;
        fits("silu_mul", up, len)?;
        fits("silu_mul", out, len)?;
        self.gpu.silu_mul_pair(
            &gate.slice(..len),
            &up.slice(..len),
            &mut out.slice_mut(..len),
            1,
            len,
        )?;
        Ok(())
    }

    fn silu_mul_stacked(
        &self,
        gu: &CudaSlice<bf16>,
        (m, n): (usize, usize),
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        fits("silu_mul", gu, m * 2 * n)?;
        fits("silu_mul", out, m * n)?;
        self.gpu
            .silu_mul(&gu.slice(..m * 2 * n), &mut out.slice_mut(..m * n), m, n)?;
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<bf16>,
        rows: Range<usize>,
        (heads, hd): (usize, usize),
        pos0: usize,
        rope: &Rope,
        seq_len: usize,
        layout: Layout,
    ) -> Result<()> {
        let w = heads * hd;
        fits("rope", x, rows.end * w)?;
        if rows.is_empty() {
            return Ok(());
        }
        let s = self.gpu.stream();
        let pos: Vec<i64> = (0..rows.len()).map(|j| (pos0 + j) as i64).collect();
        let pos = drv(s.clone_htod(&pos))?;
        let inv = drv(s.clone_htod(&rope.inv_freq(seq_len)))?;
        self.gpu.rope(
            &mut x.slice_mut(rows.start * w..rows.end * w),
            &pos,
            &inv,
            heads,
            hd,
            layout == Layout::Interleaved,
            rope.attention_factor() as f32,
        )?;
        Ok(())
    }

    fn scale_rows(
        &self,
        x: &mut CudaSlice<bf16>,
        width: usize,
        row0: usize,
        scales: &[f32],
    ) -> Result<()> {
        let end = (row0 + scales.len()) * width;
        fits("scale_rows", x, end)?;
        self.gpu
            .scale_rows(&mut x.slice_mut(row0 * width..end), scales, width)?;
        Ok(())
    }

    fn add(&self, y: &mut CudaSlice<bf16>, x: &CudaSlice<bf16>, len: usize) -> Result<()> {
        fits("add", y, len)?;
        fits("add", x, len)?;
        self.gpu.add(&mut y.slice_mut(..len), &x.slice(..len))?;
        Ok(())
    }

    fn non_finite_row(
        &self,
        x: &CudaSlice<bf16>,
        (rows, width): (usize, usize),
    ) -> Result<Option<usize>> {
        let h = self.host(x, 0..rows * width)?;
        Ok(h.chunks(width.max(1))
            .position(|r| r.iter().any(|v| !v.is_finite())))
    }

    fn gather(
        &self,
        x: &CudaSlice<bf16>,
        width: usize,
        picks: &[(usize, f32)],
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        fits("gather", out, picks.len() * width)?;
        let rows: Vec<i32> = picks
            .iter()
            .map(|(r, _)| i32::try_from(*r).map_err(|_| short("gather", *r, i32::MAX as usize)))
            .collect::<Result<_>>()?;
        let scale: Vec<f32> = picks.iter().map(|(_, s)| *s).collect();
        let used = x.len() / width.max(1) * width;
        self.gpu.moe_gather(
            &x.slice(..used),
            &rows,
            Some(&scale),
            &mut out.slice_mut(..picks.len() * width),
            width,
        )?;
        Ok(())
    }

    fn scatter_add(
        &self,
        y: &CudaSlice<bf16>,
        width: usize,
        rows: &[usize],
        out: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        fits("scatter_add", y, rows.len() * width)?;
        let Some(&last) = rows.iter().max() else {
            return Ok(());
        };
        let tokens = last + 1;
        fits("scatter_add", out, tokens * width)?;
        // One combine pass per repeat of a row (none in a MoE step: a token meets each
        // expert once), each slot -1 where a row gets nothing.
        let mut done = vec![false; rows.len()];
        while done.iter().any(|d| !d) {
            let mut slot = vec![-1i32; tokens];
            for (j, &r) in rows.iter().enumerate() {
                if !done[j] && slot[r] < 0 {
                    slot[r] = j as i32;
                    done[j] = true;
                }
            }
            self.gpu.moe_combine(
                &y.slice(..rows.len() * width),
                &slot,
                &vec![1.0; tokens],
                1,
                &mut out.slice_mut(..tokens * width),
                width,
            )?;
        }
        Ok(())
    }

    fn append_kv(
        &self,
        store: &KvStore,
        seq: SeqId,
        layer: usize,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
        rows: Range<usize>,
        kd: usize,
    ) -> Result<()> {
        let span = rows.start * kd..rows.end * kd;
        let (kh, vh) = (self.host(k, span.clone())?, self.host(v, span)?);
        super::cpu::append_kv(store, seq, layer, &kh, &vh)
    }

    fn attend(
        &self,
        store: &KvStore,
        batch: &Batch,
        offs: &[usize],
        layer: usize,
        q: &CudaSlice<bf16>,
        (heads, hd): (usize, usize),
        mask: Mask,
        prefetch: usize,
        out: &mut CudaSlice<bf16>,
        lse: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let n = *offs.last().unwrap_or(&0);
        let qh = self.host(q, 0..n * heads * hd)?;
        let mut oh = vec![0f32; n * heads * hd];
        let mut lh = vec![0f32; n * heads];
        super::cpu::attend_entries(
            store,
            batch,
            offs,
            layer,
            &qh,
            (heads, hd),
            mask,
            prefetch,
            &mut oh,
            &mut lh,
        )?;
        self.upload(&oh, out)?;
        self.upload(&lh, lse)
    }
}
