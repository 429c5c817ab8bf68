//! longctx-kvstore: the paged KV cache, in tiers.
//!
//! It owns fixed-size KV blocks per layer (`block_tokens` tokens; in a block, K
//! `[block_tokens, h_kv, d]` then V of the same shape, contiguous, so one block's K and V
//! are exactly what the attention kernels take as `[n_kv, h_kv, d]`), the block tables of each
//! sequence (append, read, fork with copy-on-write prefix sharing, truncate, free), per-layer
//! retention (full, or chunked-local so Llama 4's RoPE layers cost O(chunk)), the device /
//! host / disk tiers with byte budgets and checksummed spill files, an in-order streaming
//! read with prefetch for the attention kernels ([`attend`]), and crash-safe snapshots.
//!
//! The bookkeeping ([`table`]: block pool, tables, reference counts) is plain Rust with no
//! storage in it, as in mistral.rs's block pool and llama.cpp's `llama-kv-cells.h`, so it is
//! tested anywhere. On this CPU build the device tier is a RAM pool with its own budget (the
//! tier exists and is tested either way); CUDA memory behind it comes with the CUDA backend.
//!
//! The eviction policy is the one thing not borrowed from paged-attention servers: attention
//! over a long prefix reads every block of a layer in order for every chunk, the access
//! pattern that defeats LRU (vLLM and SGLang evict by recency, which suits prefix caching, not
//! a KV larger than memory). [`Policy::KeepNewest`] keeps the newest blocks resident and
//! streams the older ones ahead of use instead.

mod attend;
pub mod cache;
mod config;
mod disk;
mod error;
mod page;
mod snapshot;
pub mod stale;
mod store;
mod stream;
pub mod table;

pub use attend::{attend, attend_blocks, GROUP, SEGMENT};
pub use config::{Budgets, KvConfig, Policy, Retention, SeqId, Tier};
pub use error::{KvError, Result};
pub use snapshot::{SnapshotMeta, FILE_NAME as SNAPSHOT_FILE};
pub use store::{KvStore, Usage};
pub use stream::{Block, BlockStream, StreamOptions};

/// Drops a file's pages from the OS page cache (after syncing it), so the next read of it
/// comes from the disk: benchmarks compare disk reads with disk reads.
pub fn drop_os_cache(file: &std::fs::File, path: &std::path::Path) -> Result<()> {
    file.sync_data()
        .map_err(|e| KvError::io("syncing", path, e))?;
    disk::drop_os_cache(file, path)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_blocks;
