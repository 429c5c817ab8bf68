//! Weights by their Hugging Face names, from a GGUF file or a safetensors directory (one
//! file, or shards listed in `model.safetensors.index.json`), kept as the file stores them:
//! loading maps the file and checks every tensor's size, it converts nothing.

use crate::arch::{self, Role};
use crate::config::Arch;
use crate::gguf::Gguf;
use crate::{EngineError, Result};
use longctx_kernels::{Blob, Format, StoredRows};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// A tensor as its file stores it: row-major `shape` (Hugging Face order), its format, and
/// its bytes, borrowed from the mapped file (or owned, for weights made in memory).
#[derive(Clone, Debug)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub format: Format,
    pub data: Blob,
}

impl Tensor {
    /// f32 values made in memory.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        Tensor {
            shape,
            format: Format::F32,
            data: Blob::from_f32(&data),
        }
    }

    /// Stored bytes, checked to hold the shape's elements in whole blocks of its rows.
    pub fn stored(name: &str, shape: Vec<usize>, format: Format, data: Blob) -> Result<Tensor> {
        let bad = |reason: String| EngineError::Weight {
            name: name.into(),
            reason,
        };
        let n = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if let Some(&row) = shape.last() {
            if !row.is_multiple_of(format.block_elems()) {
                return Err(bad(format!(
                    "rows of {row} elements are not whole {format} blocks of {}",
                    format.block_elems()
                )));
            }
        }
        let need = format.bytes_of(n).map_err(|e| bad(e.to_string()))?;
        if need != data.len() {
            return Err(bad(format!(
                "{} bytes stored, shape {shape:?} in {format} needs {need}",
                data.len()
            )));
        }
        Ok(Tensor {
            shape,
            format,
            data,
        })
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Every element, dequantised to f32 (for the small tensors: norms, routers, tests).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(self.format.to_f32(self.data.bytes(), self.elements())?)
    }

    /// The tensor as `[shape[0], rest]` stored rows.
    pub fn rows(&self) -> Result<StoredRows<'_>> {
        let rows = self.shape.first().copied().unwrap_or(1);
        let cols = self.elements() / rows.max(1);
        Ok(StoredRows::new(self.format, self.data.bytes(), rows, cols)?)
    }
}

/// Every tensor of a model, by Hugging Face name (`model.layers.0.self_attn.q_proj.weight`).
pub struct Weights {
    map: BTreeMap<String, Tensor>,
}

/// The name one routed expert's projection has once loaded, each `[out, in]` as a dense
/// MLP's: the fused tensor's name (`model.layers.L.feed_forward.experts.gate_up_proj`, from
/// the architecture's table) with `experts.{x}.{proj}.weight` in place of its last parts.
pub fn expert_name(layer: usize, x: usize, proj: &str) -> String {
    let fused = arch::names(Arch::Llama4, Some(layer), Role::ExpertsGateUp)
        .0
        .expect("a Hugging Face name");
    let f = fused
        .strip_suffix(".experts.gate_up_proj")
        .expect("the table's fused name");
    format!("{f}.experts.{x}.{proj}.weight")
}

/// A layer's routed experts from llama.cpp's three `[E, out, in]` tensors
/// (`ffn_{gate,up,down}_exps`): each expert's rows are one contiguous run of whole blocks, so
/// each becomes its own `[out, in]` tensor borrowing the file, in the file's format.
fn split_gguf_experts(g: &Gguf, layer: usize, map: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let mut shapes = vec![];
    for (role, proj) in [
        (Role::GgufExpertsGate, "gate_proj"),
        (Role::GgufExpertsUp, "up_proj"),
        (Role::GgufExpertsDown, "down_proj"),
    ] {
        let name = arch::names(Arch::Llama4, Some(layer), role)
            .1
            .expect("a GGUF name");
        let info = g.tensors.get(&name).ok_or_else(|| EngineError::Weight {
            name: name.clone(),
            reason: "missing beside the layer's other experts".into(),
        })?;
        let dims: Vec<usize> = info.dims.iter().rev().map(|d| *d as usize).collect();
        let &[e, out, inp] = dims.as_slice() else {
            return Err(EngineError::Weight {
                name,
                reason: format!("shape {dims:?}, experts need 3 dimensions"),
            });
        };
        let t = g.tensor(&name, dims.clone())?;
        let bad = |reason: String| EngineError::Weight {
            name: name.clone(),
            reason,
        };
        let each = t
            .format
            .bytes_of(out * inp)
            .map_err(|e| bad(e.to_string()))?;
        for x in 0..e {
            let data = t
                .data
                .slice(x * each, each)
                .map_err(|e| bad(e.to_string()))?;
            let one = Tensor::stored(&name, vec![out, inp], t.format, data)?;
            map.insert(expert_name(layer, x, proj), one);
        }
        shapes.push(dims);
    }
    let (e, inter, h) = (shapes[0][0], shapes[0][1], shapes[0][2]);
    if shapes[1] != shapes[0] || shapes[2] != [e, h, inter] {
        return Err(EngineError::Weight {
            name: format!("blk.{layer}.ffn_*_exps.weight"),
            reason: format!(
                "shapes gate {:?}, up {:?}, down {:?} do not agree",
                shapes[0], shapes[1], shapes[2]
            ),
        });
    }
    Ok(())
}

