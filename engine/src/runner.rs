//! A model as the chunked-prefill driver sees it: the forward pass with this run's RoPE
//! schedule (the config's, or a long-context override) and read-ahead depth.

use crate::model::{Logits, Model};
use crate::EngineError;
use longctx_chunked_prefill::ChunkModel;
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::Rope;

pub struct Runner<'a> {
    pub model: &'a Model,
    pub rope: Option<Rope>,
    pub prefetch: usize,
}

impl<'a> Runner<'a> {
    pub fn new(model: &'a Model) -> Runner<'a> {
        Runner {
            model,
            rope: None,
            prefetch: 4,
        }
    }
}

impl ChunkModel for Runner<'_> {
    type Error = EngineError;

    fn forward_chunk(
        &self,
        tokens: &[u32],
        pos0: usize,
        store: &KvStore,
        seq: SeqId,
    ) -> Result<Vec<f32>, EngineError> {
        self.model.forward(
            tokens,
            pos0,
            store,
            seq,
            Logits::Last,
            self.rope.as_ref(),
            self.prefetch,
        )
    }

    fn activation_bytes(&self, chunk: usize) -> u64 {
        let c = &self.model.cfg;
        let (q, kv) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let inter = c
            .intermediate
            .max(c.moe.as_ref().map_or(0, |m| 2 * m.intermediate));
        // x, the norm buffer, q, attention out, its partial, k, v, o, gate and up (f32), and
        // the LSE rows; plus the attention's contiguous KV segment and the last logits.
        let per_token = 4 * (3 * c.hidden + 3 * q + 2 * kv + 2 * inter + 2 * c.heads) as u64;
        let fixed = (4 * 2 * longctx_kvstore::SEGMENT * kv + 4 * c.vocab) as u64;
        per_token * chunk as u64 + fixed
    }
}
