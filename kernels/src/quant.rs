//! Block-quantised weights for one-token (decode) products: rows of 32-weight blocks as GGUF
//! stores them (Q4_0, Q4_1, Q8_0), times activations quantised to int8 per block of 32, with
//! integer dot products (AVX-512 VNNI `vpdpbusd`) and the scales applied per block: the scheme
//! of llama.cpp's CPU backend. Decode streams ~0.6 (4-bit) or ~1.1 (8-bit) bytes per weight
//! instead of 2 (bf16) or 4 (f32). Approximate by design (int8 activations); prefill keeps
//! the f32 path.
//!
//! Every kind is held as `w = d * q + m` with `q` unsigned (0..15 packed two per byte, or
//! 0..255): Q4_1 as stored, Q4_0 with `m = -8 d`, Q8_0 with `q = i8 + 128` and `m = -128 d`.
//! With int8 activations `x ~ s * a`, a block's product is `d s sum(q a) + m s sum(a)`.
//! Scales stay f16 as in the file (Q4_1's `d` and `m` side by side), so a product streams the
//! GGUF's own bytes per block and no more.

use crate::formats::{Format, StoredRows};
use crate::KernelError;
use half::f16;
use rayon::prelude::*;

/// The GGUF block formats that are kept quantised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    Q4_0,
    Q4_1,
    Q5_0,
    Q8_0,
}

impl QKind {
    /// Bytes of one 32-weight block in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 => 18,
            QKind::Q4_1 => 20,
            QKind::Q5_0 => 22,
            QKind::Q8_0 => 34,
        }
    }

    fn packed(self) -> bool {
        self != QKind::Q8_0
    }

    /// f16 scales kept per block: `d`, and Q4_1's `m`.
    fn scales_per_block(self) -> usize {
        if self == QKind::Q4_1 {
            2
        } else {
            1
        }
    }

    /// `m / d` of the kinds whose offset follows from the scale (the unsigned shift of `q`).
    fn offset(self) -> f32 {
        match self {
            QKind::Q4_0 => -8.0,
            QKind::Q5_0 => -16.0,
            QKind::Q8_0 => -128.0,
            QKind::Q4_1 => 0.0,
        }
    }
}

const QK: usize = 32;
/// How far ahead (in rows) the vector product prefetches the weights: 32 measured best of
/// 8-64 on SmolLM2's decode step (+8-10% over none).
const PREFETCH_ROWS: usize = 32;

/// A `[rows, cols]` matrix of quantised rows (`cols` a multiple of 32).
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Per block, f16 bits: `d`, or `d, m` for Q4_1 (`[rows, cols / 32, 1 or 2]`).
    scales: Vec<u16>,
    /// Per block: 16 bytes of nibbles (elements j and j + 16 in byte j), or 32 bytes.
    q: Vec<u8>,
    /// Q5_0's fifth bits, per block (bit j: element j); empty for the other kinds.
    hi: Vec<u32>,
}

