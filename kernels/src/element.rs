//! Storage element types of the kernels: f32, bf16 and f16; all arithmetic is done in f32.

use half::{bf16, f16};

/// The storage types a kernel reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
    /// llama.cpp's q8_0 (see [`crate::kvq8`]): a KV cache type, not an [`Element`].
    Q8_0,
    /// FP8 E4M3 in blocks of 32 with a power-of-two scale (see [`crate::kvf8`]): a KV cache
    /// type, not an [`Element`].
    F8E4M3,
}

impl DType {
    /// Bytes of one value; for [`DType::Q8_0`] its byte without the block's scale (sizes of
    /// buffers are [`DType::row_bytes`]).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::Q8_0 | DType::F8E4M3 => 1,
        }
    }

    /// Bytes of `n` values stored contiguously (for the block types, `n` a multiple of 32:
    /// 36 bytes a block of q8_0, 33 of FP8).
    pub fn row_bytes(self, n: usize) -> usize {
        match self {
            DType::Q8_0 => n / crate::Q8_BLOCK * std::mem::size_of::<crate::BlockQ8>(),
            DType::F8E4M3 => n / crate::F8_BLOCK * std::mem::size_of::<crate::BlockF8>(),
            t => n * t.size_bytes(),
        }
    }

    /// Values per block of a block type (q8_0, FP8), `None` for the element types.
    pub fn block_values(self) -> Option<usize> {
        match self {
            DType::Q8_0 => Some(crate::Q8_BLOCK),
            DType::F8E4M3 => Some(crate::F8_BLOCK),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::Q8_0 => "q8_0",
            DType::F8E4M3 => "fp8_e4m3",
        }
    }
}

/// What a KV cache holds its values as: an [`Element`] (one value a unit), or a block of 32
/// values ([`KvBlock`]: q8_0 or FP8). Byte-copyable, so a store can keep, spill and snapshot
/// any of them as bytes.
pub trait KvUnit: bytemuck::Pod + Send + Sync + 'static {
    const KV_DTYPE: DType;
}

impl<T: Element + bytemuck::Pod> KvUnit for T {
    const KV_DTYPE: DType = <T as Element>::DTYPE;
}

impl KvUnit for crate::BlockQ8 {
    const KV_DTYPE: DType = DType::Q8_0;
}

impl KvUnit for crate::BlockF8 {
    const KV_DTYPE: DType = DType::F8E4M3;
}

/// A KV block type: 32 values quantised on append and read in place by attention, widened
/// a tile (or, in the fused decode step, a register) at a time.
pub trait KvBlock: KvUnit + Copy {
    /// Quantises `src` (32 values a block) into `dst`.
    fn quantize(src: &[f32], dst: &mut [Self]) -> Result<(), crate::KernelError>;
    /// Widens `src` into `dst` with `isa` (the portable loop where it is missing).
    fn widen(isa: crate::Isa, src: &[Self], dst: &mut [f32]);
    /// The K and V of a stretch of keys as the attention engine's tagged pair.
    fn pair<'a>(k: &'a [Self], v: &'a [Self]) -> crate::attention::BlockPair<'a>;
}

/// `x` quantised to a fresh buffer of blocks (`op` names the caller in the error): `x.len()`
/// must be a multiple of 32.
pub fn quantize_blocks_vec<B: KvBlock + Default>(
    op: &'static str,
    x: &[f32],
) -> Result<Vec<B>, crate::KernelError> {
    if !x.len().is_multiple_of(32) {
        return Err(crate::KernelError::ShapeMismatch {
            op,
            buffer: "src",
            expected: x.len().next_multiple_of(32),
            got: x.len(),
        });
    }
    let mut out = vec![B::default(); x.len() / 32];
    B::quantize(x, &mut out)?;
    Ok(out)
}

impl KvBlock for crate::BlockQ8 {
    fn quantize(src: &[f32], dst: &mut [Self]) -> Result<(), crate::KernelError> {
        crate::quantize_q8(src, dst)
    }
    fn widen(isa: crate::Isa, src: &[Self], dst: &mut [f32]) {
        crate::cpu::dequant_q8(isa, src, dst)
    }
    fn pair<'a>(k: &'a [Self], v: &'a [Self]) -> crate::attention::BlockPair<'a> {
        crate::attention::BlockPair::Q8(k, v)
    }
}

impl KvBlock for crate::BlockF8 {
    fn quantize(src: &[f32], dst: &mut [Self]) -> Result<(), crate::KernelError> {
        crate::quantize_f8(src, dst)
    }
    fn widen(isa: crate::Isa, src: &[Self], dst: &mut [f32]) {
        crate::cpu::dequant_f8(isa, src, dst)
    }
    fn pair<'a>(k: &'a [Self], v: &'a [Self]) -> crate::attention::BlockPair<'a> {
        crate::attention::BlockPair::F8(k, v)
    }
}

/// A storage element: converted to f32 on load, rounded from f32 on store.
pub trait Element: Copy + Send + Sync + Default + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// The slice itself when the storage is already f32 (the zero-copy path of the kernels).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The bit patterns when the storage is bf16 (read in place by the decode path).
    fn as_bf16_bits(_: &[Self]) -> Option<&[u16]> {
        None
    }
    /// Rounds `src` into `dst` (same length).
    fn narrow(src: &[f32], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(*s);
        }
    }
    /// Widens `src` into `dst` (same length).
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which the compiler vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn as_bf16_bits(s: &[Self]) -> Option<&[u16]> {
        // SAFETY: bf16 is a transparent u16.
        Some(unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u16, s.len()) })
    }
    #[inline]
    fn narrow(src: &[f32], dst: &mut [Self]) {
        // Round to nearest even, NaN kept quiet; branch-free so that it vectorises.
        for (d, s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
            let nan = ((b >> 16) as u16) | 0x40;
            *d = bf16::from_bits(if s.is_nan() { nan } else { rounded });
        }
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        // SAFETY: bf16 is a transparent u16.
        let bits = unsafe { std::slice::from_raw_parts(src.as_ptr() as *const u16, src.len()) };
        crate::cpu::widen_bf16(bits, dst);
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn as_f32(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(dst);
    }
}
