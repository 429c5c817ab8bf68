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
        Ok(Blob { owner, start, len })
    }

    /// Owned bytes.
    pub fn from_vec(v: Vec<u8>) -> Blob {
        let len = v.len();
        Blob {
            owner: Arc::new(v),
            start: 0,
            len,
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
