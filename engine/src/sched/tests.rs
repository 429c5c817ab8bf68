use super::*;
use crate::random::{random_tensors, tiny_llama4_config, tiny_llama_config};
use crate::weights::Weights;
use crate::{KvOptions, ModelConfig};
use rand::Rng;

fn tiny_llama() -> ModelConfig {
    tiny_llama_config(2, 4, 1, true)
}

fn model(cfg: &ModelConfig) -> Model {
    Model::new(cfg.clone(), Weights::from_map(random_tensors(cfg, 11))).unwrap()
}

fn store(m: &Model) -> KvStore {
    m.kv_store(
        &KvOptions {
            block_tokens: 16,
            ..KvOptions::default()
        }
        .with_host_tier(),
    )
    .unwrap()
}

fn sched(m: &Model, cfg: SchedConfig) -> Scheduler<'_> {
    Scheduler::new(m, store(m), cfg)
}

/// A scheduler with KV room for two 20-token prompts (64 tokens, blocks of 16) and no
/// prefix cache: growing answers preempt.
fn tight(m: &Model) -> Scheduler<'_> {
    sched(
        m,
        SchedConfig {
            kv_tokens: 64,
            prefix_entries: 0,
            ..SchedConfig::default()
        },
    )
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request {
        prompt,
        max_tokens,
        sampling: Sampling::default(),
        stop: vec![],
    }
}

/// What one request gives alone: the prompt in one pass, then greedy decoding.
fn alone(m: &Model, req: &Request) -> Vec<u32> {
    let s = store(m);
    let seq = s.create_seq();
    let logits = m
        .forward(&req.prompt, 0, &s, seq, Logits::Last, None, 0)
        .unwrap();
    let mut sampler = Sampler::new(req.sampling.clone());
    let n = req.prompt.len();
    crate::generate::generate(
        m,
        &s,
        seq,
        n,
        &logits,
        req.max_tokens,
        &mut sampler,
        &req.stop,
        None,
        0,
        |_| Ok(()),
    )
    .unwrap()
    .tokens
}

/// Each request's tokens and how it ended.
type Answers = std::collections::BTreeMap<RequestId, (Vec<u32>, Option<(Finish, Usage)>)>;

/// Adds `e` to the answers `got`; a failure panics.
fn record(got: &mut Answers, e: Event) {
    match e {
        Event::Token { id, token } => got.entry(id).or_default().0.push(token),
        Event::Done { id, finish, usage } => got.entry(id).or_default().1 = Some((finish, usage)),
        Event::Failed { error, .. } => panic!("{error}"),
        Event::Admitted { .. } => {}
    }
}

/// Runs the scheduler until idle.
fn drain(s: &mut Scheduler) -> Answers {
    let mut out = Answers::default();
    let mut steps = 0;
    while !s.idle() {
        steps += 1;
        assert!(steps < 10_000, "the scheduler does not finish");
        s.step_with(&mut |e| record(&mut out, e));
    }
    out
}

