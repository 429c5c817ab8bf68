//! Sampling and generation.

use crate::model::{Logits, Model};
use crate::runner::Runner;
use crate::Result;
use longctx_chunked_prefill::{prefill, Chunking, PrefillOptions};
use longctx_kvstore::{KvStore, SeqId};
use longctx_rope::Rope;

/// How the next token is picked. `temperature == 0` is greedy (on the penalised logits).
///
/// Penalties look at the tokens this sampler has picked (the answer so far), not the prompt:
/// `repetition_penalty` (llama.cpp's and transformers' rule: a logit of a token among the last
/// `repeat_last_n` picked is divided by it when positive, multiplied when negative; 1 is
/// off), `frequency_penalty` and `presence_penalty` (OpenAI's rule: `count * frequency +
/// (count > 0) * presence` subtracted, counting every token picked; 0 is off). `min_p` drops
/// the tokens less likely than `min_p` times the likeliest (after the temperature; 0 is off).
/// `no_repeat_ngram` (transformers' `no_repeat_ngram_size`; 0 is off) bans every token that
/// would make a run of that many picked tokens occur twice.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub repeat_last_n: usize,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub no_repeat_ngram: usize,
}

impl Default for Sampling {
    /// Greedy with every penalty off.
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            no_repeat_ngram: 0,
        }
    }
}

/// A value out of its range, named as the flag or request field that set it.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field} must be {range}, got {value}")]
pub struct BadSampling {
    pub field: &'static str,
    pub range: &'static str,
    pub value: f64,
}

impl Sampling {
    /// Greedy with a repetition penalty of 1.1 over the last 256 tokens and no run of 8
    /// tokens twice: the defaults of `ask` and `chat`, where SmolLM2-135M otherwise repeats
    /// one sentence until the token limit (over the last 64, as llama.cpp's default, it
    /// still repeated a paragraph of ~100 tokens; with the penalty alone, on another
    /// repository's text, a 25-token sentence three times).
    pub fn answering() -> Sampling {
        Sampling {
            repetition_penalty: 1.1,
            repeat_last_n: 256,
            no_repeat_ngram: 8,
            ..Sampling::default()
        }
    }

    /// Checks every value's range (NaN fails every check).
    pub fn validate(&self) -> std::result::Result<(), BadSampling> {
        let check = |ok: bool, field, range, value: f32| {
            if ok {
                Ok(())
            } else {
                Err(BadSampling {
                    field,
                    range,
                    value: value as f64,
                })
            }
        };
        let t = self.temperature;
        check(t >= 0.0 && t.is_finite(), "temperature", "at least 0", t)?;
        let p = self.top_p;
        check(p > 0.0 && p <= 1.0, "top_p", "within (0, 1]", p)?;
        let m = self.min_p;
        check((0.0..=1.0).contains(&m), "min_p", "within [0, 1]", m)?;
        let r = self.repetition_penalty;
        check(r > 0.0 && r.is_finite(), "repetition_penalty", "above 0", r)?;
        for (v, f) in [
            (self.frequency_penalty, "frequency_penalty"),
            (self.presence_penalty, "presence_penalty"),
        ] {
            // OpenAI's range.
            check((-2.0..=2.0).contains(&v), f, "within [-2, 2]", v)?;
        }
        Ok(())
    }

    fn penalises(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || self.no_repeat_ngram > 0
    }
}

/// A small, seedable generator (xorshift64*): the same seed gives the same text.
pub struct Sampler {
    cfg: Sampling,
    state: u64,
    /// Every token picked, in order.
    picked: Vec<u32>,
    /// How often each token was picked.
    counts: std::collections::HashMap<u32, u32>,
    /// Each token's weight, and the candidates drawn from: kept between tokens.
    weights: Vec<f32>,
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Sampler {
        let state = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        Sampler {
            cfg,
            state,
            picked: vec![],
            counts: Default::default(),
            weights: vec![],
            cand: vec![],
        }
    }

