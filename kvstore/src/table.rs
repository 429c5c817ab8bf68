//! Block bookkeeping with no storage in it: a reference-counted pool of block ids and the
//! per-layer block tables of a sequence. Forks share blocks by reference count; a shared
//! block is copied before it is written (copy-on-write).

use std::collections::VecDeque;

/// A block's id in the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

/// A slab of payloads with reference counts and a free list of ids.
pub(crate) struct Pool<P> {
    slots: Vec<Option<(u32, P)>>,
    free: Vec<u32>,
}

impl<P> Pool<P> {
    pub fn new() -> Self {
        Pool {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// Adds a payload with one reference.
    pub fn insert(&mut self, payload: P) -> BlockId {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some((1, payload));
                BlockId(i)
            }
            None => {
                self.slots.push(Some((1, payload)));
                BlockId((self.slots.len() - 1) as u32)
            }
        }
    }

    fn entry(&self, id: BlockId) -> &(u32, P) {
        self.slots[id.0 as usize]
            .as_ref()
            .expect("block id of a freed block: bookkeeping bug")
    }

    fn entry_mut(&mut self, id: BlockId) -> &mut (u32, P) {
        self.slots[id.0 as usize]
            .as_mut()
            .expect("block id of a freed block: bookkeeping bug")
    }

    pub fn get(&self, id: BlockId) -> &P {
        &self.entry(id).1
    }

    pub fn get_mut(&mut self, id: BlockId) -> &mut P {
        &mut self.entry_mut(id).1
    }

    pub fn refs(&self, id: BlockId) -> u32 {
        self.entry(id).0
    }

    pub fn retain(&mut self, id: BlockId) {
        self.entry_mut(id).0 += 1;
    }

    /// Drops one reference; the payload comes back when it was the last.
    pub fn release(&mut self, id: BlockId) -> Option<P> {
        let e = self.entry_mut(id);
        e.0 -= 1;
        if e.0 > 0 {
            return None;
        }
        let (_, p) = self.slots[id.0 as usize].take().unwrap();
        self.free.push(id.0);
        Some(p)
    }

    /// Live blocks.
    pub fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// One layer of one sequence: blocks `first..first + blocks.len()` of the token stream
/// (earlier ones were retired by chunked-local retention), `len` tokens in all.
#[derive(Clone, Debug, Default)]
pub(crate) struct LayerTable {
    pub first: usize,
    pub blocks: VecDeque<BlockId>,
    pub len: usize,
}

impl LayerTable {
    /// First token still held.
    pub fn held_from(&self, bt: usize) -> usize {
        (self.first * bt).min(self.len)
    }

    /// The block holding token `pos` (which must be held): (index into `blocks`, offset).
    pub fn locate(&self, pos: usize, bt: usize) -> (usize, usize) {
        (pos / bt - self.first, pos % bt)
    }

    /// How many leading blocks a chunked-local layer may retire before appending at `len`:
    /// those ending at or before the start of the new token's attention chunk.
    pub fn retirable(&self, chunk: usize, bt: usize) -> usize {
        let chunk_start = self.len / chunk * chunk;
        (chunk_start / bt)
            .saturating_sub(self.first)
            .min(self.blocks.len())
    }

    /// How many blocks remain after truncating to `len` tokens.
    pub fn blocks_for(&self, len: usize, bt: usize) -> usize {
        len.div_ceil(bt).saturating_sub(self.first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_ids_and_returns_payload_on_last_release() {
        let mut pool = Pool::new();
        let a = pool.insert("a");
        let b = pool.insert("b");
        pool.retain(a);
        assert_eq!(pool.refs(a), 2);
        assert_eq!(pool.release(a), None);
        assert_eq!(pool.release(a), Some("a"));
        assert_eq!(pool.len(), 1);
        let c = pool.insert("c");
        assert_eq!(c, a, "freed id is reused");
        assert_eq!(*pool.get(b), "b");
        assert_eq!(*pool.get(c), "c");
    }

    #[test]
    fn chunked_local_retires_blocks_before_the_chunk_of_the_next_token() {
        let bt = 4;
        let mut t = LayerTable {
            first: 0,
            blocks: (0..5).map(BlockId).collect(),
            len: 18, // blocks 0..5 hold tokens 0..18
        };
        // Chunk 8: the next token (18) is in chunk [16, 24): blocks 0..4 (tokens 0..16) go.
        assert_eq!(t.retirable(8, bt), 4);
        // Chunk 6: next token's chunk starts at 18: blocks ending at or before 18 are 0..4.
        assert_eq!(t.retirable(6, bt), 4);
        // Chunk 32: still in the first chunk: nothing goes.
        assert_eq!(t.retirable(32, bt), 0);
        t.first = 4;
        t.blocks.drain(..4);
        assert_eq!(t.held_from(bt), 16);
        assert_eq!(t.locate(17, bt), (0, 1));
        assert_eq!(t.retirable(8, bt), 0);
    }

    #[test]
    fn truncation_keeps_the_blocks_that_cover_the_new_length() {
        let t = LayerTable {
            first: 2,
            blocks: (0..3).map(BlockId).collect(),
            len: 20,
        };
        assert_eq!(t.blocks_for(20, 4), 3);
        assert_eq!(t.blocks_for(13, 4), 2);
        assert_eq!(t.blocks_for(12, 4), 1);
        assert_eq!(t.blocks_for(8, 4), 0);
    }
}