/// Requests of different lengths, admitted while others decode, with prompts read in
/// chunks beside decode rows (a 7-row step budget), each answer as it is alone: Llama and
/// Llama 4 (chunked-local layers, MoE), with and without sampling, with the prompt rows in
/// a lane of their own and in shared steps.
///
/// With KV room for about two of them (64 tokens), the newest is preempted as answers grow:
/// its blocks go to the host tier and come back, and nothing is computed twice.
#[test]
fn batched_requests_answer_as_each_alone() {
    let mut rng = rand::rng();
    for (cfg, kv_tokens, prompt_lane) in [
        (tiny_llama(), 1 << 17, true),
        (tiny_llama4_config(), 1 << 17, true),
        (tiny_llama(), 64, true),
        (tiny_llama4_config(), 64, true),
        (tiny_llama(), 1 << 17, false),
        (tiny_llama4_config(), 64, false),
    ] {
        let m = model(&cfg);
        let mut s = sched(
            &m,
            SchedConfig {
                max_running: 3,
                step_tokens: 7,
                prefix_entries: 0,
                kv_tokens,
                prompt_lane,
                ..SchedConfig::default()
            },
        );
        let mut reqs = vec![];
        for (i, (len, new)) in [(1, 5), (23, 9), (9, 1), (40, 12), (3, 20)]
            .into_iter()
            .enumerate()
        {
            let mut r = greedy((0..len).map(|_| rng.random_range(0..300)).collect(), new);
            if i == 3 {
                r.sampling = Sampling {
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.9,
                    seed: 5,
                    ..Sampling::default()
                };
            }
            reqs.push(r);
        }
        let ids: Vec<RequestId> = reqs.iter().map(|r| s.submit(r.clone()).unwrap()).collect();
        let got = drain(&mut s);
        for (id, r) in ids.iter().zip(&reqs) {
            let (toks, end) = &got[id];
            assert_eq!(toks, &alone(&m, r), "{:?} request {id:?}", cfg.arch);
            let (finish, usage) = end.expect("finished");
            assert_eq!(finish, Finish::Length);
            assert_eq!(usage.prompt_tokens, r.prompt.len());
            assert_eq!(usage.completion_tokens, r.max_tokens);
        }
        // Every sequence freed; every prompt token computed once.
        assert_eq!(s.store().blocks(), 0);
        let st = s.stats();
        // Prompts were read in their own lane beside decode rows (where two threads make
        // lanes), or never without lanes.
        let lanes = prompt_lane && rayon::current_num_threads() >= 2;
        assert_eq!(st.lane_steps > 0, lanes, "lane steps {}", st.lane_steps);
        let prompts: usize = reqs.iter().map(|r| r.prompt.len()).sum();
        assert_eq!(st.prefill_tokens, prompts as u64);
        if kv_tokens == 64 {
            assert!(st.preemptions > 0, "no preemption at 64 KV tokens");
            assert!(st.swap_out_blocks > 0);
            assert_eq!(st.swap_in_blocks, st.swap_out_blocks);
        } else {
            assert_eq!(st.preemptions, 0);
        }
    }
}

/// A long prompt arriving while a request decodes is read a budget's worth per step: the
/// decoding request gets a token every step meanwhile.
#[test]
fn a_long_prompt_does_not_stall_decoding() {
    let cfg = tiny_llama();
    let m = model(&cfg);
    let mut s = sched(
        &m,
        SchedConfig {
            step_tokens: 16,
            max_slowdown: 0.0,
            prompt_lane: false,
            ..SchedConfig::default()
        },
    );
    let a = s.submit(greedy(vec![1, 2, 3], 30)).unwrap();
    s.step();
    let b = s
        .submit(greedy((0..200).map(|i| i % 300).collect(), 2))
        .unwrap();
    let mut b_first = None;
    for step in 0..20 {
        let ev = s.step();
        assert!(
            ev.iter()
                .any(|e| matches!(e, Event::Token { id, .. } if *id == a)),
            "step {step}: no token for the decoding request"
        );
        if b_first.is_none()
            && ev
                .iter()
                .any(|e| matches!(e, Event::Token { id, .. } if *id == b))
        {
            b_first = Some(step);
        }
    }
    // 200 prompt tokens at 15 a step (one row goes to the decoding request): 14 steps.
    assert_eq!(b_first, Some(13));
}

