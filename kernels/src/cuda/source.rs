//! The kernel variants and their sources: each `.cu` file is specialised by `#define`s for
//! element type, head dim and KV layout, so the compiler sees constant trip counts and keeps
//! the fragments in registers.

const PRELUDE: &str = include_str!("kernels/prelude.cuh");
const FLASH_FWD: &str = include_str!("kernels/flash_fwd.cu");
const DECODE: &str = include_str!("kernels/decode.cu");
const OPS: &str = include_str!("kernels/ops.cu");

/// The 16-bit element types the GPU kernels take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuDType {
    Bf16,
    F16,
}

impl GpuDType {
    pub fn name(self) -> &'static str {
        match self {
            GpuDType::Bf16 => "bf16",
            GpuDType::F16 => "f16",
        }
    }
}

/// Head dims the attention kernels are built for.
pub const HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];

/// Which source a module is built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// `flash_fwd`: prefill / chunked prefill / ring steps.
    FlashFwd,
    /// `flash_decode` and `flash_decode_combine`.
    Decode,
    /// `rms_norm`, `rope_apply`, `silu_mul`, `add_inplace`, `moe_gather`, `moe_combine`.
    Ops,
}

/// One compiled module: a family specialised for a dtype, a head dim and a KV layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub family: Family,
    pub dtype: GpuDType,
    /// 0 for [`Family::Ops`].
    pub head_dim: usize,
    /// K/V read through a block table in the KV store's block layout.
    pub paged: bool,
}

impl Variant {
    pub fn attention(family: Family, dtype: GpuDType, head_dim: usize, paged: bool) -> Variant {
        Variant {
            family,
            dtype,
            head_dim,
            paged,
        }
    }

    pub fn ops(dtype: GpuDType) -> Variant {
        Variant {
            family: Family::Ops,
            dtype,
            head_dim: 0,
            paged: false,
        }
    }

    /// A file-name-safe name, e.g. `flash_fwd_bf16_d128_paged`.
    pub fn name(&self) -> String {
        let base = match self.family {
            Family::FlashFwd => "flash_fwd",
            Family::Decode => "flash_decode",
            Family::Ops => "ops",
        };
        let mut name = format!("{base}_{}", self.dtype.name());
        if self.family != Family::Ops {
            name += &format!("_d{}", self.head_dim);
            if self.paged {
                name += "_paged";
            }
        }
        name
    }

    /// The kernels (entry points) the module holds.
    pub fn entries(&self) -> &'static [&'static str] {
        match self.family {
            Family::FlashFwd => &["flash_fwd"],
            Family::Decode => &["flash_decode", "flash_decode_combine"],
            Family::Ops => &[
                "rms_norm",
                "rope_apply",
                "silu_mul",
                "add_inplace",
                "moe_gather",
                "moe_combine",
            ],
        }
    }

    /// The full source NVRTC compiles.
    pub fn source(&self) -> String {
        let mut src = String::new();
        src += &format!(
            "#define DTYPE_BF16 {}\n",
            (self.dtype == GpuDType::Bf16) as u8
        );
        if self.family != Family::Ops {
            src += &format!("#define HEAD_DIM {}\n", self.head_dim);
            src += &format!("#define PAGED {}\n", self.paged as u8);
        }
        src += PRELUDE;
        src += "\n";
        src += match self.family {
            Family::FlashFwd => FLASH_FWD,
            Family::Decode => DECODE,
            Family::Ops => OPS,
        };
        src
    }

    /// Every variant the runtime can ask for: what the compile check builds.
    pub fn all() -> Vec<Variant> {
        let mut v = Vec::new();
        for dtype in [GpuDType::Bf16, GpuDType::F16] {
            for family in [Family::FlashFwd, Family::Decode] {
                for d in HEAD_DIMS {
                    for paged in [false, true] {
                        v.push(Variant::attention(family, dtype, d, paged));
                    }
                }
            }
            v.push(Variant::ops(dtype));
        }
        v
    }
}

/// FNV-1a, 64-bit: a hash that stays the same across builds and toolchains, for the names of
/// cached PTX files.
pub(crate) fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
