//! Attention of a rank's queries over one KV shard, whatever the runs of the two shards: each
//! pair of runs becomes a few calls of the flash-attention kernel at local positions (see
//! [`calls`]), whose partial results are merged into the rank's running `(out, lse)` by
//! their log-sum-exp.

use crate::partition::Run;
use crate::RingError;
use bytemuck::Pod;
use longctx_kernels::{attention, merge_into, AttnParams, AttnShape, Element, Mask};
use std::ops::Range;

/// Everything about an attention besides its buffers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub h_q: usize,
    pub h_kv: usize,
    pub d: usize,
    pub mask: Mask,
    pub scale: f32,
}

/// One kernel call: query rows and key rows (indices into the runs' local elements) and the
/// kernel mask and positions that make it exact.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub q: Range<usize>,
    pub k: Range<usize>,
    pub mask: Mask,
    pub q_pos: usize,
    pub k_pos: usize,
}

impl Call {
    /// (query, key) pairs this call sees, per head.
    pub fn pairs(&self) -> u64 {
        let params = AttnParams {
            mask: self.mask,
            scale: 1.0,
            q_pos: self.q_pos,
            k_pos: self.k_pos,
        };
        let n_kv = self.k.len();
        (0..self.q.len())
            .map(|i| {
                let (lo, hi) = params.key_range(i, n_kv);
                (hi - lo) as u64
            })
            .sum()
    }
}

/// The kernel calls that attend run `a` (queries) to run `b` (keys) under `mask`; none when no
/// query sees a key. Runs of stride 1 keep absolute positions. Runs of an equal stride `s`
/// (striped) use local positions: key `j` is at or before query `i` exactly when
/// `j + shift <= i`, with `shift = ceil((b.start - a.start) / s)`, which is the kernel's causal
/// mask at shifted positions; a chunked-local mask becomes one causal call per chunk (a
/// chunk holds a contiguous range of each run's local indices).
pub fn calls(a: &Run, b: &Run, mask: Mask) -> Result<Vec<Call>, RingError> {
    if a.len == 0 || b.len == 0 {
        return Ok(vec![]);
    }
    if a.stride != b.stride {
        // Different strides (decode queries against a striped shard, say): one call per
        // query over the contiguous range of the keys it sees. Fine for a few queries.
        if a.len > 64 && b.len > 64 {
            return Err(RingError::Shape(format!(
                "runs of strides {} and {} with {} queries: use one partition for q and KV",
                a.stride, b.stride, a.len
            )));
        }
        let mut out = vec![];
        for i in 0..a.len {
            let (lo, hi) = mask.visible(a.pos(i));
            let (j0, j1) = b.indices_in(lo, hi);
            if j0 < j1 {
                out.push(Call {
                    q: i..i + 1,
                    k: j0..j1,
                    mask: Mask::None,
                    q_pos: 0,
                    k_pos: 0,
                });
            }
        }
        return Ok(out);
    }
    if a.stride == 1 {
        // Trim the keys to those some query sees (the masks are monotone in the position).
        let lo = mask.visible(a.start).0;
        let hi = mask.visible(a.last()).1;
        let (j0, j1) = b.indices_in(lo, hi);
        if j0 == j1 {
            return Ok(vec![]);
        }
        return Ok(vec![Call {
            q: 0..a.len,
            k: j0..j1,
            mask,
            q_pos: a.start,
            k_pos: b.pos(j0),
        }]);
    }
    let s = a.stride as isize;
    let diff = b.start as isize - a.start as isize;
    let shift = diff.div_euclid(s) + isize::from(diff.rem_euclid(s) != 0);
    let (qs, ks) = (shift.min(0).unsigned_abs(), shift.max(0) as usize);
    let causal = |q: Range<usize>, k: Range<usize>| Call {
        q_pos: q.start + qs,
        k_pos: k.start + ks,
        q,
        k,
        mask: Mask::Causal,
    };
    let keep = |c: Call| (c.pairs() > 0).then_some(c);
    match mask {
        Mask::None => Ok(vec![Call {
            q: 0..a.len,
            k: 0..b.len,
            mask: Mask::None,
            q_pos: 0,
            k_pos: 0,
        }]),
        Mask::Causal => Ok(keep(causal(0..a.len, 0..b.len)).into_iter().collect()),
        Mask::ChunkedLocal { chunk } => {
            let mut out = vec![];
            for c in a.start / chunk..=a.last() / chunk {
                let (i0, i1) = a.indices_in(c * chunk, (c + 1) * chunk);
                let (j0, j1) = b.indices_in(c * chunk, (c + 1) * chunk);
                if i0 < i1 && j0 < j1 {
                    out.extend(keep(causal(i0..i1, j0..j1)));
                }
            }
            Ok(out)
        }
    }
}

/// Visible (query, key) pairs per head between two shards: the work of one ring step.
pub fn pairs(q_runs: &[Run], k_runs: &[Run], mask: Mask) -> Result<u64, RingError> {
    let mut n = 0;
    for a in q_runs {
        for b in k_runs {
            n += calls(a, b, mask)?.iter().map(Call::pairs).sum::<u64>();
        }
    }
    Ok(n)
}

