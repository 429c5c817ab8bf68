//! The store: block tables over tiered block storage.
//!
//! Every block lives in exactly one place: resident in the device or host tier (an
//! `Arc`'d buffer, so a reader holding it never sees it change: writers copy a buffer that
//! is still shared) or in a slot of the spill file. New blocks go to the highest tier with a
//! budget; a full tier demotes its victim (chosen by the [`Policy`]) one tier down, and so on
//! to disk. All bookkeeping sits behind one mutex; the disk is read under it too, which keeps
//! slots from being reused under a reader (the prefetch thread of a stream does those reads
//! off the caller's thread).

use crate::disk::SpillFile;
use crate::page::PageBuf;
use crate::table::{BlockId, LayerTable, Pool};
use crate::{KvConfig, KvError, Policy, Result, Retention, SeqId, Tier};
use longctx_kernels::KvUnit;
use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// The paged, tiered KV store. Cheap to clone (a handle); safe to share across threads.
#[derive(Clone)]
pub struct KvStore {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub cfg: KvConfig,
    state: Mutex<State>,
    /// Block buffers that streams are done with, reused for the next disk reads: a fresh
    /// buffer costs a page fault per 4 KiB when the read first touches it, which on a VM
    /// halves the rate at which a stream can take blocks off the disk.
    pub recycled: Mutex<Vec<PageBuf>>,
}

pub(crate) enum Place {
    Resident(Tier, Arc<PageBuf>),
    Disk { slot: u64, sum: u64 },
}

pub(crate) struct Page {
    place: Place,
    /// Eviction order key within a resident tier (smallest goes first).
    stamp: u64,
}

#[derive(Default)]
struct Resident {
    used: u64,
    order: BTreeMap<u64, BlockId>,
}

/// Bytes and blocks per tier, and the traffic between tiers so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes held by the device, host and disk tiers.
    pub bytes: [u64; 3],
    pub blocks: [usize; 3],
    /// Blocks written to the spill file.
    pub spill_writes: u64,
    /// Blocks read back from it.
    pub spill_reads: u64,
    /// Blocks moved up a tier.
    pub promotions: u64,
}

pub(crate) struct State {
    cfg: KvConfig,
    bb: u64,
    pool: Pool<Page>,
    seqs: BTreeMap<SeqId, Vec<LayerTable>>,
    next_seq: u64,
    clock: u64,
    device: Resident,
    host: Resident,
    disk: Option<SpillFile>,
    disk_used: u64,
    usage: Usage,
}

