//! Routed experts kept resident within a byte budget (`--expert-budget`): the rest stay in
//! the mapped file, are read and prepared when a token is routed to them, and are dropped
//! again (their file pages released) when the budget needs the room. Least recently used
//! first, so the experts a run keeps choosing stay. A 109B-parameter Scout is ~95% routed
//! experts: under a budget its resident size is the attention, the shared experts and the
//! budget.

use crate::Result;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

/// A prepared expert: what it reads in place from the mapped file can be dropped.
pub trait Resident {
    /// Releases the file pages the expert's products read in place (a no-op where they read
    /// only copies): called when the expert leaves the cache.
    fn release(&self);
}

/// One (layer, expert).
pub type ExpertKey = (usize, usize);

/// What the cache did over a run.
#[derive(Serialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpertStats {
    pub budget_bytes: u64,
    /// Bytes of the file read to prepare experts (each miss reads its expert whole).
    pub bytes_read: u64,
    /// Uses of an expert that was resident.
    pub hits: u64,
    /// Uses of an expert that had to be read.
    pub misses: u64,
    /// The most bytes of prepared experts held at once (the cache and the one in use).
    pub resident_peak_bytes: u64,
    /// Experts whose file pages were asked for ahead (the next layer's router on this
    /// layer's output), and how many of those the next layer then used.
    pub read_ahead: u64,
    pub read_ahead_used: u64,
}

impl ExpertStats {
    /// Hits over uses (0 without any use).
    pub fn hit_rate(&self) -> f64 {
        let uses = self.hits + self.misses;
        if uses == 0 {
            0.0
        } else {
            self.hits as f64 / uses as f64
        }
    }

    /// The statistics in words, one line.
    pub fn sentence(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        format!(
            "experts: budget {:.1} MiB, resident peak {:.1} MiB, {:.1} MiB read, hit rate {:.1}% \
             ({} of {} uses), read ahead {} ({} used)",
            mib(self.budget_bytes),
            mib(self.resident_peak_bytes),
            mib(self.bytes_read),
            100.0 * self.hit_rate(),
            self.hits,
            self.hits + self.misses,
            self.read_ahead,
            self.read_ahead_used,
        )
    }
}

struct Entry<T> {
    expert: Arc<T>,
    bytes: u64,
    last_use: u64,
}

struct Inner<T> {
    map: HashMap<ExpertKey, Entry<T>>,
    resident: u64,
    tick: u64,
    ahead: HashSet<ExpertKey>,
    stats: ExpertStats,
}

/// The resident experts of a model, at most `budget` bytes of them.
pub struct ExpertCache<T> {
    budget: u64,
    inner: Mutex<Inner<T>>,
}

/// A prepared expert and its sizes: what it holds in memory, what was read to make it.
pub struct Made<T> {
    pub expert: T,
    pub resident_bytes: u64,
    pub read_bytes: u64,
}

/// An expert in use: released on drop when it was too large for the cache to keep.
pub struct InUse<T: Resident> {
    expert: Arc<T>,
    kept: bool,
}

impl<T: Resident> std::ops::Deref for InUse<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.expert
    }
}

impl<T: Resident> Drop for InUse<T> {
    fn drop(&mut self) {
        if !self.kept {
            self.expert.release();
        }
    }
}