#[cfg(test)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QMatrix {
    /// From GGUF blocks: `rows` rows of `cols / 32` blocks each, row-major.
    pub fn from_gguf(
        kind: QKind,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix, KernelError> {
        const OP: &str = "QMatrix::from_gguf";
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("{cols} columns are not whole blocks of {QK}"),
            });
        }
        let nb = rows * cols / QK;
        crate::attention::check_len(OP, "blocks", nb * kind.block_bytes(), bytes.len())?;
        let qb = if kind.packed() { 16 } else { 32 };
        let per = kind.scales_per_block();
        let (mut scales, mut q) = (vec![0u16; nb * per], vec![0u8; nb * qb]);
        let mut hi = vec![0u32; if kind == QKind::Q5_0 { nb } else { 0 }];
        let bits = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        for (i, blk) in bytes.chunks_exact(kind.block_bytes()).enumerate() {
            let dq = &mut q[i * qb..(i + 1) * qb];
            match kind {
                QKind::Q4_1 => {
                    (scales[2 * i], scales[2 * i + 1]) = (bits(blk, 0), bits(blk, 2));
                    dq.copy_from_slice(&blk[4..20]);
                }
                QKind::Q4_0 => {
                    scales[i] = bits(blk, 0);
                    dq.copy_from_slice(&blk[2..18]);
                }
                QKind::Q5_0 => {
                    scales[i] = bits(blk, 0);
                    hi[i] = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                    dq.copy_from_slice(&blk[6..22]);
                }
                QKind::Q8_0 => {
                    scales[i] = bits(blk, 0);
                    for (o, b) in dq.iter_mut().zip(&blk[2..34]) {
                        *o = (*b as i8 as i16 + 128) as u8;
                    }
                }
            }
        }
        Ok(QMatrix {
            kind,
            rows,
            cols,
            scales,
            q,
            hi,
        })
    }

    /// Quantises f32 rows (`[rows, cols]`) to 8 bits a weight (Q8_0's scheme), for weights that
    /// came without GGUF blocks.
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Result<QMatrix, KernelError> {
        crate::attention::check_len("QMatrix::quantize_q8", "w", rows * cols, w.len())?;
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::Unsupported {
                op: "QMatrix::quantize_q8",
                reason: format!("{cols} columns are not whole blocks of {QK}"),
            });
        }
        let mut bytes = Vec::with_capacity(rows * cols / QK * 34);
        q8_blocks(w, &mut bytes);
        QMatrix::from_gguf(QKind::Q8_0, &bytes, rows, cols)
    }

    /// From a stored `[rows, cols]` matrix of any format: Q4_0, Q4_1, Q5_0 and Q8_0 as they
    /// are; Q4_K as Q4_1 blocks (each 32-element sub-block's `d sc` and `dmin m` rounded to
    /// f16, 0.625 bytes a weight); the others (floats, Q2_K, Q3_K, Q5_K, Q6_K, IQ4) quantised
    /// to Q8_0 from their dequantised values, row by row.
    pub fn from_stored(rows_in: StoredRows) -> Result<QMatrix, KernelError> {
        let (rows, cols) = (rows_in.rows, rows_in.cols);
        let direct = |k| QMatrix::from_gguf(k, rows_in.bytes, rows, cols);
        match rows_in.format {
            Format::Q4_0 => direct(QKind::Q4_0),
            Format::Q4_1 => direct(QKind::Q4_1),
            Format::Q5_0 => direct(QKind::Q5_0),
            Format::Q8_0 => direct(QKind::Q8_0),
            Format::Q4_K => {
                let mut out = Vec::with_capacity(rows * cols / QK * 20);
                for sb in rows_in.bytes.chunks_exact(Format::Q4_K.block_bytes()) {
                    q4_k_as_q4_1(sb, &mut out);
                }
                QMatrix::from_gguf(QKind::Q4_1, &out, rows, cols)
            }
            _ => {
                if !cols.is_multiple_of(QK) {
                    return Err(KernelError::Unsupported {
                        op: "QMatrix::from_stored",
                        reason: format!("{cols} columns are not whole blocks of {QK}"),
                    });
                }
                let mut bytes = Vec::with_capacity(rows * cols / QK * 34);
                let mut row = vec![0f32; cols];
                for r in 0..rows {
                    rows_in.dequantize_row(r, &mut row);
                    q8_blocks(&row, &mut bytes);
                }
                QMatrix::from_gguf(QKind::Q8_0, &bytes, rows, cols)
            }
        }
    }

    /// The rows of `parts` stacked (same kind and columns): one product for several
    /// projections of the same input (Q, K and V; gate and up), one parallel region.
    pub fn concat(parts: &[&QMatrix]) -> Result<QMatrix, KernelError> {
        let first = parts.first().ok_or(KernelError::Unsupported {
            op: "QMatrix::concat",
            reason: "nothing to stack".into(),
        })?;
        if let Some(p) = parts
            .iter()
            .find(|p| p.kind != first.kind || p.cols != first.cols)
        {
            return Err(KernelError::Unsupported {
                op: "QMatrix::concat",
                reason: format!(
                    "{:?} x {} cols beside {:?} x {} cols",
                    p.kind, p.cols, first.kind, first.cols
                ),
            });
        }
        Ok(QMatrix {
            kind: first.kind,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            q: parts.iter().flat_map(|p| p.q.iter().copied()).collect(),
            hi: parts.iter().flat_map(|p| p.hi.iter().copied()).collect(),
        })
    }

    pub fn kind(&self) -> QKind {
        self.kind
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes a product streams.
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * self.scales.len() + 4 * self.hi.len()
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    fn qbytes(&self) -> usize {
        if self.kind.packed() {
            16
        } else {
            32
        }
    }

    /// Weight `(r, c)` as the product uses it.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let b = r * self.nb() + c / QK;
        let j = c % QK;
        let q = &self.q[b * self.qbytes()..];
        let mut v = if self.kind.packed() {
            if j < 16 {
                q[j] & 0x0f
            } else {
                q[j - 16] >> 4
            }
        } else {
            q[j]
        };
        if let Some(h) = self.hi.get(b) {
            v |= (((h >> j) & 1) << 4) as u8;
        }
        let (d, m) = self.dm(b);
        d * v as f32 + m
    }

    /// Scale and offset of block `b` (row-major over all blocks).
    fn dm(&self, b: usize) -> (f32, f32) {
        let h = |i: usize| f16::from_bits(self.scales[i]).to_f32();
        match self.kind {
            QKind::Q4_1 => (h(2 * b), h(2 * b + 1)),
            k => {
                let d = h(b);
                (d, k.offset() * d)
            }
        }
    }

    /// `y[rows] = W . x` for one activation vector `x[cols]`, x quantised to int8 per block.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        const OP: &str = "QMatrix::gemv";
        crate::attention::check_len(OP, "x", self.cols, x.len())?;
        crate::attention::check_len(OP, "y", self.rows, y.len())?;
        let vnni = vnni_available();
        let act = if vnni {
            Act::quantize(x).pairs(self.kind)
        } else {
            Act::quantize(x)
        };
        // About four chunks a thread (at least 64 rows): enough to balance, few enough that
        // the tasks' scheduling stays small beside a product of a few microseconds.
        let threads = rayon::current_num_threads().max(1);
        let rows_per = self.rows.div_ceil(4 * threads).next_multiple_of(4).max(64);
        y.par_chunks_mut(rows_per).enumerate().for_each(|(c, yc)| {
            let r0 = c * rows_per;
            #[cfg(target_arch = "x86_64")]
            if vnni {
                // SAFETY: VNNI checked at run time; rows r0..r0 + yc.len() exist.
                unsafe { self.rows_vnni::<4, 1>(&act.rec, [&act], r0, yc.len(), yc, 0) };
                return;
            }
            let _ = vnni;
            self.rows_portable(&act, r0, yc);
        });
        Ok(())
    }

    /// `y[m, rows] = x[m, cols] . W^T` for a few activation rows (a batched decode step):
    /// each activation quantised to int8 per block as in [`QMatrix::gemv`]. The rows are cut
    /// into chunks small enough to stay in L2 while every activation passes over them, so the
    /// weights stream from memory once per step, not once per row of `x`.
    pub fn gemm(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
        const OP: &str = "QMatrix::gemm";
        crate::attention::check_len(OP, "x", m * self.cols, x.len())?;
        crate::attention::check_len(OP, "y", m * self.rows, y.len())?;
        if m <= 1 {
            return if m == 1 { self.gemv(x, y) } else { Ok(()) };
        }
        let vnni = vnni_available();
        let acts: Vec<Act> = x
            .par_chunks_exact(self.cols)
            .map(|xr| {
                let a = Act::quantize(xr);
                if vnni {
                    a.pairs(self.kind)
                } else {
                    a
                }
            })
            .collect();
        // At least four chunks a thread; at most 64 rows (64 x 1536 4-bit weights: ~60 KB).
        let threads = rayon::current_num_threads().max(1);
        let rows_per = self
            .rows
            .div_ceil(4 * threads)
            .next_multiple_of(4)
            .clamp(4, 64);
        let chunks = self.rows.div_ceil(rows_per);
        let groups: Vec<(Vec<u8>, &[Act])> = if vnni {
            acts.chunks(4).map(|g| (interleave(g), g)).collect()
        } else {
            vec![]
        };
        // [chunk][activation][rows_per], scattered into y after.
        let mut yt = vec![0f32; chunks * m * rows_per];
        yt.par_chunks_mut(m * rows_per)
            .enumerate()
            .for_each(|(c, buf)| {
                let r0 = c * rows_per;
                let len = rows_per.min(self.rows - r0);
                #[cfg(target_arch = "x86_64")]
                if vnni {
                    // Up to four activations per pass over the chunk's weight blocks.
                    for (g, (recs, group)) in groups.iter().enumerate() {
                        let out = &mut buf[g * 4 * rows_per..];
                        // SAFETY: VNNI checked at run time; rows r0..r0 + len exist and `out`
                        // holds group.len() rows of rows_per.
                        unsafe { self.rows_vnni_group(recs, group, r0, len, out, rows_per) };
                    }
                    return;
                }
                for (j, act) in acts.iter().enumerate() {
                    self.rows_portable(act, r0, &mut buf[j * rows_per..j * rows_per + len]);
                }
            });
        for c in 0..chunks {
            let r0 = c * rows_per;
            let len = rows_per.min(self.rows - r0);
            for j in 0..m {
                let src = &yt[(c * m + j) * rows_per..(c * m + j) * rows_per + len];
                y[j * self.rows + r0..j * self.rows + r0 + len].copy_from_slice(src);
            }
        }
        Ok(())
    }

    /// Block `b` of row `r` times the activations' block `b`, in scalar code.
    fn block_product(&self, act: &Act, r: usize, b: usize) -> f32 {
        let (nb, qb) = (self.nb(), self.qbytes());
        let blk = r * nb + b;
        let q = &self.q[blk * qb..(blk + 1) * qb];
        let a = &act.a[b * QK..(b + 1) * QK];
        let h = self.hi.get(blk).copied().unwrap_or(0);
        let fifth = |j: usize| (((h >> j) & 1) << 4) as i32;
        let dot: i32 = if self.kind.packed() {
            (0..16)
                .map(|j| {
                    ((q[j] & 0x0f) as i32 | fifth(j)) * a[j] as i32
                        + ((q[j] >> 4) as i32 | fifth(j + 16)) * a[j + 16] as i32
                })
                .sum()
        } else {
            q.iter().zip(a).map(|(w, x)| *w as i32 * *x as i32).sum()
        };
        let (d, m) = self.dm(blk);
        d * act.s[b] * dot as f32 + m * act.ssum[b]
    }

    /// [`QMatrix::rows_vnni`] for 1 to 4 activations (`recs`: their [`interleave`]d
    /// records), four rows at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")]
    unsafe fn rows_vnni_group(
        &self,
        recs: &[u8],
        g: &[Act],
        r0: usize,
        len: usize,
        out: &mut [f32],
        stride: usize,
    ) {
        let a = |i: usize| &g[i];
        match g.len() {
            1 => self.rows_vnni::<4, 1>(recs, std::array::from_fn(a), r0, len, out, stride),
            2 => self.rows_vnni::<4, 2>(recs, std::array::from_fn(a), r0, len, out, stride),
            3 => self.rows_vnni::<4, 3>(recs, std::array::from_fn(a), r0, len, out, stride),
            _ => self.rows_vnni::<4, 4>(recs, std::array::from_fn(a), r0, len, out, stride),
        }
    }

    fn rows_portable(&self, act: &Act, r0: usize, y: &mut [f32]) {
        for (i, out) in y.iter_mut().enumerate() {
            *out = (0..self.nb())
                .map(|b| self.block_product(act, r0 + i, b))
                .sum();
        }
    }

    /// `R` rows times `J` activations at a time: each weight block is unpacked once per `J`
    /// activations (the vector product runs `R = 4, J = 1`; a batched step `R = 4, J` up to
    /// 4). Row `r0 + i`'s product with activation `j` goes to `y[j * stride + i]`, for
    /// `i < len`. Two blocks per 512-bit integer dot product. The two blocks' 32 bytes of nibbles are broadcast to
    /// both halves and shifted by 0 or 4, so the bytes come in the order
    /// `[b 0..16, b+1 0..16, b 16..32, b+1 16..32]`, which the activations were laid out in
    /// ([`Act::pairs`]); no shuffles in the loop.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")]
    unsafe fn rows_vnni<const R: usize, const J: usize>(
        &self,
        recs: &[u8],
        acts: [&Act; J],
        r0: usize,
        len: usize,
        y: &mut [f32],
        stride: usize,
    ) {
        use std::arch::x86_64::*;
        let (nb, qb) = (self.nb(), self.qbytes());
        let packed = self.kind.packed();
        let q4_1 = self.kind == QKind::Q4_1;
        let per = self.kind.scales_per_block();
        let low = _mm512_set1_epi8(0x0f);
        let shift = _mm512_set_epi64(4, 4, 4, 4, 0, 0, 0, 0);
        // 32-bit lane -> block of the pair (0: b, 1: b + 1); Q4_1's scales come as
        // [d0, m0, d1, m1], the others' as [d0, d1].
        let (lane_d, lane_m) = match (packed, q4_1) {
            (true, true) => (
                _mm512_set_epi32(2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0),
                _mm512_set_epi32(3, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1, 1, 1),
            ),
            (true, false) => (
                _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0),
                _mm512_setzero_si512(),
            ),
            _ => (
                _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                _mm512_setzero_si512(),
            ),
        };
        let q5 = self.kind == QKind::Q5_0;
        let sixteen = _mm512_set1_epi8(0x10);
        let weights = |blk: usize| -> __m512i {
            let p = self.q.as_ptr().add(blk * qb);
            if packed {
                let v = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()));
                let v = _mm512_and_si512(_mm512_srlv_epi64(v, shift), low);
                if q5 {
                    // The fifth bits in the bytes' order: [b 0..16, b+1 0..16, b 16..32,
                    // b+1 16..32].
                    let (h0, h1) = (
                        *self.hi.get_unchecked(blk) as u64,
                        *self.hi.get_unchecked(blk + 1) as u64,
                    );
                    let m = (h0 & 0xffff)
                        | ((h1 & 0xffff) << 16)
                        | ((h0 >> 16) << 32)
                        | ((h1 >> 16) << 48);
                    _mm512_or_si512(v, _mm512_maskz_mov_epi8(m, sixteen))
                } else {
                    v
                }
            } else {
                _mm512_loadu_si512(p.cast())
            }
        };
        let scales = |blk: usize| -> __m512 {
            let p = self.scales.as_ptr().add(blk * per);
            let h = if q4_1 {
                _mm_loadl_epi64(p.cast())
            } else {
                _mm_cvtsi32_si128(p.cast::<i32>().read_unaligned())
            };
            _mm512_castps128_ps512(_mm_cvtph_ps(h))
        };
        let pairs = nb / 2;
        let mut i = 0;
        while i < len {
            let n = (len - i).min(R);
            let rows: [usize; R] = std::array::from_fn(|k| r0 + i + k.min(n - 1));
            let mut acc = [[_mm512_setzero_ps(); J]; R];
            // The rows PREFETCH_ROWS on, towards L2: the loads here stall on memory otherwise
            // (the hardware prefetcher alone leaves ~10% of the decode step on the table).
            let ahead = r0 + i + PREFETCH_ROWS;
            let (qr, sr) = (nb * qb, nb * per);
            let span =
                |row: usize, len: usize| ((ahead * row).min(len), ((ahead + R) * row).min(len));
            let (a0, a1) = span(qr, self.q.len());
            crate::cpu::prefetch(&self.q[a0..a1]);
            let (b0, b1) = span(sr, self.scales.len());
            crate::cpu::prefetch(&self.scales[b0..b1]);
            for p in 0..pairs {
                let b = 2 * p;
                for k in 0..R {
                    let blk = rows[k] * nb + b;
                    let w = weights(blk);
                    let sc = scales(blk);
                    let d = _mm512_permutexvar_ps(lane_d, sc);
                    let m = _mm512_permutexvar_ps(lane_m, sc);
                    for (j, acc) in acc[k].iter_mut().enumerate() {
                        // Loaded per row, from L1: holding J of each spills registers.
                        let rec = recs.as_ptr().add((p * J + j) * REC);
                        let a = _mm512_loadu_si512(rec.cast());
                        let sv = _mm512_loadu_ps(rec.add(64).cast());
                        let ov = _mm512_loadu_ps(rec.add(128).cast());
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
                        if q4_1 {
                            // d s dot + m s sum(a)
                            let t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), sv);
                            *acc = _mm512_fmadd_ps(m, ov, _mm512_fmadd_ps(d, t, *acc));
                        } else {
                            // d (s dot + c s sum(a)), c = m / d
                            let t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sv, ov);
                            *acc = _mm512_fmadd_ps(d, t, *acc);
                        }
                    }
                }
            }
            for k in 0..n {
                for j in 0..J {
                    let mut v = _mm512_reduce_add_ps(acc[k][j]);
                    if nb % 2 == 1 {
                        // The odd last block, in natural order.
                        v += self.block_product(acts[j], rows[k], nb - 1);
                    }
                    y[j * stride + i + k] = v;
                }
            }
            i += n;
        }
    }
}

