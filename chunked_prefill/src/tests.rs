//! The driver with a stand-in model whose "logits" depend on every KV row before them, so a
//! lost, repeated or misplaced token changes the result.

use super::*;
use longctx_kernels::DType;
use longctx_kvstore::{Budgets, KvConfig, KvStore, Policy, Retention, SeqId};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

struct Fake;

#[derive(Debug, thiserror::Error)]
#[error("fake")]
struct FakeError(#[from] longctx_kvstore::KvError);

const D: usize = 8;

impl ChunkModel for Fake {
    type Error = FakeError;
    fn forward_chunk(
        &self,
        tokens: &[u32],
        pos0: usize,
        store: &KvStore,
        seq: SeqId,
    ) -> Result<Vec<f32>, FakeError> {
        assert_eq!(store.len(seq, 0)?, pos0, "chunks arrive in order");
        let rows: Vec<f32> = tokens
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                (0..D).map(move |j| (*t as f32 + (pos0 + i) as f32 * 0.5) * (j + 1) as f32)
            })
            .collect();
        store.append(seq, 0, &rows, &rows)?;
        let n = store.len(seq, 0)?;
        let (k, _) = store.read::<f32>(seq, 0, 0..n)?;
        // Position-weighted sum: order matters.
        let s: f64 = k
            .iter()
            .enumerate()
            .map(|(i, x)| *x as f64 * (1.0 + (i % 97) as f64))
            .sum();
        Ok(vec![s as f32, n as f32])
    }
    fn activation_bytes(&self, chunk: usize) -> u64 {
        100 * chunk as u64 + 1000
    }
}

