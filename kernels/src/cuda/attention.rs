//! Host side of the attention kernels: shape checks, variant choice and launches.

use super::source::{Family, Variant, HEAD_DIMS};
use super::{grid_x, grid_y, narrow, too_big, Gpu, GpuElem, GpuError};
use crate::attention::check_len;
use crate::{AttnParams, AttnShape, KernelError, Mask};
use cudarc::driver::{CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};

/// Where K and V live.
#[derive(Clone, Copy, Debug)]
pub enum KvLayout<'a> {
    /// `k` and `v` start with `[n_kv, h_kv, d]` (they may be longer, and hold at least one
    /// element).
    Contiguous,
    /// `k` is a layer's block pool in the KV store's block layout (each block K
    /// `[block_tokens, h_kv, d]` then V of the same shape; `v` is ignored) and `table[i]` is
    /// the pool block holding the sequence's tokens `[i * block_tokens, (i + 1) *
    /// block_tokens)`.
    Paged {
        table: &'a [i32],
        block_tokens: usize,
    },
}

const THREADS: u32 = 128;
/// Query rows per flash_fwd block (`BM` in flash_fwd.cu).
const BM: usize = 64;

/// The mask as the kernels take it: (kind, chunk). A chunk past `i64::MAX` becomes
/// `i64::MAX`: positions are checked to stay below it, so every query and key is still in
/// chunk 0, as with the wider chunk (a plain `as` made `usize::MAX` chunk -1: each query saw
/// only its own key).
fn mask_args(mask: Mask) -> (i32, i64) {
    match mask {
        Mask::None => (0, 1),
        Mask::Causal => (1, 1),
        Mask::ChunkedLocal { chunk } => (2, i64::try_from(chunk).unwrap_or(i64::MAX)),
    }
}

/// The scalar arguments flash_fwd and flash_decode share, in their order, kept alive for
/// the launch builder that borrows them.
struct Scalars {
    n_q: i32,
    n_kv: i32,
    h_q: i32,
    h_kv: i32,
    scale_log2: f32,
    mask: i32,
    chunk: i64,
    q_pos: i64,
    k_pos: i64,
    block_tokens: i32,
    null: u64,
}

impl Scalars {
    /// Every size in the kernels' integer types, or `Unsupported` naming the one that does
    /// not fit (the kernels index rows in `int` and positions in `i64`; the last query's
    /// and key's positions must fit too).
    fn new(
        op: &'static str,
        shape: &AttnShape,
        params: &AttnParams,
        block_tokens: usize,
    ) -> Result<Scalars, GpuError> {
        let (mask, chunk) = mask_args(params.mask);
        let last = |pos: usize, n: usize, what: &'static str| -> Result<i64, GpuError> {
            pos.checked_add(n)
                .and_then(|end| i64::try_from(end).ok())
                .map(|_| pos as i64)
                .ok_or_else(|| too_big(op, what, pos.saturating_add(n), i64::MAX as u64))
        };
        Ok(Scalars {
            n_q: narrow(op, "n_q", shape.n_q)?,
            n_kv: narrow(op, "n_kv", shape.n_kv)?,
            h_q: narrow(op, "h_q", shape.h_q)?,
            h_kv: narrow(op, "h_kv", shape.h_kv)?,
            scale_log2: params.scale * std::f32::consts::LOG2_E,
            mask,
            chunk,
            q_pos: last(params.q_pos, shape.n_q, "q_pos + n_q")?,
            k_pos: last(params.k_pos, shape.n_kv, "k_pos + n_kv")?,
            block_tokens: narrow(op, "block_tokens", block_tokens)?,
            null: 0,
        })
    }

    /// Pushes the arguments after `(q, k, v, out, lse)`: `n_q .. k_pos`, the block table (or
    /// a null pointer) and the block size.
    fn push<'a>(&'a self, b: &mut LaunchArgs<'a>, table: &'a Option<CudaSlice<i32>>) {
        b.arg(&self.n_q)
            .arg(&self.n_kv)
            .arg(&self.h_q)
            .arg(&self.h_kv);
        b.arg(&self.scale_log2).arg(&self.mask).arg(&self.chunk);
        b.arg(&self.q_pos).arg(&self.k_pos);
        match table {
            Some(t) => b.arg(t),
            None => b.arg(&self.null),
        };
        b.arg(&self.block_tokens);
    }
}

/// Device-side K/V: views for K and V, and the uploaded block table when paged.
struct Kv<'a, T> {
    k: CudaView<'a, T>,
    v: CudaView<'a, T>,
    table: Option<CudaSlice<i32>>,
    block_tokens: usize,
}

