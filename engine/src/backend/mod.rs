//! The seam between the forward pass and where it computes: [`Backend`] is every operation
//! a Llama / Llama 4 step needs, on activations of the backend's own buffer type, so the
//! forward ([`crate::model`]) is written once; [`Cpu`] runs today's kernels.
//!
//! It lives in the engine, not the kernels crate as `../shared/DESIGN.md` sketched: a
//! projection takes the engine's [`Linear`] (the stored tensor and the copies the chosen
//! numeric path prepared) and attention reads the KV store, and neither crate may depend on
//! the engine or the KV store from below. A device backend keeps its uploaded copy of each
//! weight, uploaded once in its stored type, keyed by the weight.
//!
//! Buffers are sized once for the largest step ([`Workspace`]); ops are told how many rows
//! to use, so no step allocates activations.

pub mod check;
pub mod cpu;
pub mod cuda;
#[cfg(test)]
mod tests;

pub use cpu::Cpu;
pub use cuda::Cuda;

use crate::batch::Batch;
use crate::ops::Linear;
use crate::weights::Tensor;
use crate::Result;
use longctx_kernels::{Mask, QMatrix};
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::{Layout, Rope};
use std::ops::Range;

/// Everything a forward step computes with. Lengths are in f32 elements; every op reads and
/// writes only the prefix its sizes name, so one buffer serves steps of any size up to its
/// own.
pub trait Backend: Sync {
    /// Activations where the backend computes, in its own element type (the CPU's f32, a
    /// GPU's bf16); [`Backend::upload`] and [`Backend::download`] convert from and to f32.
    type Buf: Send;

    /// The relative error the backend's activations allow against a float64 reference (f32:
    /// 1e-5; 16-bit storage: 1e-2).
    fn tolerance(&self) -> f64;

    /// A buffer of `len` zeros.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// `buf[..host.len()] = host`.
    fn upload(&self, host: &[f32], buf: &mut Self::Buf) -> Result<()>;
    /// `host = buf[..host.len()]`.
    fn download(&self, buf: &Self::Buf, host: &mut [f32]) -> Result<()> {
        self.download_rows(buf, 0, host)
    }
    /// `host = buf[at..at + host.len()]`.
    fn download_rows(&self, buf: &Self::Buf, at: usize, host: &mut [f32]) -> Result<()>;

    /// `x[i] = table[tokens[i]]` (rows of the table's width), dequantised.
    fn embed(&self, table: &Tensor, tokens: &[u32], x: &mut Self::Buf) -> Result<()>;
    /// RMSNorm of `rows` rows of `dim` into `y` (`w` None: weightless, Llama 4's QK-norm).
    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: Option<&[f32]>,
        eps: f32,
        shape: (usize, usize),
        y: &mut Self::Buf,
    ) -> Result<()>;
    /// Weightless RMSNorm in place, rows of `dim`.
    fn rms_norm_in_place(&self, x: &mut Self::Buf, eps: f32, shape: (usize, usize)) -> Result<()>;
    /// `y[m, w.out] = x[m, w.inp] . W^T` from the copy the numeric path prepared.
    fn linear(&self, w: &Linear, x: &Self::Buf, m: usize, y: &mut Self::Buf) -> Result<()>;
    /// A stacked block-quantised product (Q|K|V or gate|up): `y[m, w.rows]`.
    fn stacked(&self, w: &QMatrix, x: &Self::Buf, m: usize, y: &mut Self::Buf) -> Result<()>;
    /// Splits `m` rows of `qd + 2 kd` (a stacked Q|K|V product) into q, k and v.
    #[allow(clippy::too_many_arguments)]
    fn split_qkv(
        &self,
        qkv: &Self::Buf,
        m: usize,
        widths: (usize, usize),
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[..len] = silu(gate) * up`.
    fn silu_mul(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        len: usize,
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[r] = silu(gu[r][..n]) * gu[r][n..]` for `m` rows of a stacked gate|up product.
    fn silu_mul_stacked(
        &self,
        gu: &Self::Buf,
        shape: (usize, usize),
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Rotates rows `rows` of `x` (`[tokens, heads, hd]`), row `rows.start + j` at position
    /// `pos0 + j`, by `rope`'s schedule for a sequence of `seq_len`.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        rows: Range<usize>,
        heads: (usize, usize),
        pos0: usize,
        rope: &Rope,
        seq_len: usize,
        layout: Layout,
    ) -> Result<()>;
    /// Multiplies row `row0 + j` (of `width`) by `scales[j]`.
    fn scale_rows(
        &self,
        x: &mut Self::Buf,
        width: usize,
        row0: usize,
        scales: &[f32],
    ) -> Result<()>;
    /// `y[..len] += x[..len]`.
    fn add(&self, y: &mut Self::Buf, x: &Self::Buf, len: usize) -> Result<()>;
    /// The first of `rows` rows of `width` holding a NaN or an infinity.
    fn non_finite_row(&self, x: &Self::Buf, shape: (usize, usize)) -> Result<Option<usize>>;
    /// `out[r] = x[picks[r].0] * picks[r].1` (rows of `width`): a MoE dispatch, or picking
    /// the rows whose logits are wanted.
    fn gather(
        &self,
        x: &Self::Buf,
        width: usize,
        picks: &[(usize, f32)],
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// `out[rows[r]] += y[r]` (rows of `width`): a MoE combine.
    fn scatter_add(
        &self,
        y: &Self::Buf,
        width: usize,
        rows: &[usize],
        out: &mut Self::Buf,
    ) -> Result<()>;
    /// Appends rows `rows` of `k` and `v` (rows of `kd`) to `seq`'s layer `layer`.
    #[allow(clippy::too_many_arguments)]
    fn append_kv(
        &self,
        store: &KvStore,
        seq: SeqId,
        layer: usize,
        k: &Self::Buf,
        v: &Self::Buf,
        rows: Range<usize>,
        kd: usize,
    ) -> Result<()>;
    /// Each entry's queries (rows `offs[i]..offs[i+1]` of `q`, `[rows, heads, hd]`) over its
    /// sequence's KV in layer `layer` (which already holds the step's keys), into `out`;
    /// `lse` gets each row and head's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        store: &KvStore,
        batch: &Batch,
        offs: &[usize],
        layer: usize,
        q: &Self::Buf,
        heads: (usize, usize),
        mask: Mask,
        prefetch: usize,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) -> Result<()>;
}

