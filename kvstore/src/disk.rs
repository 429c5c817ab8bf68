//! The disk tier: one spill file per store, cut into block-sized slots. A block's checksum
//! is kept in memory when it is written and verified on every read, so a corrupted or
//! truncated spill file is an error, never wrong KV.

use crate::page::{checksum, PageBuf};
use crate::{KvError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_FILE: AtomicU64 = AtomicU64::new(0);

pub(crate) struct SpillFile {
    path: PathBuf,
    file: File,
    block_bytes: usize,
    free: Vec<u64>,
    next: u64,
}

impl SpillFile {
    pub fn create(dir: &Path, block_bytes: usize) -> Result<SpillFile> {
        std::fs::create_dir_all(dir).map_err(|e| KvError::io("creating", dir, e))?;
        let n = NEXT_FILE.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("kv-spill-{}-{n}.bin", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| KvError::io("creating", &path, e))?;
        Ok(SpillFile {
            path,
            file,
            block_bytes,
            free: Vec::new(),
            next: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a block into a free slot: (slot, checksum). On error no slot is taken.
    pub fn write(&mut self, page: &PageBuf) -> Result<(u64, u64)> {
        let bytes = page.bytes(self.block_bytes);
        let slot = self.free.pop().unwrap_or(self.next);
        let r = self
            .file
            .write_all_at(bytes, slot * self.block_bytes as u64);
        match r {
            Ok(()) => {
                if slot == self.next {
                    self.next += 1;
                }
                Ok((slot, checksum(bytes)))
            }
            Err(e) => {
                if slot != self.next {
                    self.free.push(slot);
                }
                Err(KvError::io("writing a spilled block to", &self.path, e))
            }
        }
    }

    /// Reads a slot back and checks it against the checksum taken when it was written.
    pub fn read(&self, slot: u64, sum: u64) -> Result<PageBuf> {
        let mut page = PageBuf::zeroed(self.block_bytes);
        let bytes = page.bytes_mut(self.block_bytes);
        self.file
            .read_exact_at(bytes, slot * self.block_bytes as u64)
            .map_err(|e| KvError::io("reading a spilled block from", &self.path, e))?;
        let got = checksum(bytes);
        if got != sum {
            return Err(KvError::Checksum {
                what: format!("spilled block at slot {slot} of {}", self.path.display()),
                stored: sum,
                read: got,
            });
        }
        Ok(page)
    }

    /// Reads consecutive slots `first..first + sums.len()` in one vectored read (a long
    /// sequential request keeps the disk busy where one block at a time leaves it idle between
    /// requests), each checked against its checksum.
    /// `pages` are the buffers to read into, one per block; their contents are overwritten.
    pub fn read_run(
        &self,
        first: u64,
        sums: &[u64],
        mut pages: Vec<PageBuf>,
    ) -> Result<Vec<PageBuf>> {
        use std::os::fd::AsRawFd;
        let bb = self.block_bytes;
        assert_eq!(pages.len(), sums.len(), "one buffer per block");
        let total = bb * pages.len();
        let mut done = 0usize;
        while done < total {
            // Rebuild the iovecs past what has been read so far.
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(pages.len());
            for (i, p) in pages.iter_mut().enumerate() {
                let (lo, hi) = (i * bb, (i + 1) * bb);
                if hi <= done {
                    continue;
                }
                let skip = done.saturating_sub(lo);
                let bytes = &mut p.bytes_mut(bb)[skip..];
                iov.push(libc::iovec {
                    iov_base: bytes.as_mut_ptr().cast(),
                    iov_len: bytes.len(),
                });
            }
            let offset = first * bb as u64 + done as u64;
            // SAFETY: every iovec points into a live, exclusively borrowed page buffer of the
            // stated length; the count fits an int (at most a prefetch window of blocks).
            let n = unsafe {
                libc::preadv(
                    self.file.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len() as libc::c_int,
                    offset as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(KvError::io("reading spilled blocks from", &self.path, e));
            }
            if n == 0 {
                return Err(KvError::io(
                    "reading spilled blocks from",
                    &self.path,
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            done += n as usize;
        }
        for (i, (p, sum)) in pages.iter().zip(sums).enumerate() {
            let got = checksum(p.bytes(bb));
            if got != *sum {
                return Err(KvError::Checksum {
                    what: format!(
                        "spilled block at slot {} of {}",
                        first + i as u64,
                        self.path.display()
                    ),
                    stored: *sum,
                    read: got,
                });
            }
        }
        Ok(pages)
    }

    pub fn free(&mut self, slot: u64) {
        self.free.push(slot);
    }

    /// Flushes the file and asks the kernel to drop its cached pages, so the next reads come
    /// from the device (benchmarks measure the disk, not the page cache).
    pub fn drop_os_cache(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| KvError::io("syncing", &self.path, e))?;
        drop_os_cache(&self.file, &self.path)
    }
}

impl Drop for SpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `posix_fadvise(DONTNEED)` over a whole file (clean pages only: sync first).
pub fn drop_os_cache(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(KvError::io(
            "dropping cached pages of",
            path,
            std::io::Error::from_raw_os_error(rc),
        ));
    }
    Ok(())
}
