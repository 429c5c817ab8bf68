//! The CPU backend's vector code: instruction-set detection and the few inner loops the
//! kernels spend their time in, each in a portable, an AVX2 and an AVX-512 version.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod isa;
mod peak;
mod portable;

pub use isa::Isa;
pub use peak::{peak_gflops, Peak};

/// An element of a weight the decode GEMV streams: f32, or bf16 held as its bit pattern
/// (`u16`), widened exactly to f32 on load.
pub(crate) trait RowElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    /// Sixteen consecutive elements as f32 lanes.
    ///
    /// # Safety
    /// `p` must be valid for 16 elements; only called from AVX-512F code.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// The first `n < 16` elements at `p` as f32 lanes, the other lanes zero.
    ///
    /// # Safety
    /// `p` must be valid for `n` elements; only called from AVX-512F code.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load_tail(p: *const Self, n: usize) -> std::arch::x86_64::__m512;
    /// `Some(p)` when the elements are f32 (the AVX2 paths take only those).
    fn f32_ptr(p: *const Self) -> Option<*const f32>;
}

impl RowElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_tail(p: *const f32, n: usize) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)
    }
    fn f32_ptr(p: *const f32) -> Option<*const f32> {
        Some(p)
    }
}

impl RowElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const u16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load_tail(p: *const u16, n: usize) -> std::arch::x86_64::__m512 {
        let mut buf = [0u16; 16];
        std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
        Self::load16(buf.as_ptr())
    }
    fn f32_ptr(_: *const u16) -> Option<*const f32> {
        None
    }
}

/// The Taylor series of `2^f = e^(f ln 2)` to degree 7, the vector exp2's polynomial on
/// `[-0.5, 0.5]` (error below 1e-8), lowest degree first.
#[cfg(target_arch = "x86_64")]
const EXP2_TAYLOR: [f32; 8] = [
    1.0,
    std::f32::consts::LN_2,
    0.240_226_5,
    0.055_504_11,
    0.009_618_129,
    0.001_333_355_8,
    0.000_154_035_3,
    0.000_015_252_734,
];

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

    /// The instruction set these loops run on.
    pub fn isa(&self) -> Isa {
        self.isa
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
            Isa::Avx2 => avx2::gemm(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate),
            _ => portable::gemm(m, n, k, a, ars, aks, b, ldb, c, ldc, accumulate),
        }
    }

    /// `y[0..n] += sum_r x[r] * B[r, 0..n]`, `B` with row stride `ld` (the decode GEMV).
    ///
    /// # Safety
    /// `b` must be valid for `(x.len() - 1) * ld + n` elements; `y.len() >= n`.
    #[inline]
    pub unsafe fn axpy_rows<T: RowElem>(
        &self,
        y: &mut [f32],
        x: &[f32],
        b: *const T,
        ld: usize,
        n: usize,
    ) {
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512::axpy_rows(y, x, b, ld, n),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => avx2::axpy_rows(y, x, b, ld, n),
            _ => portable::axpy_rows(y, x, b, ld, n),
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
            Isa::Avx2 if ncols.is_multiple_of(8) => unsafe {
                avx2::softmax_tile(st, kt, ncols, ld, m, l, alpha)
            },
            _ => portable::softmax_tile(st, kt, ncols, ld, m, l, alpha),
        }
    }
}

impl Ops {
    /// `st[j * ldst + r] = q[r, :] . k[j, :]` for `r < rows <= 16`, `j < kt`; columns
    /// `rows..16` are zeroed. The score path for few rows (decode), where a GEMM would waste
    /// most of its vector lanes.
    ///
    /// # Safety
    /// `q` is `[rows, d]`; `k` has `kt` rows of `d` values at stride `ldk`; `st` is valid for
    /// `(kt - 1) * ldst + 16` elements and `ldst >= 16`.
    #[inline]
    pub unsafe fn scores_dot<T: RowElem>(
        &self,
        rows: usize,
        kt: usize,
        d: usize,
        q: *const f32,
        k: *const T,
        ldk: usize,
        st: *mut f32,
        ldst: usize,
    ) {
        debug_assert!(rows <= 16 && ldst >= 16);
        match (self.isa, T::f32_ptr(k)) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, _) => avx512::scores_dot(rows, kt, d, q, k, ldk, st, ldst),
            #[cfg(target_arch = "x86_64")]
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, _) if d.is_multiple_of(8) => {
                avx2::scores_dot(rows, kt, d, q, k, ldk, st, ldst)
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Some(k)) => scores_dot_avx2(rows, kt, d, q, k, ldk, st, ldst),
            _ => portable::scores_dot(rows, kt, d, q, k, ldk, st, ldst),
        }
    }
}

