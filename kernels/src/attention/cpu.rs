//! The CPU flash-attention engine (Dao et al., "FlashAttention", 2022, on a CPU).
//!
//! One work item is one KV head, a block of queries and a range of keys. Its rows are the
//! (query, head) pairs of the block for every query head sharing that KV head, so with GQA a
//! K/V tile is loaded once for the whole group. Scores are formed transposed, key-major:
//! `S^T[BK, rows] = K_tile . Q^T`, where `Q^T` is packed once per item (scaled by
//! `scale * log2(e)`, so the softmax uses exp2) and K is read in place with no packing; the
//! running max, the sum and the exp2 are then vertical vector operations across rows, and
//! `O[rows, d] += P . V_tile` reads V rows in place. bf16/f16 tiles are widened to f32 first,
//! except blocks of more than 16 rows over a bf16 KV on a CPU with AVX512_BF16: both products
//! then run on the bf16 dot product (`Ops::scores_bf16`, `Ops::softmax_pairs`,
//! `Ops::pv_bf16`), K read in place, Q and V packed in pairs, P rounded to bf16 (2^-9
//! relative, as FlashAttention's on a GPU); over a contiguous KV an item there holds two row
//! blocks that share each tile's packed V and its prefetches (`Engine::block_pair`).
//! Work items run on the rayon pool; the decode shape (few rows, long KV) splits the keys
//! of each item across threads and merges the parts by their log-sum-exp. Decode over a
//! bf16 KV takes whole unmasked 16-key tiles in one fused step where the CPU has bf16 dot
//! products (`Ops::decode_tile_bf16`: scores with keys in lanes, one exp2 per row per tile;
//! `P V` on the dot product too, two keys at a time, P rounded to bf16 as in the tiles).
//! A KV in pieces (a paged cache's blocks) is read in place by [`attention_segments`].

use super::{check_len, merge_into, AttnParams, AttnShape};
use crate::cpu::{Isa, Ops};
use crate::element::KvBlock;
use crate::{BlockF8, BlockQ8, Element, KernelError, Q8_BLOCK};
use rayon::prelude::*;

/// Keys per tile.
const BK: usize = 64;
/// Keys per tile on the split-KV path, where a tile spans every head: K and V tiles of
/// `SPLIT_BK * h_kv * d` values each, this one and the next, stay within L2.
const SPLIT_BK: usize = 16;
/// How many tiles ahead the split-KV path prefetches.
const PREFETCH_TILES: usize = 1;
/// Keys ahead the fused decode step prefetches its head's rows: two of its 16-key steps. A
/// bf16 KV of any row width (SmolLM2's 384-byte rows: its decode 1.3x faster at 8K and 1.9x
/// at 32K than under the loop's burst of prefetches per tile, `bench e2e`);
/// a q8_0 or FP8 one only for rows over [`MID_ROW_BYTES`] (narrower, that step is bound by
/// its widening, and its own prefetch measured no better).
const DECODE_AHEAD: usize = 32;
/// Narrow KV rows (all heads of a key in at most this many bytes, SmolLM2's 384 in bf16) are
/// prefetched two tiles ahead on the split path (`bench kernels --only decode-smol`); it
/// measured 30% slower on the 2 KiB rows of `decode`.
const NARROW_ROW_BYTES: usize = 512;
/// Rows up to this size (SmolLM2's f32 KV, 768 bytes) go in whole `BK` tiles with no
/// prefetch: 3-5% faster on its f32 decode step than the wide rows' short tiles.
const MID_ROW_BYTES: usize = 1024;
/// Rows (queries x heads of a group) per work item, as a target.
pub(super) const ROWS: usize = 64;

/// How the work is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Query tiles when they give every thread enough work, split-KV otherwise.
    #[default]
    Auto,
    /// One item per (KV head, query block), each over all its keys.
    QueryTiles,
    /// Flash-decoding: the keys cut into `splits` ranges; an item is one query block over one
    /// key range for every KV head (one contiguous stream of K and V), and the f32 parts are
    /// merged by their LSE.
    SplitKv { splits: usize },
}

/// Options of the CPU backend.
#[derive(Clone, Copy, Debug)]
pub struct CpuOptions {
    pub strategy: Strategy,
    pub isa: Isa,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            strategy: Strategy::Auto,
            isa: Isa::detect(),
        }
    }
}

/// Whether attention over bf16 inputs of this shape rounds P to bf16 on this CPU with the
/// default options: query blocks of more than 16 rows run on the bf16 dot-product tiles where
/// the CPU has AVX512_BF16, and blocks of up to 6 rows (decode) take their whole unmasked
/// 16-key tiles in the fused step ([`Ops::decode_tile_bf16`]). The outputs then carry up to
/// 2^-9 of `|P| |V|` (FlashAttention's bf16 P on a GPU does the same); otherwise bf16 inputs
/// give f32-exact products. For callers' error bounds.
pub fn rounds_p_to_bf16(shape: &AttnShape) -> bool {
    let g = shape.group();
    let rows = shape.n_q.min((ROWS / g).max(1)) * g;
    let ops = Ops::new(Isa::detect());
    (rows > 16 && ops.has_bf16_tiles()) || ops.has_decode_tile_bf16(rows, shape.d)
}

/// Flash-attention forward on the CPU with the default options. See the module docs of
/// [`crate::attention`] for layouts; `out` may be of another element type than the inputs
/// (f32 partial results for a later merge, say).
pub fn attention<T: Element, O: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    params: &AttnParams,
    out: &mut [O],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    attention_with(q, k, v, shape, params, out, lse, &CpuOptions::default())
}

