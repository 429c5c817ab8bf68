//! A folder of snapshots (one sub-folder each) capped in bytes, least recently used first
//! out. Each snapshot folder's last use is the modification time of its [`USED`] file
//! (touched on every load or save; the folder's own time where there is none), so the order
//! survives across processes without an index file that two writers could tear.

use crate::{KvError, Result};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The marker file whose modification time is a snapshot's last use.
pub const USED: &str = "last-used";

/// A snapshot folder of the cache.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub dir: PathBuf,
    /// Bytes of every file in it.
    pub bytes: u64,
    pub last_used: SystemTime,
}

/// Marks `dir` as used now.
pub fn touch(dir: &Path) -> Result<()> {
    let p = dir.join(USED);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| KvError::io("creating", &p, e))?;
    f.set_modified(SystemTime::now())
        .map_err(|e| KvError::io("touching", &p, e))
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// The snapshot folders under `root` (none when it does not exist), least recently used
/// first.
pub fn entries(root: &Path) -> Vec<Entry> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut out: Vec<Entry> = rd
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            let dir = e.path();
            let time = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let last_used = time(&dir.join(USED))
                .or_else(|| time(&dir))
                .unwrap_or(SystemTime::UNIX_EPOCH);
            Entry {
                bytes: dir_bytes(&dir),
                dir,
                last_used,
            }
        })
        .collect();
    out.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.dir.cmp(&b.dir)));
    out
}

/// Removes the least recently used snapshot folders under `root` until the rest take at most
/// `limit` bytes, never one in `keep` (the snapshot in use); returns what went. A folder that
/// cannot be removed (another process's, read-only) is skipped, not an error.
pub fn evict_lru(root: &Path, limit: u64, keep: &[&Path]) -> Vec<Entry> {
    let all = entries(root);
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    let mut gone = vec![];
    for e in all {
        if total <= limit {
            break;
        }
        if keep.iter().any(|k| *k == e.dir) {
            continue;
        }
        if std::fs::remove_dir_all(&e.dir).is_ok() {
            total -= e.bytes;
            gone.push(e);
        }
    }
    gone
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(root: &Path, name: &str, bytes: usize, age_s: u64) -> PathBuf {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("kv.snapshot"), vec![7u8; bytes]).unwrap();
        touch(&d).unwrap();
        let t = SystemTime::now() - Duration::from_secs(age_s);
        std::fs::File::options()
            .write(true)
            .open(d.join(USED))
            .unwrap()
            .set_modified(t)
            .unwrap();
        d
    }

    /// Four snapshots of 1000 bytes under a 2500-byte cap: the two used longest ago go, the
    /// one in use stays even when it is the oldest, and a touch makes an old one the newest.
    #[test]
    fn the_least_recently_used_snapshots_go_first_and_the_one_in_use_stays() {
        let root = std::env::temp_dir().join(format!(
            "longctx-cache-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let a = entry(&root, "a", 1000, 400);
        let b = entry(&root, "b", 1000, 300);
        let c = entry(&root, "c", 1000, 200);
        let d = entry(&root, "d", 1000, 100);
        let order: Vec<PathBuf> = entries(&root).into_iter().map(|e| e.dir).collect();
        assert_eq!(order, [a.clone(), b.clone(), c.clone(), d.clone()]);
        // b is used now: a and c are the two oldest.
        touch(&b).unwrap();
        let gone: Vec<PathBuf> = evict_lru(&root, 2500, &[])
            .into_iter()
            .map(|e| e.dir)
            .collect();
        assert_eq!(gone, [a.clone(), c.clone()]);
        assert!(b.exists() && d.exists() && !a.exists() && !c.exists());
        // Under the cap nothing goes.
        assert!(evict_lru(&root, 2100, &[]).is_empty());
        // The one in use is kept even as the oldest: d (older than b) is kept, b goes.
        let gone: Vec<PathBuf> = evict_lru(&root, 1100, &[&d])
            .into_iter()
            .map(|e| e.dir)
            .collect();
        assert_eq!(gone, [b]);
        assert!(d.exists());
        // A cap of 0 with the one in use kept leaves just that one.
        assert!(evict_lru(&root, 0, &[&d]).is_empty());
        assert_eq!(entries(&root).len(), 1);
        assert!(entries(&root.join("nope")).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