impl Ops {
    /// `o[r, 0..d] += sum_j p[j * ldp + r] * v[j, 0..d]` for `r < rows`: the decode path's
    /// `O += P V` with P read key-major from the score tile. True when done; false when this
    /// instruction set or shape has no fused loop (the caller goes row by row).
    ///
    /// # Safety
    /// `p` holds `kt` rows at stride `ldp`; `v` `kt` rows of `d` at stride `ldv`; `o` `rows`
    /// rows of `d` at stride `ldo`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pv_rows<T: RowElem>(
        &self,
        rows: usize,
        kt: usize,
        d: usize,
        p: *const f32,
        ldp: usize,
        v: *const T,
        ldv: usize,
        o: *mut f32,
        ldo: usize,
    ) -> bool {
        if !d.is_multiple_of(16) {
            return false;
        }
        match self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                match rows {
                    1 => avx512::pv_rows::<1, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    2 => avx512::pv_rows::<2, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    3 => avx512::pv_rows::<3, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    4 => avx512::pv_rows::<4, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    5 => avx512::pv_rows::<5, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    _ => return false,
                }
                true
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                match rows {
                    1 => avx2::pv_rows::<1, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    2 => avx2::pv_rows::<2, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    3 => avx2::pv_rows::<3, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    4 => avx2::pv_rows::<4, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    5 => avx2::pv_rows::<5, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    6 => avx2::pv_rows::<6, T>(kt, d, p, ldp, v, ldv, o, ldo),
                    _ => return false,
                }
                true
            }
            _ => false,
        }
    }
}

/// Whether this CPU has the bf16 dot product (`vdpbf16ps`, AVX512_BF16) beside AVX-512F/BW.
/// `LONGCTX_NO_BF16_DOT` turns it off, to test and measure the path without it.
pub(crate) fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static B: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *B.get_or_init(|| {
            std::env::var_os("LONGCTX_NO_BF16_DOT").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bf16")
                // The bf16 tiles' exp2 takes its fraction by `vreduceps` (every CPU with
                // AVX512_BF16 has DQ; checked all the same).
                && is_x86_feature_detected!("avx512dq")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `out = SiLU(gate) * up` elementwise (`g / (1 + e^-g) * u`), over the shortest of the
/// three. With AVX-512, `e^-g` 16 lanes at a time, within an ulp or two of libm's `expf` (the
/// scalar `expf` took ~8% of a SmolLM2 prefill); elsewhere libm's `expf`.
pub fn silu_mul_into(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let n = out.len().min(gate.len()).min(up.len());
    let (out, gate, up) = (&mut out[..n], &gate[..n], &up[..n]);
    match Isa::detect() {
        // SAFETY: `Isa::detect` only returns an instruction set the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::silu_mul_into(out, gate, up) },
        _ => portable::silu_mul_into(out, gate, up),
    }
}

/// `out = e^((x - shift) / div)` elementwise (a sampler's softmax weights at a temperature),
/// over the shorter of the two; with AVX-512 16 lanes at a time, within an ulp or two of
/// libm's `expf` (as [`silu_mul_into`]), `e^0` exactly 1; elsewhere libm's `expf`.
pub fn exp_scaled_into(out: &mut [f32], x: &[f32], shift: f32, div: f32) {
    let n = out.len().min(x.len());
    let (out, x) = (&mut out[..n], &x[..n]);
    match Isa::detect() {
        // SAFETY: `Isa::detect` only returns an instruction set the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::exp_scaled_into(out, x, shift, div) },
        _ => portable::exp_scaled_into(out, x, shift, div),
    }
}

impl Ops {
    /// Keys per [`Ops::decode_tile_bf16`] step.
    pub const DECODE_TILE: usize = 16;

    /// Whether [`Ops::decode_tile_bf16`] takes `rows` rows of `d` dims here.
    pub fn has_decode_tile_bf16(&self, rows: usize, d: usize) -> bool {
        self.isa == Isa::Avx512
            && (1..=6).contains(&rows)
            && d.is_multiple_of(32)
            && bf16_dot_available()
    }

    /// One fused decode step over [`Ops::DECODE_TILE`] keys of a bf16 KV (scores, online
    /// softmax, `O = alpha O + P V`); see `avx512::decode_tile_bf16`. The caller checks
    /// [`Ops::has_decode_tile_bf16`] first.
    ///
    /// `ahead`: prefetch this head's rows that many keys on, those below `ahead.1` (0: none).
    ///
    /// # Safety
    /// `q` holds `rows` rows of `d` bf16 bits; `k` and `v` 16 rows of `d` at stride `ld`;
    /// `m` and `l` `rows` values; `o` `rows` rows of `d` at stride `ldo`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_tile_bf16(
        &self,
        rows: usize,
        d: usize,
        q: *const u16,
        scale2: f32,
        k: *const u16,
        v: *const u16,
        ld: usize,
        ahead: (usize, usize),
        m: *mut f32,
        l: *mut f32,
        o: *mut f32,
        ldo: usize,
    ) {
        debug_assert!(self.has_decode_tile_bf16(rows, d));
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::decode_tile_bf16 as f;
            match rows {
                1 => f::<1, 8>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                2 => f::<2, 8>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                3 => f::<3, 8>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                4 => f::<4, 4>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                5 => f::<5, 4>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                6 => f::<6, 4>(d, q, scale2, k, v, ld, ahead, m, l, o, ldo),
                _ => unreachable!("checked by has_decode_tile_bf16"),
            }
        }
    }
}