    fn uniform(&mut self) -> f32 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        let x = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32
    }

    /// `logits` with the repetition, frequency and presence penalties of the tokens picked so
    /// far applied.
    pub fn penalised(&self, logits: &[f32]) -> Vec<f32> {
        let mut out = logits.to_vec();
        let c = &self.cfg;
        if c.repetition_penalty != 1.0 {
            let from = self.picked.len().saturating_sub(c.repeat_last_n);
            let mut recent: Vec<u32> = self.picked[from..].to_vec();
            recent.sort_unstable();
            recent.dedup();
            for t in recent {
                if let Some(x) = out.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / c.repetition_penalty
                    } else {
                        *x * c.repetition_penalty
                    };
                }
            }
        }
        if c.frequency_penalty != 0.0 || c.presence_penalty != 0.0 {
            for (t, n) in &self.counts {
                if let Some(x) = out.get_mut(*t as usize) {
                    *x -= *n as f32 * c.frequency_penalty + c.presence_penalty;
                }
            }
        }
        let n = c.no_repeat_ngram;
        if n > 0 && self.picked.len() >= n.max(2) - 1 {
            // Every earlier run equal to the last n - 1 picked: the token after it is banned.
            let tail = &self.picked[self.picked.len() + 1 - n..];
            for w in self.picked.windows(n) {
                if &w[..n - 1] == tail {
                    if let Some(x) = out.get_mut(w[n - 1] as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        out
    }

    /// Picks the next token and remembers it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = if self.cfg.penalises() {
            let p = self.penalised(logits);
            self.pick(&p)
        } else {
            self.pick(logits)
        };
        self.picked.push(t);
        *self.counts.entry(t).or_default() += 1;
        t
    }

    /// The next token: the likeliest at temperature 0, else a draw from the softmax at the
    /// temperature over the candidates top-k, min-p and top-p keep (each by likelihood, equal
    /// weights by token), walked in token order with f64 sums. A NaN logit is never drawn.
    /// Nothing sorts the vocabulary: a sort of 49,152 indices took ~2 ms a token, serial
    /// between a batch's steps.
    fn pick(&mut self, logits: &[f32]) -> u32 {
        let temp = self.cfg.temperature;
        let top = argmax(logits);
        if temp <= 0.0 || logits.is_empty() {
            return top;
        }
        let mx = logits[top as usize];
        if mx == f32::NEG_INFINITY || mx.is_nan() {
            return top;
        }
        let w = &mut self.weights;
        w.resize(logits.len(), 0.0);
        longctx_kernels::cpu::exp_scaled_into(w, logits, mx, temp);
        // Weight 0 (far below the likeliest, or NaN) is never drawn; min-p keeps those at
        // least min_p times as likely as the likeliest (weight 1).
        let min_w = self.cfg.min_p;
        let allowed = |v: f32| v > 0.0 && v >= min_w;
        // The least likely candidate top-k and top-p keep, when either is on.
        let mut bound = None;
        let (k, p) = (self.cfg.top_k, self.cfg.top_p);
        if k > 0 || p < 1.0 {
            let cand = &mut self.cand;
            cand.clear();
            cand.extend(
                w.iter()
                    .enumerate()
                    .filter(|(_, v)| allowed(**v))
                    .map(|(i, v)| (*v, i as u32)),
            );
            let cut = k > 0 && k < cand.len();
            if cut {
                cand.select_nth_unstable_by(k - 1, likelier);
                cand.truncate(k);
            }
            if p < 1.0 {
                // The shortest likeliest-first run whose share reaches top_p.
                let want = p as f64 * cand.iter().map(|c| c.0 as f64).sum::<f64>();
                let i = locate(cand, |upto| upto >= want);
                bound = Some(cand[i]);
            } else if cut {
                bound = cand.iter().copied().max_by(likelier);
            }
        }
        let keep = |t: usize, v: f32| {
            allowed(v) && bound.is_none_or(|b| likelier(&(v, t as u32), &b).is_le())
        };
        let mass: f64 = w
            .iter()
            .enumerate()
            .filter(|(t, v)| keep(*t, **v))
            .map(|(_, v)| *v as f64)
            .sum();
        let at = self.uniform() as f64 * mass;
        let w = &self.weights;
        let mut acc = 0.0;
        let mut last = top;
        for (t, v) in w.iter().enumerate().filter(|(t, v)| keep(*t, **v)) {
            acc += *v as f64;
            last = t as u32;
            if acc > at {
                break;
            }
        }
        last
    }
}