impl KvStore {
    pub fn new(cfg: KvConfig) -> Result<KvStore> {
        cfg.validate()?;
        let state = State {
            bb: cfg.block_bytes() as u64,
            cfg: cfg.clone(),
            pool: Pool::new(),
            seqs: BTreeMap::new(),
            next_seq: 0,
            clock: 0,
            device: Resident::default(),
            host: Resident::default(),
            disk: None,
            disk_used: 0,
            usage: Usage::default(),
        };
        Ok(KvStore {
            shared: Arc::new(Shared {
                cfg,
                state: Mutex::new(state),
                recycled: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn config(&self) -> &KvConfig {
        &self.shared.cfg
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    pub fn create_seq(&self) -> SeqId {
        let mut st = self.lock();
        let id = SeqId(st.next_seq);
        st.next_seq += 1;
        let layers = vec![LayerTable::default(); st.cfg.layers.len()];
        st.seqs.insert(id, layers);
        id
    }

    /// Tokens appended to `layer` of `seq` (retired tokens included).
    pub fn len(&self, seq: SeqId, layer: usize) -> Result<usize> {
        let mut st = self.lock();
        Ok(st.table(seq, layer)?.len)
    }

    /// First token of `layer` still held (non-zero once chunked-local retention retires).
    pub fn held_from(&self, seq: SeqId, layer: usize) -> Result<usize> {
        let mut st = self.lock();
        let bt = st.cfg.block_tokens;
        Ok(st.table(seq, layer)?.held_from(bt))
    }

    /// Appends tokens to one layer: `k` and `v` are `[n, h_kv, d]`. All or nothing: on an
    /// error the layer is as it was (bar blocks its retention had retired anyway).
    pub fn append<T: KvUnit>(&self, seq: SeqId, layer: usize, k: &[T], v: &[T]) -> Result<()> {
        let cfg = &self.shared.cfg;
        check_dtype::<T>(cfg, "append")?;
        // Units of one token (values, or q8 blocks of 32).
        let row = cfg.token_bytes() / std::mem::size_of::<T>();
        if k.len() != v.len() || !k.len().is_multiple_of(row) {
            return Err(KvError::Shape {
                op: "append",
                reason: format!(
                    "k has {} and v {} elements; both must be the same multiple of h_kv * d = {row}",
                    k.len(),
                    v.len()
                ),
            });
        }
        let mut st = self.lock();
        st.append(seq, layer, bytemuck::cast_slice(k), bytemuck::cast_slice(v))
    }

    /// Copies tokens `range` of one layer out: `(k, v)`, each `[range.len(), h_kv, d]`.
    pub fn read<T: KvUnit>(
        &self,
        seq: SeqId,
        layer: usize,
        range: Range<usize>,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let cfg = &self.shared.cfg;
        check_dtype::<T>(cfg, "read")?;
        let n =
            range.end.saturating_sub(range.start) * cfg.token_bytes() / std::mem::size_of::<T>();
        let mut k = vec![T::zeroed(); n];
        let mut v = vec![T::zeroed(); n];
        let mut st = self.lock();
        st.read(
            seq,
            layer,
            range,
            bytemuck::cast_slice_mut(&mut k),
            bytemuck::cast_slice_mut(&mut v),
        )?;
        Ok((k, v))
    }

    /// A new sequence sharing every block of `seq` (copy-on-write).
    pub fn fork(&self, seq: SeqId) -> Result<SeqId> {
        let mut st = self.lock();
        let tables = st.seqs.get(&seq).ok_or(KvError::UnknownSeq(seq))?.clone();
        for t in &tables {
            for id in &t.blocks {
                st.pool.retain(*id);
            }
        }
        let id = SeqId(st.next_seq);
        st.next_seq += 1;
        st.seqs.insert(id, tables);
        Ok(id)
    }

    /// Cuts every layer of `seq` to `len` tokens (layers already shorter are left alone).
    pub fn truncate(&self, seq: SeqId, len: usize) -> Result<()> {
        let mut st = self.lock();
        let layers = st.cfg.layers.len();
        let bt = st.cfg.block_tokens;
        // Check every layer first so a failure changes nothing.
        for l in 0..layers {
            let t = st.table(seq, l)?;
            if len < t.len && len < t.held_from(bt) {
                return Err(KvError::OutOfRange {
                    layer: l,
                    start: len,
                    end: t.len,
                    held_from: t.held_from(bt),
                    len: t.len,
                });
            }
        }
        for l in 0..layers {
            if len < st.table(seq, l)?.len {
                st.truncate_layer(seq, l, len);
            }
        }
        Ok(())
    }

    /// Drops a sequence; blocks no other sequence shares are freed in every tier.
    pub fn free(&self, seq: SeqId) -> Result<()> {
        let mut st = self.lock();
        let tables = st.seqs.remove(&seq).ok_or(KvError::UnknownSeq(seq))?;
        for t in tables {
            for id in t.blocks {
                st.release(id);
            }
        }
        Ok(())
    }

    /// Moves every block of `seq` into the resident tier `to`, making room there as a new
    /// block would: a preempted sequence's KV leaves the device tier for the host tier and
    /// comes back before the sequence resumes, without being recomputed. Blocks shared with
    /// other sequences move for all of them. Returns the blocks moved.
    pub fn move_seq(&self, seq: SeqId, to: Tier) -> Result<usize> {
        let mut st = self.lock();
        if to == Tier::Disk || !st.fits(to) {
            return Err(KvError::Config(format!(
                "a sequence can move only to a memory tier with a budget, not to the {to} tier"
            )));
        }
        let ids: Vec<BlockId> = st
            .tables(seq)?
            .iter()
            .flat_map(|t| t.blocks.iter().copied())
            .collect();
        let mut moved = 0;
        for id in ids {
            let buf = match &st.pool.get(id).place {
                Place::Resident(t, _) if *t == to => continue,
                Place::Resident(_, buf) => buf.clone(),
                &Place::Disk { slot, sum } => st.read_spilled(slot, sum)?,
            };
            st.make_room(to)?;
            st.set_place(id, Place::Resident(to, buf));
            moved += 1;
        }
        Ok(moved)
    }

    /// Blocks of `seq` in each tier (device, host, disk); shared blocks count here too.
    pub fn seq_blocks(&self, seq: SeqId) -> Result<[usize; 3]> {
        let st = self.lock();
        let mut n = [0; 3];
        for t in st.tables(seq)? {
            for id in &t.blocks {
                let i = match st.pool.get(*id).place {
                    Place::Resident(Tier::Device, _) => 0,
                    Place::Resident(Tier::Host, _) => 1,
                    _ => 2,
                };
                n[i] += 1;
            }
        }
        Ok(n)
    }

    pub fn usage(&self) -> Usage {
        let st = self.lock();
        let mut u = st.usage;
        u.bytes = [st.device.used, st.host.used, st.disk_used];
        u.blocks = [
            st.device.order.len(),
            st.host.order.len(),
            (st.disk_used / st.bb) as usize,
        ];
        u
    }

    /// Live blocks in the pool (shared blocks count once).
    pub fn blocks(&self) -> usize {
        self.lock().pool.len()
    }

    /// Syncs the spill file and drops it from the OS page cache, so the next disk-tier reads
    /// really read the disk (for benchmarks).
    pub fn drop_os_cache(&self) -> Result<()> {
        match &self.lock().disk {
            Some(f) => f.drop_os_cache(),
            None => Ok(()),
        }
    }

    /// The spill file's path, once something has spilled (tests corrupt it on purpose).
    pub fn spill_path(&self) -> Option<std::path::PathBuf> {
        self.lock().disk.as_ref().map(|f| f.path().to_path_buf())
    }
}

pub(crate) fn check_dtype<T: KvUnit>(cfg: &KvConfig, op: &'static str) -> Result<()> {
    if T::KV_DTYPE != cfg.dtype {
        return Err(KvError::Shape {
            op,
            reason: format!(
                "the store holds {} but {} was given",
                cfg.dtype.name(),
                T::KV_DTYPE.name()
            ),
        });
    }
    Ok(())
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the bookkeeping as it was at the panic; the
        // store's operations are written so that is a consistent state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    pub(crate) fn table(&mut self, seq: SeqId, layer: usize) -> Result<&mut LayerTable> {
        let layers = self.cfg.layers.len();
        let t = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSeq(seq))?;
        t.get_mut(layer).ok_or(KvError::NoLayer { layer, layers })
    }

    pub(crate) fn tables(&self, seq: SeqId) -> Result<&Vec<LayerTable>> {
        self.seqs.get(&seq).ok_or(KvError::UnknownSeq(seq))
    }

    pub(crate) fn insert_seq(&mut self, tables: Vec<LayerTable>) -> SeqId {
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, tables);
        id
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn resident(&mut self, t: Tier) -> &mut Resident {
        match t {
            Tier::Device => &mut self.device,
            Tier::Host => &mut self.host,
            Tier::Disk => unreachable!("the disk tier is not a resident tier"),
        }
    }

    fn fits(&self, t: Tier) -> bool {
        self.cfg.budgets.get(t) >= self.bb
    }

    /// Where new and promoted blocks go.
    fn top(&self) -> Tier {
        [Tier::Device, Tier::Host]
            .into_iter()
            .find(|t| self.fits(*t))
            .unwrap_or(Tier::Disk)
    }

    /// Where a victim of `t` goes.
    fn below(&self, t: Tier) -> Option<Tier> {
        let candidates: &[Tier] = match t {
            Tier::Device => &[Tier::Host, Tier::Disk],
            Tier::Host => &[Tier::Disk],
            Tier::Disk => &[],
        };
        candidates.iter().copied().find(|c| self.fits(*c))
    }

    /// Demotes victims of resident tier `t` until one more block fits.
    fn make_room(&mut self, t: Tier) -> Result<()> {
        let budget = self.cfg.budgets.get(t);
        while self.resident(t).used + self.bb > budget {
            let Some((_, &victim)) = self.resident(t).order.first_key_value() else {
                break;
            };
            let Some(to) = self.below(t) else {
                return Err(KvError::BudgetExhausted {
                    tier: t,
                    needed: self.bb,
                    used: self.resident(t).used,
                    budget,
                });
            };
            let Place::Resident(_, buf) = &self.pool.get(victim).place else {
                unreachable!("a resident tier's order lists only resident blocks");
            };
            let buf = buf.clone();
            let place = match to {
                Tier::Disk => {
                    let (slot, sum) = self.disk_write(&buf)?;
                    Place::Disk { slot, sum }
                }
                _ => {
                    self.make_room(to)?;
                    Place::Resident(to, buf)
                }
            };
            self.set_place(victim, place);
        }
        Ok(())
    }

    fn disk_write(&mut self, buf: &PageBuf) -> Result<(u64, u64)> {
        let budget = self.cfg.budgets.disk;
        if self.disk_used + self.bb > budget {
            return Err(KvError::BudgetExhausted {
                tier: Tier::Disk,
                needed: self.bb,
                used: self.disk_used,
                budget,
            });
        }
        if self.disk.is_none() {
            self.disk = Some(SpillFile::create(&self.cfg.spill_dir, self.bb as usize)?);
        }
        let r = self.disk.as_mut().unwrap().write(buf)?;
        self.disk_used += self.bb;
        self.usage.spill_writes += 1;
        Ok(r)
    }

    /// Moves a block's accounting from wherever it is to `place`, with a fresh stamp.
    fn set_place(&mut self, id: BlockId, place: Place) {
        let stamp = self.tick();
        self.account(id, &place, stamp);
        let old = std::mem::replace(self.pool.get_mut(id), Page { place, stamp });
        self.unaccount(&old);
    }

    fn unaccount(&mut self, page: &Page) {
        match page.place {
            Place::Resident(t, _) => {
                let bb = self.bb;
                let r = self.resident(t);
                r.order.remove(&page.stamp);
                r.used -= bb;
            }
            Place::Disk { slot, .. } => {
                self.disk
                    .as_mut()
                    .expect("a spilled block without a spill file")
                    .free(slot);
                self.disk_used -= self.bb;
            }
        }
    }

    /// Counts a resident block in its tier (`disk_write` counts spilled ones).
    fn account(&mut self, id: BlockId, place: &Place, stamp: u64) {
        if let Place::Resident(t, _) = place {
            let bb = self.bb;
            let r = self.resident(*t);
            r.used += bb;
            r.order.insert(stamp, id);
        }
    }

    /// Adds a block at the top tier.
    pub(crate) fn place_new(&mut self, buf: PageBuf) -> Result<BlockId> {
        let place = match self.top() {
            Tier::Disk => {
                let (slot, sum) = self.disk_write(&buf)?;
                Place::Disk { slot, sum }
            }
            t => {
                self.make_room(t)?;
                Place::Resident(t, Arc::new(buf))
            }
        };
        let stamp = self.tick();
        let id = self.pool.insert(Page {
            place: Place::Disk { slot: 0, sum: 0 },
            stamp,
        });
        self.account(id, &place, stamp);
        self.pool.get_mut(id).place = place;
        Ok(id)
    }

    /// Drops one reference; the last frees the block in its tier.
    pub(crate) fn release(&mut self, id: BlockId) {
        if let Some(page) = self.pool.release(id) {
            self.unaccount(&page);
        }
    }

    pub(crate) fn retain(&mut self, id: BlockId) {
        self.pool.retain(id);
    }

    /// A block's bytes. A resident block is shared as it is (an LRU read refreshes it); a
    /// spilled one is read and verified, and moved up when `promote` is set and room can be
    /// made (a read never fails for want of room).
    pub(crate) fn load(&mut self, id: BlockId, promote: bool) -> Result<Arc<PageBuf>> {
        match self.pool.get(id).place {
            Place::Resident(t, ref buf) => {
                let buf = buf.clone();
                if self.cfg.policy == Policy::Lru {
                    self.set_place(id, Place::Resident(t, buf.clone()));
                }
                Ok(buf)
            }
            Place::Disk { slot, sum } => {
                let buf = self.read_spilled(slot, sum)?;
                let top = self.top();
                if promote && top != Tier::Disk && self.make_room(top).is_ok() {
                    self.set_place(id, Place::Resident(top, buf.clone()));
                    self.usage.promotions += 1;
                }
                Ok(buf)
            }
        }
    }

    /// A spilled block's bytes, read and verified (counted as a spill read).
    fn read_spilled(&mut self, slot: u64, sum: u64) -> Result<Arc<PageBuf>> {
        let disk = self
            .disk
            .as_ref()
            .expect("a spilled block without a spill file");
        let buf = Arc::new(disk.read(slot, sum)?);
        self.usage.spill_reads += 1;
        Ok(buf)
    }

    /// The spill slot of a block on disk, if it is there.
    pub(crate) fn disk_slot(&self, id: BlockId) -> Option<(u64, u64)> {
        match self.pool.get(id).place {
            Place::Disk { slot, sum } => Some((slot, sum)),
            Place::Resident(..) => None,
        }
    }

    /// Reads blocks in consecutive spill slots in one request (no promotion).
    pub(crate) fn load_run(
        &mut self,
        first: u64,
        sums: &[u64],
        pages: Vec<PageBuf>,
    ) -> Result<Vec<Arc<PageBuf>>> {
        let disk = self
            .disk
            .as_ref()
            .expect("a spilled block without a spill file");
        let pages = disk.read_run(first, sums, pages)?;
        self.usage.spill_reads += pages.len() as u64;
        Ok(pages.into_iter().map(Arc::new).collect())
    }

    /// A block's bytes for writing, brought to the top tier first. Readers holding the old
    /// buffer keep it unchanged.
    fn writable(&mut self, id: BlockId) -> Result<&mut PageBuf> {
        let buf = match &self.pool.get(id).place {
            Place::Resident(_, buf) => buf.clone(),
            &Place::Disk { slot, sum } => {
                let buf = self.read_spilled(slot, sum)?;
                self.usage.promotions += 1;
                buf
            }
        };
        let top = self.top();
        if top == Tier::Disk {
            return Err(KvError::Config(
                "a block must be written in memory, but no memory tier has a budget".into(),
            ));
        }
        if !matches!(self.pool.get(id).place, Place::Resident(t, _) if t == top) {
            self.make_room(top)?;
        }
        self.set_place(id, Place::Resident(top, buf));
        let Place::Resident(_, buf) = &mut self.pool.get_mut(id).place else {
            unreachable!()
        };
        Ok(Arc::make_mut(buf))
    }

    fn append(&mut self, seq: SeqId, layer: usize, k: &[u8], v: &[u8]) -> Result<()> {
        let bt = self.cfg.block_tokens;
        let retention = self.cfg.layers.get(layer).copied();
        let t = self.table(seq, layer)?;
        let old_len = t.len;
        if let Some(Retention::ChunkedLocal { chunk }) = retention {
            let n = t.retirable(chunk, bt);
            let retired: Vec<BlockId> = t.blocks.drain(..n).collect();
            t.first += n;
            for id in retired {
                self.release(id);
            }
        }
        let r = self.append_blocks(seq, layer, k, v);
        if r.is_err() {
            self.truncate_layer(seq, layer, old_len);
        }
        r
    }

    fn append_blocks(&mut self, seq: SeqId, layer: usize, k: &[u8], v: &[u8]) -> Result<()> {
        let bt = self.cfg.block_tokens;
        let tb = self.cfg.token_bytes();
        let bb = self.bb as usize;
        let n = k.len() / tb;
        let mut done = 0;
        while done < n {
            let t = self.table(seq, layer)?;
            let off = t.len % bt;
            let take = (bt - off).min(n - done);
            let rows = done * tb..(done + take) * tb;
            let (kb, vb) = (&k[rows.clone()], &v[rows]);
            let write = |page: &mut PageBuf| {
                let bytes = page.bytes_mut(bb);
                bytes[off * tb..off * tb + kb.len()].copy_from_slice(kb);
                let v0 = bt * tb + off * tb;
                bytes[v0..v0 + vb.len()].copy_from_slice(vb);
            };
            if off == 0 {
                let mut page = PageBuf::zeroed(bb);
                write(&mut page);
                let id = self.place_new(page)?;
                self.table(seq, layer)?.blocks.push_back(id);
            } else {
                let id = *t.blocks.back().expect("a partly filled block is held");
                if self.pool.refs(id) > 1 {
                    // Shared with a fork (or pinned by a stream): copy, then write the copy.
                    let mut page = (*self.load(id, false)?).clone();
                    write(&mut page);
                    let new = self.place_new(page)?;
                    *self.table(seq, layer)?.blocks.back_mut().unwrap() = new;
                    self.release(id);
                } else {
                    write(self.writable(id)?);
                }
            }
            self.table(seq, layer)?.len += take;
            done += take;
        }
        Ok(())
    }

    fn read(
        &mut self,
        seq: SeqId,
        layer: usize,
        range: Range<usize>,
        k: &mut [u8],
        v: &mut [u8],
    ) -> Result<()> {
        let bt = self.cfg.block_tokens;
        let tb = self.cfg.token_bytes();
        let promote = self.cfg.policy == Policy::Lru;
        let t = self.table(seq, layer)?;
        if range.start > range.end || range.end > t.len || range.start < t.held_from(bt) {
            return Err(KvError::OutOfRange {
                layer,
                start: range.start,
                end: range.end,
                held_from: t.held_from(bt),
                len: t.len,
            });
        }
        let mut pos = range.start;
        while pos < range.end {
            let t = self.table(seq, layer)?;
            let (bi, off) = t.locate(pos, bt);
            let id = t.blocks[bi];
            let take = (bt - off).min(range.end - pos);
            let buf = self.load(id, promote)?;
            let bytes = buf.bytes(self.bb as usize);
            let dst = (pos - range.start) * tb..(pos - range.start + take) * tb;
            k[dst.clone()].copy_from_slice(&bytes[off * tb..(off + take) * tb]);
            let v0 = bt * tb;
            v[dst].copy_from_slice(&bytes[v0 + off * tb..v0 + (off + take) * tb]);
            pos += take;
        }
        Ok(())
    }

    /// Cuts one layer to `len` tokens; `len` must be at least what the layer still holds.
    fn truncate_layer(&mut self, seq: SeqId, layer: usize, len: usize) {
        let bt = self.cfg.block_tokens;
        let Ok(t) = self.table(seq, layer) else {
            return;
        };
        let keep = t.blocks_for(len, bt);
        let dropped: VecDeque<BlockId> = t.blocks.drain(keep.min(t.blocks.len())..).collect();
        t.len = len;
        for id in dropped {
            self.release(id);
        }
    }
}
