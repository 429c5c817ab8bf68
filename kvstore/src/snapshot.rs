//! Snapshots: a sequence's KV (every layer, from whichever tier holds it) saved to a
//! directory and loaded back later, so a prefilled prompt (a whole codebase, say) is reused
//! across questions.
//!
//! File `kv.snapshot`, little-endian:
//! `"LCXKVSNP"` | header length (u64) | header (JSON, [`Header`]) | for each layer, for each
//! held block: the block's bytes, then their XXH3-64 (u64) | XXH3-64 of everything before.
//! It is written under a temporary name, synced, and renamed into place, so a snapshot that
//! is visible is complete; loading checks the size, every checksum, the format version, and
//! that the model, layout and prompt are the caller's, before any block is used.

use crate::page::{checksum, PageBuf};
use crate::table::{BlockId, LayerTable};
use crate::{KvError, KvStore, Result, Retention, SeqId};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::Xxh3;

const MAGIC: &[u8; 8] = b"LCXKVSNP";
const VERSION: u32 = 1;
/// No honest header comes near this; a larger length field is corruption.
const MAX_HEADER: u64 = 16 << 20;
pub const FILE_NAME: &str = "kv.snapshot";

/// What a snapshot must match to be loaded.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotMeta<'a> {
    /// Identifies the model (weights and config) whose KV this is.
    pub fingerprint: &'a str,
    /// The token ids the KV was computed from.
    pub tokens: &'a [u32],
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct LayerHeader {
    retention: Retention,
    first_block: usize,
    len: usize,
    blocks: usize,
}

/// The JSON header.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Header {
    version: u32,
    fingerprint: String,
    dtype: String,
    block_tokens: usize,
    h_kv: usize,
    d: usize,
    tokens: usize,
    token_hash: String,
    layers: Vec<LayerHeader>,
}

fn token_hash(tokens: &[u32]) -> String {
    let mut h = Xxh3::new();
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    format!("{:016x}", h.digest())
}

/// A writer that hashes what it writes.
struct Hashing<W> {
    inner: W,
    hash: Xxh3,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.inner.write_all(bytes)
    }
}

/// A reader that hashes what it reads; a short read is a truncated snapshot.
struct HashingReader<'p, R> {
    inner: R,
    hash: Xxh3,
    path: &'p Path,
}

impl<R: Read> HashingReader<'_, R> {
    fn get(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| KvError::Snapshot {
            path: self.path.to_path_buf(),
            reason: format!("truncated in {what}: {e}"),
        })?;
        self.hash.update(buf);
        Ok(())
    }
}

impl KvStore {
    /// Saves `seq` (which must hold exactly `meta.tokens` in every layer) to `dir/kv.snapshot`,
    /// replacing an older snapshot there only once the new one is complete.
    pub fn save_snapshot(&self, seq: SeqId, dir: &Path, meta: &SnapshotMeta) -> Result<PathBuf> {
        let cfg = self.config();
        let bb = cfg.block_bytes();
        // Pin every block so the sequence can change while we write.
        let tables: Vec<LayerTable> = {
            let mut st = self.lock();
            let tables = st.tables(seq)?.clone();
            for t in &tables {
                for id in &t.blocks {
                    st.retain(*id);
                }
            }
            tables
        };
        let pinned: Vec<BlockId> = tables.iter().flat_map(|t| t.blocks.clone()).collect();
        let r = self.write_snapshot(&tables, dir, meta, bb);
        let mut st = self.lock();
        for id in pinned {
            st.release(id);
        }
        r
    }