impl Ops {
    /// Whether [`Ops::decode_tile_blocks`] takes `rows` rows of `d` dims here.
    pub fn has_decode_tile_blocks(&self, rows: usize, d: usize) -> bool {
        self.isa == Isa::Avx512 && (1..=6).contains(&rows) && d.is_multiple_of(32)
    }

    /// One fused decode step over [`Ops::DECODE_TILE`] keys of a block KV (q8_0 or FP8), f32
    /// queries (already scaled); see `avx512::decode_tile_blocks`. The caller checks
    /// [`Ops::has_decode_tile_blocks`] first.
    ///
    /// # Safety
    /// `q` holds `rows` rows of `d` f32; `k` and `v` 16 rows of `d / 32` blocks at stride
    /// `ld` blocks; `m` and `l` `rows` values; `o` `rows` rows of `d` at stride `ldo`.
    #[inline]
    pub unsafe fn decode_tile_blocks<B: crate::KvBlock>(
        &self,
        rows: usize,
        d: usize,
        q: *const f32,
        (k, v, ld): (*const B, *const B, usize),
        ahead: (usize, usize),
        (m, l, o, ldo): (*mut f32, *mut f32, *mut f32, usize),
    ) {
        debug_assert!(self.has_decode_tile_blocks(rows, d));
        #[cfg(target_arch = "x86_64")]
        {
            use avx512::decode_tile_blocks as f;
            match rows {
                1 => f::<B, 1, 8>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                2 => f::<B, 2, 8>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                3 => f::<B, 3, 8>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                4 => f::<B, 4, 4>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                5 => f::<B, 5, 4>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                6 => f::<B, 6, 4>(d, q, 1.0, k, v, ld, ahead, m, l, o, ldo),
                _ => unreachable!("checked by has_decode_tile_blocks"),
            }
        }
    }
}

impl Ops {
    /// Whether the prefill tiles over a bf16 KV run on the bf16 dot product here
    /// ([`Ops::scores_bf16`], [`Ops::pv_bf16`]); otherwise they are widened to f32.
    pub fn has_bf16_tiles(&self) -> bool {
        self.isa == Isa::Avx512 && bf16_dot_available()
    }

