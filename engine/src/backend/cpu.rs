//! The CPU backend: today's kernels (the block-quantised, bf16 and f32 products, the CPU
//! flash attention over the KV store's tiers), on `Vec<f32>` activations.

use super::Backend;
use crate::batch::{Batch, Entry};
use crate::ops::{rms_norm, rms_norm_in_place, Linear};
use crate::weights::Tensor;
use crate::{EngineError, Result};
use longctx_kernels::{AttnParams, BlockF8, BlockQ8, DType, Mask, QMatrix};
use longctx_kvstore::{attend, attend_blocks, KvStore, SeqId, StreamOptions};
use longctx_rope::{Layout, Rope};
use rayon::prelude::*;
use std::ops::Range;

/// The CPU backend (its threads are rayon's pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// `buf[..len]`, or an error naming the op when the buffer is shorter (a workspace sized
/// for fewer rows).
fn prefix<'a>(op: &'static str, buf: &'a [f32], len: usize) -> Result<&'a [f32]> {
    buf.get(..len).ok_or_else(|| short(op, len, buf.len()))
}

fn prefix_mut<'a>(op: &'static str, buf: &'a mut [f32], len: usize) -> Result<&'a mut [f32]> {
    let have = buf.len();
    buf.get_mut(..len).ok_or_else(|| short(op, len, have))
}

