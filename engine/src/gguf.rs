//! GGUF files (llama.cpp's format): metadata, the tensor directory, and tensors as stored
//! (every format of [`longctx_kernels::formats`]), borrowed from the mapped file.
//!
//! The file is memory-mapped and parsed through a cursor that checks every length and offset
//! against the bytes that are there: string and array lengths are capped, dimensions are
//! checked for overflow, and every tensor's byte range must lie inside the data section. A
//! truncated or crafted file is an [`EngineError::BadFile`], never a panic or an
//! out-of-bounds read.
//!
//! Layout (little-endian): magic `GGUF`, version (2 or 3), tensor count, metadata count;
//! metadata `(key, type, value)`; tensor infos `(name, n_dims, dims, type, offset)`; padding to
//! `general.alignment` (32 by default); tensor data, each at `data_start + offset`.

use crate::weights::Tensor;
use crate::{EngineError, Result};
use longctx_kernels::{Blob, Format};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// No key, string or name legitimately comes near these.
const MAX_STRING: u64 = 64 << 20;
const MAX_DIMS: u32 = 4;
/// Metadata array items in one file, all arrays together: a vocabulary of 262K tokens with
/// scores, types and 1M merges is ~2M. Each item is a 32-byte [`Value`] in memory, so this
/// bounds what a crafted file can make us allocate to 512 MiB.
const MAX_ITEMS: u64 = 1 << 24;
/// Tensors in one file: real ones hold a few thousand (Llama 4 Maverick ~1,100).
const MAX_TENSORS: u64 = 1 << 20;
/// The fewest bytes a tensor info takes (empty name, one dimension) and a metadata entry
/// (empty key, a one-byte value): counts that could not fit the file are refused before
/// anything is allocated from them.
const MIN_TENSOR_INFO: u64 = 8 + 4 + 8 + 4 + 8;
const MIN_KV: u64 = 8 + 4 + 1;

/// A GGUF file's metadata, by key.
pub type Metadata = BTreeMap<String, Value>;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml's type ids, by name.
pub struct GgmlType;

impl GgmlType {
    /// ggml's name of a type id (`ggml_type` in ggml.h), read or not: errors name the type
    /// a user sees in llama.cpp's tools, not its number.
    pub fn name_of(id: u32) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        match NAMES.get(id as usize) {
            Some(n) => n.to_string(),
            None => format!("unknown type {id}"),
        }
    }
}