/// One routed expert's weights as the file keeps them.
pub enum ExpertWeights {
    /// `[gate, up, down]`, each `[out, in]`.
    OutIn([Tensor; 3]),
    /// Its slices of a transformers checkpoint's fused experts.
    Fused(FusedExpert),
}

/// One expert's slices of transformers' fused `gate_up_proj` (`[h, 2I]`) and `down_proj`
/// (`[I, h]`), input-major, borrowing the mapped file.
pub struct FusedExpert {
    pub gate_up: Tensor,
    pub down: Tensor,
    h: usize,
    inter: usize,
}

impl FusedExpert {
    /// `[gate, up, down]` as `[out, in]` copies in the stored element type (no rounding).
    pub fn split(&self) -> Result<[Tensor; 3]> {
        let (h, i) = (self.h, self.inter);
        Ok([
            transpose_float(&self.gate_up, h, 2 * i, 0, i)?,
            transpose_float(&self.gate_up, h, 2 * i, i, i)?,
            transpose_float(&self.down, i, h, 0, h)?,
        ])
    }
}

/// Bytes of a fused expert tensor's element: they are split by copying elements, so only
/// unblocked float types can be.
fn float_size(name: &str, t: &Tensor) -> Result<usize> {
    match t.format {
        Format::F32 => Ok(4),
        Format::F16 | Format::BF16 => Ok(2),
        f => Err(EngineError::Weight {
            name: name.into(),
            reason: format!("fused experts stored as {f}; they are read as f32, f16 or bf16"),
        }),
    }
}

/// Columns `c0..c0 + cols` of the row-major `[rows, stride]` float matrix `t`, transposed
/// to `[cols, rows]` in the same element type (no rounding).
fn transpose_float(
    t: &Tensor,
    rows: usize,
    stride: usize,
    c0: usize,
    cols: usize,
) -> Result<Tensor> {
    let size = float_size("fused expert", t)?;
    let src = t.data.bytes();
    let mut dst = vec![0u8; rows * cols * size];
    match size {
        2 => transpose_elems::<u16, 2>(src, &mut dst, rows, stride, c0),
        _ => transpose_elems::<u32, 4>(src, &mut dst, rows, stride, c0),
    }
    Tensor::stored(
        "fused expert",
        vec![cols, rows],
        t.format,
        Blob::from_vec(dst),
    )
}

/// An element's bits, read from and written to little-endian bytes.
trait Bits: Copy + Default {
    fn read(b: &[u8]) -> Self;
    fn write(self, b: &mut [u8]);
}

impl Bits for u16 {
    #[inline(always)]
    fn read(b: &[u8]) -> u16 {
        u16::from_le_bytes([b[0], b[1]])
    }
    #[inline(always)]
    fn write(self, b: &mut [u8]) {
        b[..2].copy_from_slice(&self.to_le_bytes());
    }
}

impl Bits for u32 {
    #[inline(always)]
    fn read(b: &[u8]) -> u32 {
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }
    #[inline(always)]
    fn write(self, b: &mut [u8]) {
        b[..4].copy_from_slice(&self.to_le_bytes());
    }
}