    fn write_snapshot(
        &self,
        tables: &[LayerTable],
        dir: &Path,
        meta: &SnapshotMeta,
        bb: usize,
    ) -> Result<PathBuf> {
        let cfg = self.config();
        for (l, t) in tables.iter().enumerate() {
            if t.len != meta.tokens.len() {
                return Err(KvError::Shape {
                    op: "save_snapshot",
                    reason: format!(
                        "layer {l} holds {} tokens but {} token ids were given",
                        t.len,
                        meta.tokens.len()
                    ),
                });
            }
        }
        let header = Header {
            version: VERSION,
            fingerprint: meta.fingerprint.to_string(),
            dtype: cfg.dtype.name().to_string(),
            block_tokens: cfg.block_tokens,
            h_kv: cfg.h_kv,
            d: cfg.d,
            tokens: meta.tokens.len(),
            token_hash: token_hash(meta.tokens),
            layers: tables
                .iter()
                .zip(&cfg.layers)
                .map(|(t, r)| LayerHeader {
                    retention: *r,
                    first_block: t.first,
                    len: t.len,
                    blocks: t.blocks.len(),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header).expect("the header serialises");
        std::fs::create_dir_all(dir).map_err(|e| KvError::io("creating", dir, e))?;
        // What a writer killed mid-save left here.
        crate::stale::remove_stale(dir, ".tmp-");
        let final_path = dir.join(FILE_NAME);
        let tmp = dir.join(format!(
            "{FILE_NAME}.tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let write = || -> Result<()> {
            let file = File::create(&tmp).map_err(|e| KvError::io("creating", &tmp, e))?;
            let mut w = Hashing {
                inner: BufWriter::with_capacity(1 << 20, file),
                hash: Xxh3::new(),
            };
            let io = |e| KvError::io("writing", &tmp, e);
            w.put(MAGIC).map_err(io)?;
            w.put(&(json.len() as u64).to_le_bytes()).map_err(io)?;
            w.put(&json).map_err(io)?;
            for t in tables {
                for id in &t.blocks {
                    let buf = {
                        let mut st = self.lock();
                        st.load(*id, false)?
                    };
                    let bytes = buf.bytes(bb);
                    w.put(bytes).map_err(io)?;
                    w.put(&checksum(bytes).to_le_bytes()).map_err(io)?;
                }
            }
            let total = w.hash.digest();
            w.inner.write_all(&total.to_le_bytes()).map_err(io)?;
            let file = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            Ok(())
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &final_path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            KvError::io("renaming the snapshot to", &final_path, e)
        })?;
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(final_path)
    }

    /// Loads `dir/kv.snapshot` into a new sequence, after checking that it is complete,
    /// uncorrupted, and made for this store's layout, `meta.fingerprint` and `meta.tokens`.
    pub fn load_snapshot(&self, dir: &Path, meta: &SnapshotMeta) -> Result<SeqId> {
        let path = dir.join(FILE_NAME);
        let fail = |reason: String| KvError::Snapshot {
            path: path.clone(),
            reason,
        };
        let file = File::open(&path).map_err(|e| KvError::io("opening", &path, e))?;
        let size = file
            .metadata()
            .map_err(|e| KvError::io("reading the size of", &path, e))?
            .len();
        let mut r = HashingReader {
            inner: BufReader::with_capacity(1 << 20, file),
            hash: Xxh3::new(),
            path: &path,
        };
        let mut read = |buf: &mut [u8], what: &str| r.get(buf, what);
        let mut magic = [0u8; 8];
        read(&mut magic, "the magic number")?;
        if &magic != MAGIC {
            return Err(fail("not a longctx KV snapshot (bad magic number)".into()));
        }
        let mut n = [0u8; 8];
        read(&mut n, "the header length")?;
        let hl = u64::from_le_bytes(n);
        if hl > MAX_HEADER || 16 + hl > size {
            return Err(fail(format!(
                "header length {hl} does not fit a file of {size} bytes"
            )));
        }
        let mut json = vec![0u8; hl as usize];
        read(&mut json, "the header")?;
        let header: Header =
            serde_json::from_slice(&json).map_err(|e| fail(format!("unreadable header: {e}")))?;
        self.check_header(&header, meta).map_err(fail)?;

        let cfg = self.config();
        let bb = cfg.block_bytes();
        let blocks: u64 = header.layers.iter().map(|l| l.blocks as u64).sum();
        let expected = 16 + hl + blocks * (bb as u64 + 8) + 8;
        if size != expected {
            return Err(fail(format!(
                "{size} bytes, but its header describes {expected} (truncated or padded)"
            )));
        }
        let mut tables: Vec<LayerTable> = Vec::with_capacity(header.layers.len());
        let mut placed: Vec<BlockId> = Vec::new();
        let loaded = (|| -> Result<()> {
            for (l, lh) in header.layers.iter().enumerate() {
                let mut t = LayerTable {
                    first: lh.first_block,
                    blocks: VecDeque::with_capacity(lh.blocks),
                    len: lh.len,
                };
                for b in 0..lh.blocks {
                    let mut page = PageBuf::zeroed(bb);
                    r.get(page.bytes_mut(bb), "a block")?;
                    let mut sum = [0u8; 8];
                    r.get(&mut sum, "a block checksum")?;
                    let (stored, got) = (u64::from_le_bytes(sum), checksum(page.bytes(bb)));
                    if stored != got {
                        return Err(KvError::Checksum {
                            what: format!("block {b} of layer {l} of {}", path.display()),
                            stored,
                            read: got,
                        });
                    }
                    let id = self.lock().place_new(page)?;
                    placed.push(id);
                    t.blocks.push_back(id);
                }
                tables.push(t);
            }
            let want = r.hash.digest();
            let mut sum = [0u8; 8];
            r.get(&mut sum, "the trailer")?;
            if u64::from_le_bytes(sum) != want {
                return Err(KvError::Checksum {
                    what: format!("the whole of {}", path.display()),
                    stored: u64::from_le_bytes(sum),
                    read: want,
                });
            }
            Ok(())
        })();
        let mut st = self.lock();
        if let Err(e) = loaded {
            // Nothing of a bad snapshot stays behind.
            for id in placed {
                st.release(id);
            }
            return Err(e);
        }
        Ok(st.insert_seq(tables))
    }

    fn check_header(&self, h: &Header, meta: &SnapshotMeta) -> std::result::Result<(), String> {
        let cfg = self.config();
        if h.version != VERSION {
            return Err(format!(
                "format version {}, this build reads version {VERSION}: prefill again",
                h.version
            ));
        }
        if h.fingerprint != meta.fingerprint {
            return Err(format!(
                "made for model {:?}, not {:?}",
                h.fingerprint, meta.fingerprint
            ));
        }
        let mine = (cfg.dtype.name(), cfg.block_tokens, cfg.h_kv, cfg.d);
        let theirs = (h.dtype.as_str(), h.block_tokens, h.h_kv, h.d);
        if mine != theirs {
            return Err(format!(
                "layout (dtype, block tokens, h_kv, d) {theirs:?} differs from the store's {mine:?}"
            ));
        }
        if h.layers.len() != cfg.layers.len() {
            return Err(format!(
                "{} layers, the store has {}",
                h.layers.len(),
                cfg.layers.len()
            ));
        }
        if h.tokens != meta.tokens.len() || h.token_hash != token_hash(meta.tokens) {
            return Err(format!(
                "made from another prompt ({} tokens, hash {}; given {} tokens)",
                h.tokens,
                h.token_hash,
                meta.tokens.len()
            ));
        }
        let bt = cfg.block_tokens;
        for (l, (lh, r)) in h.layers.iter().zip(&cfg.layers).enumerate() {
            let consistent = lh.len == h.tokens
                && lh.first_block <= lh.len.div_ceil(bt)
                && lh.blocks == lh.len.div_ceil(bt) - lh.first_block;
            if lh.retention != *r || !consistent {
                return Err(format!("layer {l} header is inconsistent: {lh:?}"));
            }
        }
        Ok(())
    }
}
