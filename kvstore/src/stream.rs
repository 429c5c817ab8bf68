//! In-order streaming of one layer's blocks to a kernel, with reads ahead of use.
//!
//! The stream pins every block it will yield when it is created (a reference, as a fork
//! takes), so a concurrent truncate or free cannot recycle them and a concurrent append
//! copies instead of writing into them. With `prefetch > 0` a background thread loads up
//! to `prefetch` blocks ahead (disk reads and checksum checks off the caller's thread);
//! the caller only ever receives whole, verified blocks.

use crate::page::PageBuf;
use crate::store::{check_dtype, KvStore, Shared};
use crate::table::BlockId;
use crate::{Policy, Result, SeqId};
use bytemuck::Pod;
use longctx_kernels::KvUnit;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Most blocks read with one request.
const MAX_RUN: usize = 8;

/// Most block buffers kept for reuse.
const RECYCLED: usize = 32;

/// How a stream reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Blocks loaded ahead of the one the caller holds; 0 loads each on demand.
    pub prefetch: usize,
    /// Key ranges each decode-path kernel call is cut into ([`crate::attend`]): `None` as
    /// suits the threads; `Some(1)` where the caller runs many sequences' attention in
    /// parallel (a batched step), which is parallel enough.
    pub splits: Option<usize>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            prefetch: 4,
            splits: None,
        }
    }
}

/// One block of a layer: tokens `pos..pos + len`.
pub struct Block<T> {
    /// Absolute position of the block's first token.
    pub pos: usize,
    /// Tokens in it.
    pub len: usize,
    /// Always `Some` until the block is dropped and its buffer goes back to the store.
    buf: Option<Arc<PageBuf>>,
    home: Arc<Shared>,
    block_bytes: usize,
    row: usize,
    v0: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Block<T> {
    fn elems(&self) -> &[T] {
        let buf = self.buf.as_ref().expect("a live block has its buffer");
        bytemuck::cast_slice(buf.bytes(self.block_bytes))
    }

    /// Keys, `[len, h_kv, d]`.
    pub fn k(&self) -> &[T] {
        &self.elems()[..self.len * self.row]
    }

    /// Values, `[len, h_kv, d]`.
    pub fn v(&self) -> &[T] {
        &self.elems()[self.v0..self.v0 + self.len * self.row]
    }
}

impl<T> Drop for Block<T> {
    fn drop(&mut self) {
        // The last holder of a buffer no tier owns (a block read from disk) recycles it.
        if let Some(buf) = self.buf.take().and_then(|b| Arc::try_unwrap(b).ok()) {
            self.home.recycle(buf);
        }
    }
}

struct Item {
    id: BlockId,
    pos: usize,
    len: usize,
}

type Loaded = Result<(Arc<PageBuf>, usize, usize)>;

enum Source {
    Inline(Arc<Shared>, VecDeque<Item>),
    Ahead {
        rx: Option<Receiver<Loaded>>,
        thread: Option<JoinHandle<()>>,
    },
}

/// The blocks of one layer of one sequence, in order. See [`KvStore::stream`].
pub struct BlockStream<T> {
    source: Source,
    home: Arc<Shared>,
    block_bytes: usize,
    row: usize,
    v0: usize,
    _t: PhantomData<T>,
}

impl Shared {
    /// Loads a pinned block and drops the pin.
    fn load_pinned(&self, item: &Item) -> Loaded {
        let mut st = self.lock();
        let r = st.load(item.id, self.cfg.policy == Policy::Lru);
        st.release(item.id);
        r.map(|b| (b, item.pos, item.len))
    }

    /// Loads the next block, or under [`Policy::KeepNewest`] the next run of blocks that sit
    /// in consecutive spill slots (up to `max`), with one read; drops their pins.
    fn load_next(&self, items: &mut VecDeque<Item>, max: usize) -> Vec<Loaded> {
        let Some(first) = items.pop_front() else {
            return vec![];
        };
        let mut st = self.lock();
        let start = match st.disk_slot(first.id) {
            Some(s) if self.cfg.policy == Policy::KeepNewest && max > 1 => s,
            _ => {
                drop(st);
                return vec![self.load_pinned(&first)];
            }
        };
        let mut run = vec![first];
        let mut sums = vec![start.1];
        while run.len() < max {
            match items.front().and_then(|it| st.disk_slot(it.id)) {
                Some((slot, sum)) if slot == start.0 + run.len() as u64 => {
                    sums.push(sum);
                    run.push(items.pop_front().unwrap());
                }
                _ => break,
            }
        }
        let pages = self.take_buffers(run.len());
        let r = st.load_run(start.0, &sums, pages);
        for it in &run {
            st.release(it.id);
        }
        match r {
            Ok(pages) => pages
                .into_iter()
                .zip(run)
                .map(|(p, it)| Ok((p, it.pos, it.len)))
                .collect(),
            Err(e) => vec![Err(e)],
        }
    }