    /// `st[j * rp + r] = scale * q[r] . k[j]` for `j < kt`, `r < rp` (a multiple of 16 up to
    /// 64), from `qw`, the queries packed `[d / 2, rp]` as bf16 pairs. The caller checks
    /// [`Ops::has_bf16_tiles`] first.
    ///
    /// # Safety
    /// `qw` holds `d / 2 * rp` pairs, `k` `kt` rows of `d` bf16 at stride `ldk`, `st` `kt * rp`
    /// values.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn scores_bf16(
        &self,
        rp: usize,
        kt: usize,
        d: usize,
        qw: *const u32,
        k: *const u16,
        ldk: usize,
        scale: f32,
        st: *mut f32,
    ) {
        debug_assert!(self.has_bf16_tiles() && rp.is_multiple_of(16) && rp <= 64);
        #[cfg(target_arch = "x86_64")]
        {
            use avx512_bf16::scores as f;
            match rp / 16 {
                1 => f::<1>(kt, d, qw, k, ldk, scale, st),
                2 => f::<2>(kt, d, qw, k, ldk, scale, st),
                3 => f::<3>(kt, d, qw, k, ldk, scale, st),
                _ => f::<4>(kt, d, qw, k, ldk, scale, st),
            }
        }
    }

    /// The online-softmax step of a score tile for [`Ops::pv_bf16`]: masks already applied
    /// (-inf), `st` `[kt, ld]` key-major, columns `0..ncols` (a multiple of 16, at most `ld`);
    /// updates `m`, `l`, `alpha` as [`Ops::softmax_tile`] does and writes the probabilities,
    /// rounded to bf16, as pairs of consecutive keys to `pw` (`[kt.div_ceil(2), ld]`, resized
    /// as needed), not back to `st`. The caller checks [`Ops::has_bf16_tiles`] first.
    #[allow(clippy::too_many_arguments)]
    pub fn softmax_pairs(
        &self,
        st: &[f32],
        kt: usize,
        ncols: usize,
        ld: usize,
        m: &mut [f32],
        l: &mut [f32],
        alpha: &mut [f32],
        pw: &mut Vec<u32>,
    ) {
        assert!(self.has_bf16_tiles() && ncols.is_multiple_of(16) && ncols <= ld);
        assert!(m.len() >= ncols && l.len() >= ncols && alpha.len() >= ncols);
        assert!(kt == 0 || st.len() >= (kt - 1) * ld + ncols);
        let np = kt.div_ceil(2);
        if pw.len() < np * ld {
            pw.resize(np * ld, 0);
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has the instructions (`has_bf16_tiles`); every buffer's size was
        // checked above.
        unsafe {
            avx512_bf16::softmax_pairs(
                st.as_ptr(),
                kt,
                ncols,
                ld,
                m.as_mut_ptr(),
                l.as_mut_ptr(),
                alpha.as_mut_ptr(),
                pw.as_mut_ptr(),
            )
        };
    }

    /// Packs V's tile (`kt` rows of `d` bf16 at stride `ldv`) into `vw` for
    /// [`Ops::pv_bf16`]: pairs of consecutive keys, `[kt.div_ceil(2), d.next_multiple_of(16)]`
    /// (`vw` grown as needed). One packing serves every row block over the tile. The caller
    /// checks [`Ops::has_bf16_tiles`] first.
    ///
    /// # Safety
    /// `v` holds `kt` rows of `d` at stride `ldv`.
    #[inline]
    pub unsafe fn pack_v_bf16(
        &self,
        kt: usize,
        d: usize,
        v: *const u16,
        ldv: usize,
        vw: &mut Vec<u32>,
    ) {
        debug_assert!(self.has_bf16_tiles());
        #[cfg(target_arch = "x86_64")]
        avx512_bf16::pack_v(kt, d, v, ldv, vw);
    }

    /// `o[r, 0..d] = alpha[r] * o[r, 0..d] + sum_j p_j[r] * v[j, 0..d]` for `r < rows`, P as
    /// [`Ops::softmax_pairs`] wrote it (`pw`: `kt.div_ceil(2)` rows of `ldp >= rows` bf16
    /// pairs) and `alpha` its rescale factors, V as [`Ops::pack_v_bf16`] packed it into
    /// `vw`; `o` has rows of `d` rounded up to 16 at stride `ldo`. The caller checks
    /// [`Ops::has_bf16_tiles`] first.
    ///
    /// # Safety
    /// `pw` holds `kt.div_ceil(2) * ldp` pairs, `alpha` `rows` values, `o` `rows` rows.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pv_bf16(
        &self,
        rows: usize,
        kt: usize,
        d: usize,
        pw: *const u32,
        ldp: usize,
        vw: &[u32],
        alpha: *const f32,
        o: *mut f32,
        ldo: usize,
    ) {
        debug_assert!(self.has_bf16_tiles() && ldp >= rows);
        assert!(vw.len() >= kt.div_ceil(2) * d.next_multiple_of(16));
        #[cfg(target_arch = "x86_64")]
        avx512_bf16::pv(rows, kt, d, pw, ldp, vw.as_ptr(), alpha, o, ldo);
    }
}

/// Asks the cache hierarchy (L2) for `rows` rows of `len` elements of `data`, the first at
/// `start`, one every `stride`; rows past the end of `data` are skipped. One bounds check,
/// not one a row: the prefill tiles ask for 128 rows a tile.
#[inline]
pub fn prefetch_rows<T>(data: &[T], start: usize, rows: usize, stride: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let fit = match data.len().checked_sub(start + len) {
            Some(room) if stride > 0 => rows.min(room / stride + 1),
            Some(_) => rows.min(1),
            None => 0,
        };
        let bytes = len * std::mem::size_of::<T>();
        let p = data.as_ptr() as *const i8;
        let row_bytes = stride * std::mem::size_of::<T>();
        let first = start * std::mem::size_of::<T>();
        for r in 0..fit {
            for off in (0..bytes).step_by(64) {
                // SAFETY: row r < fit ends at start + r * stride + len <= data.len().
                unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(first + r * row_bytes + off)) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, start, rows, stride, len);
}