impl<T: Resident> ExpertCache<T> {
    pub fn new(budget: u64) -> ExpertCache<T> {
        ExpertCache {
            budget,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                resident: 0,
                tick: 0,
                ahead: HashSet::new(),
                stats: ExpertStats {
                    budget_bytes: budget,
                    ..ExpertStats::default()
                },
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic elsewhere with the lock held leaves counts, never a broken map.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The expert `key`, resident or made now by `make` (outside the lock). Least recently
    /// used experts leave to make room; one larger than the whole budget is used once and
    /// not kept.
    pub fn get(&self, key: ExpertKey, make: impl FnOnce() -> Result<Made<T>>) -> Result<InUse<T>> {
        {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            if let Some(e) = g.map.get_mut(&key) {
                e.last_use = tick;
                let expert = e.expert.clone();
                g.stats.hits += 1;
                return Ok(InUse { expert, kept: true });
            }
        }
        let made = make()?;
        let mut g = self.lock();
        g.stats.misses += 1;
        g.stats.bytes_read += made.read_bytes;
        if g.ahead.remove(&key) {
            g.stats.read_ahead_used += 1;
        }
        let expert = Arc::new(made.expert);
        let kept = made.resident_bytes <= self.budget;
        if kept {
            while g.resident + made.resident_bytes > self.budget {
                let oldest = g
                    .map
                    .iter()
                    .min_by_key(|(_, e)| e.last_use)
                    .map(|(k, _)| *k)
                    .expect("resident bytes over zero means an entry");
                let out = g.map.remove(&oldest).expect("just found");
                g.resident -= out.bytes;
                out.expert.release();
            }
            g.resident += made.resident_bytes;
            let tick = g.tick;
            g.map.insert(
                key,
                Entry {
                    expert: expert.clone(),
                    bytes: made.resident_bytes,
                    last_use: tick,
                },
            );
        }
        let held = g.resident + if kept { 0 } else { made.resident_bytes };
        g.stats.resident_peak_bytes = g.stats.resident_peak_bytes.max(held);
        Ok(InUse { expert, kept })
    }

    /// Whether `key` is resident now.
    pub fn contains(&self, key: ExpertKey) -> bool {
        self.lock().map.contains_key(&key)
    }

    /// Notes that `key`'s file pages were asked for ahead of its use (counted when used).
    pub fn note_read_ahead(&self, key: ExpertKey) {
        let mut g = self.lock();
        if g.ahead.insert(key) {
            g.stats.read_ahead += 1;
        }
    }

    pub fn stats(&self) -> ExpertStats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Fake {
        released: Arc<AtomicUsize>,
    }

    impl Resident for Fake {
        fn release(&self) {
            self.released.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn made(bytes: u64, released: &Arc<AtomicUsize>) -> Result<Made<Fake>> {
        Ok(Made {
            expert: Fake {
                released: released.clone(),
            },
            resident_bytes: bytes,
            read_bytes: bytes / 2,
        })
    }

    #[test]
    fn least_recently_used_experts_leave_within_the_budget() {
        let rel = Arc::new(AtomicUsize::new(0));
        let c: ExpertCache<Fake> = ExpertCache::new(300);
        for key in [(0, 0), (0, 1), (0, 2)] {
            drop(c.get(key, || made(100, &rel)).unwrap());
        }
        // (0, 0) used again: (0, 1) is now the least recently used.
        drop(c.get((0, 0), || panic!("resident")).unwrap());
        drop(c.get((1, 5), || made(100, &rel)).unwrap());
        assert!(c.contains((0, 0)) && c.contains((0, 2)) && c.contains((1, 5)));
        assert!(!c.contains((0, 1)));
        assert_eq!(
            rel.load(Ordering::Relaxed),
            1,
            "the evicted expert released its pages"
        );
        let s = c.stats();
        assert_eq!((s.hits, s.misses), (1, 4));
        assert_eq!(s.bytes_read, 200);
        assert_eq!(s.resident_peak_bytes, 300);
        assert!((s.hit_rate() - 0.2).abs() < 1e-12);
    }

    #[test]
    fn an_expert_over_the_budget_is_used_once_and_released() {
        let rel = Arc::new(AtomicUsize::new(0));
        let c: ExpertCache<Fake> = ExpertCache::new(50);
        drop(c.get((0, 0), || made(40, &rel)).unwrap());
        let big = c.get((0, 1), || made(80, &rel)).unwrap();
        assert_eq!(rel.load(Ordering::Relaxed), 0, "in use: not released yet");
        drop(big);
        assert_eq!(rel.load(Ordering::Relaxed), 1);
        assert!(c.contains((0, 0)) && !c.contains((0, 1)));
        assert_eq!(c.stats().resident_peak_bytes, 120);
        // A zero budget keeps nothing: every use reads.
        let z: ExpertCache<Fake> = ExpertCache::new(0);
        for _ in 0..3 {
            drop(z.get((2, 2), || made(10, &rel)).unwrap());
        }
        assert_eq!((z.stats().hits, z.stats().misses), (0, 3));
    }

    #[test]
    fn a_failed_read_is_an_error_and_leaves_the_cache_as_it_was() {
        let rel = Arc::new(AtomicUsize::new(0));
        let c: ExpertCache<Fake> = ExpertCache::new(100);
        let e = c.get((0, 0), || {
            Err(crate::EngineError::Batch("the file shrank".into()))
        });
        assert!(e.is_err());
        assert!(!c.contains((0, 0)));
        assert_eq!(c.stats().misses, 0);
        c.note_read_ahead((0, 3));
        c.note_read_ahead((0, 3));
        drop(c.get((0, 3), || made(10, &rel)).unwrap());
        let s = c.stats();
        assert_eq!((s.read_ahead, s.read_ahead_used), (1, 1));
    }
}
