//! Continuous batching: many requests share each forward step, as vLLM schedules them.
//! Every step has a token budget, filled first with one decode row per running request,
//! then with prefill chunks of the oldest requests still reading their prompts, so a long
//! prompt is read a chunk per step while the others keep decoding (bounded time per step).
//! Requests are admitted while sequence slots and KV tokens are free (a request reserves
//! its prompt plus `max_tokens`, so a running request never runs out); the rest wait in a
//! bounded queue. Finished sequences are kept in the prefix cache ([`prefix`]) for the
//! requests that begin as they did.

pub mod prefix;

use crate::batch::Batch;
use crate::generate::{Sampler, Sampling};
use crate::model::{Logits, Model};
use crate::{EngineError, Result};
use longctx_kvstore::{KvStore, SeqId};
use prefix::PrefixCache;
use std::collections::VecDeque;

/// Limits of a scheduler.
#[derive(Clone, Debug)]
pub struct SchedConfig {
    /// Requests decoding at once.
    pub max_running: usize,
    /// Requests waiting for a slot; more are refused ([`EngineError::Busy`]).
    pub max_waiting: usize,
    /// Rows per forward step: decode rows first, then prefill chunks.
    pub step_tokens: usize,
    /// Prompt plus new tokens allowed for one request.
    pub max_context: usize,
    /// KV tokens all running requests may reserve together (prompt + `max_tokens` each);
    /// the prefix cache's sequences give way when admission needs their room.
    pub kv_tokens: usize,
    /// Finished sequences kept for prefix reuse (0: no prefix cache).
    pub prefix_entries: usize,
}

impl Default for SchedConfig {
    fn default() -> Self {
        SchedConfig {
            max_running: 64,
            max_waiting: 256,
            step_tokens: 512,
            max_context: 8192,
            kv_tokens: 1 << 17,
            prefix_entries: 16,
        }
    }
}

/// One completion to run.
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end the answer (not part of it).
    pub stop: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Why an answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop token (or the caller's stop condition, through [`Scheduler::finish`]).
    Stop,
    /// `max_tokens` reached.
    Length,
    Cancelled,
}

/// Token counts of one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache (not computed).
    pub cached_tokens: usize,
}

/// What a step produced, per request.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The request got a slot; `cached_tokens` of its prompt came from the prefix cache.
    Admitted {
        id: RequestId,
        cached_tokens: usize,
    },
    Token {
        id: RequestId,
        token: u32,
    },
    Done {
        id: RequestId,
        finish: Finish,
        usage: Usage,
    },
    Failed {
        id: RequestId,
        error: String,
    },
}

/// Counters for `/metrics` and benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    pub steps: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens computed (the rest came from the prefix cache).
    pub prefill_tokens: u64,
    pub cached_tokens: u64,
    pub generated_tokens: u64,
    pub kv_blocks: [usize; 3],
    pub prefix_entries: usize,
}

struct Running {
    id: RequestId,
    req: Request,
    seq: SeqId,
    /// Tokens whose KV the sequence holds (the prompt read so far, then the answer).
    kv: Vec<u32>,
    /// A sampled token not yet run through the model.
    pending: Option<u32>,
    sampler: Sampler,
    usage: Usage,
}

impl Running {
    fn reading_prompt(&self) -> bool {
        self.kv.len() < self.req.prompt.len()
    }

    fn reserved(&self) -> usize {
        self.req.prompt.len() + self.req.max_tokens
    }
}

