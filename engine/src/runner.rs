//! A model as the chunked-prefill driver sees it: the forward pass with this run's RoPE
//! schedule (the config's, or a long-context override) and read-ahead depth.

use crate::model::{Logits, Model};
use crate::EngineError;
use longctx_chunked_prefill::ChunkModel;
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::{Rope, Scaling};

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

    /// Fixes a dynamic-NTK schedule at the length the whole job will reach (prompt plus
    /// answer). Dynamic NTK recomputes its base from the length so far; applied chunk by
    /// chunk, the first chunk's keys would be rotated with another base than the last
    /// chunk's. With the final length known, every position uses the base of that length
    /// (static NTK with factor `factor * L / max_pos - (factor - 1)`, 1 below `max_pos`).
    pub fn for_length(mut self, total: usize) -> Self {
        let rope = self
            .rope
            .clone()
            .unwrap_or_else(|| self.model.cfg.rope.clone());
        if let Scaling::Dynamic { factor, max_pos } = rope.scaling {
            let l = total.max(max_pos) as f64;
            let f = factor * l / max_pos as f64 - (factor - 1.0);
            let mut fixed = rope.clone();
            fixed.scaling = if f > 1.0 {
                Scaling::Ntk { factor: f }
            } else {
                Scaling::Default
            };
            self.rope = Some(fixed);
        }
        self
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{random_model, tiny_llama4_config};

    #[test]
    fn a_fixed_dynamic_schedule_is_the_dynamic_one_at_the_final_length() {
        let model = random_model(tiny_llama4_config(), 3).unwrap();
        let dynamic = Rope::new(
            10000.0,
            64,
            Scaling::Dynamic {
                factor: 4.0,
                max_pos: 8192,
            },
        )
        .unwrap();
        let runner = |total| {
            Runner {
                rope: Some(dynamic.clone()),
                ..Runner::new(&model)
            }
            .for_length(total)
            .rope
            .unwrap()
        };
        assert_eq!(runner(4000).scaling, Scaling::Default);
        let fixed = runner(20000);
        let (a, b) = (fixed.inv_freq(100), dynamic.inv_freq(20000));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-12 * y.abs(), "{x} vs {y}");
        }
    }
}