/// [`transpose_float`] into `dst` (`[cols, rows]`) for elements `E` of `N` bytes, in tiles of
/// `TC` output rows by `TR` input rows, the next tile's input rows prefetched (a routed expert
/// is split on every miss under an expert budget, its input rows a page apart). Typed
/// elements, 128-column strips and the prefetch: the byte-array form with 32-column strips
/// took 42% of a bf16 checkpoint's decode under a budget at 0% hits.
fn transpose_elems<E: Bits, const N: usize>(
    src: &[u8],
    dst: &mut [u8],
    rows: usize,
    stride: usize,
    c0: usize,
) {
    const TC: usize = 128;
    const TR: usize = 32;
    if rows == 0 {
        return;
    }
    // Strips of TC output rows (TC input columns) in parallel; each TR x TC block is read by
    // whole input row segments into a buffer already transposed, then written by whole
    // output row segments.
    dst.par_chunks_mut(TC * rows * N)
        .enumerate()
        .for_each(|(strip, out)| {
            let cb = strip * TC;
            let n = out.len() / (rows * N);
            let mut buf = [[E::default(); TR]; TC];
            for r0 in (0..rows).step_by(TR) {
                let m = TR.min(rows - r0);
                for i in r0 + TR..(r0 + 2 * TR).min(rows) {
                    let s = (i * stride + c0 + cb) * N;
                    longctx_kernels::cpu::prefetch(&src[s..s + n * N]);
                }
                // Whole 32 x 32 tiles of 16-bit elements in registers where the CPU can;
                // the columns from `done` on through the buffer.
                let mut done = 0;
                while N == 2 && m == TR && done + 32 <= n {
                    let s = (r0 * stride + c0 + cb + done) * N;
                    let d = (done * rows + r0) * N;
                    if !longctx_kernels::cpu::transpose32_u16(
                        &src[s..],
                        stride,
                        &mut out[d..],
                        rows,
                    ) {
                        break;
                    }
                    done += 32;
                }
                for i in 0..m {
                    let s = ((r0 + i) * stride + c0 + cb + done) * N;
                    let row = src[s..s + (n - done) * N].chunks_exact(N);
                    for (b, e) in buf[done..n].iter_mut().zip(row) {
                        b[i] = E::read(e);
                    }
                }
                for (c, b) in buf.iter().enumerate().take(n).skip(done) {
                    let o = &mut out[(c * rows + r0) * N..(c * rows + r0 + m) * N];
                    for (e, x) in o.chunks_exact_mut(N).zip(&b[..m]) {
                        x.write(e);
                    }
                }
            }
        });
}

/// Prefixes that wrap a text model's names in multimodal checkpoints.
fn strip_prefix(name: &str) -> &str {
    for p in ["language_model.", "model.language_model."] {
        if let Some(rest) = name.strip_prefix(p) {
            // `language_model.model.layers...` and `language_model.lm_head.weight`.
            return rest;
        }
    }
    name
}

impl Weights {
    /// Tensors already in memory, by Hugging Face name.
    pub fn from_map(map: BTreeMap<String, Tensor>) -> Weights {
        Weights { map }
    }

