//! The prefix cache: finished sequences kept with the tokens their KV holds. A new request
//! takes the one sharing the longest prefix with its prompt, forks it (its blocks shared,
//! copy-on-write at the first block the new request writes) and cuts the fork to the shared
//! length, so only the rest of the prompt is computed. At most the last prompt token is
//! recomputed, for its logits. A few dozen entries are compared token by token, which costs
//! microseconds beside a forward step; entries are dropped least recently used first.

use longctx_kvstore::{KvStore, SeqId};

struct Cached {
    tokens: Vec<u32>,
    seq: SeqId,
    used: u64,
}

pub struct PrefixCache {
    cap: usize,
    entries: Vec<Cached>,
    clock: u64,
}

impl PrefixCache {
    pub fn new(cap: usize) -> PrefixCache {
        PrefixCache {
            cap,
            entries: vec![],
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// KV tokens the entries hold (blocks shared between them counted for each).
    pub fn tokens(&self) -> usize {
        self.entries.iter().map(|e| e.tokens.len()).sum()
    }

    /// A new sequence holding the longest cached prefix of `prompt` (never all of it), and
    /// that prefix's length; `None` when nothing is shared.
    pub fn lookup(&mut self, store: &KvStore, prompt: &[u32]) -> Option<(SeqId, usize)> {
        let common = |t: &[u32]| t.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let (best, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common(&e.tokens)))
            .max_by_key(|(i, n)| (*n, std::cmp::Reverse(*i)))?;
        let n = n.min(prompt.len() - 1);
        if n == 0 {
            return None;
        }
        let seq = store.fork(self.entries[best].seq).ok()?;
        // Fails where retention has retired the blocks before n (chunked-local layers).
        if store.truncate(seq, n).is_err() {
            let _ = store.free(seq);
            return None;
        }
        self.clock += 1;
        self.entries[best].used = self.clock;
        Some((seq, n))
    }

    /// Keeps `seq`, whose KV holds `tokens`; entries it extends are dropped.
    pub fn insert(&mut self, store: &KvStore, tokens: Vec<u32>, seq: SeqId) {
        if self.cap == 0 || tokens.is_empty() {
            let _ = store.free(seq);
            return;
        }
        self.entries.retain(|e| {
            let covered = e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens);
            if covered {
                let _ = store.free(e.seq);
            }
            !covered
        });
        self.clock += 1;
        self.entries.push(Cached {
            tokens,
            seq,
            used: self.clock,
        });
        while self.entries.len() > self.cap {
            self.evict_one(store);
        }
    }

    /// Drops least recently used entries until they hold at most `tokens` tokens.
    pub fn evict_until(&mut self, store: &KvStore, tokens: usize) {
        while self.tokens() > tokens && !self.entries.is_empty() {
            self.evict_one(store);
        }
    }

    fn evict_one(&mut self, store: &KvStore) {
        if let Some(i) = (0..self.entries.len()).min_by_key(|i| self.entries[*i].used) {
            let e = self.entries.swap_remove(i);
            let _ = store.free(e.seq);
        }
    }
}
