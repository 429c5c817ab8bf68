//! The prefill ring. Step `s` on rank `r` attends its queries to the KV shard of rank
//! `r - s (mod p)`: before computing, the rank forwards that shard to `r + 1`, so the
//! transfer for step `s + 1` runs while step `s` computes (double buffering: two shards are
//! alive per rank). Only KV heads travel. Steps that no rank needs (under a chunked-local
//! mask, the shards before the start of every rank's chunks) are not run at all, so Llama 4's
//! local layers pay one or two steps and only its global layers the whole ring.

use crate::attend::{attend_runs, pairs, AttnSpec};
use crate::partition::{tokens, Run};
use crate::transport::Transport;
use crate::RingError;
use bytemuck::Pod;
use bytes::Bytes;
use longctx_kernels::Element;
use std::borrow::Cow;
use std::time::Instant;

/// What one step of one rank did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStat {
    /// Whose KV shard it attended to.
    pub source: usize,
    /// Seconds computing.
    pub compute_s: f64,
    /// Seconds waiting for the next shard after computing (transfer not hidden).
    pub wait_s: f64,
    /// Visible (query, key) pairs per head it computed.
    pub pairs: u64,
}

/// A rank's share of the result: `out` `[n_local, h_q, d]` and `lse` `[n_local, h_q]` in its
/// run order, and what each step did.
#[derive(Clone, Debug)]
pub struct RankResult {
    pub out: Vec<f32>,
    pub lse: Vec<f32>,
    pub steps: Vec<StepStat>,
}

/// Steps the ring needs: one more than the farthest source any rank sees a key of.
pub fn steps_needed(layout: &[Vec<Run>], spec: &AttnSpec) -> Result<usize, RingError> {
    let p = layout.len();
    let mut last = 0;
    for s in 1..p {
        for r in 0..p {
            if pairs(&layout[r], &layout[(r + p - s) % p], spec.mask)? > 0 {
                last = s;
                break;
            }
        }
    }
    Ok(last + 1)
}

/// K then V of a shard, in one buffer with 8-byte alignment (so the receiver in the same
/// process reads it in place).
pub(crate) fn pack<T: Pod>(parts: &[&[T]]) -> Bytes {
    let bytes: usize = parts.iter().map(|p| std::mem::size_of_val(*p)).sum();
    let mut buf = vec![0u64; bytes.div_ceil(8)];
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
    let mut at = 0;
    for p in parts {
        let src: &[u8] = bytemuck::cast_slice(p);
        dst[at..at + src.len()].copy_from_slice(src);
        at += src.len();
    }
    Bytes::from_owner(Aligned(buf, bytes))
}

struct Aligned(Vec<u64>, usize);

impl AsRef<[u8]> for Aligned {
    fn as_ref(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.0)[..self.1]
    }
}

/// A typed view of received bytes: in place when aligned, else copied.
pub(crate) fn view<T: Pod>(b: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(bytemuck::pod_collect_to_vec(b)),
    }
}

/// Runs this rank's part of ring attention. `layout[r]` is rank `r`'s shard; `q`, `k`, `v`
/// are this rank's rows in its run order (`[n_local, h_q, d]`, `[n_local, h_kv, d]`).
/// Every rank of the group must call it with the same layout and spec.
pub fn ring_attention<T: Element + Pod>(
    t: &mut dyn Transport,
    layout: &[Vec<Run>],
    q: &[T],
    k: &[T],
    v: &[T],
    spec: &AttnSpec,
) -> Result<RankResult, RingError> {
    let (r, p) = (t.rank(), t.world());
    if layout.len() != p {
        return Err(RingError::Shape(format!(
            "a layout of {} shards for a group of {p} ranks",
            layout.len()
        )));
    }
    let n = tokens(&layout[r]);
    let krow = spec.h_kv * spec.d;
    let mut out = vec![0f32; n * spec.h_q * spec.d];
    let mut lse = vec![f32::NEG_INFINITY; n * spec.h_q];
    let steps = steps_needed(layout, spec)?;
    let mut stats = Vec::with_capacity(steps);
    let mut shard = pack(&[k, v]);
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    for s in 0..steps {
        let source = (r + p - s) % p;
        let more = s + 1 < steps;
        if more {
            t.start_exchange(next, shard.clone(), prev)?;
        }
        let want = 2 * tokens(&layout[source]) * krow * std::mem::size_of::<T>();
        if shard.len() != want {
            return Err(RingError::Malformed {
                rank: r,
                peer: source,
                reason: format!(
                    "a KV shard of {} bytes, the layout says {want}",
                    shard.len()
                ),
            });
        }
        let (kb, vb) = shard.split_at(want / 2);
        let (ks, vs) = (view::<T>(kb), view::<T>(vb));
        let t0 = Instant::now();
        let done = attend_runs(
            q,
            &layout[r],
            &ks,
            &vs,
            &layout[source],
            spec,
            &mut out,
            &mut lse,
        )?;
        let compute_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if more {
            shard = t.finish_exchange(prev)?;
        }
        stats.push(StepStat {
            source,
            compute_s,
            wait_s: t1.elapsed().as_secs_f64(),
            pairs: done,
        });
    }
    Ok(RankResult {
        out,
        lse,
        steps: stats,
    })
}
