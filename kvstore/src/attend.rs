//! Attention of a block of queries over one layer's KV as the store holds it: the layer is
//! streamed block by block (read ahead of use), attended by the CPU kernel at absolute
//! positions, and the partial results merged by their log-sum-exp. Blocks no query can see
//! under the mask are skipped.
//!
//! Two ways to cut the work, by the number of query rows:
//! - many rows (prefill): consecutive blocks are copied into one contiguous segment of up to
//!   [`SEGMENT`] tokens, so the kernel runs long tiles and the merge (whose cost grows with
//!   the number of parts times the rows) runs once per segment, not once per block;
//! - few rows (decode): copying would double the memory traffic of a memory-bound step, so
//!   the blocks are read in place, up to [`GROUP`] of them in one kernel call
//!   ([`longctx_kernels::attention_segments`]: one parallel region, key ranges cut across block boundaries),
//!   and the groups merged in order.

use crate::{Block, KvStore, Result, SeqId, StreamOptions};
use longctx_kernels::{
    attention, attention_segments_blocks_split, attention_segments_split, merge_into, AttnParams,
    AttnShape, Element, KvBlock, KvBlockSegment, KvSegment, KvUnit,
};

/// Tokens per contiguous segment on the prefill path.
pub const SEGMENT: usize = 4096;
/// Blocks per kernel call on the decode path (bounds the blocks held at once).
pub const GROUP: usize = 64;
/// Query rows (queries x heads) up to which the decode path is taken.
const FEW_ROWS: usize = 64;
/// Queries below which a chunk over a prefix of at least four times its length is read in
/// place too.
const IN_PLACE_ROWS: usize = 128;

/// Queries `q` (`[n_q, h_q, d]`, the first at absolute position `params.q_pos`) against every
/// held key of `layer`; `params.k_pos` is ignored (blocks carry their positions). Writes
/// `out` `[n_q, h_q, d]` and `lse` `[n_q, h_q]` as [`longctx_kernels::attention`] does.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Element + KvUnit>(
    store: &KvStore,
    seq: SeqId,
    layer: usize,
    q: &[T],
    h_q: usize,
    params: &AttnParams,
    opts: StreamOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let cfg = store.config();
    let (h_kv, d) = (cfg.h_kv, cfg.d);
    let n_q = q.len() / (h_q * d).max(1);
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    if n_q == 0 {
        return Ok(());
    }
    // The masks are monotone: the first query sees the lowest key, the last the highest.
    let lo = params.mask.visible(params.q_pos).0;
    let hi = params.mask.visible(params.q_pos + n_q - 1).1;
    let visible = |b: &Block<T>| b.pos + b.len > lo && b.pos < hi;
    let shape = |n_kv| AttnShape {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
    };
    let row = h_kv * d;
    let mut part_out = vec![0f32; out.len()];
    let mut part_lse = vec![0f32; lse.len()];
    let mut stream = store.stream::<T>(seq, layer, opts)?;
    // A short chunk over a long prefix (a prompt read a few rows a step beside decoding
    // requests) also reads the blocks in place: a copy of every block would cost it more
    // than its own products.
    let held = store.len(seq, layer)?;
    if n_q * h_q <= FEW_ROWS || (n_q < IN_PLACE_ROWS && held >= 4 * n_q) {
        let mut first = true;
        loop {
            let mut group = Vec::with_capacity(GROUP);
            for b in stream.by_ref() {
                let b = b?;
                if visible(&b) {
                    group.push(b);
                    if group.len() == GROUP {
                        break;
                    }
                }
            }
            if group.is_empty() {
                return Ok(());
            }
            let segs: Vec<KvSegment<'_, T>> = group
                .iter()
                .map(|b| KvSegment {
                    k: b.k(),
                    v: b.v(),
                    pos: b.pos,
                })
                .collect();
            let n_kv = group.iter().map(|b| b.len).sum();
            if first {
                attention_segments_split(q, &segs, shape(n_kv), params, opts.splits, out, lse)?;
                first = false;
            } else {
                let (po, pl) = (&mut part_out, &mut part_lse);
                attention_segments_split(q, &segs, shape(n_kv), params, opts.splits, po, pl)?;
                merge_into(out, lse, &part_out, &part_lse, d)?;
            }
        }
    }
    // Prefill: contiguous segments.
    let (mut k, mut v) = (Vec::<T>::new(), Vec::<T>::new());
    let mut seg_pos = 0;
    let mut flush = |k: &mut Vec<T>, v: &mut Vec<T>, pos: usize| -> Result<()> {
        if k.is_empty() {
            return Ok(());
        }
        let n_kv = k.len() / row;
        let p = params.at(params.q_pos, pos);
        attention(q, k, v, shape(n_kv), &p, &mut part_out, &mut part_lse)?;
        merge_into(out, lse, &part_out, &part_lse, d)?;
        k.clear();
        v.clear();
        Ok(())
    };
    for b in stream {
        let b = b?;
        if !visible(&b) {
            continue;
        }
        let contiguous = !k.is_empty() && seg_pos + k.len() / row == b.pos;
        if !contiguous || k.len() / row + b.len > SEGMENT {
            flush(&mut k, &mut v, seg_pos)?;
        }
        if k.is_empty() {
            seg_pos = b.pos;
        }
        k.extend_from_slice(b.k());
        v.extend_from_slice(b.v());
    }
    flush(&mut k, &mut v, seg_pos)
}

