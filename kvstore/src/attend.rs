//! Attention of a block of queries over one layer's KV as the store holds it: the layer is
//! streamed block by block (read ahead of use), each block attended by the CPU kernel at its
//! absolute positions, and the partial results merged by their log-sum-exp. Blocks no query
//! can see under the mask are not read at all.

use crate::{KvStore, Result, SeqId, StreamOptions};
use bytemuck::Pod;
use longctx_kernels::{attention, merge_into, AttnParams, AttnShape, Element};

/// Queries `q` (`[n_q, h_q, d]`, the first at absolute position `params.q_pos`) against every
/// held key of `layer`; `params.k_pos` is ignored (blocks carry their positions). Writes
/// `out` `[n_q, h_q, d]` and `lse` `[n_q, h_q]` as [`longctx_kernels::attention`] does.
#[allow(clippy::too_many_arguments)]
pub fn attend<T: Element + Pod>(
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
    let mut part_out = vec![0f32; out.len()];
    let mut part_lse = vec![0f32; lse.len()];
    for block in store.stream::<T>(seq, layer, opts)? {
        let block = block?;
        if block.pos + block.len <= lo || block.pos >= hi {
            continue;
        }
        let shape = AttnShape {
            n_q,
            n_kv: block.len,
            h_q,
            h_kv,
            d,
        };
        let p = params.at(params.q_pos, block.pos);
        attention(
            q,
            block.k(),
            block.v(),
            shape,
            &p,
            &mut part_out,
            &mut part_lse,
        )?;
        merge_into(out, lse, &part_out, &part_lse, d)?;
    }
    Ok(())
}