/// Asks the cache hierarchy (L2) for `data`, one request per 64-byte line; a hint only.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let bytes = std::mem::size_of_val(data);
        let p = data.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: `off < bytes`, inside `data`; prefetches never fault anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(p.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// `dst[c * lds + i] = src[i * lss + c]` for `i, c < 32`: a 32 x 32 tile of 16-bit elements
/// (little-endian bytes; strides in elements) transposed in registers. `false`, and nothing
/// written, without AVX-512 BW or where the slices are too short for the tile: the caller
/// then moves the elements itself.
pub fn transpose32_u16(src: &[u8], lss: usize, dst: &mut [u8], lds: usize) -> bool {
    let need = |ld: usize| (31 * ld + 32) * 2;
    if lss < 32 || lds < 32 || src.len() < need(lss) || dst.len() < need(lds) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx512 && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU has AVX-512F/BW, and both slices hold the whole tile (checked).
        unsafe { avx512::transpose32_u16(src.as_ptr().cast(), lss, dst.as_mut_ptr().cast(), lds) };
        return true;
    }
    false
}

/// Widens bf16 bit patterns to f32 with the best instruction set of this CPU.
pub(crate) fn widen_bf16(src: &[u16], dst: &mut [f32]) {
    match Isa::detect() {
        // SAFETY: `detect` only returns instruction sets the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512::widen_bf16(src, dst) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::widen_bf16(src, dst) },
        _ => portable::widen_bf16(src, dst),
    }
}

/// Widens FP8 blocks to f32 with `isa` (the portable loop where it is missing).
pub(crate) fn dequant_f8(isa: Isa, src: &[crate::kvf8::BlockF8], dst: &mut [f32]) {
    match isa {
        // SAFETY: the CPU has AVX-512F when `available` says so.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { avx512::dequant_f8(src, dst) },
        _ => portable::dequant_f8(src, dst),
    }
}