/// [`attention`] with explicit options.
pub fn attention_with<T: Element, O: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    params: &AttnParams,
    out: &mut [O],
    lse: &mut [f32],
    opts: &CpuOptions,
) -> Result<(), KernelError> {
    const OP: &str = "attention";
    shape.check(OP)?;
    params.check(OP)?;
    let AttnShape {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
    } = shape;
    check_len(OP, "q", n_q * h_q * d, q.len())?;
    check_len(OP, "k", n_kv * h_kv * d, k.len())?;
    check_len(OP, "v", n_kv * h_kv * d, v.len())?;
    check_len(OP, "out", n_q * h_q * d, out.len())?;
    check_len(OP, "lse", n_q * h_q, lse.len())?;
    if n_q == 0 {
        return Ok(());
    }

    let engine = Engine {
        q,
        k,
        v,
        shape,
        params: *params,
        ops: Ops::new(opts.isa),
        scale2: params.scale * std::f32::consts::LOG2_E,
        bf16_tiles: T::as_bf16_bits(k).is_some() && Ops::new(opts.isa).has_bf16_tiles(),
        blocks: None,
        decode_ahead: 0,
    };
    let g = shape.group();
    let bq = (ROWS / g).max(1);
    // Over a bf16 KV on the dot product an item is two row blocks sharing each tile's
    // packed V (`Engine::block_pair`).
    let pairs = engine.bf16_tiles;
    let bq_item = if pairs { 2 * bq } else { bq };
    let n_blocks = n_q.div_ceil(bq_item);
    let items = n_blocks * h_kv;
    let splits = match opts.strategy {
        Strategy::QueryTiles => 1,
        Strategy::SplitKv { splits } => splits.max(1),
        Strategy::Auto => auto_splits(&shape, rayon::current_num_threads()),
    };
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let lse_ptr = SyncPtr(lse.as_mut_ptr());
    let block_of = |i: usize| {
        let (hk, b) = (i % h_kv, i / h_kv);
        (hk, b * bq_item, ((b + 1) * bq_item).min(n_q))
    };

    if splits == 1 {
        // Longest items first (causal masks make late query blocks the costly ones), so
        // work stealing ends with short items.
        let mut order: Vec<usize> = (0..items).collect();
        order.sort_by_key(|&i| {
            let (_, q0, q1) = block_of(i);
            std::cmp::Reverse(engine.span(q0, q1, 0, n_kv).1)
        });
        order.par_iter().for_each(|&i| {
            with_scratch(|st| {
                let (hk, q0, q1) = block_of(i);
                let qm = (q0 + bq).min(q1);
                // Both halves many rows (few take the decode path's packing).
                if pairs && (q1 - qm) * g > 16 && (qm - q0) * g > 16 {
                    st.scratch.resize_with(2, Scratch::default);
                    let (sa, sb) = st.scratch.split_at_mut(1);
                    let (sa, sb) = (&mut sa[0], &mut sb[0]);
                    engine.block_pair(sa, sb, hk, (q0, qm, q1));
                    // SAFETY: items cover disjoint (query, head) rows of `out` and `lse`.
                    unsafe {
                        engine.store(sa, hk, q0, qm, out_ptr, lse_ptr);
                        engine.store(sb, hk, qm, q1, out_ptr, lse_ptr);
                    }
                    return;
                }
                let sc = &mut st.scratch[0];
                for (a, b) in [(q0, qm), (qm, q1)] {
                    if a < b {
                        engine.block(sc, hk, a, b, 0, n_kv);
                        // SAFETY: as above.
                        unsafe { engine.store(sc, hk, a, b, out_ptr, lse_ptr) };
                    }
                }
            })
        });
        return Ok(());
    }

    split_kv(
        q,
        &[KvSegment {
            k,
            v,
            pos: params.k_pos,
        }],
        shape,
        params,
        splits,
        opts,
        out,
        lse,
    );
    Ok(())
}

/// One stretch of a KV held in pieces (a paged cache's block): keys and values
/// `[len, h_kv, d]`, the first key at absolute position `pos`.
#[derive(Clone, Copy, Debug)]
pub struct KvSegment<'a, T> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub pos: usize,
}

/// [`attention`] over a KV held in segments, as over their concatenation but with each
/// segment's keys at its own absolute positions (`params.k_pos` is not used; any order).
/// The segments are read in place, all of them in one parallel region: the decode step
/// over a paged cache without one kernel call (and one merge) per block. `shape.n_kv` is
/// the total number of keys.
pub fn attention_segments<T: Element, O: Element>(
    q: &[T],
    segments: &[KvSegment<'_, T>],
    shape: AttnShape,
    params: &AttnParams,
    out: &mut [O],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    attention_segments_split(q, segments, shape, params, None, out, lse)
}

/// [`attention_segments`] cut into `splits` key ranges (`None`: as many as suit the threads).
/// `Some(1)` where the caller already runs many of these in parallel (one per sequence of a
/// batched step): ranges within each would only add parts to merge. The tests pass explicit
/// counts, which a 2-thread machine's own choice would not reach.
pub fn attention_segments_split<T: Element, O: Element>(
    q: &[T],
    segments: &[KvSegment<'_, T>],
    shape: AttnShape,
    params: &AttnParams,
    splits: Option<usize>,
    out: &mut [O],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "attention_segments";
    shape.check(OP)?;
    params.check(OP)?;
    let AttnShape { n_q, h_kv, d, .. } = shape;
    let row = h_kv * d;
    let lens = segments.iter().map(|s| (s.k.len(), s.v.len()));
    check_segments(OP, lens, row, shape, (q.len(), out.len(), lse.len()))?;
    if n_q == 0 {
        return Ok(());
    }
    let segments: Vec<KvSegment<'_, T>> = segments
        .iter()
        .copied()
        .filter(|s| !s.k.is_empty())
        .collect();
    if segments.is_empty() {
        out.iter_mut().for_each(|x| *x = O::from_f32(0.0));
        lse.fill(f32::NEG_INFINITY);
        return Ok(());
    }
    let opts = CpuOptions::default();
    let splits = splits
        .unwrap_or_else(|| auto_splits(&shape, rayon::current_num_threads()))
        .max(1);
    split_kv(q, &segments, shape, params, splits, &opts, out, lse);
    Ok(())
}

/// One stretch of a block-quantised KV (a paged cache's block): K and V blocks
/// `[len, h_kv, d / 32]` of q8_0 ([`crate::kvq8`]) or FP8 ([`crate::kvf8`]), the first key at
/// absolute position `pos`.
#[derive(Clone, Copy, Debug)]
pub struct KvBlockSegment<'a, B> {
    pub k: &'a [B],
    pub v: &'a [B],
    pub pos: usize,
}

/// A stretch of a q8_0 KV.
pub type KvSegmentQ8<'a> = KvBlockSegment<'a, BlockQ8>;

/// The K and V blocks of a stretch of keys, tagged by type, as the engine reads them.
#[derive(Clone, Copy, Debug)]
pub enum BlockPair<'a> {
    Q8(&'a [BlockQ8], &'a [BlockQ8]),
    F8(&'a [BlockF8], &'a [BlockF8]),
}

impl BlockPair<'_> {
    /// Widens blocks `b..b + n` of K and of V into `k` and `v`.
    fn widen(&self, isa: crate::Isa, b: usize, n: usize, k: &mut [f32], v: &mut [f32]) {
        match *self {
            BlockPair::Q8(ks, vs) => {
                BlockQ8::widen(isa, &ks[b..b + n], k);
                BlockQ8::widen(isa, &vs[b..b + n], v);
            }
            BlockPair::F8(ks, vs) => {
                BlockF8::widen(isa, &ks[b..b + n], k);
                BlockF8::widen(isa, &vs[b..b + n], v);
            }
        }
    }

    /// Prefetches blocks `lo..hi` of K and V.
    fn prefetch(&self, lo: usize, hi: usize) {
        match *self {
            BlockPair::Q8(k, v) => {
                crate::cpu::prefetch(&k[lo..hi]);
                crate::cpu::prefetch(&v[lo..hi]);
            }
            BlockPair::F8(k, v) => {
                crate::cpu::prefetch(&k[lo..hi]);
                crate::cpu::prefetch(&v[lo..hi]);
            }
        }
    }
}