/// [`attend`] over a block-quantised KV, q8_0 or FP8 (`f32` queries): every row count takes
/// the in-place path, up to [`GROUP`] blocks a kernel call (each tile dequantised into the
/// kernel's small staging, or widened in registers for few rows), since a contiguous copy
/// would be the dequantised KV this type exists to avoid.
#[allow(clippy::too_many_arguments)]
pub fn attend_blocks<B: KvBlock>(
    store: &KvStore,
    seq: SeqId,
    layer: usize,
    q: &[f32],
    h_q: usize,
    params: &AttnParams,
    opts: StreamOptions,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<()> {
    let cfg = store.config();
    let (h_kv, d) = (cfg.h_kv, cfg.d);
    let n_q = q.len() / (h_q * d).max(1);
    out.fill(0.0);
    lse.fill(f32::NEG_INFINITY);
    if n_q == 0 {
        return Ok(());
    }
    let lo = params.mask.visible(params.q_pos).0;
    let hi = params.mask.visible(params.q_pos + n_q - 1).1;
    let shape = |n_kv| AttnShape {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
    };
    let mut part_out = vec![0f32; out.len()];
    let mut part_lse = vec![0f32; lse.len()];
    let mut stream = store.stream::<B>(seq, layer, opts)?;
    let mut first = true;
    loop {
        let mut group = Vec::with_capacity(GROUP);
        for b in stream.by_ref() {
            let b = b?;
            if b.pos + b.len > lo && b.pos < hi {
                group.push(b);
                if group.len() == GROUP {
                    break;
                }
            }
        }
        if group.is_empty() {
            return Ok(());
        }
        let segs: Vec<KvBlockSegment<'_, B>> = group
            .iter()
            .map(|b| KvBlockSegment {
                k: b.k(),
                v: b.v(),
                pos: b.pos,
            })
            .collect();
        let n_kv = group.iter().map(|b| b.len).sum();
        if first {
            let splits = opts.splits;
            attention_segments_blocks_split(q, &segs, shape(n_kv), params, splits, out, lse)?;
            first = false;
        } else {
            let (po, pl) = (&mut part_out, &mut part_lse);
            attention_segments_blocks_split(q, &segs, shape(n_kv), params, opts.splits, po, pl)?;
            merge_into(out, lse, &part_out, &part_lse, d)?;
        }
    }
}