/// A step's activations, allocated once for steps of up to `rows` rows (and grown, never
/// per step, when a larger one comes).
pub struct Workspace<B: Backend> {
    pub rows: usize,
    /// The residual stream `[rows, hidden]`, a normed copy, a sublayer's output.
    pub x: B::Buf,
    pub normed: B::Buf,
    pub o: B::Buf,
    /// Attention: q `[rows, heads * hd]`, k and v `[rows, kv_heads * hd]`, a stacked Q|K|V,
    /// the attention output and its LSE.
    pub q: B::Buf,
    pub k: B::Buf,
    pub v: B::Buf,
    pub qkv: B::Buf,
    pub attn: B::Buf,
    pub lse: B::Buf,
    /// A feed-forward's intermediates (gate, up, and the SiLU product in `gate_up`).
    pub ffn: FfnScratch<B>,
    /// The router's logits, an expert's input and output rows.
    pub router: B::Buf,
    pub expert_in: B::Buf,
    pub expert_out: B::Buf,
    /// The logits of the wanted rows: `logit_rows` rows (one until a step wants more: a
    /// prompt's every row is a vocabulary each).
    pub logits: B::Buf,
    pub logit_rows: usize,
    /// Host scratch: the router's logits as top-k reads them, a row scale per token.
    pub host: Vec<f32>,
    pub scales: Vec<f32>,
}

/// An MLP's intermediates: gate, up, and a stacked gate|up (which also takes the SiLU
/// product of separate gate and up).
pub struct FfnScratch<B: Backend> {
    pub gate: B::Buf,
    pub up: B::Buf,
    pub gate_up: B::Buf,
}

/// The widths a workspace's buffers are sized by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Widths {
    pub hidden: usize,
    pub q: usize,
    pub kv: usize,
    pub heads: usize,
    /// The widest feed-forward intermediate (dense, shared or routed expert).
    pub inter: usize,
    pub experts: usize,
    pub vocab: usize,
}

impl<B: Backend> Workspace<B> {
    pub fn new(be: &B, w: Widths, rows: usize) -> Result<Workspace<B>> {
        let rows = rows.max(1);
        Ok(Workspace {
            rows,
            x: be.alloc(rows * w.hidden)?,
            normed: be.alloc(rows * w.hidden)?,
            o: be.alloc(rows * w.hidden)?,
            q: be.alloc(rows * w.q)?,
            k: be.alloc(rows * w.kv)?,
            v: be.alloc(rows * w.kv)?,
            qkv: be.alloc(rows * (w.q + 2 * w.kv))?,
            attn: be.alloc(rows * w.q)?,
            lse: be.alloc(rows * w.heads)?,
            ffn: FfnScratch {
                gate: be.alloc(rows * w.inter)?,
                up: be.alloc(rows * w.inter)?,
                gate_up: be.alloc(rows * 2 * w.inter)?,
            },
            router: be.alloc(rows * w.experts.max(1))?,
            expert_in: be.alloc(rows * w.hidden)?,
            expert_out: be.alloc(rows * w.hidden)?,
            logits: be.alloc(w.vocab)?,
            logit_rows: 1,
            host: vec![0f32; rows * w.experts],
            scales: Vec::with_capacity(rows),
        })
    }

    /// Room for `m` rows of logits.
    pub fn logits_for(&mut self, be: &B, m: usize, vocab: usize) -> Result<()> {
        if m > self.logit_rows {
            self.logits = be.alloc(m * vocab)?;
            self.logit_rows = m;
        }
        Ok(())
    }
}