/// Appends Q8_0 blocks of `w` (whole blocks of 32): `d = amax / 127` in f16, `q = round(w / d)`.
fn q8_blocks(w: &[f32], bytes: &mut Vec<u8>) {
    for blk in w.chunks_exact(QK) {
        let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
        // A NaN or infinite weight makes its block's scale NaN, so every product reading it
        // is NaN (and the forward pass stops there) instead of the weight rounding to 0.
        let d = if blk.iter().all(|x| x.is_finite()) {
            f16::from_f32(amax / 127.0)
        } else {
            f16::NAN
        };
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        bytes.extend_from_slice(&d.to_le_bytes());
        bytes.extend(
            blk.iter()
                .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
}

/// One Q4_K super-block as eight Q4_1 blocks: sub-block `s` is `x = (d sc_s) q - dmin m_s`,
/// so its Q4_1 scale is `d sc_s` and its minimum `-dmin m_s`; its nibbles are the low (even
/// `s`) or high (odd `s`) halves of 32 bytes, laid out again as Q4_1's (byte j: elements j
/// and j + 16).
fn q4_k_as_q4_1(sb: &[u8], out: &mut Vec<u8>) {
    let h = |i: usize| f16::from_le_bytes([sb[i], sb[i + 1]]).to_f32();
    let (d, dmin) = (h(0), h(2));
    let (sc, qs) = (&sb[4..16], &sb[16..144]);
    for s in 0..8 {
        let (scale, min) = crate::formats::q4_k_sub_block(s, d, dmin, sc);
        out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(-min).to_le_bytes());
        let q = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        let nib = |l: usize| if s % 2 == 0 { q[l] & 0x0f } else { q[l] >> 4 };
        out.extend((0..16).map(|j| nib(j) | (nib(j + 16) << 4)));
    }
}

/// Activations quantised per block of 32: `x ~ s[b] * a`, with `ssum[b] = s[b] * sum(a)`;
/// and, for the vector path, the same laid out per pair of blocks (see [`Act::pairs`]).
struct Act {
    a: Vec<i8>,
    s: Vec<f32>,
    ssum: Vec<f32>,
    /// What the vector kernel reads, one 192-byte record per pair of blocks: the pair's 64
    /// bytes of `a` in the order the kernel reads the weights' bytes (packed nibbles:
    /// `[b 0..16, b+1 0..16, b 16..32, b+1 16..32]`; 8-bit weights: natural), then per
    /// 32-bit lane of the integer dot product the lane's block's `s` (16 f32) and its offset
    /// factor (16 f32): `ssum / 8` (Q4_1, times `m`) or `c * ssum / 8` (the others,
    /// `c = m / d`), a block's offset spread over the eight lanes that sum into it. Empty
    /// until [`Act::pairs`].
    rec: Vec<u8>,
}

/// Bytes of one pair's record in [`Act::rec`].
const REC: usize = 192;

impl Act {
    fn quantize(x: &[f32]) -> Act {
        let nb = x.len() / QK;
        let mut a = vec![0i8; x.len()];
        let (mut s, mut ssum) = (vec![0f32; nb], vec![0f32; nb]);
        for (b, (xb, ab)) in x.chunks_exact(QK).zip(a.chunks_exact_mut(QK)).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            // A NaN or infinity would round to 0 (max ignores NaN): a NaN scale carries it
            // into every product instead, where the forward pass's check sees it.
            let scale = if xb.iter().all(|v| v.is_finite()) {
                amax / 127.0
            } else {
                f32::NAN
            };
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // Round to nearest (ties to even) by the 1.5 * 2^23 shift: `round()` is a libm
            // call per element on baseline x86-64, a tenth of a batched product's time.
            const SHIFT: f32 = 12_582_912.0;
            let mut sum = 0i32;
            for (o, v) in ab.iter_mut().zip(xb) {
                let q = ((v * inv + SHIFT) - SHIFT) as i8;
                *o = q;
                sum += q as i32;
            }
            s[b] = scale;
            ssum[b] = scale * sum as f32;
        }
        Act {
            a,
            s,
            ssum,
            rec: vec![],
        }
    }

    /// Lays out the pairs of blocks for [`QMatrix::rows_vnni`] on weights of `kind`: packed
    /// nibbles give bytes `[b 0..16, b+1 0..16, b 16..32, b+1 16..32]` (lanes 0-3 and 8-11
    /// of the dot product are block b's), 8-bit weights their natural order (lanes 0-7).
    fn pairs(mut self, kind: QKind) -> Act {
        let pairs = self.s.len() / 2;
        let packed = kind.packed();
        let c = if kind == QKind::Q4_1 {
            1.0
        } else {
            kind.offset()
        };
        self.rec = vec![0u8; pairs * REC];
        for (p, rec) in self.rec.chunks_exact_mut(REC).enumerate() {
            let b = 2 * p;
            let src = &self.a[b * QK..(b + 2) * QK];
            let dst = &mut rec[..64];
            for (d, x) in dst.iter_mut().zip(src) {
                *d = *x as u8;
            }
            if packed {
                let u = |r: std::ops::Range<usize>| src[r].iter().map(|x| *x as u8);
                for (d, x) in dst
                    .iter_mut()
                    .zip(u(0..16).chain(u(32..48)).chain(u(16..32)).chain(u(48..64)))
                {
                    *d = x;
                }
            }
            for lane in 0..16 {
                let blk = b + if packed { (lane / 4) % 2 } else { lane / 8 };
                let (sv, ov) = (self.s[blk], c * self.ssum[blk] / 8.0);
                rec[64 + 4 * lane..68 + 4 * lane].copy_from_slice(&sv.to_ne_bytes());
                rec[128 + 4 * lane..132 + 4 * lane].copy_from_slice(&ov.to_ne_bytes());
            }
        }
        self
    }
}