/// The likelier of two (weight, token) candidates first; equal weights by token.
fn likelier(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The index, once `c` is reordered, of the first candidate in the order [`likelier`] gives
/// whose running sum of weights through it (in f64) satisfies `reached` (monotone: false,
/// then true); the last when none does. Linear time: each round selects the likelier half of
/// what is left and keeps the half holding the answer.
fn locate(c: &mut [(f32, u32)], reached: impl Fn(f64) -> bool) -> usize {
    let (mut lo, mut hi, mut before) = (0, c.len(), 0.0f64);
    while hi - lo > 64 {
        let mid = lo + (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid - lo, likelier);
        let upper: f64 = c[lo..mid].iter().map(|x| x.0 as f64).sum();
        if reached(before + upper) {
            hi = mid;
        } else {
            before += upper;
            lo = mid;
        }
    }
    c[lo..hi].sort_unstable_by(likelier);
    for (i, x) in c.iter().enumerate().take(hi).skip(lo) {
        before += x.0 as f64;
        if reached(before) {
            return i;
        }
    }
    hi.saturating_sub(1)
}

/// The index of the first largest value (NaN never wins); 0 when none is above -inf.
fn argmax(x: &[f32]) -> u32 {
    // 16 running maxima vectorise; the scalar fold over 49,152 logits was ~50 us a token.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for (m, v) in lanes.iter_mut().zip(c) {
            *m = if *v > *m { *v } else { *m };
        }
    }
    let best = lanes
        .iter()
        .chain(it.remainder())
        .fold(f32::NEG_INFINITY, |b, v| if *v > b { *v } else { b });
    if best == f32::NEG_INFINITY {
        return 0;
    }
    x.iter().position(|v| *v == best).unwrap_or(0) as u32
}

/// What a generation produced.
pub struct Generated {
    pub tokens: Vec<u32>,
    /// Seconds from this call to the first new token (its sampling only: the caller's prefill
    /// is not in it; the commands' closing line adds it) and for the rest.
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A sampler that has picked `tokens` (each forced by a logit far above the rest).
    fn after(cfg: Sampling, tokens: &[u32], vocab: usize) -> Sampler {
        let mut s = Sampler::new(cfg);
        for &t in tokens {
            let mut l = vec![0.0; vocab];
            l[t as usize] = 1000.0;
            assert_eq!(s.sample(&l), t);
        }
        s
    }

    /// No run of `n` picked tokens occurs twice, however strongly the logits pull back to one
    /// (greedy on fixed logits repeats one token forever without the ban); the ban looks at
    /// the answer, not beyond, and 0 is off.
    /// The sampler's rule spelt out: the candidates sorted by weight (likeliest first,
    /// equal ones by token) for top-k, min-p and top-p, then those kept walked in token order
    /// with f64 sums.
    fn pick_by_full_sort(cfg: &Sampling, u: f32, logits: &[f32]) -> u32 {
        let top = argmax(logits);
        if cfg.temperature <= 0.0 {
            return top;
        }
        let mut w = vec![0f32; logits.len()];
        let mx = logits[top as usize];
        longctx_kernels::cpu::exp_scaled_into(&mut w, logits, mx, cfg.temperature);
        let mut c: Vec<(f32, u32)> = (0..w.len() as u32)
            .map(|i| (w[i as usize], i))
            .filter(|c| c.0 > 0.0 && c.0 >= cfg.min_p)
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if cfg.top_k > 0 {
            c.truncate(cfg.top_k);
        }
        if cfg.top_p < 1.0 {
            let mass: f64 = c.iter().map(|x| x.0 as f64).sum();
            let mut acc = 0.0;
            let keep = c
                .iter()
                .position(|x| {
                    acc += x.0 as f64;
                    acc >= cfg.top_p as f64 * mass
                })
                .map_or(c.len(), |i| i + 1);
            c.truncate(keep);
        }
        c.sort_by_key(|x| x.1);
        let at = u as f64 * c.iter().map(|x| x.0 as f64).sum::<f64>();
        let mut acc = 0.0;
        for x in &c {
            acc += x.0 as f64;
            if acc > at {
                return x.1;
            }
        }
        c.last().map_or(top, |x| x.1)
    }

