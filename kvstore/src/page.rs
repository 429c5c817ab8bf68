//! One block's bytes, and the checksum that guards them off the device.

use xxhash_rust::xxh3::xxh3_64;

/// A block's bytes: K `[block_tokens, h_kv, d]` then V of the same shape. Backed by `u64`s
/// so every element type's slice view is aligned.
#[derive(Clone)]
pub(crate) struct PageBuf(Box<[u64]>);

impl PageBuf {
    pub fn zeroed(bytes: usize) -> PageBuf {
        PageBuf(vec![0u64; bytes.div_ceil(8)].into_boxed_slice())
    }

    /// The first `n` bytes (the block size; the backing may round up to 8).
    pub fn bytes(&self, n: usize) -> &[u8] {
        &bytemuck::cast_slice(&self.0)[..n]
    }

    pub fn bytes_mut(&mut self, n: usize) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.0)[..n]
    }
}

/// The checksum of spilled blocks and snapshot pages (XXH3-64: tens of GB/s, so verifying
/// every read costs little next to the read itself).
pub(crate) fn checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}