/// [`attention_segments`] over a block-quantised KV (q8_0 or FP8), read in place: many
/// query rows stage each tile of keys (all heads) dequantised into the thread's small f32
/// staging for the f32 micro-kernels; few rows (decode) widen each block in registers. No
/// dequantised copy of the KV is ever made. Queries are f32; `d` must be a multiple of 32.
pub fn attention_segments_blocks<B: KvBlock, O: Element>(
    q: &[f32],
    segments: &[KvBlockSegment<'_, B>],
    shape: AttnShape,
    params: &AttnParams,
    out: &mut [O],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    attention_segments_blocks_split(q, segments, shape, params, None, out, lse)
}

/// The lengths of a segmented call: each segment's K and V of whole key rows of `row` units
/// (values, or q8 blocks), `n_kv` rows in all, and the q / out / lse lengths of `shape`.
fn check_segments(
    op: &'static str,
    lens: impl Iterator<Item = (usize, usize)>,
    row: usize,
    shape: AttnShape,
    (q, out, lse): (usize, usize, usize),
) -> Result<(), KernelError> {
    let mut total = 0;
    for (k, v) in lens {
        check_len(op, "v", k, v)?;
        if !k.is_multiple_of(row) {
            return Err(KernelError::ShapeMismatch {
                op,
                buffer: "k",
                expected: k.next_multiple_of(row),
                got: k,
            });
        }
        total += k;
    }
    let AttnShape { n_q, h_q, d, .. } = shape;
    check_len(op, "k", shape.n_kv * row, total)?;
    check_len(op, "q", n_q * h_q * d, q)?;
    check_len(op, "out", n_q * h_q * d, out)?;
    check_len(op, "lse", n_q * h_q, lse)
}

/// [`attention_segments_blocks`] cut into `splits` key ranges (`None`: as suits the threads).
pub fn attention_segments_blocks_split<B: KvBlock, O: Element>(
    q: &[f32],
    segments: &[KvBlockSegment<'_, B>],
    shape: AttnShape,
    params: &AttnParams,
    splits: Option<usize>,
    out: &mut [O],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    const OP: &str = "attention_segments_blocks";
    shape.check(OP)?;
    params.check(OP)?;
    let AttnShape { n_q, h_kv, d, .. } = shape;
    if !d.is_multiple_of(Q8_BLOCK) {
        return Err(KernelError::Unsupported {
            op: OP,
            reason: format!("head_dim {d} is not a multiple of the KV block of {Q8_BLOCK}"),
        });
    }
    let row = h_kv * d / Q8_BLOCK;
    let lens = segments.iter().map(|s| (s.k.len(), s.v.len()));
    check_segments(OP, lens, row, shape, (q.len(), out.len(), lse.len()))?;
    if n_q == 0 {
        return Ok(());
    }
    let segments: Vec<KvBlockSegment<'_, B>> = segments
        .iter()
        .copied()
        .filter(|s| !s.k.is_empty())
        .collect();
    if segments.is_empty() {
        out.iter_mut().for_each(|x| *x = O::from_f32(0.0));
        lse.fill(f32::NEG_INFINITY);
        return Ok(());
    }
    let splits = splits
        .unwrap_or_else(|| auto_splits(&shape, rayon::current_num_threads()))
        .max(1);
    let ops = Ops::new(CpuOptions::default().isa);
    let row_bytes = row * std::mem::size_of::<B>();
    // Wide rows under the fused decode step: it prefetches its own rows (as over bf16).
    let rows = shape.n_q.min((ROWS / shape.group()).max(1)) * shape.group();
    let decode_ahead = if row_bytes > MID_ROW_BYTES && ops.has_decode_tile_blocks(rows, d) {
        DECODE_AHEAD
    } else {
        0
    };
    let engines: Vec<Engine<'_, f32>> = segments
        .iter()
        .map(|s| Engine {
            q,
            k: &[],
            v: &[],
            shape: AttnShape {
                n_kv: s.k.len() / row,
                ..shape
            },
            params: params.at(params.q_pos, s.pos),
            ops,
            scale2: params.scale * std::f32::consts::LOG2_E,
            bf16_tiles: false,
            blocks: Some(B::pair(s.k, s.v)),
            decode_ahead,
        })
        .collect();
    split_run(&engines, shape, splits, true, row_bytes, out, lse);
    Ok(())
}

/// Split-KV (flash-decoding): the keys (the concatenation of `segs`) cut into `splits`
/// ranges; an item is one query block over one key range for every KV head, heads innermost
/// so that the item streams a contiguous stretch of K and V. Parts are f32 and merged per
/// row by their LSE.
#[allow(clippy::too_many_arguments)]
fn split_kv<T: Element, O: Element>(
    q: &[T],
    segs: &[KvSegment<'_, T>],
    shape: AttnShape,
    params: &AttnParams,
    splits: usize,
    opts: &CpuOptions,
    out: &mut [O],
    lse: &mut [f32],
) {
    let AttnShape { n_q, h_kv, d, .. } = shape;
    let row = h_kv * d;
    let ops = Ops::new(opts.isa);
    let scale2 = params.scale * std::f32::consts::LOG2_E;
    let bf16_tiles = segs.iter().all(|s| T::as_bf16_bits(s.k).is_some()) && ops.has_bf16_tiles();
    let bq = (ROWS / shape.group()).max(1);
    // f32 tiles are read in place, and so are bf16 ones for few rows (decode: widened in
    // registers); other cases are widened once per tile for all heads.
    let direct_bf16 =
        segs.iter().all(|s| T::as_bf16_bits(s.k).is_some()) && n_q.min(bq) * shape.group() <= 16;
    let row_bytes = row * std::mem::size_of::<T>();
    // The fused decode step prefetches its own rows, spread over its work.
    let decode_ahead = if direct_bf16 && ops.has_decode_tile_bf16(n_q.min(bq) * shape.group(), d) {
        DECODE_AHEAD
    } else {
        0
    };
    let engines: Vec<Engine<'_, T>> = segs
        .iter()
        .map(|s| Engine {
            q,
            k: s.k,
            v: s.v,
            shape: AttnShape {
                n_kv: s.k.len() / row,
                ..shape
            },
            params: params.at(params.q_pos, s.pos),
            ops,
            scale2,
            bf16_tiles,
            blocks: None,
            decode_ahead,
        })
        .collect();
    // bf16 tiles on the dot-product unit read K and V in place too.
    let staged = T::as_f32(segs[0].k).is_none() && !direct_bf16 && !bf16_tiles;
    split_run(&engines, shape, splits, staged, row_bytes, out, lse);
}

/// The split-KV loop over `engines`, one a segment (see [`split_kv`]); `staged` widens each
/// tile of every head into the thread's staging first; `row_bytes` is one key's K bytes.
fn split_run<T: Element, O: Element>(
    engines: &[Engine<'_, T>],
    shape: AttnShape,
    splits: usize,
    staged: bool,
    row_bytes: usize,
    out: &mut [O],
    lse: &mut [f32],
) {
    let AttnShape {
        n_q, h_q, h_kv, d, ..
    } = shape;
    // Key index at which each segment starts in the concatenation, and the total.
    let mut starts = Vec::with_capacity(engines.len() + 1);
    starts.push(0);
    for e in engines {
        starts.push(starts.last().unwrap() + e.shape.n_kv);
    }
    let n_kv = *starts.last().unwrap();
    let bq = (ROWS / shape.group()).max(1);
    let n_blocks = n_q.div_ceil(bq);
    let chunk = n_kv.div_ceil(splits).next_multiple_of(BK);
    let splits = n_kv.div_ceil(chunk).max(1);
    let rows_all = n_q * h_q;
    let mut part_o = vec![0f32; splits * rows_all * d];
    let mut part_l = vec![f32::NEG_INFINITY; splits * rows_all];
    {
        let po_ptr = SyncPtr(part_o.as_mut_ptr());
        let pl_ptr = SyncPtr(part_l.as_mut_ptr());
        // A block KV under many rows (a prefill chunk) is staged, and the GEMMs on staged f32
        // tiles want long ones; 16-key tiles made its prefill slower than bf16's.
        let many = n_q.min(bq) * shape.group() > 16;
        let q8_many = engines[0].blocks.is_some() && many;
        let in_kernel = engines[0].decode_ahead > 0;
        let (bk, tiles_ahead) = if q8_many {
            (BK, 0)
        } else if many {
            // A prompt chunk over its prefix in place (see the KV store's `attend`): the
            // GEMM tiles want long ones, as on the contiguous path.
            (BK, PREFETCH_TILES)
        } else if row_bytes <= NARROW_ROW_BYTES {
            (SPLIT_BK, 2 * PREFETCH_TILES)
        } else if row_bytes <= MID_ROW_BYTES {
            (BK, 0)
        } else if in_kernel {
            // The fused step prefetches within the segment; this loop only the next
            // segment's first keys, as far ahead as the step does.
            (SPLIT_BK, DECODE_AHEAD / SPLIT_BK)
        } else {
            (SPLIT_BK, PREFETCH_TILES)
        };
        let work: Vec<(usize, usize)> = (0..splits)
            .flat_map(|s| (0..n_blocks).map(move |b| (s, b)))
            .collect();
        work.par_iter().for_each(|&(s, b)| {
            with_scratch(|st| {
                st.scratch.resize_with(h_kv, Scratch::default);
                let (q0, q1) = (b * bq, ((b + 1) * bq).min(n_q));
                let (g0, g1) = ((s * chunk).min(n_kv), ((s + 1) * chunk).min(n_kv));
                // Segments overlapping [g0, g1): the first resets the running state, the
                // others only move the visible key ranges onto their own keys.
                let first = starts.partition_point(|&x| x <= g0) - 1;
                let mut i = first;
                while i < engines.len() && starts[i] < g1 {
                    let e = &engines[i];
                    let (j0, j1) = (
                        g0.max(starts[i]) - starts[i],
                        g1.min(starts[i + 1]) - starts[i],
                    );
                    let mut span = (0, 0);
                    for (hk, sc) in st.scratch.iter_mut().enumerate() {
                        span = if i == first {
                            e.begin(sc, hk, q0, q1, j0, j1)
                        } else {
                            e.retarget(sc, q0, q1, j0, j1)
                        };
                    }
                    // Where the tiles to prefetch lie after this segment's last: the next
                    // segment's first keys, when the item goes on there.
                    let next =
                        (i + 1 < engines.len() && starts[i + 1] < g1).then(|| &engines[i + 1]);
                    let mut t = span.0;
                    while t < span.1 {
                        let kt = bk.min(span.1 - t);
                        let ahead = t + tiles_ahead * bk;
                        // A block tile of whole unmasked 16-key steps runs fused, unstaged.
                        let staged = staged && !e.blocks_fused(&st.scratch[0], q1 - q0, t, kt);
                        if staged {
                            e.stage(st, t, kt);
                        }
                        let (kd, vd) = (BK * d, BK * d.next_multiple_of(16));
                        for (hk, sc) in st.scratch.iter_mut().enumerate() {
                            // Pull a later tile towards the cache, one head's share at a time.
                            match (ahead < span.1, next) {
                                (true, _) if in_kernel => {}
                                (true, _) => e.prefetch((ahead, bk), hk),
                                (false, Some(n)) => n.prefetch((ahead - span.1, bk), hk),
                                (false, None) => {}
                            }
                            let kv = staged.then(|| {
                                (&st.k[hk * kd..(hk + 1) * kd], &st.v[hk * vd..(hk + 1) * vd])
                            });
                            e.tile(sc, hk, (q0, q1), (t, kt), kv);
                        }
                        t += kt;
                    }
                    i += 1;
                }
                let base = s * rows_all;
                let e = &engines[first];
                for (hk, sc) in st.scratch.iter().enumerate() {
                    // SAFETY: split `s`, query block `b` owns these rows of the parts.
                    unsafe {
                        let o = SyncPtr(po_ptr.get().add(base * d));
                        let l = SyncPtr(pl_ptr.get().add(base));
                        e.store(sc, hk, q0, q1, o, l);
                    }
                }
            })
        });
    }
    let out_rows = SyncPtr(out.as_mut_ptr());
    let lse_ptr = SyncPtr(lse.as_mut_ptr());
    (0..rows_all)
        .into_par_iter()
        .with_min_len(64)
        .for_each(|row| {
            let (mut o, mut l) = ([0f32; 256], [f32::NEG_INFINITY]);
            let o = &mut o[..d];
            o.fill(0.0);
            for s in 0..splits {
                let at = s * rows_all + row;
                let (po, pl) = (&part_o[at * d..(at + 1) * d], &part_l[at..at + 1]);
                merge_into(o, &mut l, po, pl, d)
                    .expect("partial results are sized by construction");
            }
            // SAFETY: one task per row of `out` and `lse`.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(out_rows.get().add(row * d), d);
                for (x, y) in dst.iter_mut().zip(o.iter()) {
                    *x = O::from_f32(*y);
                }
                *lse_ptr.get().add(row) = l[0];
            }
        });
}

/// Key ranges for [`Strategy::Auto`]: split-KV for decode (few rows over a long KV, which is
/// memory-bound: every thread streams contiguous key ranges), and when there are too few
/// query items to keep the threads busy.
fn auto_splits(shape: &AttnShape, threads: usize) -> usize {
    let g = shape.group();
    let bq = (ROWS / g).max(1);
    let items = shape.n_q.div_ceil(bq) * shape.h_kv;
    if shape.n_q.min(bq) * g <= 16 && shape.n_kv >= 8 * BK {
        // Two ranges a thread: fewer parts to merge and items to start than four, which
        // measured 5% slower on SmolLM2's 2K-token decode step; enough to even out a late
        // thread.
        (2 * threads).max(shape.n_kv.div_ceil(8192))
    } else if items >= 4 * threads {
        1
    } else {
        (4 * threads)
            .div_ceil(items)
            .min(shape.n_kv / (4 * BK))
            .max(1)
    }
}

thread_local! {
    /// Each thread's buffers, kept across calls: decode calls the kernel once per KV block
    /// and layer (hundreds of calls a token), and fresh buffers would cost an allocation and
    /// a memset each time.
    static STAGING: std::cell::RefCell<Staging> = std::cell::RefCell::new(Staging::default());
}

/// Runs `f` with this thread's [`Staging`] (at least one [`Scratch`] in it); a fresh one if
/// the thread's own is in use further up its stack.
fn with_scratch<R>(f: impl FnOnce(&mut Staging) -> R) -> R {
    STAGING.with(|cell| match cell.try_borrow_mut() {
        Ok(mut st) => {
            if st.scratch.is_empty() {
                st.scratch.push(Scratch::default());
            }
            f(&mut st)
        }
        Err(_) => {
            let mut st = Staging {
                scratch: vec![Scratch::default()],
                ..Staging::default()
            };
            f(&mut st)
        }
    })
}

/// A raw pointer that work items share to write disjoint rows.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: only used to write rows that no other item touches.
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    // A method, not a field access, so closures capture the whole (Sync) wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

/// Per-thread buffers of the split-KV path: a KV tile of every head, copied in memory order
/// (one sequential stream the prefetchers follow, instead of one 4 KiB-strided stream per
/// head), and the running state of each head.
#[derive(Default)]
struct Staging {
    /// K tile per head: `[h_kv, BK, d]`.
    k: Vec<f32>,
    /// V tile per head: `[h_kv, BK, d_pad]`.
    v: Vec<f32>,
    scratch: Vec<Scratch>,
}

/// Per-thread buffers, reused across work items.
#[derive(Default)]
struct Scratch {
    /// `Q^T`: `[d, rows_pad]`, scaled by `scale * log2(e)`.
    qt: Vec<f32>,
    /// Few rows of bf16 queries: `Q` `[rows, d]` as their bits, unscaled (the fused decode
    /// step's bf16 dot products); empty otherwise.
    qb: Vec<u16>,
    /// Many rows over a bf16 KV on the bf16 dot product: `Q^T` as bf16 pairs along d,
    /// `[d / 2, rows_pad]`, unscaled; empty otherwise.
    qw: Vec<u32>,
    /// That path's P and V tiles packed as bf16 pairs of consecutive keys.
    pw: Vec<u32>,
    vw: Vec<u32>,
    /// A K tile widened to f32: `[BK, d]`.
    kbuf: Vec<f32>,
    /// A V tile widened to f32: `[BK, d_pad]`.
    vbuf: Vec<f32>,
    /// Scores, then probabilities, key-major: `[BK, rows_pad]`.
    st: Vec<f32>,
    /// Output accumulator: `[rows, d_pad]`.
    o: Vec<f32>,
    /// Running max (log2 units), running sum and the last rescale factor, per row.
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    /// Visible key range of each query of the block.
    lo: Vec<usize>,
    hi: Vec<usize>,
    /// The same per score column (query row x head of the group), as u32 for the masking's
    /// vector compares; padding columns see every key.
    lo_col: Vec<u32>,
    hi_col: Vec<u32>,
    /// The largest `lo` and the smallest `hi` of the block: a tile within `[lo_max, hi_min)`
    /// needs no mask.
    lo_max: usize,
    hi_min: usize,
    d_pad: usize,
}

impl Scratch {
    fn prepare(&mut self, rows: usize, d: usize, nq: usize) {
        let rp = rows.next_multiple_of(16);
        let dp = d.next_multiple_of(16);
        self.d_pad = dp;
        let fit = |v: &mut Vec<f32>, n: usize, x: f32| {
            v.clear();
            v.resize(n, x);
        };
        fit(&mut self.qt, d * rp, 0.0);
        // Written before they are read (each tile's widened K and V, and its scores): only
        // grown, never cleared, so a decode item does not memset 40 KB per head.
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        grow(&mut self.kbuf, BK * d);
        grow(&mut self.vbuf, BK * dp);
        grow(&mut self.st, BK * rp);
        fit(&mut self.o, rows * dp, 0.0);
        fit(&mut self.m, rp, f32::NEG_INFINITY);
        fit(&mut self.l, rp, 0.0);
        fit(&mut self.alpha, rp, 1.0);
        self.lo.resize(nq, 0);
        self.hi.resize(nq, 0);
    }

    /// Row `r` normalised into `out`; returns its natural-log LSE (`-inf` with zeros when
    /// the row saw no key).
    fn finish_row(&self, r: usize, d: usize, out: &mut [f32]) -> f32 {
        let l = self.l[r];
        if l > 0.0 {
            let inv = 1.0 / l;
            for (x, y) in out.iter_mut().zip(&self.o[r * self.d_pad..][..d]) {
                *x = y * inv;
            }
            (self.m[r] + l.log2()) * std::f32::consts::LN_2
        } else {
            out.fill(0.0);
            f32::NEG_INFINITY
        }
    }
}

struct Engine<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    shape: AttnShape,
    params: AttnParams,
    ops: Ops,
    scale2: f32,
    /// Whether tiles of many rows run on the bf16 dot product (a bf16 KV on a CPU with it).
    bf16_tiles: bool,
    /// A block KV (`k` and `v` then empty): K and V blocks `[n_kv, h_kv, d / 32]`, staged or
    /// widened in registers.
    blocks: Option<BlockPair<'a>>,
    /// Keys ahead that the fused decode step prefetches its head's rows (0: none; the split
    /// loop prefetches instead).
    decode_ahead: usize,
}

impl<T: Element> Engine<'_, T> {
    /// The union `[lo, hi)` of keys seen by queries `q0..q1`, within `[j0, j1)`.
    fn span(&self, q0: usize, q1: usize, j0: usize, j1: usize) -> (usize, usize) {
        let (mut lo, mut hi) = (j1, j0);
        for i in q0..q1 {
            let (a, b) = self.params.key_range(i, self.shape.n_kv);
            let (a, b) = (a.max(j0), b.min(j1));
            if a < b {
                lo = lo.min(a);
                hi = hi.max(b);
            }
        }
        (lo, hi.max(lo))
    }

    /// Runs KV head `hk`, queries `q0..q1`, keys `j0..j1` into `sc` (un-normalised).
    fn block(&self, sc: &mut Scratch, hk: usize, q0: usize, q1: usize, j0: usize, j1: usize) {
        let (start, end) = self.begin(sc, hk, q0, q1, j0, j1);
        let AttnShape { h_kv, d, .. } = self.shape;
        let rows = (q1 - q0) * self.shape.group();
        // Few rows over narrow bf16 KV rows (decode over a KV store block): the split path's
        // short tiles, the key rows (every head's) prefetched two tiles ahead.
        let narrow = rows <= 16
            && T::as_bf16_bits(self.k).is_some()
            && h_kv * d * std::mem::size_of::<T>() <= NARROW_ROW_BYTES;
        let bk = if narrow { SPLIT_BK } else { BK };
        let mut t = start;
        while t < end {
            let kt = bk.min(end - t);
            if narrow {
                let a = ((t + 2 * bk).min(end) * h_kv * d).min(self.k.len());
                let b = ((t + 3 * bk).min(end) * h_kv * d).min(self.k.len());
                crate::cpu::prefetch(&self.k[a..b]);
                crate::cpu::prefetch(&self.v[a..b]);
            } else if !sc.qw.is_empty() {
                // Many rows on the bf16 dot product: this head's rows of the next tile.
                self.prefetch_head_rows(hk, (t + bk).min(end), (t + 2 * bk).min(end));
            }
            self.tile(sc, hk, (q0, q1), (t, kt), None);
            t += kt;
        }
    }

    /// Asks L2 for head `hk`'s K and V rows of keys `a..b`: one row of d values every
    /// `h_kv * d`, a stride the hardware prefetcher misses (the V tile's loads were 45% of
    /// the bf16 `P V` product's time, `perf`).
    fn prefetch_head_rows(&self, hk: usize, a: usize, b: usize) {
        let AttnShape { h_kv, d, .. } = self.shape;
        let at = (a * h_kv + hk) * d;
        crate::cpu::prefetch_rows(self.k, at, b.saturating_sub(a), h_kv * d, d);
        crate::cpu::prefetch_rows(self.v, at, b.saturating_sub(a), h_kv * d, d);
    }

    /// Packs the queries of head group `hk` into `sc` and resets its running state; returns
    /// the keys `[start, end)` the block must visit.
    fn begin(
        &self,
        sc: &mut Scratch,
        hk: usize,
        q0: usize,
        q1: usize,
        j0: usize,
        j1: usize,
    ) -> (usize, usize) {
        let AttnShape { h_q, d, .. } = self.shape;
        let g = self.shape.group();
        let nq = q1 - q0;
        let rows = nq * g;
        sc.prepare(rows, d, nq);
        let rp = rows.next_multiple_of(16);
        // Few rows (decode): scores by dot products over Q packed row-major; otherwise by a
        // GEMM over Q^T.
        let few = rp == 16;
        sc.qb.clear();
        sc.qw.clear();
        let tiles_bf16 = !few && rp <= 64 && self.bf16_tiles;
        if let (true, Some(bits)) = (tiles_bf16, T::as_bf16_bits(self.q)) {
            // Q^T as bf16 pairs along d, `[d / 2, rp]`, unscaled (the scores are scaled in
            // f32); padding rows zero.
            sc.qw.resize(d / 2 * rp, 0);
            // Every row asked for at once first: the packing loop alone kept only a row or
            // two of misses in flight (90% of its time waited on the first load of a row).
            crate::cpu::prefetch_rows(bits, (q0 * h_q + hk * g) * d, nq, h_q * d, g * d);
            for i in 0..nq {
                for gi in 0..g {
                    let r = i * g + gi;
                    let src = &bits[((q0 + i) * h_q + hk * g + gi) * d..][..d];
                    for (p, pair) in src.chunks_exact(2).enumerate() {
                        sc.qw[p * rp + r] = pair[0] as u32 | (pair[1] as u32) << 16;
                    }
                }
            }
            return self.retarget(sc, q0, q1, j0, j1);
        }
        if let (true, Some(bits)) = (few, T::as_bf16_bits(self.q)) {
            for i in 0..nq {
                sc.qb
                    .extend_from_slice(&bits[((q0 + i) * h_q + hk * g) * d..][..g * d]);
            }
        }
        for i in 0..nq {
            for gi in 0..g {
                let r = i * g + gi;
                let src = &self.q[((q0 + i) * h_q + hk * g + gi) * d..][..d];
                for (dd, x) in src.iter().enumerate() {
                    let at = if few { r * d + dd } else { dd * rp + r };
                    sc.qt[at] = x.to_f32() * self.scale2;
                }
            }
        }
        self.retarget(sc, q0, q1, j0, j1)
    }

    /// Sets the keys `[j0, j1)` of this engine's KV as the ones the next tiles visit,
    /// keeping the running state of `sc` (a work item moving on to the next segment of a
    /// paged KV); returns the keys `[start, end)` to visit.
    fn retarget(
        &self,
        sc: &mut Scratch,
        q0: usize,
        q1: usize,
        j0: usize,
        j1: usize,
    ) -> (usize, usize) {
        let g = self.shape.group();
        let rp = ((q1 - q0) * g).next_multiple_of(16);
        sc.lo_col.clear();
        sc.hi_col.clear();
        (sc.lo_max, sc.hi_min) = (0, usize::MAX);
        for i in 0..q1 - q0 {
            let (a, b) = self.params.key_range(q0 + i, self.shape.n_kv);
            sc.lo[i] = a.max(j0);
            sc.hi[i] = b.min(j1).max(sc.lo[i]);
            sc.lo_max = sc.lo_max.max(sc.lo[i]);
            sc.hi_min = sc.hi_min.min(sc.hi[i]);
            let narrow = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
            for _ in 0..g {
                sc.lo_col.push(narrow(sc.lo[i]));
                sc.hi_col.push(narrow(sc.hi[i]));
            }
        }
        sc.lo_col.resize(rp, 0);
        sc.hi_col.resize(rp, u32::MAX);
        self.span(q0, q1, j0, j1)
    }

    /// One KV tile, keys `t..t + kt`, into the running state of `sc`. `staged` holds the
    /// tile's K `[kt, d]` and V `[kt, d_pad]` already in f32, when the caller staged it.
    fn tile(
        &self,
        sc: &mut Scratch,
        hk: usize,
        (q0, q1): (usize, usize),
        (t, kt): (usize, usize),
        staged: Option<(&[f32], &[f32])>,
    ) {
        let AttnShape { h_kv, d, .. } = self.shape;
        let g = self.shape.group();
        let nq = q1 - q0;
        let rows = nq * g;
        let (rp, dp) = (rows.next_multiple_of(16), sc.d_pad);
        let few = rp == 16;
        let ld = h_kv * d;
        let (k32, v32) = (T::as_f32(self.k), T::as_f32(self.v));
        let base = (t * h_kv + hk) * d;
        if let (Some(blocks), None) = (self.blocks, staged) {
            // The caller checked `blocks_fused`: whole unmasked 16-key steps, fused.
            let (nb, step) = (d / Q8_BLOCK, Ops::DECODE_TILE);
            for s in (0..kt).step_by(step) {
                let at = ((t + s) * h_kv + hk) * nb;
                // SAFETY: qt holds the rows row-major, scaled (so scale 1); 16 keys of nb
                // blocks at stride h_kv * nb from `at` lie within k and v (t + kt <= n_kv);
                // m, l hold rp >= rows values, o rows rows of dp >= d.
                let state = (sc.m.as_mut_ptr(), sc.l.as_mut_ptr(), sc.o.as_mut_ptr(), dp);
                let ahead = (self.decode_ahead, self.shape.n_kv - (t + s));
                let q = sc.qt.as_ptr();
                unsafe {
                    match blocks {
                        BlockPair::Q8(k, v) => self.ops.decode_tile_blocks(
                            rows,
                            d,
                            q,
                            (k[at..].as_ptr(), v[at..].as_ptr(), h_kv * nb),
                            ahead,
                            state,
                        ),
                        BlockPair::F8(k, v) => self.ops.decode_tile_blocks(
                            rows,
                            d,
                            q,
                            (k[at..].as_ptr(), v[at..].as_ptr(), h_kv * nb),
                            ahead,
                            state,
                        ),
                    }
                };
            }
            return;
        }
        if let (false, None, Some(kb), Some(vb)) = (
            sc.qw.is_empty(),
            staged,
            T::as_bf16_bits(self.k),
            T::as_bf16_bits(self.v),
        ) {
            // Many rows over a bf16 KV: both products on the bf16 dot product, K read in
            // place, V packed into key pairs first.
            let mut vw = std::mem::take(&mut sc.vw);
            // SAFETY: kt rows of d at stride ld from `base` lie within v.
            unsafe {
                self.ops
                    .pack_v_bf16(kt, d, vb[base..].as_ptr(), ld, &mut vw)
            };
            self.tile_bf16(sc, hk, (q0, q1), (t, kt), kb, &vw);
            sc.vw = vw;
            return;
        }
        let bits = match (staged, few) {
            (None, true) => T::as_bf16_bits(self.k).zip(T::as_bf16_bits(self.v)),
            _ => None,
        };
        if let Some((kb, vb)) = bits {
            if kt == Ops::DECODE_TILE
                && !sc.qb.is_empty()
                && self.ops.has_decode_tile_bf16(rows, d)
                && sc.lo_max <= t
                && sc.hi_min >= t + kt
            {
                // A whole unmasked tile: the fused step.
                // SAFETY: qb is [rows, d]; 16 rows of K and V at stride ld from `base`;
                // m, l hold rp >= rows values, o rows rows of dp >= d.
                unsafe {
                    self.ops.decode_tile_bf16(
                        rows,
                        d,
                        sc.qb.as_ptr(),
                        self.scale2,
                        kb[base..].as_ptr(),
                        vb[base..].as_ptr(),
                        ld,
                        (self.decode_ahead, self.shape.n_kv - t),
                        sc.m.as_mut_ptr(),
                        sc.l.as_mut_ptr(),
                        sc.o.as_mut_ptr(),
                        dp,
                    )
                };
                return;
            }
            // Decode over a bf16 cache: K and V read in place, widened in registers.
            // SAFETY: kt rows of d values at stride ld from `base` lie within k and v.
            unsafe {
                let (q, st) = (sc.qt.as_ptr(), sc.st.as_mut_ptr());
                self.ops
                    .scores_dot(rows, kt, d, q, kb[base..].as_ptr(), ld, st, rp);
            }
            self.softmax_step(sc, nq, t, kt);
            // SAFETY: st is [kt, rp]; V as above; o is [rows, dp].
            let fused = unsafe {
                self.ops.pv_rows(
                    rows,
                    kt,
                    d,
                    sc.st.as_ptr(),
                    rp,
                    vb[base..].as_ptr(),
                    ld,
                    sc.o.as_mut_ptr(),
                    dp,
                )
            };
            if fused {
                return;
            }
            let mut p = [0f32; BK];
            for r in 0..rows {
                for (j, x) in p[..kt].iter_mut().enumerate() {
                    *x = sc.st[j * rp + r];
                }
                // SAFETY: as above; o's row r has d_pad >= d values.
                unsafe {
                    self.ops.axpy_rows(
                        &mut sc.o[r * dp..r * dp + d],
                        &p[..kt],
                        vb[base..].as_ptr(),
                        ld,
                        d,
                    )
                };
            }
            return;
        }
        // S^T[kt, rp] = K_tile[kt, d] . Q^T[d, rp]
        let (kp, lda) = match (staged, k32) {
            (Some((k, _)), _) => (k.as_ptr(), d),
            (None, Some(k)) => (k[base..].as_ptr(), ld),
            (None, None) => {
                for j in 0..kt {
                    T::widen(&self.k[base + j * ld..][..d], &mut sc.kbuf[j * d..][..d]);
                }
                (sc.kbuf.as_ptr(), d)
            }
        };
        // SAFETY: `kp` has kt rows of d values at stride lda; qt is [rows, d] (few) or
        // [d, rp]; st is [BK, rp].
        unsafe {
            if few {
                let (q, st) = (sc.qt.as_ptr(), sc.st.as_mut_ptr());
                self.ops.scores_dot(rows, kt, d, q, kp, lda, st, rp);
            } else {
                self.ops.gemm(
                    kt,
                    rp,
                    d,
                    kp,
                    lda,
                    1,
                    sc.qt.as_ptr(),
                    rp,
                    sc.st.as_mut_ptr(),
                    rp,
                    false,
                )
            }
        };
        self.softmax_step(sc, nq, t, kt);
        // O[rows, d] += P[rows, kt] . V_tile[kt, d], P read from S^T.
        let (vp, ldv) = match (staged, v32) {
            (Some((_, v)), _) => (v.as_ptr(), dp),
            (None, Some(v)) => (v[base..].as_ptr(), ld),
            (None, None) => {
                for j in 0..kt {
                    T::widen(&self.v[base + j * ld..][..d], &mut sc.vbuf[j * dp..][..d]);
                }
                (sc.vbuf.as_ptr(), dp)
            }
        };
        // SAFETY: st holds [kt, rp]; vp has kt rows of d values at stride ldv (only d
        // columns are read); o is [rows, dp].
        unsafe {
            self.ops.gemm(
                rows,
                d,
                kt,
                sc.st.as_ptr(),
                1,
                rp,
                vp,
                ldv,
                sc.o.as_mut_ptr(),
                dp,
                true,
            )
        };
    }

    /// One KV tile on the bf16 dot product (`sc` packed by [`Engine::begin`] for it): the
    /// scores from K in place, the mask, the softmax step into bf16 pairs of P, and `P V`
    /// from `vw`, the tile's V as [`Ops::pack_v_bf16`] packed it (once for every row block
    /// over the tile).
    fn tile_bf16(
        &self,
        sc: &mut Scratch,
        hk: usize,
        (q0, q1): (usize, usize),
        (t, kt): (usize, usize),
        kb: &[u16],
        vw: &[u32],
    ) {
        let AttnShape { h_kv, d, .. } = self.shape;
        let nq = q1 - q0;
        let rows = nq * self.shape.group();
        let (rp, dp) = (rows.next_multiple_of(16), sc.d_pad);
        let (ld, base) = (h_kv * d, (t * h_kv + hk) * d);
        // SAFETY: qw is [d / 2, rp] with rp <= 64 (rows per item); kt rows of d at stride
        // ld from `base` lie within k; st is [BK, rp].
        unsafe {
            self.ops.scores_bf16(
                rp,
                kt,
                d,
                sc.qw.as_ptr(),
                kb[base..].as_ptr(),
                ld,
                self.scale2,
                sc.st.as_mut_ptr(),
            );
        }
        self.mask_tile(sc, nq, t, kt);
        self.ops.softmax_pairs(
            &sc.st,
            kt,
            rp,
            rp,
            &mut sc.m,
            &mut sc.l,
            &mut sc.alpha,
            &mut sc.pw,
        );
        // SAFETY: pw holds kt.div_ceil(2) rows of rp >= rows pairs; alpha rp >= rows
        // factors (the rescale, applied as o is loaded); o is [rows, dp]; pv_bf16 checks
        // vw's length.
        unsafe {
            self.ops.pv_bf16(
                rows,
                kt,
                d,
                sc.pw.as_ptr(),
                rp,
                vw,
                sc.alpha.as_ptr(),
                sc.o.as_mut_ptr(),
                dp,
            );
        }
    }

    /// [`Engine::block`] for two row blocks of one head over a bf16 KV on the dot product,
    /// queries `q0..qm` into `sa` and `qm..q1` into `sb`: each KV tile's V is packed once
    /// and its rows prefetched once for both (the packing was a tenth of `P V`'s time, the
    /// prefetches a twentieth of the whole). Keys `0..n_kv`.
    fn block_pair(&self, sa: &mut Scratch, sb: &mut Scratch, hk: usize, q: (usize, usize, usize)) {
        let (q0, qm, q1) = q;
        let n_kv = self.shape.n_kv;
        let (Some(kb), Some(vb)) = (T::as_bf16_bits(self.k), T::as_bf16_bits(self.v)) else {
            // Not a bf16 KV: each block on its own.
            self.block(sa, hk, q0, qm, 0, n_kv);
            self.block(sb, hk, qm, q1, 0, n_kv);
            return;
        };
        let a = self.begin(sa, hk, q0, qm, 0, n_kv);
        let b = self.begin(sb, hk, qm, q1, 0, n_kv);
        let AttnShape { h_kv, d, .. } = self.shape;
        let (start, end) = (a.0.min(b.0), a.1.max(b.1));
        let mut vw = std::mem::take(&mut sa.vw);
        let mut t = start;
        while t < end {
            let kt = BK.min(end - t);
            self.prefetch_head_rows(hk, (t + BK).min(end), (t + 2 * BK).min(end));
            // SAFETY: kt rows of d at stride h_kv * d from the tile's first lie within v.
            unsafe {
                let base = (t * h_kv + hk) * d;
                self.ops
                    .pack_v_bf16(kt, d, vb[base..].as_ptr(), h_kv * d, &mut vw)
            };
            // A block whose keys miss the tile skips it (its mask would hide every key).
            if t < a.1 && t + kt > a.0 {
                self.tile_bf16(sa, hk, (q0, qm), (t, kt), kb, &vw);
            }
            if t < b.1 && t + kt > b.0 {
                self.tile_bf16(sb, hk, (qm, q1), (t, kt), kb, &vw);
            }
            t += kt;
        }
        sa.vw = vw;
    }

    /// Whether the block tile of keys `t..t + kt` runs on [`Ops::decode_tile_blocks`]: few
    /// rows (`sc` as [`Engine::begin`] packed them, queries row-major), whole 16-key steps, no
    /// query masked in it.
    fn blocks_fused(&self, sc: &Scratch, nq: usize, t: usize, kt: usize) -> bool {
        let rows = nq * self.shape.group();
        self.blocks.is_some()
            && rows.next_multiple_of(16) == 16
            && kt.is_multiple_of(Ops::DECODE_TILE)
            && self.ops.has_decode_tile_blocks(rows, self.shape.d)
            && sc.lo_max <= t
            && sc.hi_min >= t + kt
    }

    /// Masks the score tile of keys `t..t + kt`, takes the online-softmax step and rescales
    /// the output rows.
    fn softmax_step(&self, sc: &mut Scratch, nq: usize, t: usize, kt: usize) {
        let rows = nq * self.shape.group();
        let rp = rows.next_multiple_of(16);
        self.mask_tile(sc, nq, t, kt);
        self.ops
            .softmax_tile(&mut sc.st, kt, rp, rp, &mut sc.m, &mut sc.l, &mut sc.alpha);
        self.rescale(sc, rows);
    }

    /// Sets the scores of keys `t..t + kt` that a query of the block does not see to -inf.
    fn mask_tile(&self, sc: &mut Scratch, nq: usize, t: usize, kt: usize) {
        if sc.lo_max <= t && sc.hi_min >= t + kt {
            return;
        }
        let g = self.shape.group();
        let rp = (nq * g).next_multiple_of(16);
        if t + kt <= u32::MAX as usize {
            // Branch-free over the columns (a diagonal tile masks about half of them).
            for j in 0..kt {
                let x = (t + j) as u32;
                let row = &mut sc.st[j * rp..][..rp];
                for ((s, &lo), &hi) in row.iter_mut().zip(&sc.lo_col).zip(&sc.hi_col) {
                    *s = if x < lo || x >= hi {
                        f32::NEG_INFINITY
                    } else {
                        *s
                    };
                }
            }
            return;
        }
        for i in 0..nq {
            let (lo, hi) = (sc.lo[i], sc.hi[i]);
            for j in 0..kt {
                if t + j < lo || t + j >= hi {
                    sc.st[j * rp + i * g..][..g].fill(f32::NEG_INFINITY);
                }
            }
        }
    }

    /// Rescales the output rows by the softmax step's factors (rows whose max moved).
    fn rescale(&self, sc: &mut Scratch, rows: usize) {
        let dp = sc.d_pad;
        for r in 0..rows {
            let a = sc.alpha[r];
            if a != 1.0 {
                sc.o[r * dp..(r + 1) * dp].iter_mut().for_each(|x| *x *= a);
            }
        }
    }

    /// Prefetches head `hk`'s share (1 / h_kv) of the K and V rows of keys `t..t + kt`
    /// (clipped to the KV), all heads' rows being one contiguous stretch of memory.
    fn prefetch(&self, (t, kt): (usize, usize), hk: usize) {
        let AttnShape { n_kv, h_kv, d, .. } = self.shape;
        let (a, b) = (t.min(n_kv) * h_kv * d, (t + kt).min(n_kv) * h_kv * d);
        let share = (b - a).div_ceil(h_kv);
        let (lo, hi) = ((a + hk * share).min(b), (a + (hk + 1) * share).min(b));
        if let Some(blocks) = self.blocks {
            blocks.prefetch(lo / Q8_BLOCK, hi.div_ceil(Q8_BLOCK));
            return;
        }
        crate::cpu::prefetch(&self.k[lo..hi]);
        crate::cpu::prefetch(&self.v[lo..hi]);
    }

    /// Copies keys `t..t + kt` of every head into `st`, widened to f32.
    fn stage(&self, st: &mut Staging, t: usize, kt: usize) {
        let AttnShape { h_kv, d, .. } = self.shape;
        let dp = d.next_multiple_of(16);
        st.k.resize(h_kv * BK * d, 0.0);
        st.v.resize(h_kv * BK * dp, 0.0);
        if let Some(blocks) = self.blocks {
            let nb = d / Q8_BLOCK;
            let isa = self.ops.isa();
            for j in 0..kt {
                for hk in 0..h_kv {
                    let src = ((t + j) * h_kv + hk) * nb;
                    let (ko, vo) = ((hk * BK + j) * d, (hk * BK + j) * dp);
                    blocks.widen(isa, src, nb, &mut st.k[ko..][..d], &mut st.v[vo..][..d]);
                }
            }
            return;
        }
        for j in 0..kt {
            for hk in 0..h_kv {
                let src = ((t + j) * h_kv + hk) * d;
                T::widen(&self.k[src..src + d], &mut st.k[(hk * BK + j) * d..][..d]);
                T::widen(&self.v[src..src + d], &mut st.v[(hk * BK + j) * dp..][..d]);
            }
        }
    }

    /// Normalises the block in `sc` and writes it to `out` and `lse`.
    ///
    /// # Safety
    /// No other thread may write the rows of queries `q0..q1`, heads of group `hk`.
    unsafe fn store<O: Element>(
        &self,
        sc: &Scratch,
        hk: usize,
        q0: usize,
        q1: usize,
        out: SyncPtr<O>,
        lse: SyncPtr<f32>,
    ) {
        let AttnShape { h_q, d, .. } = self.shape;
        let g = self.shape.group();
        let rows = (q1 - q0) * g;
        let mut tmp = [0f32; 256];
        for r in 0..rows {
            let row = (q0 + r / g) * h_q + hk * g + r % g;
            let l = sc.finish_row(r, d, &mut tmp[..d]);
            let o = std::slice::from_raw_parts_mut(out.get().add(row * d), d);
            for (x, y) in o.iter_mut().zip(&tmp[..d]) {
                *x = O::from_f32(*y);
            }
            *lse.get().add(row) = l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread that re-enters attention while its own staging is borrowed (rayon can run
    /// another call's task on a thread waiting inside one) gets a fresh staging that, like
    /// the thread's own, holds a scratch; the tile loops index `scratch[0]`.
    #[test]
    fn a_reentered_thread_gets_its_own_scratch() {
        with_scratch(|outer| {
            assert!(!outer.scratch.is_empty());
            outer.scratch[0] = Scratch::default();
            with_scratch(|inner| {
                assert_eq!(inner.scratch.len(), 1);
                assert!(!std::ptr::eq(&inner.scratch[0], &outer.scratch[0]));
            });
        });
    }
}