    #[test]
    fn picks_as_a_full_sort_would_on_random_logits_and_settings() {
        use rand::{Rng, SeedableRng};
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for case in 0..400 {
            // Vocabularies below, at and past the first sorted run (64), ties in some.
            let vocab = [1, 7, 64, 65, 300, 5000, 49152][case % 7];
            let ties = case % 3 == 0;
            // Some cases hold logits no draw may take: -inf and NaN.
            let holes = case % 5 == 0;
            let logits: Vec<f32> = (0..vocab)
                .map(|_| {
                    let v: f32 = rng.random_range(-8.0..8.0);
                    match rng.random_range(0..10) {
                        0 if holes => f32::NEG_INFINITY,
                        1 if holes => f32::NAN,
                        _ if ties => v.round(),
                        _ => v,
                    }
                })
                .collect();
            let cfg = Sampling {
                temperature: [0.0, 0.3, 1.0, 2.0][rng.random_range(0..4)],
                top_k: [0, 1, 5, 64, 100, 9000][rng.random_range(0..6)],
                top_p: [1.0, 0.9, 0.5, 0.05][rng.random_range(0..4)],
                min_p: [0.0, 0.0, 0.05, 0.5][rng.random_range(0..4)],
                seed: rng.random(),
                ..Sampling::default()
            };
            let mut s = Sampler::new(cfg.clone());
            for draw in 0..5 {
                // The uniform `pick` will draw, from a copy of its state.
                let u = Sampler {
                    state: s.state,
                    ..Sampler::new(cfg.clone())
                }
                .uniform();
                let want = pick_by_full_sort(&cfg, u, &logits);
                let got = s.pick(&logits);
                assert_eq!(got, want, "seed {seed} case {case} draw {draw} {cfg:?}");
            }
        }
    }

    #[test]
    fn the_likeliest_is_the_first_largest_and_nan_never_wins() {
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        for n in [1, 15, 16, 17, 33, 1000] {
            for at in [0, n / 2, n - 1] {
                let mut x = vec![1.0f32; n];
                x[at] = 2.0;
                // A NaN before it and a tie after it change nothing.
                if at > 0 {
                    x[at - 1] = f32::NAN;
                }
                if at + 1 < n {
                    x[n - 1] = 2.0;
                }
                assert_eq!(argmax(&x), at as u32, "n {n} at {at}");
            }
        }
    }