    pub fn from_gguf(g: &Gguf) -> Result<Weights> {
        let kind = match g.get("general.architecture").and_then(|v| v.as_str()) {
            Some("llama4") => Arch::Llama4,
            _ => Arch::Llama,
        };
        let mut map = BTreeMap::new();
        for (name, info) in &g.tensors {
            let shape: Vec<usize> = info.dims.iter().rev().map(|d| *d as usize).collect();
            if let Some(layer) = name
                .strip_prefix("blk.")
                .and_then(|r| r.strip_suffix(".ffn_gate_exps.weight"))
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|_| kind == Arch::Llama4)
            {
                split_gguf_experts(g, layer, &mut map)?;
                continue;
            }
            // rope_freqs is read by the config; up and down experts with the gate's.
            let Some(hf) = arch::hf_name(kind, name) else {
                continue;
            };
            map.insert(hf, g.tensor(name, shape)?);
        }
        Ok(Weights { map })
    }

    /// A directory with `model.safetensors` or `model.safetensors.index.json` and its shards.
    pub fn from_safetensors_dir(dir: &Path) -> Result<Weights> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<std::path::PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index)
                .map_err(|e| EngineError::io("reading", &index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::BadFile {
                    path: index.clone(),
                    format: "safetensors index",
                    reason: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::BadFile {
                    path: index.clone(),
                    format: "safetensors index",
                    reason: "no weight_map".into(),
                })?;
            let mut files: Vec<std::path::PathBuf> = Vec::new();
            for f in map.values().filter_map(|f| f.as_str()) {
                // Shard names come from the file: keep them inside the directory.
                if f.contains('/') || f.contains("..") {
                    return Err(EngineError::BadFile {
                        path: index.clone(),
                        format: "safetensors index",
                        reason: format!("shard name {f:?} leaves the model directory"),
                    });
                }
                let p = dir.join(f);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut map = BTreeMap::new();
        for f in files {
            load_safetensors(&f, &mut map)?;
        }
        Ok(Weights { map })
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.map.get(name).ok_or_else(|| EngineError::Weight {
            name: name.into(),
            reason: "missing from the checkpoint".into(),
        })
    }

    /// Takes a tensor out, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.map.remove(name).ok_or_else(|| EngineError::Weight {
            name: name.into(),
            reason: "missing from the checkpoint".into(),
        })?;
        if t.shape != shape {
            return Err(EngineError::Weight {
                name: name.into(),
                reason: format!("shape {:?}, the config needs {shape:?}", t.shape),
            });
        }
        Ok(t)
    }

    /// Takes layer `f`'s `e` routed experts out as the file keeps them: a GGUF's (or
    /// per-expert safetensors') `[out, in]` weights, or each expert's slices of transformers'
    /// fused `gate_up_proj [E, h, 2I]` and `down_proj [E, I, h]` (input-major: split into
    /// `[out, in]` copies by [`FusedExpert::split`], when and if the expert is used).
    pub fn take_experts(
        &mut self,
        layer: usize,
        e: usize,
        h: usize,
        inter: usize,
    ) -> Result<Vec<ExpertWeights>> {
        let fused = |role| arch::names(Arch::Llama4, Some(layer), role).0;
        let (gu_name, d_name) = (
            fused(Role::ExpertsGateUp).expect("a Hugging Face name"),
            fused(Role::ExpertsDown).expect("a Hugging Face name"),
        );
        if !self.contains(&gu_name) {
            return (0..e)
                .map(|x| {
                    Ok(ExpertWeights::OutIn([
                        self.take(&expert_name(layer, x, "gate_proj"), &[inter, h])?,
                        self.take(&expert_name(layer, x, "up_proj"), &[inter, h])?,
                        self.take(&expert_name(layer, x, "down_proj"), &[h, inter])?,
                    ]))
                })
                .collect();
        }
        let gu = self.take(&gu_name, &[e, h, 2 * inter])?;
        let dn = self.take(&d_name, &[e, inter, h])?;
        for (name, t) in [(&gu_name, &gu), (&d_name, &dn)] {
            float_size(name, t)?;
        }
        // Each expert's rows are contiguous: a slice of the mapped tensor, nothing copied.
        let slice = |name: &str, t: &Tensor, x: usize, rows: usize, cols: usize| {
            let size = float_size(name, t)?;
            let n = rows * cols * size;
            Tensor::stored(name, vec![rows, cols], t.format, t.data.slice(x * n, n)?)
        };
        (0..e)
            .map(|x| {
                Ok(ExpertWeights::Fused(FusedExpert {
                    gate_up: slice(&gu_name, &gu, x, h, 2 * inter)?,
                    down: slice(&d_name, &dn, x, inter, h)?,
                    h,
                    inter,
                }))
            })
            .collect()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }
}

fn load_safetensors(path: &Path, map: &mut BTreeMap<String, Tensor>) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io("opening", path, e))?;
    // SAFETY: read-only private map; contents are validated by the safetensors parser.
    let mm =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io("mapping", path, e))?;
    let owner = std::sync::Arc::new(mm);
    let bytes: &[u8] = &owner[..];
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| EngineError::BadFile {
        path: path.to_path_buf(),
        format: "safetensors",
        reason: e.to_string(),
    })?;
    let base = bytes.as_ptr() as usize;
    for (name, view) in st.tensors() {
        let format = match view.dtype() {
            safetensors::Dtype::F32 => Format::F32,
            safetensors::Dtype::BF16 => Format::BF16,
            safetensors::Dtype::F16 => Format::F16,
            t => {
                return Err(EngineError::Unsupported(format!(
                    "{}: tensor {name} is {t:?}; this build reads f32, bf16 and f16",
                    path.display()
                )))
            }
        };
        // The view borrows the map: its offset in it locates the tensor's bytes.
        let start = view.data().as_ptr() as usize - base;
        let data = Blob::mapped(owner.clone(), start, view.data().len())?;
        let shape = view.shape().to_vec();
        let t = Tensor::stored(&name, shape, format, data).map_err(|e| EngineError::BadFile {
            path: path.to_path_buf(),
            format: "safetensors",
            reason: e.to_string(),
        })?;
        map.insert(strip_prefix(&name).to_string(), t);
    }
    Ok(())
}