/// Continuous batching over one model and its KV store.
pub struct Scheduler<'m> {
    model: &'m Model,
    store: KvStore,
    cfg: SchedConfig,
    waiting: VecDeque<(RequestId, Request)>,
    running: Vec<Running>,
    cache: PrefixCache,
    next_id: u64,
    stats: Stats,
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, store: KvStore, cfg: SchedConfig) -> Scheduler<'m> {
        let cache = PrefixCache::new(cfg.prefix_entries);
        Scheduler {
            model,
            store,
            cfg,
            waiting: VecDeque::new(),
            running: vec![],
            cache,
            next_id: 0,
            stats: Stats::default(),
        }
    }

    pub fn store(&self) -> &KvStore {
        &self.store
    }

    /// Queues a request; refused when it cannot ever run or the queue is full.
    pub fn submit(&mut self, req: Request) -> Result<RequestId> {
        if req.prompt.is_empty() {
            return Err(EngineError::Batch("the prompt is empty".into()));
        }
        if let Some(t) = req
            .prompt
            .iter()
            .find(|t| **t as usize >= self.model.cfg.vocab)
        {
            return Err(EngineError::Tokenizer(format!(
                "token id {t} outside the vocabulary of {}",
                self.model.cfg.vocab
            )));
        }
        let limit = self.cfg.max_context.min(self.cfg.kv_tokens);
        if req.prompt.len().saturating_add(req.max_tokens) > limit {
            return Err(EngineError::PromptTooLong {
                prompt: req.prompt.len(),
                new: req.max_tokens,
                limit,
            });
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(EngineError::Busy(self.waiting.len()));
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.waiting.push_back((id, req));
        Ok(id)
    }

    /// True when nothing is running or waiting.
    pub fn idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Ends a request now (a client gone, a stop string seen): its sequence is freed or
    /// kept in the prefix cache. Returns its usage, `None` for an unknown (finished) id.
    pub fn finish(&mut self, id: RequestId) -> Option<Usage> {
        if let Some(i) = self.waiting.iter().position(|(w, _)| *w == id) {
            let (_, req) = self.waiting.remove(i).expect("found");
            return Some(Usage {
                prompt_tokens: req.prompt.len(),
                ..Usage::default()
            });
        }
        let i = self.running.iter().position(|r| r.id == id)?;
        let r = self.running.swap_remove(i);
        let usage = r.usage;
        self.retire(r);
        Some(usage)
    }

    pub fn stats(&self) -> Stats {
        let u = self.store.usage();
        Stats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks: u.blocks,
            prefix_entries: self.cache.len(),
            ..self.stats
        }
    }

    /// The sequence goes to the prefix cache (or is freed when it holds no whole prompt).
    fn retire(&mut self, r: Running) {
        if r.reading_prompt() {
            let _ = self.store.free(r.seq);
        } else {
            self.cache.insert(&self.store, r.kv, r.seq);
        }
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(Running::reserved).sum()
    }

    /// Moves waiting requests into free slots, oldest first, while their KV fits.
    fn admit(&mut self, events: &mut Vec<Event>) {
        while self.running.len() < self.cfg.max_running {
            let Some((_, req)) = self.waiting.front() else {
                return;
            };
            let need = req.prompt.len() + req.max_tokens;
            let cached = self.cache.tokens();
            if self.reserved() + need > self.cfg.kv_tokens {
                return;
            }
            if self.reserved() + need + cached > self.cfg.kv_tokens {
                self.cache
                    .evict_until(&self.store, self.cfg.kv_tokens - self.reserved() - need);
            }
            let (id, req) = self.waiting.pop_front().expect("front exists");
            let (seq, reused) = match self.cache.lookup(&self.store, &req.prompt) {
                Some((seq, n)) => (seq, n),
                None => (self.store.create_seq(), 0),
            };
            self.stats.prompt_tokens += req.prompt.len() as u64;
            self.stats.cached_tokens += reused as u64;
            let usage = Usage {
                prompt_tokens: req.prompt.len(),
                completion_tokens: 0,
                cached_tokens: reused,
            };
            events.push(Event::Admitted {
                id,
                cached_tokens: reused,
            });
            self.running.push(Running {
                id,
                kv: req.prompt[..reused].to_vec(),
                sampler: Sampler::new(req.sampling.clone()),
                req,
                seq,
                pending: None,
                usage,
            });
        }
    }

    /// One forward step over the running requests; what each produced.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = vec![];
        self.admit(&mut events);
        let mut budget = self.cfg.step_tokens.max(1);
        // (running index, tokens, position): decode rows first, then prompt chunks.
        let mut rows: Vec<(usize, Vec<u32>, usize)> = vec![];
        for (i, r) in self.running.iter().enumerate() {
            if let Some(t) = r.pending {
                rows.push((i, vec![t], r.kv.len()));
                budget = budget.saturating_sub(1);
            }
        }
        for (i, r) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if r.reading_prompt() {
                let at = r.kv.len();
                let take = (r.req.prompt.len() - at).min(budget);
                rows.push((i, r.req.prompt[at..at + take].to_vec(), at));
                budget -= take;
            }
        }
        if rows.is_empty() {
            return events;
        }
        let mut batch = Batch::new();
        for (i, toks, pos) in &rows {
            batch.push(self.running[*i].seq, toks, *pos, Logits::Last);
        }
        self.stats.steps += 1;
        match self.model.forward_batch(&batch, &self.store, None, 4) {
            Ok(logits) => {
                for ((i, toks, _), lg) in rows.iter().zip(logits) {
                    let r = &mut self.running[*i];
                    if r.pending.take().is_none() {
                        self.stats.prefill_tokens += toks.len() as u64;
                    }
                    r.kv.extend_from_slice(toks);
                    if r.reading_prompt() {
                        continue;
                    }
                    let t = r.sampler.sample(&lg);
                    if r.req.stop.contains(&t) {
                        events.push(Event::Done {
                            id: r.id,
                            finish: Finish::Stop,
                            usage: r.usage,
                        });
                        continue;
                    }
                    r.usage.completion_tokens += 1;
                    self.stats.generated_tokens += 1;
                    events.push(Event::Token { id: r.id, token: t });
                    if r.usage.completion_tokens >= r.req.max_tokens {
                        events.push(Event::Done {
                            id: r.id,
                            finish: Finish::Length,
                            usage: r.usage,
                        });
                    } else {
                        r.pending = Some(t);
                    }
                }
            }
            Err(e) => {
                // The step's sequences may hold part of its KV: they end, the rest go on.
                let msg = e.to_string();
                for (i, _, _) in &rows {
                    let r = &self.running[*i];
                    events.push(Event::Failed {
                        id: r.id,
                        error: msg.clone(),
                    });
                }
                let failed: Vec<RequestId> =
                    rows.iter().map(|(i, _, _)| self.running[*i].id).collect();
                self.running.retain(|r| {
                    if failed.contains(&r.id) {
                        let _ = self.store.free(r.seq);
                        false
                    } else {
                        true
                    }
                });
                return events;
            }
        }
        let done: Vec<RequestId> = events
            .iter()
            .filter_map(|e| match e {
                Event::Done { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        for id in done {
            self.finish(id);
        }
        events
    }
}

#[cfg(test)]
mod tests;
