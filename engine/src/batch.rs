//! One step's rows from many sequences: each entry is a sequence's next tokens (a prefill
//! chunk, or one decode token) at its own position. [`Model::forward_batch`] runs them all
//! through one pass: the matrix products over every row at once (each weight read once per
//! step, not once per sequence), attention per sequence over its own KV.
//!
//! [`Model::forward_batch`]: crate::Model::forward_batch

use crate::model::Logits;
use longctx_kvstore::SeqId;

/// A sequence's rows in a step.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub seq: SeqId,
    /// Appended at positions `pos0..pos0 + tokens.len()`; the sequence holds `pos0` tokens.
    pub tokens: &'a [u32],
    pub pos0: usize,
    pub want: Logits,
}

/// The entries of one step, each a different sequence.
#[derive(Clone, Debug, Default)]
pub struct Batch<'a> {
    pub entries: Vec<Entry<'a>>,
}

impl<'a> Batch<'a> {
    pub fn new() -> Self {
        Batch::default()
    }

    pub fn push(&mut self, seq: SeqId, tokens: &'a [u32], pos0: usize, want: Logits) {
        self.entries.push(Entry {
            seq,
            tokens,
            pos0,
            want,
        });
    }

    /// Rows in the step (every entry's tokens).
    pub fn rows(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }

    /// Each entry's first row.
    pub(crate) fn offsets(&self) -> Vec<usize> {
        let mut o = Vec::with_capacity(self.entries.len() + 1);
        let mut at = 0;
        for e in &self.entries {
            o.push(at);
            at += e.tokens.len();
        }
        o.push(at);
        o
    }

    /// The position of row `r` of the step.
    pub(crate) fn position(&self, r: usize) -> usize {
        let mut at = 0;
        for e in &self.entries {
            if r < at + e.tokens.len() {
                return e.pos0 + (r - at);
            }
            at += e.tokens.len();
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::{random_tensors, tiny_llama4_config, tiny_llama_config};

    fn tiny_llama() -> ModelConfig {
        tiny_llama_config(2, 8, 2, false)
    }
    use crate::weights::Weights;
    use crate::{KvOptions, Model, ModelConfig};
    use longctx_kvstore::KvStore;
    use rand::Rng;

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        assert_eq!(a.len(), b.len());
        let d: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n.max(1e-30)).sqrt()
    }

    /// Three sequences at different lengths, one forked from another (sharing its blocks),
    /// stepped together (a prefill chunk beside single decode tokens), give the logits each
    /// gets alone: the exact path within 1e-5, the quantised decode path within its int8
    /// rounding of each row alone (the same kernel on the same rows: 1e-5 too).
    #[test]
    fn a_batched_step_gives_each_sequence_its_own_logits() {
        let mut rng = rand::rng();
        let mut l4 = tiny_llama4_config();
        l4.llama4.as_mut().expect("Llama 4").chunk = 16;
        for (cfg, quant) in [(tiny_llama(), false), (tiny_llama(), true), (l4, false)] {
            let vocab = cfg.vocab as u32;
            let mut model =
                Model::new(cfg.clone(), Weights::from_map(random_tensors(&cfg, 3))).unwrap();
            if quant {
                model.enable_quant_decode().unwrap();
            }
            let toks = |n: usize, rng: &mut rand::rngs::ThreadRng| -> Vec<u32> {
                (0..n).map(|_| rng.random_range(0..vocab)).collect()
            };
            // Prompts of 37 and 5 tokens (Llama 4 with 16-token chunks here: 37 crosses two);
            // the third forks the first after its prompt.
            let (pa, pb) = (toks(37, &mut rng), toks(5, &mut rng));
            let next = (toks(1, &mut rng), toks(3, &mut rng), toks(1, &mut rng));
            let run = |batched: bool| -> Vec<Vec<f32>> {
                let store: KvStore = model
                    .kv_store(&KvOptions {
                        block_tokens: 16,
                        ..KvOptions::default()
                    })
                    .unwrap();
                let (a, b) = (store.create_seq(), store.create_seq());
                let f = |t: &[u32], p, s| model.forward(t, p, &store, s, Logits::All, None, 0);
                f(&pa, 0, a).unwrap();
                let c = store.fork(a).unwrap();
                if batched {
                    let mut step = Batch::new();
                    step.push(a, &next.0, 37, Logits::Last);
                    step.push(b, &pb, 0, Logits::All);
                    step.push(c, &next.2, 37, Logits::All);
                    let mut out = model.forward_batch(&step, &store, None, 0).unwrap();
                    // A second step: b decodes, a takes 3 more, c sits out.
                    let mut step = Batch::new();
                    step.push(b, &next.0, 5, Logits::Last);
                    step.push(a, &next.1, 38, Logits::All);
                    out.extend(model.forward_batch(&step, &store, None, 0).unwrap());
                    out
                } else {
                    let last = |v: Vec<f32>| v[v.len() - cfg.vocab..].to_vec();
                    vec![
                        last(f(&next.0, 37, a).unwrap()),
                        f(&pb, 0, b).unwrap(),
                        f(&next.2, 37, c).unwrap(),
                        last(f(&next.0, 5, b).unwrap()),
                        f(&next.1, 38, a).unwrap(),
                    ]
                }
            };
            let (alone, together) = (run(false), run(true));
            for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
                let e = rel_err(b, a);
                assert!(
                    e < 1e-5,
                    "{:?} quant {quant}: entry {i} rel err {e:e}",
                    cfg.arch
                );
            }
        }
    }

    #[test]
    fn a_sequence_twice_in_one_step_is_an_error() {
        let cfg = tiny_llama();
        let model = Model::new(cfg.clone(), Weights::from_map(random_tensors(&cfg, 3))).unwrap();
        let store = model.kv_store(&KvOptions::default()).unwrap();
        let s = store.create_seq();
        let mut step = Batch::new();
        step.push(s, &[1], 0, Logits::Last);
        step.push(s, &[2], 1, Logits::Last);
        let e = model.forward_batch(&step, &store, None, 0).unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        // Nothing was appended.
        assert_eq!(store.len(s, 0).unwrap(), 0);
        // A step that does not continue its sequence.
        let mut step = Batch::new();
        step.push(s, &[1], 3, Logits::Last);
        let e = model.forward_batch(&step, &store, None, 0).unwrap_err();
        assert!(e.to_string().contains("holds 0 tokens"), "{e}");
        // An empty step and an entry without tokens are fine.
        assert!(model
            .forward_batch(&Batch::new(), &store, None, 0)
            .unwrap()
            .is_empty());
        let mut step = Batch::new();
        step.push(s, &[], 0, Logits::Last);
        assert_eq!(
            model.forward_batch(&step, &store, None, 0).unwrap(),
            vec![Vec::<f32>::new()]
        );
    }
}
