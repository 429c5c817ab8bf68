//! Tensors as a file stores them: bytes shared with their owner (a memory-mapped file, or a
//! vector for weights made in memory), read in place in their [`Format`].

use super::Format;
use crate::KernelError;
use std::sync::Arc;

/// Bytes `start..start + len` of an owner that lives as long as any blob of it: many tensors
/// borrow one mapped file without copying it, and the mapping outlives none of them.
#[derive(Clone)]
pub struct Blob {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
    /// The owner is a read-only private map of a file: its pages can be dropped and are read
    /// again from the file when touched ([`Blob::release_pages`]).
    mapped: bool,
}

impl Blob {
    /// A range of a shared owner; an error when it lies outside it.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Result<Blob, KernelError> {
        let total = (*owner).as_ref().len();
        if start.checked_add(len).is_none_or(|e| e > total) {
            return Err(KernelError::Unsupported {
                op: "Blob::new",
                reason: format!("bytes {start}..+{len} lie outside the {total} of the owner"),
            });
        }
        Ok(Blob {
            owner,
            start,
            len,
            mapped: false,
        })
    }

    /// A range of a read-only private memory map of a file (what [`Blob::release_pages`] may
    /// drop); an error when it lies outside it.
    pub fn mapped(
        owner: Arc<memmap2::Mmap>,
        start: usize,
        len: usize,
    ) -> Result<Blob, KernelError> {
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = owner;
        Ok(Blob {
            mapped: true,
            ..Blob::new(owner, start, len)?
        })
    }

    /// Drops this blob's whole pages from the process's memory when they belong to a file
    /// map (a no-op for owned bytes): for a weight repacked into a kernel's layout, whose
    /// file bytes are not read again on that path. Nothing is lost: a later read faults the
    /// pages in from the file again.
    pub fn release_pages(&self) {
        #[cfg(unix)]
        self.advise(libc::MADV_DONTNEED);
    }

    /// Asks the kernel to start reading this blob's pages from the file now (a no-op for
    /// owned bytes): a read-ahead that costs this thread nothing, for bytes needed soon.
    pub fn will_need(&self) {
        #[cfg(unix)]
        self.advise(libc::MADV_WILLNEED);
    }

    /// Maps this blob's pages in one call (Linux's `MADV_POPULATE_READ`; a no-op for owned
    /// bytes, elsewhere, or where the kernel refuses it): for bytes about to be read whole
    /// once. An expert read under `--expert-budget` otherwise takes one page fault per few
    /// pages (a 6 MB bf16 expert, ~1,500 faults on every miss).
    pub fn populate(&self) {
        #[cfg(target_os = "linux")]
        self.advise(libc::MADV_POPULATE_READ);
    }

    #[cfg(unix)]
    fn advise(&self, advice: libc::c_int) {
        if self.mapped {
            const PAGE: usize = 4096;
            let base = self.bytes().as_ptr() as usize;
            let (lo, hi) = (base.next_multiple_of(PAGE), (base + self.len) / PAGE * PAGE);
            if hi > lo {
                // SAFETY: lo..hi lies within a read-only private file map that stays mapped
                // (this blob holds it); MADV_DONTNEED on such a map only drops pages, which
                // later reads fault in from the file with the same contents, and
                // MADV_WILLNEED and MADV_POPULATE_READ only read them.
                unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, advice) };
            }
        }
    }

    /// Owned bytes.
    pub fn from_vec(v: Vec<u8>) -> Blob {
        let len = v.len();
        Blob {
            owner: Arc::new(v),
            start: 0,
            len,
            mapped: false,
        }
    }

    /// f32 values, stored little-endian.
    pub fn from_f32(v: &[f32]) -> Blob {
        Blob::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn bytes(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes `start..start + len` of this blob, sharing its owner.
    pub fn slice(&self, start: usize, len: usize) -> Result<Blob, KernelError> {
        if start.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(KernelError::Unsupported {
                op: "Blob::slice",
                reason: format!("bytes {start}..+{len} lie outside a blob of {}", self.len),
            });
        }
        Ok(Blob {
            owner: self.owner.clone(),
            start: self.start + start,
            len,
            mapped: self.mapped,
        })
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blob({} bytes)", self.len)
    }
}

/// A `[rows, cols]` matrix as stored: each row `cols` elements of `format`, whole blocks,
/// rows back to back (a Hugging Face `[out, in]` weight, or a GGUF tensor of dims
/// `[cols, rows]`).
#[derive(Clone, Copy, Debug)]
pub struct StoredRows<'a> {
    pub format: Format,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
}

impl<'a> StoredRows<'a> {
    /// Checks that `bytes` holds exactly `rows` rows of `cols` whole blocks.
    pub fn new(
        format: Format,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<StoredRows<'a>, KernelError> {
        let row_bytes = format.bytes_of(cols)?;
        let need = row_bytes
            .checked_mul(rows)
            .ok_or_else(|| KernelError::Unsupported {
                op: "StoredRows::new",
                reason: format!("{rows} rows of {cols} {format} elements overflow"),
            })?;
        crate::attention::check_len("StoredRows::new", "bytes", need, bytes.len())?;
        Ok(StoredRows {
            format,
            bytes,
            rows,
            cols,
            row_bytes,
        })
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Row `r` dequantised into `out` (`cols` long).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let b = &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
        // Sizes were checked in `new`.
        self.format
            .dequantize(b, &mut out[..self.cols])
            .expect("row sizes checked at construction");
    }

    /// Rows `r0..r0 + n` dequantised, row-major, into `out` (`n * cols` long).
    pub fn dequantize_rows(&self, r0: usize, n: usize, out: &mut [f32]) {
        let b = &self.bytes[r0 * self.row_bytes..(r0 + n) * self.row_bytes];
        self.format
            .dequantize(b, &mut out[..n * self.cols])
            .expect("row sizes checked at construction");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping a file map's pages loses nothing: the bytes read back the same (from the
    /// file), also for a slice that starts and ends inside pages; owned bytes are untouched.
    #[test]
    fn released_pages_read_back_from_the_file() {
        let path = std::env::temp_dir().join(format!("longctx-blob-{}", std::process::id()));
        let want: Vec<u8> = (0..5 * 4096 + 123).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, &want).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a private read-only map of a file this test owns.
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let whole = Blob::mapped(map.clone(), 0, want.len()).unwrap();
        let part = whole.slice(100, 3 * 4096).unwrap();
        assert_eq!(whole.bytes(), &want[..]);
        part.release_pages();
        whole.release_pages();
        assert_eq!(part.bytes(), &want[100..100 + 3 * 4096]);
        assert_eq!(whole.bytes(), &want[..]);
        let owned = Blob::from_vec(want.clone());
        owned.release_pages();
        assert_eq!(owned.bytes(), &want[..]);
        assert!(Blob::mapped(map, 10, want.len()).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