struct Tmp(PathBuf);
impl Tmp {
    fn new() -> Tmp {
        let p = std::env::temp_dir().join(format!(
            "longctx-prefill-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn store(dir: &Tmp) -> KvStore {
    KvStore::new(KvConfig {
        block_tokens: 16,
        h_kv: 1,
        d: D,
        dtype: DType::F32,
        layers: vec![Retention::Full],
        budgets: Budgets {
            device: 4 * 16 * D as u64 * 8,
            host: 0,
            disk: u64::MAX,
        },
        policy: Policy::KeepNewest,
        spill_dir: dir.0.join("spill"),
    })
    .unwrap()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919) % 1000).collect()
}

#[test]
fn every_chunk_size_gives_the_one_pass_result() {
    let dir = Tmp::new();
    let t = tokens(301);
    let no = AtomicBool::new(false);
    let run = |chunking| {
        let s = store(&dir);
        let opts = PrefillOptions {
            chunking,
            checkpoints: None,
        };
        prefill(&Fake, &s, &t, &opts, &no, |_| {}).unwrap().logits
    };
    let one = run(Chunking::Fixed(301));
    for c in [1, 7, 64, 4096] {
        assert_eq!(run(Chunking::Fixed(c)), one, "chunk {c}");
    }
    assert_eq!(run(Chunking::Budget(100 * 50 + 1000)), one);
}

#[test]
fn planner_picks_the_largest_chunk_the_budget_allows() {
    assert_eq!(plan_chunk(&Fake, 100 * 50 + 1000, 10_000).unwrap(), 48);
    assert_eq!(plan_chunk(&Fake, 100 * 5 + 1000, 10_000).unwrap(), 5);
    assert_eq!(plan_chunk(&Fake, u64::MAX / 2, 300).unwrap(), 288);
    assert!(matches!(
        plan_chunk(&Fake, 50, 10),
        Err(PrefillError::Budget { .. })
    ));
}

#[test]
fn a_cancelled_prefill_resumes_from_its_checkpoint_with_the_same_result() {
    let dir = Tmp::new();
    let t = tokens(500);
    let ck = Checkpoints {
        dir: dir.0.join("ck"),
        every: 3,
        fingerprint: "fake-1".into(),
    };
    let opts = PrefillOptions {
        chunking: Chunking::Fixed(20),
        checkpoints: Some(ck.clone()),
    };
    let no = AtomicBool::new(false);
    let want = uninterrupted(&dir, &t).logits;
    // Cancel after 7 chunks (140 tokens): the driver checkpoints where it stopped.
    let cancel = AtomicBool::new(false);
    let mut events = vec![];
    let err = prefill(&Fake, &store(&dir), &t, &opts, &cancel, |p| {
        events.push(p.done);
        if p.done >= 140 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            PrefillError::Cancelled {
                done: 140,
                total: 500,
                checkpoint: Some(_)
            }
        ),
        "{err}"
    );
    assert!(events.windows(2).all(|w| w[0] < w[1]));
    // A new process (a new store) resumes at 140 and ends where an uninterrupted run ends.
    let mut first = None;
    let done = prefill(&Fake, &store(&dir), &t, &opts, &no, |p| {
        first.get_or_insert(p.done);
    })
    .unwrap();
    assert_eq!(done.resumed_from, 140);
    assert_eq!(first, Some(160));
    assert_eq!(done.logits, want);
    // Another model or another prompt never resumes from it.
    let other = PrefillOptions {
        chunking: Chunking::Fixed(20),
        checkpoints: Some(Checkpoints {
            fingerprint: "fake-2".into(),
            ..ck.clone()
        }),
    };
    assert_eq!(
        prefill(&Fake, &store(&dir), &t, &other, &no, |_| {})
            .unwrap()
            .resumed_from,
        0
    );
    let mut t2 = t.clone();
    t2[5] += 1;
    assert_eq!(
        prefill(&Fake, &store(&dir), &t2, &opts, &no, |_| {})
            .unwrap()
            .resumed_from,
        0
    );
}

#[test]
fn a_killed_run_resumes_from_the_last_periodic_checkpoint() {
    let dir = Tmp::new();
    let t = tokens(400);
    let ck = Checkpoints {
        dir: dir.0.join("ck"),
        every: 4,
        fingerprint: "fake".into(),
    };
    let opts = PrefillOptions {
        chunking: Chunking::Fixed(10),
        checkpoints: Some(ck),
    };
    // Simulate a kill: stop without the cancel path (an error from the progress callback is
    // not possible, so cancel, then delete what the cancel wrote and keep the periodic one).
    let cancel = AtomicBool::new(false);
    let _ = prefill(&Fake, &store(&dir), &t, &opts, &cancel, |p| {
        if p.done == 120 {
            // The periodic checkpoint at 120 (12 chunks) was just written.
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let no = AtomicBool::new(false);
    let done = prefill(&Fake, &store(&dir), &t, &opts, &no, |_| {}).unwrap();
    assert_eq!(done.resumed_from, 120);
    assert!(matches!(
        prefill(&Fake, &store(&dir), &[], &opts, &no, |_| {}),
        Err(PrefillError::Empty)
    ));
}

/// Checkpoints that cannot be written (a read-only or full disk) turn themselves off; the
/// prefill finishes with the same logits and says why (a long `ask` once failed outright).
#[test]
fn unwritable_checkpoints_do_not_stop_the_prefill() {
    let dir = Tmp::new();
    let t = tokens(300);
    // A file where the checkpoint folder should be: every write under it fails.
    std::fs::write(dir.0.join("blocked"), b"x").unwrap();
    let opts = PrefillOptions {
        chunking: Chunking::Fixed(20),
        checkpoints: Some(Checkpoints {
            dir: dir.0.join("blocked").join("ck"),
            every: 2,
            fingerprint: "fake-1".into(),
        }),
    };
    let no = AtomicBool::new(false);
    let got = prefill(&Fake, &store(&dir), &t, &opts, &no, |_| {}).unwrap();
    assert!(got.checkpoint_error.is_some());
    let want = uninterrupted(&dir, &t);
    assert_eq!(got.logits, want.logits);
    assert!(want.checkpoint_error.is_none());
}

/// The same prompt in chunks of 20 without checkpoints or cancellation: what a checkpointed
/// or interrupted run must end with.
fn uninterrupted(dir: &Tmp, t: &[u32]) -> Prefilled {
    let opts = PrefillOptions {
        chunking: Chunking::Fixed(20),
        checkpoints: None,
    };
    prefill(
        &Fake,
        &store(dir),
        t,
        &opts,
        &AtomicBool::new(false),
        |_| {},
    )
    .unwrap()
}