/// Widens q8 blocks to f32 (`scale * q`) with `isa` (the portable loop where it is missing).
pub(crate) fn dequant_q8(isa: Isa, src: &[crate::kvq8::BlockQ8], dst: &mut [f32]) {
    match isa {
        // SAFETY: the CPU has AVX-512F when `available` says so.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { avx512::dequant_q8(src, dst) },
        _ => portable::dequant_q8(src, dst),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn scores_dot_avx2(
    rows: usize,
    kt: usize,
    d: usize,
    q: *const f32,
    k: *const f32,
    ldk: usize,
    st: *mut f32,
    ldst: usize,
) {
    portable::scores_dot(rows, kt, d, q, k, ldk, st, ldst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The register transpose moves every element of a tile to its mirror place and writes
    /// nothing outside the tile (odd strides; a short slice is refused untouched).
    #[test]
    fn a_tile_of_16_bit_elements_is_transposed() {
        let mut rng = rand::rng();
        let (lss, lds) = (45, 37);
        let src: Vec<u8> = (0..(31 * lss + 32) * 2).map(|_| rng.random()).collect();
        let mut dst = vec![0xAAu8; (31 * lds + 32) * 2 + 6];
        if !transpose32_u16(&src, lss, &mut dst, lds) {
            eprintln!("skipped: no AVX-512 BW here");
            return;
        }
        for (at, pair) in dst.chunks_exact(2).enumerate() {
            let (c, i) = (at / lds, at % lds);
            if c < 32 && i < 32 {
                let s = 2 * (i * lss + c);
                assert_eq!(pair, &src[s..s + 2], "row {c}, column {i}");
            } else {
                assert_eq!(pair, [0xAA, 0xAA], "element {at} outside the tile written");
            }
        }
        let mut short = vec![0u8; (31 * lds + 31) * 2];
        assert!(!transpose32_u16(&src, lss, &mut short, lds));
        assert!(short.iter().all(|&b| b == 0));
    }

    /// The bf16 tiles' softmax step (probabilities straight to bf16 pairs) against f64: the
    /// running max, the rescale and the sum within 1e-5, each probability within a bf16
    /// rounding, pairs of consecutive keys with a zero for an odd tile's missing key; a
    /// column masked throughout (no visible key yet) stays empty, a masked key gives 0.
    #[test]
    fn softmax_pairs_match_f64() {
        let ops = Ops::new(Isa::detect());
        if !ops.has_bf16_tiles() {
            eprintln!("skipped: no AVX-512 BF16 here");
            return;
        }
        let mut rng = rand::rng();
        for (kt, ncols, ld) in [(64, 64, 64), (37, 32, 48), (1, 16, 16), (2, 48, 64)] {
            let st: Vec<f32> = (0..kt * ld)
                .map(|i| match (i % ld, rng.random_range(0..8)) {
                    (3, _) => f32::NEG_INFINITY,
                    (_, 0) => f32::NEG_INFINITY,
                    _ => rng.random_range(-40.0..40.0),
                })
                .collect();
            let m0: Vec<f32> = (0..ncols)
                .map(|c| match c % 3 {
                    0 => f32::NEG_INFINITY,
                    _ => rng.random_range(-30.0..30.0),
                })
                .collect();
            let l0: Vec<f32> = m0
                .iter()
                .map(|m| {
                    if m.is_finite() {
                        rng.random_range(0.5..9.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            let (mut m, mut l, mut alpha) = (m0.clone(), l0.clone(), vec![f32::NAN; ncols]);
            let mut pw = Vec::new();
            ops.softmax_pairs(&st, kt, ncols, ld, &mut m, &mut l, &mut alpha, &mut pw);
            assert!(pw.len() >= kt.div_ceil(2) * ld);
            let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1e-30);
            for c in 0..ncols {
                let mx = (0..kt)
                    .map(|j| st[j * ld + c] as f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                let m_new = mx.max(m0[c] as f64);
                assert_eq!(m[c] as f64, m_new, "column {c}: max");
                let mref = if m_new == f64::NEG_INFINITY {
                    0.0
                } else {
                    m_new
                };
                let a = (m0[c] as f64 - mref).exp2();
                assert!(
                    close(alpha[c] as f64, a, 1e-5),
                    "column {c}: alpha {} vs {a}",
                    alpha[c]
                );
                let mut sum = 0.0;
                for j in 0..kt.next_multiple_of(2) {
                    let p = if j < kt {
                        (st[j * ld + c] as f64 - mref).exp2()
                    } else {
                        0.0
                    };
                    sum += p;
                    let word = pw[j / 2 * ld + c] >> (16 * (j % 2));
                    let got = f32::from_bits((word & 0xFFFF) << 16) as f64;
                    assert!(
                        close(got, p, 2f64.powi(-8)),
                        "column {c}, key {j}: {got} vs {p}"
                    );
                    if p == 0.0 {
                        assert_eq!(got, 0.0, "column {c}, key {j}: a masked key");
                    }
                }
                let want_l = l0[c] as f64 * a + sum;
                assert!(
                    close(l[c] as f64, want_l, 1e-5),
                    "column {c}: sum {} vs {want_l}",
                    l[c]
                );
            }
        }
    }

    /// Prefetching rows never reads or faults outside the slice: rows past its end, a start
    /// beyond it, a zero stride and zero rows are all taken.
    #[test]
    fn prefetching_rows_stays_inside_the_slice() {
        let data = vec![0u16; 1000];
        prefetch_rows(&data, 0, 64, 128, 64);
        prefetch_rows(&data, 990, 4, 128, 64);
        prefetch_rows(&data, 5000, 4, 128, 64);
        prefetch_rows(&data, 10, 3, 0, 64);
        prefetch_rows(&data, 10, 0, 128, 64);
        prefetch_rows::<u16>(&[], 0, 8, 1, 1);
    }

    /// A value's SiLU does not depend on its offset in the slice (a batched step holds a
    /// row at another offset than the row alone; the vector code's tail is masked, not
    /// scalar).
    #[test]
    fn silu_mul_gives_each_value_the_same_bits_at_any_offset() {
        let mut rng = rand::rng();
        let g: Vec<f32> = (0..100).map(|_| rng.random_range(-20.0..20.0)).collect();
        let u: Vec<f32> = (0..100).map(|_| rng.random_range(-2.0..2.0)).collect();
        let mut whole = vec![0f32; 100];
        silu_mul_into(&mut whole, &g, &u);
        for start in 0..40 {
            for len in [1, 7, 16, 23, 60] {
                let mut part = vec![0f32; len];
                silu_mul_into(&mut part, &g[start..start + len], &u[start..start + len]);
                for (j, x) in part.iter().enumerate() {
                    assert_eq!(
                        x.to_bits(),
                        whole[start + j].to_bits(),
                        "offset {start} len {len}"
                    );
                }
            }
        }
    }

    /// SiLU x up on this CPU against float64, at lengths with and without a 16-lane tail,
    /// over the range where `e^-g` goes from overflow to underflow, and at the edges (zero,
    /// huge, infinite and NaN gates give what libm's `expf` gives).
    #[test]
    fn silu_mul_matches_f64_and_libm_at_the_edges() {
        let mut rng = rand::rng();
        for n in [1, 15, 16, 17, 100, 4099] {
            // Below -80 SiLU leaves f32's normal range (e^-g overflows from -88.7).
            let g: Vec<f32> = (0..n).map(|_| rng.random_range(-80.0..100.0)).collect();
            let u: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
            let mut out = vec![f32::NAN; n];
            silu_mul_into(&mut out, &g, &u);
            for i in 0..n {
                let (gi, ui) = (g[i] as f64, u[i] as f64);
                let want = gi / (1.0 + (-gi).exp()) * ui;
                // A few ulps: e^-g's, the division's and the product's roundings. (An exp2 of
                // `-g log2 e` rounded to f32 is off by |g| 6e-8 relative: 4e-6 at g = -70,
                // enough to turn SmolLM2's greedy answer in `tests/cli_chat.rs`.)
                let err = (out[i] as f64 - want).abs() / want.abs().max(1e-38);
                assert!(err < 5e-7, "n {n} g {gi} u {ui}: {} vs {want}", out[i]);
            }
        }
        let edges = [
            0.0f32,
            -0.0,
            1e-30,
            -1e-30,
            88.0,
            -88.0,
            89.0,
            -89.0,
            150.0,
            -150.0,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let g: Vec<f32> = edges.iter().cycle().take(32).copied().collect();
        let u = vec![1.5f32; g.len()];
        let mut out = vec![0f32; g.len()];
        silu_mul_into(&mut out, &g, &u);
        let mut want = vec![0f32; g.len()];
        portable::silu_mul_into(&mut want, &g, &u);
        for ((o, w), gi) in out.iter().zip(&want).zip(&g) {
            let tol = 5e-7 * w.abs();
            let same = (o.is_nan() && w.is_nan()) || o == w || (o - w).abs() <= tol;
            assert!(same, "g {gi}: {o} vs libm's {w}");
        }
    }

    /// A sampler's weights: within a few ulps of f64 over the range where they go from 1 to
    /// underflow, at every length around the 16 lanes; `e^0` exactly 1; the edges as libm's.
    #[test]
    fn scaled_exp_matches_f64_and_is_one_at_the_shift() {
        let mut rng = rand::rng();
        for n in [1, 15, 16, 17, 100, 4099] {
            let (shift, div) = (
                rng.random_range(-5.0f32..5.0),
                rng.random_range(0.1f32..2.0),
            );
            let x: Vec<f32> = (0..n)
                .map(|_| shift - rng.random_range(0.0..30.0))
                .collect();
            let mut out = vec![f32::NAN; n];
            exp_scaled_into(&mut out, &x, shift, div);
            for i in 0..n {
                let y = ((x[i] - shift) / div) as f64;
                let want = y.exp();
                let err = (out[i] as f64 - want).abs() / want.max(1e-38);
                assert!(err < 5e-7, "n {n} y {y}: {} vs {want}", out[i]);
            }
            let mut one = [0f32; 3];
            exp_scaled_into(&mut one, &[shift; 3], shift, div);
            assert_eq!(one, [1.0; 3]);
        }
        let x = [0.0f32, -1e30, f32::NEG_INFINITY, f32::NAN, 200.0, -200.0];
        let mut out = [0f32; 6];
        exp_scaled_into(&mut out, &x, 0.0, 1.0);
        let mut want = [0f32; 6];
        portable::exp_scaled_into(&mut want, &x, 0.0, 1.0);
        for ((o, w), xi) in out.iter().zip(&want).zip(&x) {
            let same = (o.is_nan() && w.is_nan()) || o == w || (o - w).abs() <= 5e-7 * w.abs();
            assert!(same, "x {xi}: {o} vs libm's {w}");
        }
    }

    /// Every instruction set's score path against a float64 dot product, for f32 and bf16
    /// keys, every row count, key counts around the 8-key groups, and head dims with and
    /// without a tail.
    #[test]
    fn scores_dot_matches_f64_for_every_isa_and_row_count() {
        let mut rng = rand::rng();
        let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.available())
            .collect();
        for d in [16, 64, 72, 128] {
            for rows in 1..=16 {
                for kt in [1, 7, 8, 9, 16, 23] {
                    let ldk = d + 8;
                    let q: Vec<f32> = (0..rows * d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let k32: Vec<f32> =
                        (0..kt * ldk).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let k16: Vec<u16> = k32
                        .iter()
                        .map(|x| half::bf16::from_f32(*x).to_bits())
                        .collect();
                    for isa in &isas {
                        for bf16 in [false, true] {
                            let mut st = vec![f32::NAN; kt * 16];
                            let ops = Ops::new(*isa);
                            // SAFETY: sizes as the contract asks.
                            unsafe {
                                if bf16 {
                                    ops.scores_dot(
                                        rows,
                                        kt,
                                        d,
                                        q.as_ptr(),
                                        k16.as_ptr(),
                                        ldk,
                                        st.as_mut_ptr(),
                                        16,
                                    )
                                } else {
                                    ops.scores_dot(
                                        rows,
                                        kt,
                                        d,
                                        q.as_ptr(),
                                        k32.as_ptr(),
                                        ldk,
                                        st.as_mut_ptr(),
                                        16,
                                    )
                                }
                            }
                            for j in 0..kt {
                                for r in 0..16 {
                                    let want: f64 = if r < rows {
                                        (0..d)
                                            .map(|i| {
                                                let kv = if bf16 {
                                                    u16::to_f32(k16[j * ldk + i])
                                                } else {
                                                    k32[j * ldk + i]
                                                };
                                                q[r * d + i] as f64 * kv as f64
                                            })
                                            .sum()
                                    } else {
                                        0.0
                                    };
                                    let got = st[j * 16 + r] as f64;
                                    assert!(
                                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                        "{isa:?} bf16={bf16} d={d} rows={rows} kt={kt} ({j},{r}): {got} vs {want}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The fused `O += P V` of decode against a float64 sum, f32 and bf16 V.
    /// The decode GEMV's inner loop on every instruction set, f32 and bf16 rows, row counts
    /// around its four-row step and columns around the vector widths.
    #[test]
    fn axpy_rows_matches_f64_for_every_isa() {
        let mut rng = rand::rng();
        for isa in Isa::all_available() {
            let ops = Ops::new(isa);
            for (rows, n) in [(1, 1), (3, 7), (4, 8), (5, 17), (9, 64), (13, 100)] {
                let ld = n + 3;
                let x: Vec<f32> = (0..rows).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b32: Vec<f32> = (0..rows * ld)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let b16: Vec<u16> = b32
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                let y0: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
                for bf16 in [false, true] {
                    let mut y = y0.clone();
                    // SAFETY: b holds rows rows of ld >= n; y holds n.
                    unsafe {
                        if bf16 {
                            ops.axpy_rows(&mut y, &x, b16.as_ptr(), ld, n)
                        } else {
                            ops.axpy_rows(&mut y, &x, b32.as_ptr(), ld, n)
                        }
                    };
                    for j in 0..n {
                        let want = y0[j] as f64
                            + (0..rows)
                                .map(|r| {
                                    let w = if bf16 {
                                        u16::to_f32(b16[r * ld + j]) as f64
                                    } else {
                                        b32[r * ld + j] as f64
                                    };
                                    x[r] as f64 * w
                                })
                                .sum::<f64>();
                        assert!(
                            (y[j] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{isa:?} bf16 {bf16} rows {rows} n {n} col {j}: {} vs {want}",
                            y[j]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pv_rows_matches_f64() {
        let mut rng = rand::rng();
        for (isa, d) in Isa::all_available()
            .into_iter()
            .flat_map(|i| [16, 64, 72, 128].map(|d| (i, d)))
        {
            let ops = Ops::new(isa);
            for rows in 1..=6 {
                for kt in [1, 5, 16, 23] {
                    let (ldp, ldv, ldo) = (16, d + 8, d + 16);
                    let p: Vec<f32> = (0..kt * ldp).map(|_| rng.random_range(0.0..1.0)).collect();
                    let v32: Vec<f32> =
                        (0..kt * ldv).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let v16: Vec<u16> = v32
                        .iter()
                        .map(|x| half::bf16::from_f32(*x).to_bits())
                        .collect();
                    let o0: Vec<f32> = (0..rows * ldo)
                        .map(|_| rng.random_range(-1.0..1.0))
                        .collect();
                    for bf16 in [false, true] {
                        let mut o = o0.clone();
                        // SAFETY: sizes as the contract asks.
                        let done = unsafe {
                            if bf16 {
                                ops.pv_rows(
                                    rows,
                                    kt,
                                    d,
                                    p.as_ptr(),
                                    ldp,
                                    v16.as_ptr(),
                                    ldv,
                                    o.as_mut_ptr(),
                                    ldo,
                                )
                            } else {
                                ops.pv_rows(
                                    rows,
                                    kt,
                                    d,
                                    p.as_ptr(),
                                    ldp,
                                    v32.as_ptr(),
                                    ldv,
                                    o.as_mut_ptr(),
                                    ldo,
                                )
                            }
                        };
                        if !done {
                            assert!(d % 16 != 0 || rows > 5 || isa == Isa::Portable);
                            assert_eq!(o, o0, "untouched when not done");
                            continue;
                        }
                        for r in 0..rows {
                            for i in 0..ldo {
                                let want = if i < d {
                                    o0[r * ldo + i] as f64
                                        + (0..kt)
                                            .map(|j| {
                                                let vv = if bf16 {
                                                    u16::to_f32(v16[j * ldv + i])
                                                } else {
                                                    v32[j * ldv + i]
                                                };
                                                p[j * ldp + r] as f64 * vv as f64
                                            })
                                            .sum::<f64>()
                                } else {
                                    o0[r * ldo + i] as f64
                                };
                                let got = o[r * ldo + i] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                    "d={d} rows={rows} kt={kt}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