/// The same in a prompt lane: each step reads a chunk of at most the step budget in the
/// prompt lane while the decoding request gets a token every decode round (at least one a
/// step, as they come), and both answers are as each alone.
#[test]
fn a_long_prompt_in_its_lane_does_not_stall_decoding() {
    if rayon::current_num_threads() < 2 {
        eprintln!("skipped: lanes need two threads, this pool has one");
        return;
    }
    let cfg = tiny_llama();
    let m = model(&cfg);
    let mut s = sched(
        &m,
        SchedConfig {
            step_tokens: 16,
            ..SchedConfig::default()
        },
    );
    let ra = greedy(vec![1, 2, 3], 3000);
    let rb = greedy((0..200).map(|i| i % 300).collect(), 2);
    let a = s.submit(ra.clone()).unwrap();
    let mut got: Answers = Answers::default();
    s.step_with(&mut |e| record(&mut got, e));
    let b = s.submit(rb.clone()).unwrap();
    let mut b_first = None;
    for step in 0..20 {
        let before = got.get(&a).map_or(0, |x| x.0.len());
        s.step_with(&mut |e| record(&mut got, e));
        assert!(
            got[&a].0.len() > before,
            "step {step}: no token for the decoding request"
        );
        if b_first.is_none() && got.contains_key(&b) {
            b_first = Some(step);
        }
    }
    // 200 prompt tokens, 16 a step (the decode rows are not in the budget): 13 steps.
    assert_eq!(b_first, Some(12));
    assert_eq!(s.stats().lane_steps, 13);
    assert_eq!(got[&b].0, alone(&m, &rb));
    let a_toks = &got[&a].0;
    assert!(
        a_toks.len() < ra.max_tokens,
        "the decoding request ended early"
    );
    assert_eq!(a_toks[..], alone(&m, &ra)[..a_toks.len()]);
}

/// A second request sharing a prompt prefix with a finished one computes only the rest,
/// reports the reused tokens, and answers as it would without the cache.
#[test]
fn the_prefix_cache_reuses_a_finished_prompt() {
    let mut rng = rand::rng();
    let cfg = tiny_llama();
    let m = model(&cfg);
    let doc: Vec<u32> = (0..70).map(|_| rng.random_range(0..300)).collect();
    let q = |extra: &[u32]| greedy([doc.as_slice(), extra].concat(), 6);
    let (q1, q2) = (q(&[5, 6, 7]), q(&[9, 8]));
    let mut s = sched(&m, SchedConfig::default());
    let a = s.submit(q1.clone()).unwrap();
    let first = drain(&mut s);
    assert_eq!(first[&a].1.unwrap().1.cached_tokens, 0);
    let b = s.submit(q2.clone()).unwrap();
    let second = drain(&mut s);
    let usage = second[&b].1.unwrap().1;
    assert_eq!(usage.cached_tokens, 70);
    assert_eq!(second[&b].0, alone(&m, &q2));
    let st = s.stats();
    assert_eq!(st.prefill_tokens, 73 + 2);
    assert_eq!(st.cached_tokens, 70);
    // The same prompt again: all but its last token reused.
    let c = s.submit(q2.clone()).unwrap();
    let third = drain(&mut s);
    assert_eq!(third[&c].1.unwrap().1.cached_tokens, 71);
    assert_eq!(third[&c].0, second[&b].0);
}

#[test]
fn bad_requests_are_refused_and_finished_ones_free_their_blocks() {
    let cfg = tiny_llama();
    let m = model(&cfg);
    let mut s = sched(
        &m,
        SchedConfig {
            max_running: 1,
            max_waiting: 2,
            max_context: 64,
            prefix_entries: 0,
            ..SchedConfig::default()
        },
    );
    let e = s.submit(greedy(vec![], 4)).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    let e = s.submit(greedy(vec![1; 60], 5)).unwrap_err();
    assert!(
        matches!(e, EngineError::PromptTooLong { limit: 64, .. }),
        "{e}"
    );
    let e = s.submit(greedy(vec![1, 300], 5)).unwrap_err();
    assert!(e.to_string().contains("outside the vocabulary"), "{e}");
    let e = s.submit(greedy(vec![1], usize::MAX)).unwrap_err();
    assert!(matches!(e, EngineError::PromptTooLong { .. }), "{e}");
    let a = s.submit(greedy(vec![1, 2], 50)).unwrap();
    let b = s.submit(greedy(vec![3, 4], 50)).unwrap();
    assert!(matches!(
        s.submit(greedy(vec![1], 1)),
        Err(EngineError::Busy(2))
    ));
    for _ in 0..5 {
        s.step();
    }
    assert_eq!(s.stats().running, 1);
    assert!(s.store().blocks() > 0);
    // Cancelled mid-answer and while waiting: nothing left held.
    assert_eq!(s.finish(a).unwrap().completion_tokens, 5);
    assert_eq!(s.finish(b).unwrap().completion_tokens, 0);
    assert!(s.finish(b).is_none());
    assert!(s.idle());
    assert_eq!(s.store().blocks(), 0);
}

