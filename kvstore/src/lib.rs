//! longctx-kvstore: the paged KV cache, in tiers.
//!
//! It will own fixed-size KV blocks per layer, the block tables of each sequence (append,
//! fork with copy-on-write prefix sharing, truncate, free), per-layer retention (full or
//! chunked-local, so Llama 4's RoPE layers cost O(chunk)), the device / host / disk tiers with
//! byte budgets and checksummed spill files, a streaming read path with prefetch for the
//! attention kernels, and crash-safe snapshots of a sequence. The bookkeeping is plain Rust
//! with no GPU types (as in llama.cpp's `llama-kv-cells.h` and mistral.rs's block pool), so it
//! is unit-tested anywhere. Nothing is implemented yet: see the tiered KV store issue.
