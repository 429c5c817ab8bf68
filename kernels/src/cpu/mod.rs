//! The CPU backend's vector code: instruction-set detection and the few inner loops the
//! kernels spend their time in, each in a portable, an AVX2 and an AVX-512 version.

#[cfg(target_arch = "x86_64")]
mod avx512;
mod isa;
mod portable;

pub use isa::Isa;

/// The inner loops for one instruction set, chosen once per kernel call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ops {
    isa: Isa,
}

impl Ops {
    /// `isa` must be available on this CPU (see [`Isa::available`]); otherwise the portable
    /// loops are used.
    pub fn new(isa: Isa) -> Ops {
        let isa = if isa.available() { isa } else { Isa::Portable };
        Ops { isa }
    }

    /// `c[m, n] (+)= sum_k a[i*ars + k*aks] * b[k*ldb + j]`; columns of `c` from `n` up to
    /// the next multiple of 16 are written too (as zeros when not accumulating).
    ///
    /// # Safety
    /// `a`, `b` and `c` must be valid for the sizes and strides given, `c` for
    /// `(m - 1) * ldc + n.next_multiple_of(16)` elements.
    #[inline]
    pub unsafe fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        ars: usize,
        aks: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::gemm(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => gemm_avx2(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate),
            _ => portable::gemm(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate),
        }
    }

    /// One online-softmax step over a key-major score tile (log2 units); see
    /// `portable::softmax_tile`. `ncols` is a multiple of 16.
    #[inline]
    pub fn softmax_tile(
        &self,
        st: &mut [f32],
        kt: usize,
        ncols: usize,
        ld: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
    ) {
        match self.isa {
            // SAFETY: `Ops::new` only keeps an instruction set the CPU has.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { avx512::softmax_tile(st, kt, ncols, ld, m, l, alpha) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { softmax_tile_avx2(st, kt, ncols, ld, m, l, alpha) },
            _ => portable::softmax_tile(st, kt, ncols, ld, m, l, alpha),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    ars: usize,
    aks: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    portable::gemm(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_tile_avx2(
    st: &mut [f32],
    kt: usize,
    ncols: usize,
    ld: usize,
    m: &mut [f32],
    l: &mut [f32],
    alpha: &mut [f32],
) {
    portable::softmax_tile(st, kt, ncols, ld, m, l, alpha)
}