    #[test]
    fn no_run_of_n_tokens_is_picked_twice() {
        let logits: Vec<f32> = (0..40)
            .map(|t| if t >= 5 { 10.0 - t as f32 * 0.1 } else { -5.0 })
            .collect();
        for n in [0usize, 1, 2, 3, 8] {
            let mut s = Sampler::new(Sampling {
                no_repeat_ngram: n,
                ..Sampling::default()
            });
            let picked: Vec<u32> = (0..30).map(|_| s.sample(&logits)).collect();
            if n == 0 {
                assert!(picked.iter().all(|&t| t == 5), "{picked:?}");
                continue;
            }
            let mut seen = std::collections::HashSet::new();
            for w in picked.windows(n) {
                assert!(seen.insert(w.to_vec()), "n {n}: {w:?} twice in {picked:?}");
            }
            // Still the likeliest token that is allowed: the first pick is the argmax.
            assert_eq!(picked[0], 5);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_of_recent_tokens() {
        let cfg = Sampling {
            repetition_penalty: 2.0,
            ..Sampling::default()
        };
        let logits = [1.0, 4.0, -2.0, 3.0];
        let s = after(cfg.clone(), &[1, 1, 2], 4);
        // Token 1 (4 / 2) and token 2 (-2 * 2), once each however often picked.
        assert_eq!(s.penalised(&logits), [1.0, 2.0, -4.0, 3.0]);
        // Only the last repeat_last_n picks count.
        let s = after(
            Sampling {
                repeat_last_n: 1,
                ..cfg
            },
            &[1, 1, 2],
            4,
        );
        assert_eq!(s.penalised(&logits), [1.0, 4.0, -4.0, 3.0]);
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_as_openai_specifies() {
        let cfg = Sampling {
            frequency_penalty: 0.5,
            presence_penalty: 1.0,
            ..Sampling::default()
        };
        let s = after(cfg, &[1, 1, 2], 4);
        // Token 1: 4 - (2 * 0.5 + 1); token 2: -2 - (1 * 0.5 + 1).
        assert_eq!(s.penalised(&[1.0, 4.0, -2.0, 3.0]), [1.0, 2.0, -3.5, 3.0]);
    }

    /// Greedy stays deterministic and picks on the penalised logits: the loop "A B A B"
    /// breaks, and with every penalty off the pick is the plain argmax as before.
    #[test]
    fn greedy_picks_the_argmax_of_the_penalised_logits() {
        let logits = [0.0, 5.0, 4.9];
        let mut plain = Sampler::new(Sampling::default());
        assert_eq!([plain.sample(&logits), plain.sample(&logits)], [1, 1]);
        let cfg = Sampling {
            repetition_penalty: 1.1,
            ..Sampling::default()
        };
        let run = || {
            let mut s = Sampler::new(cfg.clone());
            [s.sample(&logits), s.sample(&logits), s.sample(&logits)]
        };
        // 5 / 1.1 = 4.55 < 4.9; then both are penalised: 4.55 vs 4.45.
        assert_eq!(run(), [1, 2, 1]);
        assert_eq!(run(), run());
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_likeliest() {
        // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let seen = |min_p: f32| {
            let mut s = Sampler::new(Sampling {
                temperature: 1.0,
                min_p,
                seed: 7,
                ..Sampling::default()
            });
            let mut seen = [false; 4];
            for _ in 0..2000 {
                seen[s.sample(&logits) as usize] = true;
            }
            seen
        };
        // 0.35 * 0.5 = 0.175: tokens 0 and 1 stay.
        assert_eq!(seen(0.35), [true, true, false, false]);
        // 0.25 * 0.5 = 0.125: token 2 too.
        assert_eq!(seen(0.25), [true, true, true, false]);
        assert_eq!(seen(0.0), [true; 4]);
        // A min-p above every other token leaves the likeliest alone.
        assert_eq!(seen(1.0), [true, false, false, false]);
    }

    #[test]
    fn out_of_range_values_are_named() {
        let bad = |s: Sampling| s.validate().unwrap_err().field;
        let d = Sampling::default;
        assert!(d().validate().is_ok());
        assert_eq!(bad(Sampling { min_p: 1.5, ..d() }), "min_p");
        assert_eq!(
            bad(Sampling {
                min_p: f32::NAN,
                ..d()
            }),
            "min_p"
        );
        assert_eq!(
            bad(Sampling {
                repetition_penalty: 0.0,
                ..d()
            }),
            "repetition_penalty"
        );
        assert_eq!(
            bad(Sampling {
                frequency_penalty: 2.5,
                ..d()
            }),
            "frequency_penalty"
        );
        assert_eq!(
            bad(Sampling {
                presence_penalty: -3.0,
                ..d()
            }),
            "presence_penalty"
        );
        assert_eq!(bad(Sampling { top_p: 0.0, ..d() }), "top_p");
        assert_eq!(
            bad(Sampling {
                temperature: -1.0,
                ..d()
            }),
            "temperature"
        );
    }
}