/// The records of `acts` interleaved per pair (pair p's record of activation j at
/// `(p * acts.len() + j) * REC`): one stream for the kernel's `J` activations.
fn interleave(acts: &[Act]) -> Vec<u8> {
    let pairs = acts[0].rec.len() / REC;
    let mut out = Vec::with_capacity(pairs * acts.len() * REC);
    for p in 0..pairs {
        for a in acts {
            out.extend_from_slice(&a.rec[p * REC..(p + 1) * REC]);
        }
    }
    out
}

fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::env::var_os("LONGCTX_NO_VNNI").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn blocks(kind: QKind, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32(rng.random_range(0.001..0.05));
            out.extend_from_slice(&d.to_le_bytes());
            if kind == QKind::Q4_1 {
                out.extend_from_slice(&f16::from_f32(rng.random_range(-0.3..0.3)).to_le_bytes());
            }
            let n = match kind {
                QKind::Q8_0 => 32,
                QKind::Q5_0 => 20,
                _ => 16,
            };
            out.extend((0..n).map(|_| rng.random::<u8>()));
        }
        out
    }

    /// The quantised product against the float64 product of the same (dequantised) weights:
    /// within int8 activation rounding; and the vector path equal to the portable one.
    #[test]
    fn gemv_matches_the_dequantised_product() {
        let mut rng = rand::rng();
        for kind in [QKind::Q4_0, QKind::Q4_1, QKind::Q5_0, QKind::Q8_0] {
            for (rows, cols) in [(1, 32), (7, 96), (130, 576), (67, 1536)] {
                let w = QMatrix::from_gguf(kind, &blocks(kind, rows, cols, &mut rng), rows, cols)
                    .unwrap();
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut y = vec![0f32; rows];
                w.gemv(&x, &mut y).unwrap();
                let act = Act::quantize(&x);
                let mut y_port = vec![0f32; rows];
                w.rows_portable(&act, 0, &mut y_port);
                // Each block's int8 step from its definition (max |x| / 127), not from the
                // code under test: a bound built on the kernel's own scale passed a scale
                // of `amax * 127`.
                let step: Vec<f64> = x
                    .chunks(QK)
                    .map(|b| b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 127.0)
                    .collect();
                for r in 0..rows {
                    let want: f64 = (0..cols).map(|c| w.get(r, c) as f64 * x[c] as f64).sum();
                    // Rounding x to int8 moves each term by at most |w| * step / 2.
                    let bound: f64 = (0..cols)
                        .map(|c| w.get(r, c).abs() as f64 * step[c / QK] / 2.0)
                        .sum::<f64>()
                        * 1.001
                        + 1e-4;
                    let err = (y[r] as f64 - want).abs();
                    assert!(
                        err <= bound,
                        "{kind:?} {rows}x{cols} row {r}: {err} > {bound}"
                    );
                    let (a, b) = (y[r] as f64, y_port[r] as f64);
                    assert!(
                        // Same integers; only the order of the float sums differs.
                        (a - b).abs() <= 0.05 * bound,
                        "{kind:?}: vector {a} and portable {b} paths differ"
                    );
                }
            }
        }
    }

    /// Q8_0 quantisation of f32 rows (weights without GGUF blocks): every weight within half a
    /// step (amax / 254) of its value, at amplitudes below and above 127 (so the scale is a
    /// division, not a remainder), all-zero blocks exactly zero.
    /// A batched product is each row's vector product, bit for bit (the same int8
    /// activations and the same kernel), at row counts that are not multiples of a chunk.
    #[test]
    fn gemm_rows_are_their_gemvs() {
        let mut rng = rand::rng();
        for kind in [QKind::Q4_0, QKind::Q4_1, QKind::Q5_0, QKind::Q8_0] {
            for (rows, cols, m) in [(1, 32, 2), (7, 96, 3), (130, 576, 5), (67, 1536, 17)] {
                let w = QMatrix::from_gguf(kind, &blocks(kind, rows, cols, &mut rng), rows, cols)
                    .unwrap();
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                let mut y = vec![0f32; m * rows];
                w.gemm(&x, m, &mut y).unwrap();
                for j in 0..m {
                    let mut one = vec![0f32; rows];
                    w.gemv(&x[j * cols..(j + 1) * cols], &mut one).unwrap();
                    assert_eq!(
                        &y[j * rows..(j + 1) * rows],
                        &one[..],
                        "{kind:?} {rows}x{cols} row {j}"
                    );
                }
            }
        }
        let w = QMatrix::quantize_q8(&[0.5; 64], 2, 32).unwrap();
        // A non-finite activation or weight is NaN in every product it enters, not 0.
        let mut x = vec![1.0f32; 96];
        x[40] = f32::NAN;
        x[70] = f32::INFINITY;
        let mut y = vec![0f32; 6];
        w.gemm(&x, 3, &mut y).unwrap();
        assert!(y[0].is_finite() && y[1].is_finite());
        assert!(y[2..].iter().all(|v| v.is_nan()), "{y:?}");
        let mut wv = vec![0.5f32; 64];
        wv[33] = f32::NAN;
        let w2 = QMatrix::quantize_q8(&wv, 2, 32).unwrap();
        let mut y = vec![0f32; 2];
        w2.gemv(&[1.0; 32], &mut y).unwrap();
        assert!(y[0].is_finite() && y[1].is_nan(), "{y:?}");
        assert!(w.gemm(&[1.0; 64], 3, &mut [0.0; 6]).is_err());
        assert!(w.gemm(&[1.0; 96], 3, &mut [0.0; 5]).is_err());
    }

    #[test]
    fn quantize_q8_is_within_half_a_step() {
        let mut rng = rand::rng();
        for amp in [0.01f32, 3.0, 500.0] {
            let (rows, cols) = (5, 96);
            let mut w: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-amp..amp))
                .collect();
            w[32..64].fill(0.0);
            let q = QMatrix::quantize_q8(&w, rows, cols).unwrap();
            for (b, blk) in w.chunks(QK).enumerate() {
                let amax = blk.iter().fold(0f32, |a, x| a.max(x.abs()));
                // The f16 scale rounds amax / 127 by at most 2^-11 relative.
                let step = amax / 127.0 * (1.0 + 1.0 / 1024.0);
                for (j, x) in blk.iter().enumerate() {
                    let i = b * QK + j;
                    let got = q.get(i / cols, i % cols);
                    assert!(
                        (got - x).abs() <= step / 2.0 + step * 1e-3,
                        "amp {amp} block {b}: {got} for {x} (step {step})"
                    );
                }
            }
            assert!((32..64).all(|i| q.get(i / cols, i % cols) == 0.0));
        }
        assert!(QMatrix::quantize_q8(&[0.0; 40], 1, 40).is_err());
        assert!(QMatrix::quantize_q8(&[0.0; 64], 1, 32).is_err());
    }

    /// Stacking checks kind and columns; the stack's rows are the parts' rows in order.
    #[test]
    fn concat_stacks_rows_and_refuses_mismatches() {
        let mut rng = rand::rng();
        let m = |kind, rows, cols, rng: &mut rand::rngs::ThreadRng| {
            QMatrix::from_gguf(kind, &blocks(kind, rows, cols, rng), rows, cols).unwrap()
        };
        let (a, b) = (
            m(QKind::Q4_1, 3, 64, &mut rng),
            m(QKind::Q4_1, 2, 64, &mut rng),
        );
        let c = QMatrix::concat(&[&a, &b]).unwrap();
        assert_eq!((c.rows(), c.cols(), c.kind()), (5, 64, QKind::Q4_1));
        // What a product streams: the file's bytes per block (Q4_1: 20 for 32 weights).
        assert_eq!(c.bytes(), 5 * 2 * 20);
        for kind in [QKind::Q4_0, QKind::Q4_1, QKind::Q8_0] {
            let q = m(kind, 3, 96, &mut rng);
            assert_eq!(q.bytes(), 3 * 3 * kind.block_bytes(), "{kind:?}");
        }
        for col in 0..64 {
            assert_eq!(c.get(1, col), a.get(1, col));
            assert_eq!(c.get(4, col), b.get(1, col));
        }
        let other_kind = m(QKind::Q8_0, 2, 64, &mut rng);
        let other_cols = m(QKind::Q4_1, 2, 96, &mut rng);
        assert!(QMatrix::concat(&[&a, &other_kind]).is_err());
        assert!(QMatrix::concat(&[&a, &other_cols]).is_err());
        assert!(QMatrix::concat(&[]).is_err());
    }

    #[test]
    fn dequantised_weights_match_gguf_and_bad_sizes_are_errors() {
        let mut rng = rand::rng();
        for (kind, f) in [
            (QKind::Q4_0, Format::Q4_0),
            (QKind::Q4_1, Format::Q4_1),
            (QKind::Q5_0, Format::Q5_0),
            (QKind::Q8_0, Format::Q8_0),
        ] {
            let b = blocks(kind, 3, 64, &mut rng);
            let w = QMatrix::from_gguf(kind, &b, 3, 64).unwrap();
            // The formats table (checked against gguf-py) is the reference.
            let want = f.to_f32(&b, 3 * 64).unwrap();
            for r in 0..3 {
                for c in 0..64 {
                    let want = want[r * 64 + c];
                    assert!(
                        (w.get(r, c) - want).abs() <= 1e-6 * want.abs().max(1.0),
                        "{kind:?} ({r}, {c}): {} vs {want}",
                        w.get(r, c)
                    );
                }
            }
            assert!(QMatrix::from_gguf(kind, &b[..b.len() - 1], 3, 64).is_err());
            assert!(QMatrix::from_gguf(kind, &b, 3, 63).is_err());
        }
        let w = QMatrix::quantize_q8(&[0.5; 64], 2, 32).unwrap();
        assert!((w.get(1, 31) - 0.5).abs() < 1e-3);
        let _ = f16_at;
    }

    /// Every stored format through the decode path: the product within int8 rounding (of the
    /// activations, and of the weights where they are requantised) of the float64 product of
    /// the file's dequantised weights; Q4_K's repacking into Q4_1 keeps every weight to f16
    /// rounding of its scales.
    #[test]
    fn every_stored_format_multiplies_from_its_blocks() {
        let mut rng = rand::rng();
        for f in crate::formats::ALL {
            let (rows, cols) = (37, 2 * 256 + if f.block_elems() == 256 { 0 } else { 64 });
            let bytes = crate::formats::tests::random_blocks(f, rows * cols, &mut rng);
            let stored = StoredRows::new(f, &bytes, rows, cols).unwrap();
            let w = QMatrix::from_stored(stored).unwrap();
            let wf = f.to_f32(&bytes, rows * cols).unwrap();
            if f == Format::Q4_K {
                assert_eq!(w.kind(), QKind::Q4_1);
                for i in (0..rows * cols).step_by(7) {
                    let (g, e) = (w.get(i / cols, i % cols), wf[i]);
                    // Each of `d sc` and `dmin m` is rounded to f16 (2^-11 of itself at most).
                    let sb = &bytes[i / 256 * 144..];
                    let h = |o: usize| f16::from_le_bytes([sb[o], sb[o + 1]]).to_f32().abs();
                    let (sc, mn) =
                        crate::formats::q4_k_sub_block(i % 256 / 32, h(0), h(2), &sb[4..16]);
                    let bound = (sc * 15.0 + mn) / 2048.0;
                    assert!((g - e).abs() <= bound * 1.01, "Q4_K [{i}]: {g} vs {e}");
                }
            }
            let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut y = vec![0f32; rows];
            w.gemv(&x, &mut y).unwrap();
            let (mut num, mut den) = (0f64, 0f64);
            for r in 0..rows {
                let want: f64 = (0..cols)
                    .map(|c| wf[r * cols + c] as f64 * x[c] as f64)
                    .sum();
                num += (y[r] as f64 - want).powi(2);
                den += want * want;
            }
            let e = (num / den).sqrt();
            assert!(e < 2e-2, "{f}: relative error {e:e}");
        }
    }
}
