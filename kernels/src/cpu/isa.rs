//! Instruction-set detection, once per process, with an override for testing the fallbacks.

use std::sync::OnceLock;

/// The vector instruction sets the CPU kernels are written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust loops; what any CPU runs.
    Portable,
    /// AVX2 + FMA (the same portable code compiled for 256-bit vectors).
    Avx2,
    /// AVX-512F hand-written kernels (512-bit vectors, masked tails, `vscalefps`).
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every instruction set this CPU runs, from the slowest; tests cover each of them.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.available())
            .collect()
    }

    /// The best instruction set of this CPU. `LONGCTX_ISA=portable|avx2|avx512` lowers it
    /// (never raises it past what the CPU has), to measure or debug the fallbacks.
    pub fn detect() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let best = Isa::all_available()
                .into_iter()
                .max()
                .unwrap_or(Isa::Portable);
            let wanted = match std::env::var("LONGCTX_ISA").as_deref() {
                Ok("portable") => Isa::Portable,
                Ok("avx2") => Isa::Avx2,
                _ => best,
            };
            wanted.min(best)
        })
    }
}
