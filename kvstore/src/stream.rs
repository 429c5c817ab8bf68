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
use longctx_kernels::Element;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How a stream reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamOptions {
    /// Blocks loaded ahead of the one the caller holds; 0 loads each on demand.
    pub prefetch: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { prefetch: 4 }
    }
}

/// One block of a layer: tokens `pos..pos + len`.
pub struct Block<T> {
    /// Absolute position of the block's first token.
    pub pos: usize,
    /// Tokens in it.
    pub len: usize,
    buf: Arc<PageBuf>,
    block_bytes: usize,
    row: usize,
    v0: usize,
    _t: PhantomData<T>,
}

impl<T: Pod> Block<T> {
    fn elems(&self) -> &[T] {
        bytemuck::cast_slice(self.buf.bytes(self.block_bytes))
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

    fn unpin(&self, items: impl IntoIterator<Item = Item>) {
        let mut st = self.lock();
        for it in items {
            st.release(it.id);
        }
    }
}

impl KvStore {
    /// Streams the held blocks of `layer` of `seq` in order, as they are now.
    pub fn stream<T: Element + Pod>(
        &self,
        seq: SeqId,
        layer: usize,
        opts: StreamOptions,
    ) -> Result<BlockStream<T>> {
        let cfg = &self.shared.cfg;
        check_dtype::<T>(cfg, "stream")?;
        let bt = cfg.block_tokens;
        let mut items = VecDeque::new();
        {
            let mut st = self.lock();
            let t = st.table(seq, layer)?.clone();
            for (i, id) in t.blocks.iter().enumerate() {
                let pos = (t.first + i) * bt;
                st.retain(*id);
                items.push_back(Item {
                    id: *id,
                    pos,
                    len: bt.min(t.len - pos),
                });
            }
        }
        let shared = self.shared.clone();
        let source = if opts.prefetch == 0 {
            Source::Inline(shared, items)
        } else {
            let (tx, rx) = sync_channel(opts.prefetch);
            let thread = std::thread::Builder::new()
                .name("kv-prefetch".into())
                .spawn(move || {
                    while let Some(item) = items.pop_front() {
                        let r = shared.load_pinned(&item);
                        let failed = r.is_err();
                        if tx.send(r).is_err() || failed {
                            break;
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
            block_bytes: cfg.block_bytes(),
            row: cfg.h_kv * cfg.d,
            v0: bt * cfg.h_kv * cfg.d,
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
            buf,
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
