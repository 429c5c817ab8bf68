//! Continuous batching: many requests share each forward step, as vLLM schedules them.
//! Every step has a token budget, filled first with one decode row per running request,
//! then with prefill chunks of the oldest requests still reading their prompts, so a long
//! prompt is read a chunk per step while the others keep decoding (bounded time per step).
//! With two or more threads such a step runs in two lanes instead (half the threads each):
//! the prompt's chunk in one, decode rounds over the others in the other, each round's
//! tokens out as it ends ([`Scheduler::step_with`]).
//! Requests are admitted while sequence slots are free and their prompt's KV fits in the
//! device tier's share (`kv_tokens`); the rest wait in a bounded queue. Answers grow, so a
//! step may need more KV than is free: then the newest running request is preempted, as
//! vLLM swaps: its blocks move to the host tier (not recomputed) and come back when room
//! frees, before any new request is admitted. Finished sequences are kept in the prefix cache
//! ([`prefix`]) for the requests that begin as they did.

pub mod pace;
pub mod prefix;

use crate::batch::Batch;
use crate::generate::{Sampler, Sampling};
use crate::model::{Logits, Model};
use crate::{EngineError, Result};
use longctx_kvstore::{KvStore, SeqId, Tier};
use pace::Pacer;
use prefix::PrefixCache;
use rayon::prelude::*;
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
    /// KV tokens the running requests may hold in the device tier together, counted in
    /// whole blocks. A step that needs more preempts the newest running request to the
    /// host tier; the prefix cache's sequences give way first.
    pub kv_tokens: usize,
    /// Finished sequences kept for prefix reuse (0: no prefix cache).
    pub prefix_entries: usize,
    /// While requests decode, a step takes only as many prompt rows as keep it within this
    /// many times the time of its decode rows alone ([`pace`]); 0 or 1: no limit but
    /// `step_tokens`.
    pub max_slowdown: f64,
    /// A step's decode rows and its prompt rows run side by side, each on half the threads
    /// (two thread pools), when both are present and there are at least two threads. On a CPU two
    /// threads on one step each do less than one alone, so a prompt read beside the decoding
    /// requests slows their tokens less, and is itself read faster, than in shared steps.
    pub prompt_lane: bool,
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
            max_slowdown: 3.0,
            prompt_lane: true,
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
    /// Steps whose decode and prompt rows ran side by side in two lanes.
    pub lane_steps: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens computed (the rest came from the prefix cache).
    pub prefill_tokens: u64,
    pub cached_tokens: u64,
    pub generated_tokens: u64,
    pub kv_blocks: [usize; 3],
    pub prefix_entries: usize,
    /// Requests preempted now, their KV in the host tier.
    pub swapped: usize,
    /// Preemptions so far, and the blocks they moved out of the device tier and back in.
    pub preemptions: u64,
    pub swap_out_blocks: u64,
    pub swap_in_blocks: u64,
}

/// A row of a step: the running request's index, its tokens, their first position.
type Row = (usize, Vec<u32>, usize);

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

    /// Device KV tokens the request claims, in whole blocks of `bt`, once `extra` more are
    /// appended: all of its prompt from admission on, as the prompt will be read.
    fn held(&self, extra: usize, bt: usize) -> usize {
        (self.kv.len() + extra)
            .max(self.req.prompt.len())
            .div_ceil(bt)
            * bt
    }
}

/// Two thread pools that split the threads: a step's decode rows run in one while its prompt
/// rows run in the other.
struct Lanes {
    decode: rayon::ThreadPool,
    prompt: rayon::ThreadPool,
}

impl Lanes {
    /// Lanes over `threads` threads (the decode lane takes the odd one); none for fewer than
    /// two, or where the pools cannot be made.
    fn new(threads: usize) -> Option<Lanes> {
        if threads < 2 {
            return None;
        }
        let pool = |n: usize, name: &'static str| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(move |i| format!("longctx-{name}-{i}"))
                .build()
                .ok()
        };
        Some(Lanes {
            decode: pool(threads - threads / 2, "decode")?,
            prompt: pool(threads / 2, "prompt")?,
        })
    }
}

/// Continuous batching over one model and its KV store.
pub struct Scheduler<'m> {
    model: &'m Model,
    store: KvStore,
    cfg: SchedConfig,
    waiting: VecDeque<(RequestId, Request)>,
    running: Vec<Running>,
    /// Preempted requests, their blocks in the host tier.
    swapped: Vec<Running>,
    cache: PrefixCache,
    pacer: Pacer,
    lanes: Option<std::sync::Arc<Lanes>>,
    next_id: u64,
    stats: Stats,
}