/// One tensor's directory entry. `dims` are GGUF's (innermost first), so a weight of
/// `[out, in]` in row-major terms has `dims == [in, out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// `None` for a type this build cannot read (reported when the tensor is asked for).
    pub ty: Option<Format>,
    pub type_id: u32,
    /// Absolute byte range in the file.
    pub start: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: BTreeMap<String, TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array items read so far (bounded by [`MAX_ITEMS`]).
    items: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = (self.pos as u64)
            .checked_add(n)
            .filter(|e| *e <= self.buf.len() as u64)
            .ok_or_else(|| {
                format!(
                    "truncated: {what} needs {n} bytes at offset {}, the file has {}",
                    self.pos,
                    self.buf.len()
                )
            })?;
        let s = &self.buf[self.pos..end as usize];
        self.pos = end as usize;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > MAX_STRING {
            return Err(format!("{what}: string length {n} is beyond any sane size"));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.take(1, what)?[0]),
            1 => Value::I8(self.take(1, what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, what)?.try_into().unwrap())),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deep"));
                }
                let item = self.u32(what)?;
                let n = self.u64(what)?;
                // Every item takes at least its fixed size: a count beyond what is left is a
                // lie, found before allocating for it.
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("{what}: unknown array item type {t}")),
                };
                let left = (self.buf.len() - self.pos) as u64;
                if n.checked_mul(min).is_none_or(|b| b > left) {
                    return Err(format!(
                        "{what}: array of {n} items with {left} bytes left in the file"
                    ));
                }
                self.items += n;
                if self.items > MAX_ITEMS {
                    return Err(format!(
                        "{what}: more than {MAX_ITEMS} metadata array items in the file, beyond \
                         any real model"
                    ));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = std::fs::File::open(path).map_err(|e| EngineError::io("opening", path, e))?;
        // SAFETY: the map is read-only and private to this process; a file changed underneath
        // it would show changed bytes, which the parser treats as untrusted input anyway.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| EngineError::io("mapping", path, e))?;
        Gguf::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<Gguf> {
        let bad = |reason: String| EngineError::BadFile {
            path: path.to_path_buf(),
            format: "GGUF",
            reason,
        };
        let (version, metadata, tensors) = Self::parse_bytes(&map).map_err(bad)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version,
            metadata,
            tensors,
        })
    }

    #[allow(clippy::type_complexity)]
    fn parse_bytes(
        buf: &[u8],
    ) -> std::result::Result<(u32, Metadata, BTreeMap<String, TensorInfo>), String> {
        let mut c = Cursor {
            buf,
            pos: 0,
            items: 0,
        };
        if c.take(4, "the magic number")? != b"GGUF" {
            return Err("bad magic number (not a GGUF file)".into());
        }
        let version = c.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version}; this build reads 2 and 3"));
        }
        let n_tensors = c.u64("the tensor count")?;
        let n_kv = c.u64("the metadata count")?;
        let left = buf.len() as u64;
        let need = n_tensors
            .checked_mul(MIN_TENSOR_INFO)
            .zip(n_kv.checked_mul(MIN_KV))
            .and_then(|(a, b)| a.checked_add(b));
        if need.is_none_or(|b| b > left) {
            return Err(format!(
                "{n_tensors} tensors and {n_kv} metadata entries cannot fit {left} bytes"
            ));
        }
        if n_tensors > MAX_TENSORS {
            return Err(format!(
                "{n_tensors} tensors, beyond any real model (at most {MAX_TENSORS} are read)"
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key {i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| a.is_power_of_two() && *a <= 1 << 20)
                .ok_or_else(|| format!("general.alignment {v:?} is not a power of two"))?,
        };
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name {i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!("tensor {name}: {n_dims} dimensions"));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            infos.push((name, dims, type_id, offset));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = BTreeMap::new();
        for (name, dims, type_id, offset) in infos {
            let elements = dims
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .ok_or_else(|| format!("tensor {name}: dimensions {dims:?} overflow"))?;
            let ty = Format::from_ggml(type_id);
            let bytes = match ty {
                Some(t) => {
                    let (per, size) = (t.block_elems() as u64, t.block_bytes() as u64);
                    if dims[0] % per != 0 {
                        return Err(format!(
                            "tensor {name}: row of {} elements is not whole {t} blocks",
                            dims[0]
                        ));
                    }
                    (elements / per)
                        .checked_mul(size)
                        .ok_or_else(|| format!("tensor {name}: dimensions {dims:?} overflow"))?
                }
                None => 0,
            };
            let start = data_start
                .checked_add(offset)
                .filter(|s| s.checked_add(bytes).is_some_and(|e| e <= left))
                .ok_or_else(|| {
                    format!(
                        "tensor {name}: {bytes} bytes at data offset {offset} lie outside the \
                         file of {left} bytes (truncated?)"
                    )
                })?;
            if tensors.contains_key(&name) {
                return Err(format!("tensor {name} appears twice"));
            }
            tensors.insert(
                name.clone(),
                TensorInfo {
                    name,
                    dims,
                    ty,
                    type_id,
                    start,
                    bytes,
                },
            );
        }
        // Byte ranges must not overlap: a tensor aliasing another's bytes once loaded and
        // answered wrongly. Sorted by start, each must end before the next begins.
        let mut ranges: Vec<(u64, u64, &str)> = tensors
            .values()
            .filter(|t| t.bytes > 0)
            .map(|t| (t.start, t.start + t.bytes, t.name.as_str()))
            .collect();
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(format!(
                    "tensors {} and {} overlap (bytes {}..{} and {}..{})",
                    w[0].2, w[1].2, w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor's directory entry, or the error naming why it cannot be read.
    fn info(&self, name: &str) -> Result<(&TensorInfo, Format)> {
        let info = self.tensors.get(name).ok_or_else(|| EngineError::Weight {
            name: name.into(),
            reason: format!("not in {}", self.path.display()),
        })?;
        let ty = info.ty.ok_or_else(|| {
            let known: Vec<&str> = longctx_kernels::formats::ALL
                .iter()
                .map(|f| f.name())
                .collect();
            // By ggml's name, as llama.cpp's tools show it (once "GGML type 16", a number).
            EngineError::Unsupported(format!(
                "tensor {name} is {}, which this build does not read; it reads {}",
                GgmlType::name_of(info.type_id),
                known.join(", ")
            ))
        })?;
        Ok((info, ty))
    }

    /// A tensor as stored, borrowing the mapped file, with row-major `shape` (its reversed
    /// GGUF dims); nothing is copied.
    pub fn tensor(&self, name: &str, shape: Vec<usize>) -> Result<Tensor> {
        let (info, ty) = self.info(name)?;
        let blob = Blob::mapped(self.map.clone(), info.start as usize, info.bytes as usize)?;
        Tensor::stored(name, shape, ty, blob)
    }

    /// A tensor, dequantised to f32, in row-major order of its reversed GGUF dims.
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (info, ty) = self.info(name)?;
        let bytes = &(*self.map).as_ref()[info.start as usize..(info.start + info.bytes) as usize];
        Ok(ty.to_f32(bytes, info.elements() as usize)?)
    }
}

/// Parses GGUF bytes held in memory (for fuzzing and tests).
pub fn parse_header(buf: &[u8]) -> std::result::Result<usize, String> {
    Gguf::parse_bytes(buf).map(|(_, m, t)| m.len() + t.len())
}

/// The metadata of GGUF bytes held in memory (for fuzzing the tokenizer built from it).
pub fn parse_metadata(buf: &[u8]) -> std::result::Result<Metadata, String> {
    Gguf::parse_bytes(buf).map(|(_, m, _)| m)
}

#[cfg(test)]
mod tests;