fn short(op: &'static str, len: usize, have: usize) -> EngineError {
    EngineError::Batch(format!(
        "{op}: a buffer of {have} values where {len} are needed"
    ))
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn tolerance(&self) -> f64 {
        1e-5
    }

    fn alloc(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0f32; len])
    }

    fn upload(&self, host: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        prefix_mut("upload", buf, host.len())?.copy_from_slice(host);
        Ok(())
    }

    fn download_rows(&self, buf: &Vec<f32>, at: usize, host: &mut [f32]) -> Result<()> {
        host.copy_from_slice(&prefix("download", buf, at + host.len())?[at..]);
        Ok(())
    }

    fn embed(&self, table: &Tensor, tokens: &[u32], x: &mut Vec<f32>) -> Result<()> {
        let rows = table.rows()?;
        let (vocab, h) = (rows.rows, rows.cols);
        let x = prefix_mut("embed", x, tokens.len() * h)?;
        for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
            let t = t as usize;
            if t >= vocab {
                return Err(EngineError::Tokenizer(format!(
                    "token id {t} outside the vocabulary of {vocab}"
                )));
            }
            rows.dequantize_row(t, row);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        w: Option<&[f32]>,
        eps: f32,
        (rows, dim): (usize, usize),
        y: &mut Vec<f32>,
    ) -> Result<()> {
        let x = prefix("rms_norm", x, rows * dim)?;
        rms_norm(x, w, eps, dim, prefix_mut("rms_norm", y, rows * dim)?);
        Ok(())
    }

    fn rms_norm_in_place(
        &self,
        x: &mut Vec<f32>,
        eps: f32,
        (rows, dim): (usize, usize),
    ) -> Result<()> {
        rms_norm_in_place(prefix_mut("rms_norm", x, rows * dim)?, eps, dim);
        Ok(())
    }

    fn linear(&self, w: &Linear, x: &Vec<f32>, m: usize, y: &mut Vec<f32>) -> Result<()> {
        let x = prefix("linear", x, m * w.inp)?;
        w.forward(x, m, prefix_mut("linear", y, m * w.out)?)
    }

    fn stacked(&self, w: &QMatrix, x: &Vec<f32>, m: usize, y: &mut Vec<f32>) -> Result<()> {
        let x = prefix("stacked", x, m * w.cols())?;
        Ok(w.gemm(x, m, prefix_mut("stacked", y, m * w.rows())?)?)
    }

    fn split_qkv(
        &self,
        qkv: &Vec<f32>,
        m: usize,
        (qd, kd): (usize, usize),
        q: &mut Vec<f32>,
        k: &mut Vec<f32>,
        v: &mut Vec<f32>,
    ) -> Result<()> {
        let width = qd + 2 * kd;
        let qkv = prefix("split_qkv", qkv, m * width)?;
        let q = prefix_mut("split_qkv", q, m * qd)?;
        let k = prefix_mut("split_qkv", k, m * kd)?;
        let v = prefix_mut("split_qkv", v, m * kd)?;
        for (r, row) in qkv.chunks_exact(width).enumerate() {
            q[r * qd..(r + 1) * qd].copy_from_slice(&row[..qd]);
            k[r * kd..(r + 1) * kd].copy_from_slice(&row[qd..qd + kd]);
            v[r * kd..(r + 1) * kd].copy_from_slice(&row[qd + kd..]);
        }
        Ok(())
    }

    fn silu_mul(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        len: usize,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (gate, up) = (prefix("silu_mul", gate, len)?, prefix("silu_mul", up, len)?);
        let out = prefix_mut("silu_mul", out, len)?;
        // Rows of 4096 in parallel: the `exp`s on every core.
        out.par_chunks_mut(4096)
            .zip(gate.par_chunks(4096).zip(up.par_chunks(4096)))
            .for_each(|(o, (g, u))| longctx_kernels::cpu::silu_mul_into(o, g, u));
        Ok(())
    }

    fn silu_mul_stacked(
        &self,
        gu: &Vec<f32>,
        (m, n): (usize, usize),
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let gu = prefix("silu_mul", gu, m * 2 * n)?;
        let out = prefix_mut("silu_mul", out, m * n)?;
        // Straight from each stacked row, rows in parallel: no copies of the halves, and
        // the `exp`s on every core (as `silu_mul`, to the bit).
        out.par_chunks_mut(n.max(1))
            .zip(gu.par_chunks(2 * n.max(1)))
            .for_each(|(g, row)| longctx_kernels::cpu::silu_mul_into(g, &row[..n], &row[n..]));
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        rows: Range<usize>,
        (heads, hd): (usize, usize),
        pos0: usize,
        rope: &Rope,
        seq_len: usize,
        layout: Layout,
    ) -> Result<()> {
        let w = heads * hd;
        let n = rows.len();
        let x = prefix_mut("rope", x, rows.end * w)?;
        let x = &mut x[rows.start * w..];
        longctx_rope::apply(x, (n, heads, hd), pos0, rope, seq_len, layout)?;
        Ok(())
    }

    fn scale_rows(
        &self,
        x: &mut Vec<f32>,
        width: usize,
        row0: usize,
        scales: &[f32],
    ) -> Result<()> {
        let x = prefix_mut("scale_rows", x, (row0 + scales.len()) * width)?;
        for (row, s) in x[row0 * width..].chunks_exact_mut(width).zip(scales) {
            for v in row {
                *v *= s;
            }
        }
        Ok(())
    }

    fn add(&self, y: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> Result<()> {
        for (a, b) in prefix_mut("add", y, len)?
            .iter_mut()
            .zip(prefix("add", x, len)?)
        {
            *a += b;
        }
        Ok(())
    }

    fn non_finite_row(&self, x: &Vec<f32>, (rows, width): (usize, usize)) -> Result<Option<usize>> {
        let x = prefix("non_finite_row", x, rows * width)?;
        // `v * 0.0` is 0 for every finite v and NaN otherwise; 16 independent sums vectorise.
        let mut acc = [0f32; 16];
        let mut it = x.chunks_exact(16);
        for c in &mut it {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v * 0.0;
            }
        }
        for (a, v) in acc.iter_mut().zip(it.remainder()) {
            *a += v * 0.0;
        }
        if acc.iter().all(|a| *a == 0.0) {
            return Ok(None);
        }
        Ok(Some(
            x.chunks(width.max(1))
                .position(|r| r.iter().any(|v| !v.is_finite()))
                .unwrap_or(0),
        ))
    }

    fn gather(
        &self,
        x: &Vec<f32>,
        width: usize,
        picks: &[(usize, f32)],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let out = prefix_mut("gather", out, picks.len() * width)?;
        for (dst, &(r, s)) in out.chunks_exact_mut(width).zip(picks) {
            let src = x
                .get(r * width..(r + 1) * width)
                .ok_or_else(|| short("gather", (r + 1) * width, x.len()))?;
            if s == 1.0 {
                dst.copy_from_slice(src);
            } else {
                for (a, b) in dst.iter_mut().zip(src) {
                    *a = b * s;
                }
            }
        }
        Ok(())
    }

    fn scatter_add(
        &self,
        y: &Vec<f32>,
        width: usize,
        rows: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let y = prefix("scatter_add", y, rows.len() * width)?;
        for (src, &r) in y.chunks_exact(width).zip(rows) {
            let have = out.len();
            let dst = out
                .get_mut(r * width..(r + 1) * width)
                .ok_or_else(|| short("scatter_add", (r + 1) * width, have))?;
            for (a, b) in dst.iter_mut().zip(src) {
                *a += b;
            }
        }
        Ok(())
    }

    fn append_kv(
        &self,
        store: &KvStore,
        seq: SeqId,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        rows: Range<usize>,
        kd: usize,
    ) -> Result<()> {
        let k = &prefix("append_kv", k, rows.end * kd)?[rows.start * kd..];
        let v = &prefix("append_kv", v, rows.end * kd)?[rows.start * kd..];
        append_kv(store, seq, layer, k, v)
    }

    fn attend(
        &self,
        store: &KvStore,
        batch: &Batch,
        offs: &[usize],
        layer: usize,
        q: &Vec<f32>,
        (heads, hd): (usize, usize),
        mask: Mask,
        prefetch: usize,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let n = *offs.last().unwrap_or(&0);
        let q = prefix("attend", q, n * heads * hd)?;
        let out = prefix_mut("attend", out, n * heads * hd)?;
        let lse = prefix_mut("attend", lse, n * heads)?;
        attend_entries(
            store,
            batch,
            offs,
            layer,
            q,
            (heads, hd),
            mask,
            prefetch,
            out,
            lse,
        )
    }
}