/// Attends the queries `q` (rows in `q_runs` order, `[n_q, h_q, d]`) to a KV shard (`k`,
/// `v` in `k_runs` order, `[n_kv, h_kv, d]`), merging into `out` `[n_q, h_q, d]` and `lse`
/// `[n_q, h_q]` (start them at zeros and `-inf`). Returns the pairs computed.
#[allow(clippy::too_many_arguments)]
pub fn attend_runs<T: Element + Pod>(
    q: &[T],
    q_runs: &[Run],
    k: &[T],
    v: &[T],
    k_runs: &[Run],
    spec: &AttnSpec,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<u64, RingError> {
    let AttnSpec {
        h_q, h_kv, d, mask, ..
    } = *spec;
    let (qrow, krow) = (h_q * d, h_kv * d);
    let n_q = crate::partition::tokens(q_runs);
    let n_kv = crate::partition::tokens(k_runs);
    if q.len() != n_q * qrow || k.len() != n_kv * krow || v.len() != k.len() {
        return Err(RingError::Shape(format!(
            "q has {} values (runs need {}), k {} and v {} (runs need {})",
            q.len(),
            n_q * qrow,
            k.len(),
            v.len(),
            n_kv * krow
        )));
    }
    if out.len() != n_q * qrow || lse.len() != n_q * h_q {
        return Err(RingError::Shape(
            "out or lse does not match the queries".into(),
        ));
    }
    let mut part_out: Vec<f32> = Vec::new();
    let mut part_lse: Vec<f32> = Vec::new();
    let mut done = 0;
    for a in q_runs {
        for b in k_runs {
            for c in calls(a, b, mask)? {
                let (qr, kr) = (
                    a.offset + c.q.start..a.offset + c.q.end,
                    b.offset + c.k.start..b.offset + c.k.end,
                );
                let shape = AttnShape {
                    n_q: qr.len(),
                    n_kv: kr.len(),
                    h_q,
                    h_kv,
                    d,
                };
                let params = AttnParams {
                    mask: c.mask,
                    scale: spec.scale,
                    q_pos: c.q_pos,
                    k_pos: c.k_pos,
                };
                part_out.resize(qr.len() * qrow, 0.0);
                part_lse.resize(qr.len() * h_q, 0.0);
                attention(
                    &q[qr.start * qrow..qr.end * qrow],
                    &k[kr.start * krow..kr.end * krow],
                    &v[kr.start * krow..kr.end * krow],
                    shape,
                    &params,
                    &mut part_out,
                    &mut part_lse,
                )?;
                merge_into(
                    &mut out[qr.start * qrow..qr.end * qrow],
                    &mut lse[qr.start * h_q..qr.end * h_q],
                    &part_out,
                    &part_lse,
                    d,
                )?;
                done += c.pairs();
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force: pairs of positions with key visible from query under the mask.
    fn brute(a: &Run, b: &Run, mask: Mask) -> u64 {
        let mut n = 0;
        for i in 0..a.len {
            let (lo, hi) = mask.visible(a.pos(i));
            n += (0..b.len).filter(|j| (lo..hi).contains(&b.pos(*j))).count() as u64;
        }
        n
    }

    #[test]
    fn calls_see_exactly_the_visible_pairs_for_every_stride_and_mask() {
        for stride in [1, 3, 4] {
            for (sa, sb) in [(0, 0), (0, 2), (2, 0), (1, 1), (5, 0), (0, 7)] {
                for (la, lb) in [(1, 1), (5, 9), (13, 4)] {
                    for mask in [
                        Mask::None,
                        Mask::Causal,
                        Mask::ChunkedLocal { chunk: 5 },
                        Mask::ChunkedLocal { chunk: 8 },
                    ] {
                        let (sa, sb) = if stride > 1 {
                            (sa % stride, sb % stride)
                        } else {
                            (sa, sb)
                        };
                        let a = Run {
                            start: sa,
                            stride,
                            len: la,
                            offset: 0,
                        };
                        let b = Run {
                            start: sb,
                            stride,
                            len: lb,
                            offset: 0,
                        };
                        let got: u64 = calls(&a, &b, mask).unwrap().iter().map(Call::pairs).sum();
                        assert_eq!(got, brute(&a, &b, mask), "{a:?} {b:?} {mask:?}");
                    }
                }
            }
        }
        // Decode queries (stride 1) against a striped shard.
        for mask in [Mask::None, Mask::Causal, Mask::ChunkedLocal { chunk: 5 }] {
            let a = Run {
                start: 10,
                stride: 1,
                len: 3,
                offset: 0,
            };
            let b = Run {
                start: 1,
                stride: 3,
                len: 9,
                offset: 0,
            };
            let got: u64 = calls(&a, &b, mask).unwrap().iter().map(Call::pairs).sum();
            assert_eq!(got, brute(&a, &b, mask), "{mask:?}");
        }
    }
}