impl Gpu {
    fn kv<'a, T: GpuElem>(
        &self,
        op: &'static str,
        k: &'a CudaSlice<T>,
        v: &'a CudaSlice<T>,
        layout: KvLayout<'_>,
        shape: &AttnShape,
    ) -> Result<Kv<'a, T>, GpuError> {
        let AttnShape { n_kv, h_kv, d, .. } = *shape;
        match layout {
            KvLayout::Contiguous => {
                // At least the keys read: a buffer allocated once for the longest sequence
                // serves shorter ones, and no key at all still has a (never read) element,
                // since the driver allocates no empty buffer.
                let need = n_kv * h_kv * d;
                for (buffer, got) in [("k", k.len()), ("v", v.len())] {
                    if got < need.max(1) {
                        return Err(KernelError::ShapeMismatch {
                            op,
                            buffer,
                            expected: need.max(1),
                            got,
                        }
                        .into());
                    }
                }
                Ok(Kv {
                    k: k.as_view(),
                    v: v.as_view(),
                    table: None,
                    block_tokens: 1,
                })
            }
            KvLayout::Paged {
                table,
                block_tokens,
            } => {
                let bad =
                    |reason: String| GpuError::Kernel(KernelError::Unsupported { op, reason });
                if block_tokens == 0 {
                    return Err(bad("block_tokens is 0".into()));
                }
                let half = block_tokens
                    .checked_mul(h_kv * d)
                    .ok_or_else(|| bad(format!("{block_tokens} tokens a block")))?;
                if !k.len().is_multiple_of(2 * half) {
                    return Err(bad(format!(
                        "pool of {} elements is not whole blocks of {}",
                        k.len(),
                        2 * half
                    )));
                }
                let blocks = k.len() / (2 * half);
                let needed = n_kv.div_ceil(block_tokens);
                if table.len() < needed {
                    return Err(bad(format!(
                        "block table has {} entries, {n_kv} tokens need {needed}",
                        table.len()
                    )));
                }
                // Checked here so that the kernel never reads outside the pool.
                if let Some(b) = table[..needed]
                    .iter()
                    .find(|&&b| b < 0 || b as usize >= blocks)
                {
                    return Err(bad(format!(
                        "block table entry {b} outside the pool's {blocks} blocks"
                    )));
                }
                // A zero-token sequence still gets a (never read) one-entry table: no empty allocation.
                let host: &[i32] = if needed == 0 { &[0] } else { &table[..needed] };
                let dev = self.stream.clone_htod(host)?;
                Ok(Kv {
                    k: k.as_view(),
                    v: k.slice(half.min(k.len())..),
                    table: Some(dev),
                    block_tokens,
                })
            }
        }
    }

    fn check_common<T: GpuElem>(
        op: &'static str,
        q: &CudaSlice<T>,
        shape: &AttnShape,
        params: &AttnParams,
        out: &CudaSlice<T>,
        lse: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        shape.check(op)?;
        params.check(op)?;
        if !HEAD_DIMS.contains(&shape.d) {
            return Err(KernelError::Unsupported {
                op,
                reason: format!("head_dim {} (the GPU kernels take {HEAD_DIMS:?})", shape.d),
            }
            .into());
        }
        let AttnShape { n_q, h_q, d, .. } = *shape;
        check_len(op, "q", n_q * h_q * d, q.len())?;
        check_len(op, "out", n_q * h_q * d, out.len())?;
        check_len(op, "lse", n_q * h_q, lse.len())?;
        Ok(())
    }

    /// Flash-attention forward, the GPU twin of [`crate::attention`]: `out` in the input's
    /// type, `lse` in f32 (natural log). Tensor cores; any number of queries.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<T: GpuElem>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        layout: KvLayout<'_>,
        shape: AttnShape,
        params: &AttnParams,
        out: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda attention";
        Self::check_common(OP, q, &shape, params, out, lse)?;
        let kv = self.kv(OP, k, v, layout, &shape)?;
        if shape.n_q == 0 {
            return Ok(());
        }
        let variant = Variant::attention(Family::FlashFwd, T::DTYPE, shape.d, kv.table.is_some());
        let f = self.function(variant, "flash_fwd")?;
        let sc = Scalars::new(OP, &shape, params, kv.block_tokens)?;
        let cfg = LaunchConfig {
            grid_dim: (
                grid_x(OP, "query tiles", shape.n_q.div_ceil(BM))?,
                grid_y(OP, "h_q", shape.h_q)?,
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&f);
        b.arg(q).arg(&kv.k).arg(&kv.v).arg(out).arg(lse);
        sc.push(&mut b, &kv.table);
        // SAFETY: argument order and types match flash_fwd's signature; lengths checked above.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Split-KV decode (flash-decoding) for few queries over a long KV: the keys cut into
    /// `splits` ranges (None: enough blocks to fill the GPU), partial results merged by LSE.
    #[allow(clippy::too_many_arguments)]
    pub fn decode<T: GpuElem>(
        &self,
        q: &CudaSlice<T>,
        k: &CudaSlice<T>,
        v: &CudaSlice<T>,
        layout: KvLayout<'_>,
        shape: AttnShape,
        params: &AttnParams,
        splits: Option<usize>,
        out: &mut CudaSlice<T>,
        lse: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        const OP: &str = "cuda decode";
        Self::check_common(OP, q, &shape, params, out, lse)?;
        let kv = self.kv(OP, k, v, layout, &shape)?;
        if shape.n_q == 0 {
            return Ok(());
        }
        let rows = shape.n_q * shape.h_q;
        let splits = splits
            .unwrap_or_else(|| {
                let fill = (4 * self.info.multiprocessors).div_ceil(rows);
                fill.min((shape.n_kv / 256).max(1))
            })
            .clamp(1, 4096);
        let variant = Variant::attention(Family::Decode, T::DTYPE, shape.d, kv.table.is_some());
        let f = self.function(variant, "flash_decode")?;
        let combine = self.function(variant, "flash_decode_combine")?;
        let mut part_o = self.stream.alloc_zeros::<f32>(splits * rows * shape.d)?;
        let mut part_lse = self.stream.alloc_zeros::<f32>(splits * rows)?;
        let sc = Scalars::new(OP, &shape, params, kv.block_tokens)?;
        let rows_u = grid_x(OP, "n_q * h_q", rows)?;
        let splits_i = splits as i32;
        let mut b = self.stream.launch_builder(&f);
        b.arg(q)
            .arg(&kv.k)
            .arg(&kv.v)
            .arg(&mut part_o)
            .arg(&mut part_lse);
        sc.push(&mut b, &kv.table);
        b.arg(&splits_i);
        let cfg = LaunchConfig {
            grid_dim: (rows_u, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument order and types match flash_decode's signature.
        unsafe { b.launch(cfg) }?;
        let mut c = self.stream.launch_builder(&combine);
        c.arg(&part_o).arg(&part_lse).arg(out).arg(lse);
        c.arg(&sc.n_q).arg(&sc.h_q).arg(&splits_i);
        let cfg = LaunchConfig {
            grid_dim: (rows_u, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above, for flash_decode_combine.
        unsafe { c.launch(cfg) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The launch arguments, checked without a GPU.
    use super::*;

    fn shape(n_q: usize, n_kv: usize) -> AttnShape {
        AttnShape {
            n_q,
            n_kv,
            h_q: 8,
            h_kv: 2,
            d: 128,
        }
    }

    fn unsupported(r: Result<Scalars, GpuError>) -> String {
        match r {
            Err(GpuError::Kernel(KernelError::Unsupported { reason, .. })) => reason,
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn an_unbounded_chunk_stays_one_chunk_on_the_gpu() {
        let s = shape(10, 10);
        let p = AttnParams::new(&s, Mask::ChunkedLocal { chunk: usize::MAX });
        let sc = Scalars::new("t", &s, &p, 1).unwrap();
        assert_eq!((sc.mask, sc.chunk), (2, i64::MAX));
        let p = AttnParams::new(&s, Mask::ChunkedLocal { chunk: 8192 });
        assert_eq!(Scalars::new("t", &s, &p, 1).unwrap().chunk, 8192);
    }

    #[test]
    fn sizes_past_the_kernels_integers_are_unsupported_not_wrapped() {
        let big = i32::MAX as usize + 1;
        let s = shape(1, big);
        let p = AttnParams::new(&s, Mask::Causal);
        assert!(unsupported(Scalars::new("t", &s, &p, 1)).contains("n_kv = 2147483648"));
        let s = shape(big, 1);
        let p = AttnParams::new(&s, Mask::Causal);
        assert!(unsupported(Scalars::new("t", &s, &p, 1)).contains("n_q"));
        let s = shape(4, 4);
        let p = AttnParams::new(&s, Mask::Causal);
        assert!(unsupported(Scalars::new("t", &s, &p, big)).contains("block_tokens"));
        // Positions: the last query's must fit in i64 too.
        let p = AttnParams::new(&s, Mask::Causal).at(i64::MAX as usize - 2, 0);
        assert!(unsupported(Scalars::new("t", &s, &p, 1)).contains("q_pos + n_q"));
        let p = AttnParams::new(&s, Mask::Causal).at(0, usize::MAX);
        assert!(unsupported(Scalars::new("t", &s, &p, 1)).contains("k_pos + n_kv"));
        // At the edge: fits.
        let p = AttnParams::new(&s, Mask::Causal).at(i64::MAX as usize - 4, 7);
        let sc = Scalars::new("t", &s, &p, 1).unwrap();
        assert_eq!(
            (sc.q_pos, sc.k_pos, sc.n_q, sc.h_kv),
            (i64::MAX - 4, 7, 4, 2)
        );
    }

    #[test]
    fn grid_dimensions_are_checked() {
        assert_eq!(grid_y("t", "h_q", 65_535).unwrap(), 65_535);
        assert!(grid_y("t", "h_q", 65_536).is_err());
        assert_eq!(
            grid_x("t", "rows", i32::MAX as usize).unwrap(),
            i32::MAX as u32
        );
        assert!(grid_x("t", "rows", i32::MAX as usize + 1).is_err());
    }
}