/// Validates a safetensors header held in memory (for fuzzing and tests).
pub fn parse_safetensors_header(buf: &[u8]) -> std::result::Result<usize, String> {
    safetensors::SafeTensors::deserialize(buf)
        .map(|s| s.len())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;
    use rand::{Rng, SeedableRng};

    fn bf16_tensor(shape: Vec<usize>, v: &[f32]) -> Tensor {
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
            .collect();
        Tensor::stored("t", shape, Format::BF16, Blob::from_vec(bytes)).unwrap()
    }

    #[test]
    fn fused_experts_split_into_each_experts_out_in_weights_in_their_own_type() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
        // Awkward sizes: 3 experts, hidden 37, intermediate 150 (whole 32 x 32 tiles of the
        // transpose and a part of one, in two 128-column strips and a short one).
        let (e, h, i) = (3, 37, 150);
        let gu: Vec<f32> = (0..e * h * 2 * i)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let dn: Vec<f32> = (0..e * i * h)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let f = "model.layers.0.feed_forward";
        let mut map = BTreeMap::new();
        map.insert(
            format!("{f}.experts.gate_up_proj"),
            bf16_tensor(vec![e, h, 2 * i], &gu),
        );
        map.insert(
            format!("{f}.experts.down_proj"),
            bf16_tensor(vec![e, i, h], &dn),
        );
        let mut w = Weights::from_map(map);
        let experts = w.take_experts(0, e, h, i).unwrap();
        assert_eq!(experts.len(), e);
        let r = |v: f32| bf16::from_f32(v).to_f32();
        for (x, ex) in experts.iter().enumerate() {
            let ExpertWeights::Fused(fused) = ex else {
                panic!("kept fused until used")
            };
            let [g, u, d] = &fused.split().unwrap();
            for t in [g, u, d] {
                assert_eq!(t.format, Format::BF16, "kept in the stored type");
            }
            assert_eq!(
                (g.shape.as_slice(), d.shape.as_slice()),
                (&[i, h][..], &[h, i][..])
            );
            let (g, u, d) = (
                g.to_f32().unwrap(),
                u.to_f32().unwrap(),
                d.to_f32().unwrap(),
            );
            for o in 0..i {
                for k in 0..h {
                    let at = (x * h + k) * 2 * i;
                    assert_eq!(g[o * h + k], r(gu[at + o]));
                    assert_eq!(u[o * h + k], r(gu[at + i + o]));
                }
            }
            for o in 0..h {
                for k in 0..i {
                    assert_eq!(d[o * i + k], r(dn[(x * i + k) * h + o]));
                }
            }
        }
        assert!(!w.contains(&format!("{f}.experts.gate_up_proj")), "taken");
    }

    #[test]
    fn a_quantised_fused_expert_tensor_is_an_error_not_a_misread() {
        let f = "model.layers.0.feed_forward";
        let mut map = BTreeMap::new();
        let q = Tensor::stored(
            "gu",
            vec![1, 32, 64],
            Format::Q8_0,
            Blob::from_vec(vec![0; 32 * 2 * 34]),
        )
        .unwrap();
        map.insert(format!("{f}.experts.gate_up_proj"), q);
        map.insert(
            format!("{f}.experts.down_proj"),
            Tensor::new(vec![1, 32, 32], vec![0.0; 1024]),
        );
        let err = Weights::from_map(map)
            .take_experts(0, 1, 32, 32)
            .map(|_| ())
            .unwrap_err();
        assert!(err.to_string().contains("fused experts stored as"), "{err}");
    }
}