/// Under KV pressure the newest request is preempted: its blocks leave the device tier
/// for the host tier, no new request is admitted while it waits, and it resumes (blocks
/// back on the device) when the older one ends; both answer as alone.
#[test]
fn kv_pressure_moves_the_newest_request_to_the_host_tier_and_back() {
    let cfg = tiny_llama();
    let m = model(&cfg);
    let mut s = tight(&m);
    let reqs = [
        greedy(vec![1; 20], 30),
        greedy(vec![2; 20], 30),
        greedy(vec![3; 20], 30),
    ];
    let ids: Vec<RequestId> = reqs.iter().map(|r| s.submit(r.clone()).unwrap()).collect();
    // Two prompts of 20 (32 tokens each in blocks of 16) fit in 64; the third waits.
    let mut out = Answers::default();
    for e in s.step() {
        if let Event::Token { id, token } = e {
            out.entry(id).or_default().0.push(token);
        }
    }
    assert_eq!((s.stats().running, s.stats().waiting), (2, 1));
    let (mut saw_swapped, mut steps) = (false, 0);
    while !s.idle() {
        steps += 1;
        assert!(steps < 1000, "the scheduler does not finish");
        for e in s.step() {
            if let Event::Token { id, token } = e {
                out.entry(id).or_default().0.push(token);
            }
        }
        let st = s.stats();
        // A preempted request's blocks are in the host tier; nothing new is admitted past
        // it, and the running requests' KV fits in 64 tokens.
        saw_swapped |= st.swapped > 0 && st.kv_blocks[1] > 0;
        assert!(st.swapped == 0 || st.running <= 1, "{st:?}");
        assert!(st.kv_blocks[0] <= cfg.layers * 64 / 16, "{st:?}");
    }
    assert!(saw_swapped);
    for (id, r) in ids.iter().zip(&reqs) {
        assert_eq!(out[id].0, alone(&m, r), "request {id:?}");
    }
    let st = s.stats();
    assert_eq!(
        st.prefill_tokens, 60,
        "a preempted prompt is not read again"
    );
    assert!(st.preemptions >= 1);
    assert_eq!(st.swap_in_blocks, st.swap_out_blocks);
    assert_eq!(s.store().blocks(), 0);
}

/// A request cancelled while preempted frees its blocks in the host tier.
#[test]
fn a_preempted_request_can_be_cancelled() {
    let cfg = tiny_llama();
    let m = model(&cfg);
    let mut s = tight(&m);
    let a = s.submit(greedy(vec![1; 20], 40)).unwrap();
    let b = s.submit(greedy(vec![2; 20], 40)).unwrap();
    while s.stats().swapped == 0 {
        assert!(!s.idle());
        s.step();
    }
    assert!(s.store().usage().blocks[1] > 0);
    let usage = s.finish(b).expect("b is known while preempted");
    assert!(usage.completion_tokens > 0);
    assert_eq!(s.store().usage().blocks[1], 0, "b's host blocks freed");
    assert_eq!(s.stats().swapped, 0);
    let got = drain(&mut s);
    assert_eq!(got[&a].1.expect("a finished").0, Finish::Length);
    assert_eq!(s.store().blocks(), 0);
}
