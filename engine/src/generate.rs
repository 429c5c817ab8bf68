//! Sampling and generation.

use crate::model::{Logits, Model};
use crate::runner::Runner;
use crate::Result;
use longctx_chunked_prefill::{prefill, Chunking, PrefillOptions};
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::Rope;

/// How the next token is picked. `temperature == 0` is greedy.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// A small, seedable generator (xorshift64*): the same seed gives the same text.
pub struct Sampler {
    cfg: Sampling,
    state: u64,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Sampler {
        let state = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Sampler { cfg, state }
    }

    fn uniform(&mut self) -> f32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, v)| if *v > b.1 { (i, *v) } else { b },
                )
                .0 as u32
        };
        if self.cfg.temperature <= 0.0 {
            return argmax();
        }
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        if self.cfg.top_k > 0 {
            idx.truncate(self.cfg.top_k);
        }
        let mx = logits[idx[0]];
        let mut p: Vec<f32> = idx
            .iter()
            .map(|i| ((logits[*i] - mx) / self.cfg.temperature).exp())
            .collect();
        let total: f32 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= total);
        if self.cfg.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = p
                .iter()
                .position(|x| {
                    acc += x;
                    acc >= self.cfg.top_p
                })
                .map_or(p.len(), |i| i + 1);
            p.truncate(keep);
            let t: f32 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= t);
        }
        let mut u = self.uniform();
        for (i, x) in p.iter().enumerate() {
            if u < *x {
                return idx[i] as u32;
            }
            u -= x;
        }
        idx[p.len() - 1] as u32
    }
}

/// What a generation produced.
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Seconds to the first new token (prefill included) and for the rest.
    pub first_token_s: f64,
    pub decode_s: f64,
}

/// Continues `seq` (holding `pos` tokens, the last of which gave `last_logits`) by up to
/// `max_tokens` tokens, calling `on_token` with each; stops at any of `stop`.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    store: &KvStore,
    seq: SeqId,
    mut pos: usize,
    last_logits: &[f32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    rope: Option<&Rope>,
    prefetch: usize,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    let t0 = std::time::Instant::now();
    let mut out = vec![];
    let mut logits = last_logits.to_vec();
    let mut first = 0.0;
    for i in 0..max_tokens {
        let t = sampler.sample(&logits);
        if i == 0 {
            first = t0.elapsed().as_secs_f64();
        }
        if stop.contains(&t) {
            break;
        }
        out.push(t);
        on_token(t)?;
        if i + 1 == max_tokens {
            break;
        }
        logits = model.forward(&[t], pos, store, seq, Logits::Last, rope, prefetch)?;
        pos += 1;
    }
    Ok(Generated {
        tokens: out,
        first_token_s: first,
        decode_s: t0.elapsed().as_secs_f64() - first,
    })
}

/// Prefills `ids` into a new sequence of `store` (in chunks whose activations fit 256 MiB),
/// then generates up to `max_tokens` as [`generate`] does.
pub fn complete(
    runner: &Runner,
    store: &KvStore,
    ids: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generated> {
    let opts = PrefillOptions {
        chunking: Chunking::Budget(256 << 20),
        checkpoints: None,
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    let done = prefill(runner, store, ids, &opts, &never, |_| {})?;
    generate(
        runner.model,
        store,
        done.seq,
        ids.len(),
        &done.logits,
        max_tokens,
        sampler,
        stop,
        runner.rope.as_ref(),
        runner.prefetch,
        on_token,
    )
}

/// Negative log-likelihood (nats) of token `target` under `logits`.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let mx = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx
        + logits
            .iter()
            .map(|v| (*v as f64 - mx).exp())
            .sum::<f64>()
            .ln();
    lse - logits[target as usize] as f64
}