impl<'m> Scheduler<'m> {
    pub fn new(model: &'m Model, store: KvStore, cfg: SchedConfig) -> Scheduler<'m> {
        let cache = PrefixCache::new(cfg.prefix_entries);
        let pacer = Pacer::new(cfg.max_slowdown);
        // The CUDA backend runs a step on the GPU: no CPU threads to split.
        let lanes = (cfg.prompt_lane && !model.on_cuda())
            .then(|| Lanes::new(rayon::current_num_threads()))
            .flatten()
            .map(std::sync::Arc::new);
        Scheduler {
            model,
            store,
            cfg,
            waiting: VecDeque::new(),
            running: vec![],
            swapped: vec![],
            cache,
            pacer,
            lanes,
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
        self.running.is_empty() && self.waiting.is_empty() && self.swapped.is_empty()
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
        let r = match self.running.iter().position(|r| r.id == id) {
            Some(i) => self.running.swap_remove(i),
            None => {
                let i = self.swapped.iter().position(|r| r.id == id)?;
                self.swapped.swap_remove(i)
            }
        };
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
            swapped: self.swapped.len(),
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

    fn block_tokens(&self) -> usize {
        self.store.config().block_tokens
    }

    /// Device KV tokens the running requests hold (whole blocks).
    fn used(&self) -> usize {
        let bt = self.block_tokens();
        self.running.iter().map(|r| r.held(0, bt)).sum()
    }

    /// Whether `need` more device KV tokens fit beside the running requests; when they do,
    /// prefix-cache entries are dropped until they fit beside those too. With nothing
    /// running everything fits (`submit` bounds a request by `kv_tokens`, but not in whole
    /// blocks), so a request alone always runs.
    fn room_for(&mut self, need: usize) -> bool {
        let free = match self.cfg.kv_tokens.checked_sub(self.used() + need) {
            Some(free) => free,
            None if self.running.is_empty() => 0,
            None => return false,
        };
        if self.cache.tokens() > free {
            self.cache.evict_until(&self.store, free);
        }
        true
    }

    /// Preempts the newest running request: its blocks move to the host tier (where the
    /// store has none, they stay put and only the request waits).
    fn preempt(&mut self) {
        let Some(i) = (0..self.running.len()).max_by_key(|i| self.running[*i].id) else {
            return;
        };
        let r = self.running.swap_remove(i);
        if let Ok(n) = self.store.move_seq(r.seq, Tier::Host) {
            self.stats.swap_out_blocks += n as u64;
        }
        self.stats.preemptions += 1;
        self.swapped.push(r);
    }

    /// Brings preempted requests back, oldest first, then moves waiting requests into free
    /// slots, oldest first, while their KV fits. New requests wait while any is preempted.
    fn admit(&mut self, events: &mut Vec<Event>) {
        let bt = self.block_tokens();
        while self.running.len() < self.cfg.max_running && !self.swapped.is_empty() {
            let i = (0..self.swapped.len())
                .min_by_key(|i| self.swapped[*i].id)
                .expect("not empty");
            if !self.room_for(self.swapped[i].held(1, bt)) {
                return;
            }
            let r = self.swapped.swap_remove(i);
            match self.store.move_seq(r.seq, Tier::Device) {
                Ok(n) => {
                    self.stats.swap_in_blocks += n as u64;
                    self.running.push(r);
                }
                Err(e) => {
                    events.push(Event::Failed {
                        id: r.id,
                        error: e.to_string(),
                    });
                    let _ = self.store.free(r.seq);
                }
            }
        }
        if !self.swapped.is_empty() {
            return;
        }
        while self.running.len() < self.cfg.max_running {
            let Some((_, req)) = self.waiting.front() else {
                return;
            };
            // Its whole prompt and first answer token must fit now.
            if !self.room_for((req.prompt.len() + 1).div_ceil(bt) * bt) {
                return;
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

    /// The step's rows as (running index, tokens, position): a decode row for every
    /// request with a pending token, then prompt chunks, oldest request first, while the
    /// step's token budget lasts.
    fn plan(&self) -> Vec<Row> {
        let mut budget = self.cfg.step_tokens.max(1);
        let mut rows = vec![];
        for (i, r) in self.running.iter().enumerate() {
            if let Some(t) = r.pending {
                rows.push((i, vec![t], r.kv.len()));
                budget = budget.saturating_sub(1);
            }
        }
        let decode_rows = rows.len();
        // With lanes a prompt beside decode rows is read in its own lane ([`Self::lane_step`]),
        // sized there: any prompt row here only says that one is being read.
        let mut budget = match self.lanes {
            Some(_) => budget,
            None => self.pacer.prompt_rows(decode_rows, budget),
        };
        let mut reading: Vec<usize> = (0..self.running.len())
            .filter(|i| self.running[*i].reading_prompt())
            .collect();
        reading.sort_by_key(|i| self.running[*i].id);
        for i in reading {
            if budget == 0 {
                break;
            }
            let r = &self.running[i];
            let at = r.kv.len();
            let take = (r.req.prompt.len() - at).min(budget);
            rows.push((i, r.req.prompt[at..at + take].to_vec(), at));
            budget -= take;
        }
        rows
    }

    /// The forward step of `rows` (as [`Scheduler::plan`] gives them), in `pool` or the
    /// caller's; its logits, one entry a row, and the seconds it took.
    fn forward_in(
        &self,
        pool: Option<&rayon::ThreadPool>,
        rows: &[Row],
    ) -> (Result<Vec<Vec<f32>>>, f64) {
        let mut batch = Batch::new();
        for (i, toks, pos) in rows {
            batch.push(self.running[*i].seq, toks, *pos, Logits::Last);
        }
        let t = std::time::Instant::now();
        let run = || self.model.forward_batch(&batch, &self.store, None, 4);
        let out = match pool {
            Some(p) => p.install(run),
            None => run(),
        };
        (out, t.elapsed().as_secs_f64())
    }

    /// Device KV tokens the running requests hold once `rows` are appended (whole blocks).
    fn kv_after(&self, rows: &[Row]) -> usize {
        let bt = self.block_tokens();
        self.running
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let new = rows
                    .iter()
                    .find(|row| row.0 == i)
                    .map_or(0, |row| row.1.len());
                r.held(new, bt)
            })
            .sum()
    }

    /// One forward step over the running requests; what each produced.
    pub fn step(&mut self) -> Vec<Event> {
        let mut events = vec![];
        self.step_with(&mut |e| events.push(e));
        events
    }

    /// [`Scheduler::step`], each event handed to `emit` as it happens. With a prompt lane, a
    /// step that reads a prompt beside decoding requests runs several decode rounds while
    /// the prompt lane reads (see `Scheduler::lane_step`): their tokens come out as each
    /// round ends, not when the step does.
    pub fn step_with(&mut self, emit: &mut dyn FnMut(Event)) {
        let mut events = vec![];
        self.admit(&mut events);
        let mut rows = self.plan();
        // Under KV pressure the newest requests give way until the step fits.
        loop {
            let after = self.kv_after(&rows);
            if after <= self.cfg.kv_tokens || self.running.len() <= 1 {
                if self.cache.tokens() > self.cfg.kv_tokens.saturating_sub(after) {
                    self.cache
                        .evict_until(&self.store, self.cfg.kv_tokens.saturating_sub(after));
                }
                break;
            }
            self.preempt();
            rows = self.plan();
        }
        if rows.is_empty() {
            events.into_iter().for_each(&mut *emit);
            return;
        }
        self.stats.steps += 1;
        // Decode rows come first in the plan, prompt chunks after them.
        let decode_rows = rows
            .iter()
            .filter(|(i, _, _)| self.running[*i].pending.is_some())
            .count();
        let prompt_rows = rows.iter().map(|r| r.1.len()).sum::<usize>() - decode_rows;
        if let (Some(lanes), true) = (self.lanes.clone(), decode_rows > 0 && prompt_rows > 0) {
            events.into_iter().for_each(&mut *emit);
            // The first prompt chunk's request: the oldest reading its prompt.
            let reader = rows[decode_rows].0;
            rows.truncate(decode_rows);
            self.lane_step(&lanes, rows, reader, emit);
            return;
        }
        let (out, secs) = self.forward_in(None, &rows);
        self.pacer.observe(decode_rows, prompt_rows, secs);
        self.absorb(&rows, out, &mut events, true);
        self.finish_done(&events);
        events.into_iter().for_each(&mut *emit);
    }

    /// A step in two lanes: the request `reader` (running index; the oldest reading its
    /// prompt) reads a chunk of it in the prompt lane (about [`pace::LANE_SECS`] of work, so
    /// that the lane reads long chunks and rarely waits), while the decode lane runs decode
    /// rounds over the other requests, the first over `decode` (rows as [`Scheduler::plan`]
    /// gives them), until the chunk is read. Each round's events go to `emit` when it ends.
    fn lane_step(
        &mut self,
        lanes: &Lanes,
        decode: Vec<Row>,
        reader: usize,
        emit: &mut dyn FnMut(Event),
    ) {
        self.stats.lane_steps += 1;
        let (id, seq, at) = {
            let r = &self.running[reader];
            (r.id, r.seq, r.kv.len())
        };
        let left = self.running[reader].req.prompt.len() - at;
        let take = self
            .pacer
            .lane_prompt_rows(left, self.cfg.step_tokens.max(1));
        let toks = self.running[reader].req.prompt[at..at + take].to_vec();
        let (model, store) = (self.model, self.store.clone());
        let (read, prompt_secs) = std::thread::scope(|s| {
            let chunk = &toks;
            let prompt = s.spawn(move || {
                let mut b = Batch::new();
                b.push(seq, chunk, at, Logits::Last);
                let t = std::time::Instant::now();
                let out = lanes
                    .prompt
                    .install(|| model.forward_batch(&b, &store, None, 4));
                (out, t.elapsed().as_secs_f64())
            });
            let mut rows = decode;
            // Decode rounds until the chunk is read, each one's new KV within the budget.
            while !rows.is_empty() && self.kv_after(&rows) <= self.cfg.kv_tokens {
                let (out, _) = self.forward_in(Some(&lanes.decode), &rows);
                let mut events = vec![];
                // Sampled on this thread: the prompt lane computes beside it.
                self.absorb(&rows, out, &mut events, false);
                self.finish_done(&events);
                events.into_iter().for_each(&mut *emit);
                if prompt.is_finished() {
                    break;
                }
                rows = self.plan_decode();
            }
            prompt.join().unwrap_or_else(|_| {
                let e = EngineError::Batch("the prompt lane's step panicked".into());
                (Err(e), f64::NAN)
            })
        });
        self.pacer.observe_lane(take, prompt_secs);
        // Rounds may have ended other requests: the reader by its id.
        let Some(i) = self.running.iter().position(|r| r.id == id) else {
            return;
        };
        let rows = [(i, toks, at)];
        let mut events = vec![];
        self.absorb(
            &rows,
            read.map(|lg| vec![lg.into_iter().next().unwrap_or_default()]),
            &mut events,
            true,
        );
        self.finish_done(&events);
        events.into_iter().for_each(&mut *emit);
    }

    /// Decode rows only: one for every request with a pending token.
    fn plan_decode(&self) -> Vec<Row> {
        self.running
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.pending.map(|t| (i, vec![t], r.kv.len())))
            .collect()
    }

    /// Takes a forward step's result for `rows`: KV read, tokens sampled (on every thread
    /// when `parallel`), events for each request; on an error the step's requests fail
    /// (their sequences may hold part of its KV) and leave, the rest go on.
    fn absorb(
        &mut self,
        rows: &[Row],
        out: Result<Vec<Vec<f32>>>,
        events: &mut Vec<Event>,
        parallel: bool,
    ) {
        match out {
            Ok(logits) => {
                // Each row's logits by running index, for the requests that sample.
                let mut draw: Vec<Option<&[f32]>> = vec![None; self.running.len()];
                for ((i, toks, _), lg) in rows.iter().zip(&logits) {
                    let r = &mut self.running[*i];
                    if r.pending.take().is_none() {
                        self.stats.prefill_tokens += toks.len() as u64;
                    }
                    r.kv.extend_from_slice(toks);
                    if !r.reading_prompt() {
                        draw[*i] = Some(lg);
                    }
                }
                // Sampled on every thread: serial, a sampled 16-sequence step waited ~4% of its
                // time on the samplers, its workers idle.
                let sample =
                    |(r, lg): (&mut Running, &Option<&[f32]>)| lg.map(|lg| r.sampler.sample(lg));
                let picked: Vec<Option<u32>> = if parallel {
                    self.running.par_iter_mut().zip(&draw).map(sample).collect()
                } else {
                    self.running.iter_mut().zip(&draw).map(sample).collect()
                };
                for (i, _, _) in rows {
                    let r = &mut self.running[*i];
                    let Some(t) = picked[*i] else {
                        continue;
                    };
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
                let msg = e.to_string();
                for (i, _, _) in rows {
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
            }
        }
    }

    /// Ends the requests `events` report done.
    fn finish_done(&mut self, events: &[Event]) {
        for e in events {
            if let Event::Done { id, .. } = e {
                self.finish(*id);
            }
        }
    }
}

#[cfg(test)]
mod tests;
