//! The ring against the single-device kernel: every rank count, partition and mask, GQA,
//! awkward lengths; decode; peers that fail or stall.

use super::*;
use crate::partition::{gather_rows, scatter_rows};
use crate::schedule::link;
use longctx_kernels::attention::reference::{
    errors, inputs, reference, rel_error, Inputs, TestRng,
};
use longctx_kernels::{attention, AttnParams, AttnShape, Mask};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

fn seeded(name: &str) -> StdRng {
    let seed: u64 = rand::random();
    eprintln!("{name}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

fn single_device(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    spec: &AttnSpec,
) -> (Vec<f32>, Vec<f32>) {
    let shape = AttnShape {
        n_q: n,
        n_kv: n,
        h_q: spec.h_q,
        h_kv: spec.h_kv,
        d: spec.d,
    };
    let params = AttnParams::new(&shape, spec.mask).with_scale(spec.scale);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; n * spec.h_q];
    attention(q, k, v, shape, &params, &mut out, &mut lse).unwrap();
    (out, lse)
}

/// Runs the ring with one thread per rank and reassembles the whole-sequence result.
fn run_ring(
    p: usize,
    partition: Partition,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    spec: &AttnSpec,
    link_model: Option<LinkModel>,
) -> (Vec<f32>, Vec<f32>) {
    let lay = layout(partition, n, p);
    let (qrow, krow) = (spec.h_q * spec.d, spec.h_kv * spec.d);
    let mut out = vec![0f32; q.len()];
    let mut lse = vec![0f32; n * spec.h_q];
    let results: Vec<RankResult> = std::thread::scope(|s| {
        let handles: Vec<_> = InProcess::group(p, Duration::from_secs(30))
            .into_iter()
            .map(|t| {
                let lay = &lay;
                s.spawn(move || {
                    let r = t.rank();
                    let (ql, kl, vl) = (
                        gather_rows(q, &lay[r], qrow),
                        gather_rows(k, &lay[r], krow),
                        gather_rows(v, &lay[r], krow),
                    );
                    match link_model {
                        Some(m) => {
                            ring_attention(&mut Delayed::new(t, m), lay, &ql, &kl, &vl, spec)
                        }
                        None => ring_attention(&mut { t }, lay, &ql, &kl, &vl, spec),
                    }
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, res) in results.iter().enumerate() {
        scatter_rows(&res.out, &lay[r], qrow, &mut out);
        scatter_rows(&res.lse, &lay[r], spec.h_q, &mut lse);
    }
    (out, lse)
}

/// Input kinds of the ring tests (see `longctx_kernels::attention::reference::Inputs`).
const KINDS: [Inputs; 3] = [Inputs::Uniform(1.0), Inputs::Uniform(4.0), Inputs::Hard];

fn check(
    rng: &mut StdRng,
    p: usize,
    partition: Partition,
    n: usize,
    group: usize,
    mask: Mask,
    link_model: Option<LinkModel>,
) {
    let h_kv = 2;
    let d = [16, 64, 128][rng.random_range(0..3)];
    let kind = KINDS[rng.random_range(0..3)];
    let spec = AttnSpec {
        h_q: h_kv * group,
        h_kv,
        d,
        mask,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let shape = AttnShape {
        n_q: n,
        n_kv: n,
        h_q: spec.h_q,
        h_kv,
        d,
    };
    let params = AttnParams::new(&shape, mask).with_scale(spec.scale);
    let seed: u64 = rng.random();
    let (q, k, v) = inputs::<f32>(&mut TestRng::new(seed), &shape, &params, kind);
    let (got, got_lse) = run_ring(p, partition, &q, &k, &v, n, &spec, link_model);
    let what = format!("p={p} {partition:?} n={n} d={d} group={group} {mask:?} {kind:?}");
    if n <= 1001 {
        // The float64 reference, every error measure. Worst measured (four runs): 5.0e-6,
        // the row-wise output error.
        let e = errors(&got, &got_lse, &reference(&q, &k, &v, shape, &params));
        assert!(e.worst() <= 1e-5, "{what}: {e:?} (seed {seed})");
    } else {
        // Longer: the single-device kernel (itself held to the f64 reference at 1e-5).
        let (want, want_lse) = single_device(&q, &k, &v, n, &spec);
        let f64s = |x: &[f32]| x.iter().map(|v| *v as f64).collect::<Vec<_>>();
        let (e, el) = (
            rel_error(&got, &f64s(&want)),
            rel_error(&got_lse, &f64s(&want_lse)),
        );
        assert!(e <= 1e-5 && el <= 1e-5, "{what}: out {e:e}, lse {el:e}");
    }
}

#[test]
fn ring_equals_the_single_device_kernel_for_every_partition_mask_and_rank_count() {
    let mut rng = seeded("ring");
    let lengths = [1, 2, 7, 63, 200, 1001];
    for p in [1, 2, 3, 4, 8] {
        for partition in Partition::ALL {
            for mask in [Mask::Causal, Mask::None, Mask::ChunkedLocal { chunk: 37 }] {
                for group in [1, 4, 8] {
                    let n = lengths[rng.random_range(0..lengths.len())];
                    check(&mut rng, p, partition, n, group, mask, None);
                }
            }
        }
    }
}

#[test]
fn ring_at_5000_tokens() {
    let mut rng = seeded("ring5000");
    check(&mut rng, 8, Partition::Zigzag, 5000, 4, Mask::Causal, None);
    check(
        &mut rng,
        3,
        Partition::Striped,
        4999,
        1,
        Mask::ChunkedLocal { chunk: 256 },
        None,
    );
    check(
        &mut rng,
        4,
        Partition::Contiguous,
        5000,
        8,
        Mask::None,
        None,
    );
}

#[test]
fn ring_over_a_delayed_link_is_still_exact() {
    let mut rng = seeded("delayed");
    let m = link(1.0, 200.0);
    check(
        &mut rng,
        4,
        Partition::Zigzag,
        300,
        4,
        Mask::Causal,
        Some(m),
    );
}

#[test]
fn zigzag_balances_causal_work_and_local_layers_skip_far_steps() {
    let (n, p) = (4096, 8);
    let spec = |mask| AttnSpec {
        h_q: 1,
        h_kv: 1,
        d: 8,
        mask,
        scale: 1.0,
    };
    let work = |part| -> Vec<u64> {
        let lay = layout(part, n, p);
        (0..p)
            .map(|r| {
                (0..p)
                    .map(|s| pairs(&lay[r], &lay[s], Mask::Causal).unwrap())
                    .sum()
            })
            .collect()
    };
    let balance = |w: Vec<u64>| {
        let max = *w.iter().max().unwrap() as f64;
        max / (w.iter().sum::<u64>() as f64 / w.len() as f64)
    };
    assert!(balance(work(Partition::Zigzag)) <= 1.01);
    assert!(balance(work(Partition::Contiguous)) > 1.8);
    // Chunked-local with shards at least a chunk long: the previous rank at most.
    let lay = layout(Partition::Contiguous, n, p);
    // Shards of 512: a chunk of 768 reaches back into the previous shard, never further; chunks
    // of 512 or 256 align with the shards.
    assert_eq!(
        steps_needed(&lay, &spec(Mask::ChunkedLocal { chunk: 768 })).unwrap(),
        2
    );
    assert_eq!(
        steps_needed(&lay, &spec(Mask::ChunkedLocal { chunk: 512 })).unwrap(),
        1
    );
    assert_eq!(
        steps_needed(&lay, &spec(Mask::ChunkedLocal { chunk: 256 })).unwrap(),
        1
    );
    assert_eq!(steps_needed(&lay, &spec(Mask::Causal)).unwrap(), p);
}

#[test]
fn sharded_decode_equals_the_single_device_kernel() {
    let mut rng = seeded("decode");
    for p in [1, 2, 3, 4, 8] {
        for partition in Partition::ALL {
            for (group, n_q) in [(1, 1), (4, 1), (8, 3)] {
                let h_kv = 2;
                let d = [16, 64, 128][rng.random_range(0..3)];
                let kind = KINDS[rng.random_range(0..3)];
                let n = rng.random_range(1..700);
                let mask = [Mask::Causal, Mask::None, Mask::ChunkedLocal { chunk: 50 }]
                    [rng.random_range(0..3)];
                let spec = AttnSpec {
                    h_q: h_kv * group,
                    h_kv,
                    d,
                    mask,
                    scale: 1.0 / (d as f32).sqrt(),
                };
                let q_pos = n - n_q.min(n);
                let shape = AttnShape {
                    n_q,
                    n_kv: n,
                    h_q: spec.h_q,
                    h_kv,
                    d,
                };
                let params = AttnParams::new(&shape, mask)
                    .with_scale(spec.scale)
                    .at(q_pos, 0);
                let seed: u64 = rng.random();
                let (q, k, v) = inputs::<f32>(&mut TestRng::new(seed), &shape, &params, kind);
                let want = reference(&q, &k, &v, shape, &params);
                let lay = layout(partition, n, p);
                let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
                    let hs: Vec<_> = InProcess::group(p, Duration::from_secs(30))
                        .into_iter()
                        .map(|mut t| {
                            let (lay, q, k, v, spec) = (&lay, &q, &k, &v, &spec);
                            s.spawn(move || {
                                let r = t.rank();
                                let kl = gather_rows(k, &lay[r], h_kv * d);
                                let vl = gather_rows(v, &lay[r], h_kv * d);
                                ring_decode(&mut t, q, q_pos, &kl, &vl, &lay[r], spec).unwrap()
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for (out, lse) in results {
                    let e = errors(&out, &lse, &want);
                    assert!(
                        e.worst() <= 1e-5,
                        "p={p} {partition:?} n={n} d={d} {mask:?} {kind:?}: {e:?} (seed {seed})"
                    );
                }
            }
        }
    }
}

/// A transport that fails on its `fail_at`-th send, like a rank whose GPU fell over.
struct Failing {
    inner: InProcess,
    sends: usize,
    fail_at: usize,
}

impl Transport for Failing {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn send(&mut self, to: usize, data: bytes::Bytes) -> Result<(), RingError> {
        self.sends += 1;
        if self.sends > self.fail_at {
            return Err(RingError::Shape("injected failure".into()));
        }
        self.inner.send(to, data)
    }
    fn recv(&mut self, from: usize) -> Result<bytes::Bytes, RingError> {
        self.inner.recv(from)
    }
}

fn ring_with_a_bad_rank(stall: bool) -> Vec<Result<RankResult, RingError>> {
    let (p, n) = (4, 64);
    let spec = AttnSpec {
        h_q: 2,
        h_kv: 2,
        d: 8,
        mask: Mask::Causal,
        scale: 1.0,
    };
    let lay = layout(Partition::Zigzag, n, p);
    let timeout = Duration::from_millis(500);
    std::thread::scope(|s| {
        let hs: Vec<_> = InProcess::group(p, timeout)
            .into_iter()
            .map(|t| {
                let (lay, spec) = (&lay, &spec);
                s.spawn(move || {
                    let r = t.rank();
                    let m = crate::partition::tokens(&lay[r]);
                    let x = vec![0.5f32; m * 16];
                    if r == 2 && stall {
                        std::thread::sleep(Duration::from_millis(2000));
                    }
                    let mut t = Failing {
                        inner: t,
                        sends: 0,
                        // The first send: had rank 2 forwarded its own shard first, a rank
                        // with every shard already in hand could rightly finish.
                        fail_at: if r == 2 && !stall { 0 } else { usize::MAX },
                    };
                    ring_attention(&mut t, lay, &x, &x, &x, spec)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_failed_or_stalled_peer_is_an_error_on_every_rank_not_a_hang() {
    for stall in [false, true] {
        let t = Instant::now();
        let results = ring_with_a_bad_rank(stall);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
        for (r, res) in results.iter().enumerate() {
            match res {
                Err(RingError::PeerGone { .. } | RingError::Timeout { .. }) => {}
                Err(RingError::Shape(m)) if r == 2 && m.contains("injected") => {}
                other => panic!("stall={stall} rank {r}: {other:?}"),
            }
        }
    }
}

#[test]
fn nccl_without_a_gpu_is_a_typed_error_not_a_panic() {
    let env = crate::bootstrap::RankEnv {
        rank: 0,
        world: 1,
        master_addr: "127.0.0.1".into(),
        master_port: 1,
    };
    if longctx_kernels::cuda::probe(0).is_ok() {
        longctx_kernels::testing::skipped(
            "nccl_without_a_gpu_is_a_typed_error_not_a_panic",
            "a GPU is present (longctx bench gpu checks NCCL there)",
        );
        return;
    }
    let t = Instant::now();
    match crate::nccl::Nccl::connect(&env, 0, Duration::from_secs(5)) {
        Err(RingError::Unavailable(m)) => assert!(m.contains("no GPU"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected without a GPU"),
    }
    assert!(t.elapsed() < Duration::from_secs(1));
}