    fn take_buffers(&self, n: usize) -> Vec<PageBuf> {
        let bb = self.cfg.block_bytes();
        let mut pool = self.recycled.lock().unwrap_or_else(|e| e.into_inner());
        (0..n)
            .map(|_| pool.pop().unwrap_or_else(|| PageBuf::zeroed(bb)))
            .collect()
    }

    fn recycle(&self, buf: PageBuf) {
        let mut pool = self.recycled.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < RECYCLED {
            pool.push(buf);
        }
    }

    fn unpin(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.lock();
        for it in items {
            st.release(it.id);
        }
    }
}

impl KvStore {
    /// Streams the held blocks of `layer` of `seq` in order, as they are now.
    pub fn stream<T: KvUnit>(
        &self,
        seq: SeqId,
        layer: usize,
        opts: StreamOptions,
    ) -> Result<BlockStream<T>> {
        let cfg = &self.shared.cfg;
        check_dtype::<T>(cfg, "stream")?;
        let bt = cfg.block_tokens;
        let mut items = VecDeque::new();
        let mut spilled = false;
        {
            let mut st = self.lock();
            let t = st.table(seq, layer)?.clone();
            for (i, id) in t.blocks.iter().enumerate() {
                let pos = (t.first + i) * bt;
                st.retain(*id);
                spilled |= st.disk_slot(*id).is_some();
                items.push_back(Item {
                    id: *id,
                    pos,
                    len: bt.min(t.len - pos),
                });
            }
        }
        let shared = self.shared.clone();
        // Nothing to read ahead when every block is in memory: no thread.
        let source = if opts.prefetch == 0 || !spilled {
            Source::Inline(shared, items)
        } else {
            let (tx, rx) = sync_channel(opts.prefetch);
            let max_run = opts.prefetch.clamp(1, MAX_RUN);
            let thread = std::thread::Builder::new()
                .name("kv-prefetch".into())
                .spawn(move || {
                    'outer: while !items.is_empty() {
                        for r in shared.load_next(&mut items, max_run) {
                            let failed = r.is_err();
                            if tx.send(r).is_err() || failed {
                                break 'outer;
                            }
                        }
                    }
                    shared.unpin(items);
                })
                .map_err(|e| crate::KvError::io("starting the prefetch thread for", "kv", e))?;
            Source::Ahead {
                rx: Some(rx),
                thread: Some(thread),
            }
        };
        Ok(BlockStream {
            source,
            home: self.shared.clone(),
            block_bytes: cfg.block_bytes(),
            row: cfg.token_bytes() / std::mem::size_of::<T>(),
            v0: bt * cfg.token_bytes() / std::mem::size_of::<T>(),
            _t: PhantomData,
        })
    }
}

impl<T> Iterator for BlockStream<T> {
    type Item = Result<Block<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        let loaded = match &mut self.source {
            Source::Inline(shared, items) => {
                let item = items.pop_front()?;
                shared.load_pinned(&item)
            }
            Source::Ahead { rx, .. } => rx.as_ref()?.recv().ok()?,
        };
        Some(loaded.map(|(buf, pos, len)| Block {
            pos,
            len,
            buf: Some(buf),
            home: self.home.clone(),
            block_bytes: self.block_bytes,
            row: self.row,
            v0: self.v0,
            _t: PhantomData,
        }))
    }
}

impl<T> Drop for BlockStream<T> {
    fn drop(&mut self) {
        match &mut self.source {
            Source::Inline(shared, items) => shared.unpin(items.drain(..)),
            Source::Ahead { rx, thread } => {
                // Closing the channel stops the thread at its next send; it unpins the rest.
                drop(rx.take());
                if let Some(t) = thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}
