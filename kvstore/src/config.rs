//! What a store holds (shape, element type, per-layer retention) and where (tier budgets,
//! eviction policy, spill directory).

use crate::{KvError, Result};
use longctx_kernels::DType;
use std::fmt;
use std::path::PathBuf;

/// A sequence's handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

/// The storage tiers, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Accelerator memory; on a CPU-only machine a RAM pool with its own budget.
    Device,
    /// Host RAM.
    Host,
    /// Checksummed spill files in the cache directory.
    Disk,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Disk];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How much of a layer's KV is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Retention {
    /// Every token (global attention layers).
    Full,
    /// Only the blocks a chunked-local layer can still attend to: those from the start of the
    /// attention chunk of the first token of the latest append. Llama 4's RoPE layers.
    ChunkedLocal { chunk: usize },
}

/// Which resident block makes room when a tier is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Least recently used; a read of a lower-tier block promotes it. The textbook choice, and
    /// the wrong one for attention, which scans every block of a layer in order for every
    /// chunk: the block LRU evicts is the one the next scan needs first.
    Lru,
    /// Keep the newest blocks resident and stream older ones: the oldest-written block is
    /// evicted first and reads never promote, so a scan reads the spilled prefix from the
    /// lower tier in order (ahead of use, see [`crate::StreamOptions`]) and finds the recent
    /// blocks resident.
    KeepNewest,
}

/// Byte budgets per tier. A zero budget skips the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub device: u64,
    pub host: u64,
    pub disk: u64,
}

impl Budgets {
    pub fn get(&self, tier: Tier) -> u64 {
        match tier {
            Tier::Device => self.device,
            Tier::Host => self.host,
            Tier::Disk => self.disk,
        }
    }
}

/// Everything a store needs to know up front.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// Tokens per block.
    pub block_tokens: usize,
    /// KV heads.
    pub h_kv: usize,
    /// Head dimension.
    pub d: usize,
    pub dtype: DType,
    /// One entry per layer.
    pub layers: Vec<Retention>,
    pub budgets: Budgets,
    pub policy: Policy,
    /// Where spill files go (created if missing). Each store spills into its own file there,
    /// removed when the store is dropped.
    pub spill_dir: PathBuf,
}

impl KvConfig {
    /// Bytes of one token's K (or V) in one layer.
    pub fn token_bytes(&self) -> usize {
        self.dtype.row_bytes(self.h_kv * self.d)
    }

    /// Bytes of one block: K `[block_tokens, h_kv, d]` followed by V of the same shape.
    pub fn block_bytes(&self) -> usize {
        2 * self.block_tokens * self.token_bytes()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(KvError::Config(m));
        if self.block_tokens == 0 || self.h_kv == 0 || self.d == 0 {
            return bad(format!(
                "block_tokens ({}), h_kv ({}) and d ({}) must be non-zero",
                self.block_tokens, self.h_kv, self.d
            ));
        }
        if let Some(n) = self.dtype.block_values() {
            if !self.d.is_multiple_of(n) {
                return bad(format!(
                    "a {} KV needs a head dim that is a multiple of {n} (this model's is {}): \
                     use another KV type",
                    self.dtype.name(),
                    self.d
                ));
            }
        }
        if self.layers.is_empty() {
            return bad("at least one layer is needed".into());
        }
        for (i, r) in self.layers.iter().enumerate() {
            if let Retention::ChunkedLocal { chunk: 0 } = r {
                return bad(format!("layer {i}: chunked-local retention with chunk 0"));
            }
        }
        let block = self.block_bytes() as u64;
        if Tier::ALL.iter().all(|t| self.budgets.get(*t) < block) {
            return bad(format!(
                "no tier can hold one block of {block} bytes: raise a budget"
            ));
        }
        Ok(())
    }
}
