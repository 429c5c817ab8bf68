//! Sharded decode: a sequence's KV is spread over the ranks; every rank attends the new
//! queries to its own shard, and the partial `(out, lse)` pairs travel round the ring
//! (`p - 1` steps, each rank forwarding what it received) so that every rank ends with the
//! merge of all of them.

use crate::attend::{attend_runs, AttnSpec};
use crate::partition::Run;
use crate::prefill::{pack, view};
use crate::transport::Transport;
use crate::RingError;
use bytemuck::Pod;
use longctx_kernels::{merge_into, Element};

/// Attends `n_q` queries (`q` `[n_q, h_q, d]` at absolute positions `q_pos..`) to the KV
/// held by all ranks (this rank's `k`, `v` in `k_runs` order). Returns the merged
/// `(out [n_q, h_q, d], lse [n_q, h_q])` on every rank.
pub fn ring_decode<T: Element + Pod>(
    t: &mut dyn Transport,
    q: &[T],
    q_pos: usize,
    k: &[T],
    v: &[T],
    k_runs: &[Run],
    spec: &AttnSpec,
) -> Result<(Vec<f32>, Vec<f32>), RingError> {
    let (r, p) = (t.rank(), t.world());
    let n_q = q.len() / (spec.h_q * spec.d).max(1);
    let q_runs = [Run {
        start: q_pos,
        stride: 1,
        len: n_q,
        offset: 0,
    }];
    let mut out = vec![0f32; n_q * spec.h_q * spec.d];
    let mut lse = vec![f32::NEG_INFINITY; n_q * spec.h_q];
    attend_runs(q, &q_runs, k, v, k_runs, spec, &mut out, &mut lse)?;
    let mut part = pack(&[&out[..], &lse[..]]);
    let (next, prev) = ((r + 1) % p, (r + p - 1) % p);
    let want = (out.len() + lse.len()) * 4;
    for _ in 1..p {
        t.start_exchange(next, part, prev)?;
        part = t.finish_exchange(prev)?;
        if part.len() != want {
            return Err(RingError::Malformed {
                rank: r,
                peer: prev,
                reason: format!("a partial result of {} bytes, expected {want}", part.len()),
            });
        }
        let vals = view::<f32>(&part);
        let (po, pl) = vals.split_at(out.len());
        merge_into(&mut out, &mut lse, po, pl, spec.d)?;
    }
    Ok((out, lse))
}