/// Each entry's attention over its own sequence, entries in parallel (a decode step of
/// many sequences has one row each: too little for the kernel's own parallelism alone).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attend_entries(
    store: &KvStore,
    batch: &Batch,
    offs: &[usize],
    l: usize,
    q: &[f32],
    (heads, hd): (usize, usize),
    mask: Mask,
    prefetch: usize,
    attn: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let qd = heads * hd;
    let mut jobs = Vec::with_capacity(batch.entries.len());
    let (mut attn, mut lse) = (attn, lse);
    for (i, e) in batch.entries.iter().enumerate() {
        let rows = offs[i + 1] - offs[i];
        let (a, rest) = std::mem::take(&mut attn).split_at_mut(rows * qd);
        let (s, rest_l) = std::mem::take(&mut lse).split_at_mut(rows * heads);
        (attn, lse) = (rest, rest_l);
        if rows > 0 {
            jobs.push((e, &q[offs[i] * qd..offs[i + 1] * qd], a, s));
        }
    }
    // As many sequences as two a thread are parallel enough: each one's kernel then runs
    // its keys as one range (cut into ranges too, a 16-sequence step at ~600 keys each
    // decoded ~5% slower: more parts to merge, nested parallel regions).
    let splits = (jobs.len() >= 2 * rayon::current_num_threads()).then_some(1);
    let opts = StreamOptions { prefetch, splits };
    let run = |(e, q, a, s): (&Entry, &[f32], &mut [f32], &mut [f32])| {
        let params = AttnParams {
            mask,
            scale: 1.0 / (hd as f32).sqrt(),
            q_pos: e.pos0,
            k_pos: 0,
        };
        attend_typed(store, e.seq, l, q, heads, &params, opts, a, s)
    };
    if jobs.len() == 1 {
        return jobs.into_iter().try_for_each(run);
    }
    jobs.into_par_iter().try_for_each(run)
}

pub(crate) fn append_kv(store: &KvStore, seq: SeqId, l: usize, k: &[f32], v: &[f32]) -> Result<()> {
    use half::{bf16, f16};
    match store.config().dtype {
        DType::F32 => store.append(seq, l, k, v)?,
        DType::BF16 => {
            let c = |x: &[f32]| x.iter().map(|v| bf16::from_f32(*v)).collect::<Vec<_>>();
            store.append(seq, l, &c(k), &c(v))?
        }
        DType::F16 => {
            let c = |x: &[f32]| x.iter().map(|v| f16::from_f32(*v)).collect::<Vec<_>>();
            store.append(seq, l, &c(k), &c(v))?
        }
        DType::Q8_0 => {
            use longctx_kernels::quantize_q8_vec;
            store.append(seq, l, &quantize_q8_vec(k)?, &quantize_q8_vec(v)?)?
        }
        DType::F8E4M3 => {
            use longctx_kernels::quantize_f8_vec;
            store.append(seq, l, &quantize_f8_vec(k)?, &quantize_f8_vec(v)?)?
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attend_typed(
    store: &KvStore,
    seq: SeqId,
    l: usize,
    q: &[f32],
    h_q: usize,
    params: &AttnParams,
    opts: StreamOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    use half::{bf16, f16};
    match store.config().dtype {
        DType::F32 => attend(store, seq, l, q, h_q, params, opts, out, lse)?,
        DType::BF16 => {
            let qb: Vec<bf16> = q.iter().map(|v| bf16::from_f32(*v)).collect();
            attend(store, seq, l, &qb, h_q, params, opts, out, lse)?
        }
        DType::F16 => {
            let qb: Vec<f16> = q.iter().map(|v| f16::from_f32(*v)).collect();
            attend(store, seq, l, &qb, h_q, params, opts, out, lse)?
        }
        // f32 queries: the tiles are dequantised to f32, where the products run.
        DType::Q8_0 => attend_blocks::<BlockQ8>(store, seq, l, q, h_q, params, opts, out, lse)?,
        DType::F8E4M3 => attend_blocks::<BlockF8>(store, seq, l, q, h_q, params, opts, out, lse)?,
    }
    Ok(())
}
