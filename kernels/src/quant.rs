//! Block-quantised weights for products with few rows (decode steps, batched steps, prompt
//! chunks up to a few hundred rows): 32-weight blocks from GGUF's own values (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and IQ4_NL as stored; Q4_K, Q5_K, IQ4_XS, Q2_K, Q3_K and Q6_K from their
//! super-blocks, only the scales rounded to f16), times activations quantised to int8 per
//! block of 32, with integer dot products (AVX-512 VNNI `vpdpbusd`; on AVX2 CPUs its
//! `vpmaddubsw` emulation, `quant/avx2.rs`) and the scales applied per block: the scheme of
//! llama.cpp's CPU backend. Decode streams 0.56-0.88 bytes per weight (1.06 for Q8_0)
//! instead of 2 (bf16) or 4 (f32). Approximate by design (int8 activations).
//!
//! Every kind is held as `w = d * q + m` with `q` unsigned (0..15 packed two per byte, 0..31,
//! 0..63 or 0..255): Q4_1 and Q5_1 as stored, Q4_0 with `m = -8 d`, Q5_0 with `m = -16 d`,
//! Q8_0 with `q = i8 + 128` and `m = -128 d`, IQ4 with `q` its level + 128 (looked up from
//! the nibble) and `m = -128 d`; Q6 with a scale per half block; Q2_16 and Q3_16 (their
//! values in 2-bit planes) with the file's own sub-scales per half block and super-block
//! scales, `d` and `m` per half made from them in the kernel. With int8
//! activations `x ~ s * a`, a block's product is `d s sum(q a) + m s sum(a)`. Rows are
//! interleaved in groups of 16 (see [`QMatrix`]) and the scales stay f16 as in the file, so
//! a product streams the GGUF's own bytes per block.

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::formats::{Format, StoredRows};
use crate::KernelError;
use half::f16;
use rayon::prelude::*;

/// The GGUF block formats that are kept quantised.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QKind {
    Q4_0,
    Q4_1,
    Q5_0,
    /// Q5_1 as stored, and Q5_K as Q5_1 blocks (each 32-weight sub-block's `d sc` and
    /// `dmin m` rounded to f16, as Q4_K into Q4_1).
    Q5_1,
    Q8_0,
    /// GGUF's Q6_K as 32-weight blocks: 6-bit `q` (nibbles and a plane of high bit pairs),
    /// a scale per 16 weights (`d sc` in f16), `w = scale (q - 32)`. 0.875 bytes a weight.
    Q6,
    /// IQ4_NL as stored, and IQ4_XS as IQ4_NL blocks (`d (ls - 32)` rounded to f16): a
    /// nibble indexes ggml's 16 int8 levels. Held as nibbles; the products look the levels
    /// up (`vpshufb`) and take them as `q + 128` with Q8_0's offset.
    Iq4,
    /// Q2_K as 32-weight blocks of its 2-bit values `v = q` with a scale and a minimum per
    /// 16 weights, `w = d_h v + m_h`, `d_h = d sc`, `m_h = -dmin m`: the file's own bytes, its
    /// 4-bit `sc` and `m` per half (one byte) and its f16 `d` and `dmin` per super-block of 256
    /// weights, multiplied out in the kernel. 0.33 bytes a weight, as the file.
    Q2_16,
    /// Q3_K as [`QKind::Q2_16`] plus a plane of third bits: `v = q + 4` (0..7), its 6-bit
    /// `sc` per half (a byte), `d_h = d (sc - 32)`, `m_h = -4 d_h`. 0.45 bytes a weight (the
    /// file's 0.43).
    Q3_16,
}

/// ggml's IQ4 levels plus 128, as the products take them (unsigned bytes).
const IQ4_UNSIGNED: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (crate::formats::IQ4_LEVELS[i] as i16 + 128) as u8;
        i += 1;
    }
    t
};

impl QKind {
    /// Bytes of one 32-weight block in GGUF.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q4_0 | QKind::Iq4 => 18,
            QKind::Q4_1 => 20,
            QKind::Q5_0 => 22,
            QKind::Q5_1 => 24,
            QKind::Q8_0 => 34,
            // As held: nibbles, high bit pairs, two f16 scales.
            QKind::Q6 => 28,
            // As held: 2-bit values (and third bits), the halves' sub-scales (two bytes); the
            // super-block's `d` and `dmin` (4 bytes for 8 blocks) apart.
            QKind::Q2_16 => 10,
            QKind::Q3_16 => 14,
        }
    }

    /// Bytes of one row's block of weights as held (the scales apart).
    fn qbytes(self) -> usize {
        if self.two_bit() {
            8
        } else if self.packed() {
            16
        } else {
            32
        }
    }

    /// Whether the values are held as 2-bit planes (Q2_16, Q3_16), not nibbles.
    fn two_bit(self) -> bool {
        matches!(self, QKind::Q2_16 | QKind::Q3_16)
    }

    /// The value of the bit held in [`QMatrix::hi`] (Q5's fifth, Q3_16's third), if any.
    fn plane_bit(self) -> u8 {
        match self {
            QKind::Q5_0 | QKind::Q5_1 => 16,
            QKind::Q3_16 => 4,
            _ => 0,
        }
    }

    fn packed(self) -> bool {
        self != QKind::Q8_0
    }

    /// The word of a block's activations each of the eight unpacked weight vectors takes.
    fn words(self) -> &'static [usize; 8] {
        if self.packed() {
            &WORD_PACKED
        } else {
            &WORD_Q8
        }
    }

    /// Whether fifth bits are held (Q5_0, Q5_1).
    fn five(self) -> bool {
        matches!(self, QKind::Q5_0 | QKind::Q5_1)
    }

    /// Whether each block's `m` is held (rather than following from `d`).
    fn has_min(self) -> bool {
        matches!(self, QKind::Q4_1 | QKind::Q5_1)
    }

    /// 16-bit scales kept per block: `d` (f16); Q4_1's and Q5_1's `m`, Q6's second half's
    /// scale; Q2_16's and Q3_16's one word of the two halves' sub-scale bytes (the first
    /// half's in the low byte).
    fn scales_per_block(self) -> usize {
        match self {
            QKind::Q4_1 | QKind::Q5_1 | QKind::Q6 => 2,
            _ => 1,
        }
    }

    /// `m / d` of the kinds whose offset follows from the scale (the unsigned shift of `q`).
    fn offset(self) -> f32 {
        match self {
            QKind::Q4_0 => -8.0,
            QKind::Q5_0 => -16.0,
            QKind::Q8_0 | QKind::Iq4 => -128.0,
            QKind::Q6 => -32.0,
            QKind::Q4_1 | QKind::Q5_1 | QKind::Q2_16 | QKind::Q3_16 => 0.0,
        }
    }
}

const QK: usize = 32;
/// Rows per interleaved group: one 512-bit integer dot product is 16 rows x 4 weights.
const G: usize = 16;
/// How far ahead (in bytes of weights) the products prefetch: the hardware prefetcher alone
/// leaves part of a decode step's bandwidth unused.
const PREFETCH: usize = 4096;
/// Activation values (rows x columns) up to which [`QMatrix::gemm`] quantises and packs its
/// rows serially: a 16-sequence step of a model up to 2,048 wide.
const SERIAL_ELEMS: usize = 1 << 15;

/// A `[rows, cols]` matrix of quantised rows (`cols` a multiple of 32), in groups of 16
/// rows interleaved so that one integer dot product covers 4 weights of each of 16 rows and
/// the activation is a broadcast: per block a group's products are 8 `vpdpbusd`, one
/// conversion and the block's scales applied once to 16 rows (llama.cpp's scheme, laid out
/// for AVX-512). Rows past `rows` in the last group are zero.
pub struct QMatrix {
    kind: QKind,
    rows: usize,
    cols: usize,
    /// Per group, per block: the 16 rows' `d` as f16 bits, then (Q4_1, Q5_1) their `m`
    /// (Q6: their second halves' scales); Q2_16, Q3_16: the rows' sub-scale words.
    scales: Vec<u16>,
    /// Q2_16's and Q3_16's super-block scales per group and super-block (8 blocks): the 16
    /// rows' `d`, then their `dmin` (Q3_16: unused), f16 bits as in the file; empty otherwise.
    sup: Vec<u16>,
    /// Per group, per block, the 16 rows' weights as the kernel loads them. Packed kinds:
    /// four 64-byte chunks, chunk `c` holding in bytes `4r..4r + 4` row r's elements
    /// `4c..4c + 4` (low nibbles) and `16 + 4c..16 + 4c + 4` (high nibbles). Q8_0 (`q + 128`):
    /// eight chunks, chunk `c` row r's elements `4c..4c + 4`.
    q: Vec<u8>,
    /// Q5_0's and Q5_1's fifth bits per group and block: one 64-bit mask per unpacked vector (low
    /// nibbles of chunk c: vector 2c, high: 2c + 1; bit `4r + i` its byte); empty otherwise.
    hi: Vec<u64>,
    /// Q6's high bit pairs per group and block: two 64-byte chunks, chunk h's byte `4r + i`
    /// holding at bits `2u..2u + 2` those of unpacked vector `4h + u`'s byte; empty otherwise.
    hi2: Vec<u8>,
}

/// One group's scales, weights, fifth bits and high bit pairs, as [`QMatrix`] holds them.
struct GroupPlanes<'a> {
    scales: &'a mut [u16],
    sup: &'a mut [u16],
    q: &'a mut [u8],
    hi: &'a mut [u64],
    hi2: &'a mut [u8],
}

/// One row's GGUF blocks of `kind` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL) into lane `lane` of
/// its group, by whole 4-byte words: in the group layout a packed byte holds elements `4c + i`
/// and `16 + 4c + i` as GGUF's byte `4c + i` does, Q8_0's `q + 128` is its byte with the top
/// bit flipped, and Q5's fifth bits of vector `2c + high` are bits `16 high + 4c..+4` of its
/// `qh` (the four bytes before the nibbles). (Element by element it took 4 ns a weight.)
fn place_row(kind: QKind, row: &[u8], lane: usize, p: &mut GroupPlanes) {
    let (qb, per, bs) = (
        kind.qbytes() * G,
        kind.scales_per_block() * G,
        kind.block_bytes(),
    );
    let head = bs - kind.qbytes();
    let q5 = kind.five();
    for (b, blk) in row.chunks_exact(bs).enumerate() {
        let sc = &mut p.scales[b * per..(b + 1) * per];
        sc[lane] = u16::from_le_bytes([blk[0], blk[1]]);
        if per == 2 * G {
            sc[G + lane] = u16::from_le_bytes([blk[2], blk[3]]);
        }
        if q5 {
            let qh = &blk[head - 4..head];
            let h = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]) as u64;
            for t in 0..8 {
                let (c, high) = (t / 2, t % 2);
                p.hi[b * 8 + t] |= ((h >> (16 * high + 4 * c)) & 0xf) << (4 * lane);
            }
        }
        let dst = &mut p.q[b * qb..(b + 1) * qb];
        for (c, w) in blk[head..].chunks_exact(4).enumerate() {
            let o = &mut dst[c * 64 + 4 * lane..c * 64 + 4 * lane + 4];
            if kind == QKind::Q8_0 {
                let x = u32::from_le_bytes([w[0], w[1], w[2], w[3]]) ^ 0x8080_8080;
                o.copy_from_slice(&x.to_le_bytes());
            } else {
                o.copy_from_slice(w);
            }
        }
    }
}

/// One row's block as values: `w = d * v + m`, `v` unsigned (0..15, 0..31, `q + 128`, or
/// Iq4's level + 128).
struct RowBlock {
    /// The block's f16 scales as [`QMatrix::scales`] holds them, the first
    /// [`QKind::scales_per_block`] used: `d`; then Q4_1's and Q5_1's `m`, or Q6's scale of
    /// elements 16..32 (`d` is that of 0..16). Q2_16 and Q3_16: `[sub-scale word, d, dmin,
    /// 0]` (`d` and `dmin` their super-block's). The other kinds' offset follows from `d`.
    sc: [u16; 4],
    v: [u8; QK],
}

/// [`QMatrix::group_vnni`]'s handling of a block: one dot product per activation and one
/// scale, or a dot product per half with Q6's scales, or with Q2_16's / Q3_16's scales and
/// minimums.
const WHOLE: u8 = 0;
const HALVES_Q6: u8 = 1;
const HALVES_MIN: u8 = 2;

/// Word (4 elements) of a block's activations each unpacked weight vector multiplies.
const WORD_PACKED: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];
const WORD_Q8: [usize; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

#[cfg(test)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

impl QMatrix {
    /// A matrix of `kind` whose groups `fill(g, planes)` writes, group by group in parallel,
    /// in place (loading prepares every weight this way; building each group apart and then
    /// joining them held a second copy of the largest weight, the LM head, at the peak).
    fn planes(
        kind: QKind,
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, GroupPlanes) + Sync,
    ) -> QMatrix {
        let nb = cols / QK;
        let groups = rows.div_ceil(G);
        let (qb, per) = (kind.qbytes() * G, kind.scales_per_block() * G);
        // Q5_0's fifth bits and Q6's bit pairs; one unused element a group for the other
        // kinds (parallel chunks need a size), dropped after.
        let (q5, q6, k16) = (kind.plane_bit() != 0, kind == QKind::Q6, kind.two_bit());
        let (hw, h2w) = (if q5 { nb * 8 } else { 1 }, if q6 { nb * 128 } else { 1 });
        let sw = if k16 { nb.div_ceil(8) * 2 * G } else { 1 };
        let mut scales = vec![0u16; groups * nb * per];
        let mut sup = vec![0u16; groups * sw];
        let mut q = vec![0u8; groups * nb * qb];
        let mut hi = vec![0u64; groups * hw];
        let mut hi2 = vec![0u8; groups * h2w];
        if nb > 0 {
            q.par_chunks_mut(nb * qb)
                .zip(scales.par_chunks_mut(nb * per))
                .zip(sup.par_chunks_mut(sw))
                .zip(hi.par_chunks_mut(hw))
                .zip(hi2.par_chunks_mut(h2w))
                .enumerate()
                .for_each(|(g, ((((q, scales), sup), hi), hi2))| {
                    fill(
                        g,
                        GroupPlanes {
                            scales,
                            sup,
                            q,
                            hi,
                            hi2,
                        },
                    )
                });
        }
        if !k16 {
            sup = vec![];
        }
        if !q5 {
            hi = vec![];
        }
        if !q6 {
            hi2 = vec![];
        }
        QMatrix {
            kind,
            rows,
            cols,
            scales,
            sup,
            q,
            hi,
            hi2,
        }
    }

    /// Lays out `rows x cols / 32` row blocks (`block(r, b)`) in the kernel's groups.
    fn pack(
        kind: QKind,
        rows: usize,
        cols: usize,
        block: impl Fn(usize, usize) -> RowBlock + Sync,
    ) -> QMatrix {
        let nb = cols / QK;
        let (qb, per) = (kind.qbytes() * G, kind.scales_per_block() * G);
        QMatrix::planes(kind, rows, cols, |g, p| {
            for r in g * G..(g * G + G).min(rows) {
                let lane = r % G;
                for b in 0..nb {
                    let rb = block(r, b);
                    for k in 0..per / G {
                        p.scales[b * per + k * G + lane] = rb.sc[k];
                    }
                    if kind.two_bit() {
                        let at = (b / 8) * 2 * G + lane;
                        (p.sup[at], p.sup[at + G]) = (rb.sc[1], rb.sc[2]);
                    }
                    let dst = &mut p.q[b * qb..(b + 1) * qb];
                    // Byte i of unpacked vector t (elements 4c..4c + 4 of the low half for
                    // t = 2c, of the high half for t = 2c + 1).
                    let el = |t: usize, i: usize| rb.v[16 * (t % 2) + 4 * (t / 2) + i];
                    // A plane of bit pairs: chunk t / 4's byte 4 lane + i holds vector t's at
                    // bits 2 (t % 4) (Q2_16's values, Q6's high pairs).
                    let pairs = |plane: &mut [u8], shift: u32| {
                        for ch in 0..2 {
                            for i in 0..4 {
                                let mut byte = 0u8;
                                for u in 0..4 {
                                    byte |= ((el(4 * ch + u, i) >> shift) & 3) << (2 * u);
                                }
                                plane[ch * 64 + 4 * lane + i] = byte;
                            }
                        }
                    };
                    if kind.two_bit() {
                        pairs(dst, 0);
                    } else if kind == QKind::Iq4 {
                        // Back from levels to their nibbles.
                        let nib =
                            |v: u8| IQ4_UNSIGNED.iter().position(|&l| l == v).unwrap_or(0) as u8;
                        for e in 0..16 {
                            let (c, i) = (e / 4, e % 4);
                            dst[c * 64 + 4 * lane + i] = nib(rb.v[e]) | (nib(rb.v[e + 16]) << 4);
                        }
                    } else if kind.packed() {
                        for e in 0..16 {
                            let (c, i) = (e / 4, e % 4);
                            dst[c * 64 + 4 * lane + i] =
                                (rb.v[e] & 15) | ((rb.v[e + 16] & 15) << 4);
                        }
                    } else {
                        for e in 0..QK {
                            dst[(e / 4) * 64 + 4 * lane + e % 4] = rb.v[e];
                        }
                    }
                    let bit = kind.plane_bit();
                    if bit != 0 {
                        for t in 0..8 {
                            let nib =
                                (0..4).fold(0u64, |m, i| m | (((el(t, i) & bit != 0) as u64) << i));
                            p.hi[b * 8 + t] |= nib << (4 * lane);
                        }
                    }
                    if kind == QKind::Q6 {
                        pairs(&mut p.hi2[b * 128..(b + 1) * 128], 4);
                    }
                }
            }
        })
    }

    /// [`QMatrix::pack`] of Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and IQ4_NL GGUF blocks by whole
    /// 4-byte words ([`place_row`]).
    fn pack_words(kind: QKind, bytes: &[u8], rows: usize, cols: usize) -> QMatrix {
        let row_bytes = cols / QK * kind.block_bytes();
        QMatrix::rows_as(kind, rows, cols, |r, buf| {
            buf.extend_from_slice(&bytes[r * row_bytes..(r + 1) * row_bytes])
        })
    }

    /// A matrix of `kind` whose row `r` `conv(r, buf)` writes as GGUF blocks of `kind` into
    /// the (cleared) `buf`: converted and laid out in the groups in one pass, group by group
    /// in parallel, with no whole-matrix copy between (loading prepares every weight this
    /// way, and an expert left on disk at each miss).
    fn rows_as(
        kind: QKind,
        rows: usize,
        cols: usize,
        conv: impl Fn(usize, &mut Vec<u8>) + Sync,
    ) -> QMatrix {
        let row_bytes = cols / QK * kind.block_bytes();
        QMatrix::planes(kind, rows, cols, |g, mut p| {
            let mut buf = Vec::with_capacity(row_bytes);
            for r in g * G..(g * G + G).min(rows) {
                buf.clear();
                conv(r, &mut buf);
                debug_assert_eq!(buf.len(), row_bytes);
                place_row(kind, &buf, r % G, &mut p);
            }
        })
    }

    /// Row `r`'s block `b` read back from the groups.
    fn row_block(&self, r: usize, b: usize) -> RowBlock {
        let (g, lane) = (r / G, r % G);
        let blk = g * self.nb() + b;
        let (qb, per) = (self.kind.qbytes() * G, self.kind.scales_per_block() * G);
        let src = &self.q[blk * qb..(blk + 1) * qb];
        let mut v = [0u8; QK];
        if self.kind.two_bit() {
            for (e, o) in v.iter_mut().enumerate() {
                let (c, i, high) = ((e % 16) / 4, e % 4, e >= 16);
                let t = 2 * c + high as usize;
                *o = (src[(t / 4) * 64 + 4 * lane + i] >> (2 * (t % 4))) & 3;
            }
        } else if self.kind.packed() {
            for e in 0..16 {
                let byte = src[(e / 4) * 64 + 4 * lane + e % 4];
                (v[e], v[e + 16]) = (byte & 15, byte >> 4);
            }
            if self.kind == QKind::Iq4 {
                for o in v.iter_mut() {
                    *o = IQ4_UNSIGNED[*o as usize];
                }
            }
        } else {
            for (e, o) in v.iter_mut().enumerate() {
                *o = src[(e / 4) * 64 + 4 * lane + e % 4];
            }
        }
        if self.kind.plane_bit() != 0 {
            for (e, o) in v.iter_mut().enumerate() {
                let (c, i, high) = ((e % 16) / 4, e % 4, e >= 16);
                let mask = self.hi[blk * 8 + 2 * c + high as usize];
                if (mask >> (4 * lane + i)) & 1 != 0 {
                    *o |= self.kind.plane_bit();
                }
            }
        }
        if self.kind == QKind::Q6 {
            for (e, o) in v.iter_mut().enumerate() {
                let (c, i, high) = ((e % 16) / 4, e % 4, e >= 16);
                let t = 2 * c + high as usize;
                let pair = self.hi2[blk * 128 + (t / 4) * 64 + 4 * lane + i] >> (2 * (t % 4));
                *o |= (pair & 3) << 4;
            }
        }
        let mut sc = [0u16; 4];
        for (k, o) in sc.iter_mut().enumerate().take(per / G) {
            *o = self.scales[blk * per + k * G + lane];
        }
        if self.kind.two_bit() {
            let at = (g * self.nb().div_ceil(8) + b / 8) * 2 * G + lane;
            (sc[1], sc[2]) = (self.sup[at], self.sup[at + G]);
        }
        RowBlock { sc, v }
    }

    /// From GGUF blocks: `rows` rows of `cols / 32` blocks each, row-major.
    pub fn from_gguf(
        kind: QKind,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<QMatrix, KernelError> {
        const OP: &str = "QMatrix::from_gguf";
        if matches!(kind, QKind::Q6 | QKind::Q2_16 | QKind::Q3_16) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!(
                    "{kind:?} is made from k-quant super-blocks (QMatrix::from_stored)"
                ),
            });
        }
        if !cols.is_multiple_of(QK) {
            return Err(KernelError::Unsupported {
                op: OP,
                reason: format!("{cols} columns are not whole blocks of {QK}"),
            });
        }
        let n = rows
            .checked_mul(cols / QK)
            .and_then(|n| n.checked_mul(kind.block_bytes()))
            .ok_or(KernelError::Unsupported {
                op: OP,
                reason: format!("{rows} x {cols} overflows"),
            })?;
        crate::attention::check_len(OP, "blocks", n, bytes.len())?;
        Ok(QMatrix::pack_words(kind, bytes, rows, cols))
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
        let mut bytes = vec![0u8; rows * cols / QK * 34];
        q8_blocks(w, &mut bytes);
        QMatrix::from_gguf(QKind::Q8_0, &bytes, rows, cols)
    }

    /// From a stored `[rows, cols]` matrix of any format, in the layout fastest for products
    /// of many rows (prompt chunks), each block format from its own values: Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q8_0 and IQ4_NL as they are; Q4_K and Q5_K as Q4_1 and Q5_1 blocks (each
    /// 32-element sub-block's `d sc` and `dmin m` rounded to f16: 0.625 and 0.75 bytes a
    /// weight); IQ4_XS as IQ4_NL blocks (`d (ls - 32)` rounded to f16); Q2_K and Q3_K as
    /// [`QKind::Q2_16`] and [`QKind::Q3_16`]; Q6_K as [`QKind::Q6`] (0.875 bytes a weight,
    /// its own 6-bit values); the floats quantised to Q8_0, row by row.
    ///
    /// (Q6_K tensors other than the LM head were once requantised to Q8_0, 1.06 bytes a
    /// weight, because Q6 made prompts ~13% slower: that was the half-block products keeping
    /// their accumulators in memory, since repaired; measured after, Q6 prompts are as fast.)
    pub fn from_stored(rows_in: StoredRows) -> Result<QMatrix, KernelError> {
        let (rows, cols) = (rows_in.rows, rows_in.cols);
        let direct = |k| QMatrix::from_gguf(k, rows_in.bytes, rows, cols);
        match rows_in.format {
            Format::Q4_0 => direct(QKind::Q4_0),
            Format::Q4_1 => direct(QKind::Q4_1),
            Format::Q5_0 => direct(QKind::Q5_0),
            Format::Q8_0 => direct(QKind::Q8_0),
            Format::Q5_1 => direct(QKind::Q5_1),
            Format::IQ4_NL => direct(QKind::Iq4),
            Format::Q4_K => Ok(super_blocks_as(&rows_in, QKind::Q4_1, q4_k_as_q4_1)),
            Format::Q5_K => Ok(super_blocks_as(&rows_in, QKind::Q5_1, q5_k_as_q5_1)),
            Format::IQ4_XS => Ok(super_blocks_as(&rows_in, QKind::Iq4, iq4_xs_as_iq4_nl)),
            Format::Q2_K | Format::Q3_K => Ok(k16_as_half_blocks(&rows_in)),
            Format::Q6_K => Ok(q6_k_as_q6(&rows_in)),
            _ => {
                if !cols.is_multiple_of(QK) {
                    return Err(KernelError::Unsupported {
                        op: "QMatrix::from_stored",
                        reason: format!("{cols} columns are not whole blocks of {QK}"),
                    });
                }
                let row_bytes = cols / QK * QKind::Q8_0.block_bytes();
                // A group's rows through one f32 row and one row of blocks (a buffer a row
                // was ~5% of making a bf16 file's copies: its allocation and zeroing).
                Ok(QMatrix::planes(QKind::Q8_0, rows, cols, |g, mut p| {
                    let (mut row, mut buf) = (vec![0f32; cols], vec![0u8; row_bytes]);
                    for r in g * G..(g * G + G).min(rows) {
                        rows_in.dequantize_row(r, &mut row);
                        q8_blocks(&row, &mut buf);
                        place_row(QKind::Q8_0, &buf, r % G, &mut p);
                    }
                }))
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
        let rows = parts.iter().map(|p| p.rows).sum();
        if parts.iter().all(|p| p.rows.is_multiple_of(G)) {
            // Whole groups: the parts' groups one after the other.
            // Slices appended whole (a routed expert is stacked on every miss under an
            // expert budget; element by element costs 15% of such a run).
            fn joined<T: Copy>(parts: &[&QMatrix], plane: impl Fn(&QMatrix) -> &[T]) -> Vec<T> {
                let mut v = Vec::with_capacity(parts.iter().map(|p| plane(p).len()).sum());
                for p in parts {
                    v.extend_from_slice(plane(p));
                }
                v
            }
            return Ok(QMatrix {
                kind: first.kind,
                rows,
                cols: first.cols,
                scales: joined(parts, |p| &p.scales),
                sup: joined(parts, |p| &p.sup),
                q: joined(parts, |p| &p.q),
                hi: joined(parts, |p| &p.hi),
                hi2: joined(parts, |p| &p.hi2),
            });
        }
        let mut at = Vec::with_capacity(rows);
        for (i, p) in parts.iter().enumerate() {
            at.extend((0..p.rows).map(|r| (i, r)));
        }
        Ok(QMatrix::pack(first.kind, rows, first.cols, |r, b| {
            let (i, pr) = at[r];
            parts[i].row_block(pr, b)
        }))
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

    /// Bytes a product streams (the last group's padding rows included).
    pub fn bytes(&self) -> usize {
        self.q.len() + 2 * (self.scales.len() + self.sup.len()) + 8 * self.hi.len() + self.hi2.len()
    }

    fn nb(&self) -> usize {
        self.cols / QK
    }

    /// Scale and offset of element `e` of a row's block: `w = scale v + offset`.
    fn params(&self, rb: &RowBlock, e: usize) -> (f32, f32) {
        let f = |k: usize| f16::from_bits(rb.sc[k]).to_f32();
        let h = e / 16;
        match self.kind {
            QKind::Q4_1 | QKind::Q5_1 => (f(0), f(1)),
            QKind::Q6 => (f(h), -32.0 * f(h)),
            QKind::Q2_16 => {
                let sub = (rb.sc[0] >> (8 * h)) as u8;
                (f(1) * (sub & 15) as f32, -f(2) * (sub >> 4) as f32)
            }
            QKind::Q3_16 => {
                let d = f(1) * (((rb.sc[0] >> (8 * h)) & 0xff) as i32 - 32) as f32;
                (d, -4.0 * d)
            }
            k => (f(0), k.offset() * f(0)),
        }
    }

    /// Weight `(r, c)` as the product uses it.
    pub fn get(&self, r: usize, c: usize) -> f32 {
        let rb = self.row_block(r, c / QK);
        let (d, m) = self.params(&rb, c % QK);
        d * rb.v[c % QK] as f32 + m
    }

    /// `y[rows] = W . x` for one activation vector `x[cols]`, x quantised to int8 per block.
    pub fn gemv(&self, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        const OP: &str = "QMatrix::gemv";
        crate::attention::check_len(OP, "x", self.cols, x.len())?;
        crate::attention::check_len(OP, "y", self.rows, y.len())?;
        let act = Act::quantize(x);
        let vnni = vnni_available();
        let mut tiles = take_tiles();
        if vnni {
            if tiles.is_empty() {
                tiles.push(Tile::default());
            }
            tiles[0].pack(&[&act], self.kind.words());
        }
        let tile = &tiles[..tiles.len().min(1)];
        // About four chunks a thread (at least 64 rows, whole groups): enough to balance,
        // few enough that scheduling stays small beside a product of a few microseconds.
        let threads = rayon::current_num_threads().max(1);
        let rows_per = self.rows.div_ceil(4 * threads).next_multiple_of(G).max(64);
        y.par_chunks_mut(rows_per).enumerate().for_each(|(c, yc)| {
            let r0 = c * rows_per;
            #[cfg(target_arch = "x86_64")]
            if vnni {
                // SAFETY: VNNI checked at run time; r0 starts a group, rows r0..r0 +
                // yc.len() exist.
                unsafe { self.rows_vnni(tile, r0, yc.len(), yc.as_mut_ptr(), 0) };
                return;
            } else if avx2::available() {
                // SAFETY: as above, AVX2 checked at run time.
                unsafe { self.rows_avx2(&[&act], r0, yc.len(), yc.as_mut_ptr(), 0) };
                return;
            }
            let _ = vnni;
            self.rows_portable(&act, r0, yc);
        });
        give_tiles(tiles);
        Ok(())
    }

    /// `y[m, rows] = x[m, cols] . W^T` for several activation rows (a batched decode step, a
    /// prompt chunk): each activation quantised to int8 per block as in [`QMatrix::gemv`].
    /// The rows are cut into chunks of whole groups small enough to stay in L2 while every
    /// activation passes over them, and each group's blocks are unpacked once per eight
    /// activations, so the weights stream from memory once per call.
    pub fn gemm(&self, x: &[f32], m: usize, y: &mut [f32]) -> Result<(), KernelError> {
        const OP: &str = "QMatrix::gemm";
        crate::attention::check_len(OP, "x", m * self.cols, x.len())?;
        crate::attention::check_len(OP, "y", m * self.rows, y.len())?;
        if m <= 1 {
            return if m == 1 { self.gemv(x, y) } else { Ok(()) };
        }
        // The quantised rows go in this thread's pool, kept between products (a fresh pool
        // if the thread re-enters here while waiting on its own parallel loop).
        ACTS.with(|pool| match pool.try_borrow_mut() {
            Ok(mut p) => self.gemm_in(&mut p, x, m, y),
            Err(_) => self.gemm_in(&mut Vec::new(), x, m, y),
        })
    }

    /// [`QMatrix::gemm`] for m >= 2, its rows quantised into `pool`.
    fn gemm_in(
        &self,
        pool: &mut Vec<Act>,
        x: &[f32],
        m: usize,
        y: &mut [f32],
    ) -> Result<(), KernelError> {
        if pool.len() < m {
            pool.resize_with(m, Act::default);
        }
        let acts = &mut pool[..m];
        // A decode step's few rows are quantised and packed on this thread: each parallel
        // loop costs the other workers a wake-up and a join (a 16-sequence step ran ~420 of
        // them, ~10% of its time idle in the scheduler), more than these microseconds.
        let small = m * self.cols <= SERIAL_ELEMS;
        if small {
            for (a, x) in acts.iter_mut().zip(x.chunks_exact(self.cols)) {
                a.quantize_into(x);
            }
        } else {
            acts.par_iter_mut()
                .zip(x.par_chunks_exact(self.cols))
                .for_each(|(a, x)| a.quantize_into(x));
        }
        let acts = &*acts;
        let vnni = vnni_available();
        #[cfg(target_arch = "x86_64")]
        let avx2 = !vnni && avx2::available();
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        if !vnni && !avx2 {
            y.par_chunks_mut(self.rows)
                .zip(acts)
                .for_each(|(yr, act)| self.rows_portable(act, 0, yr));
            return Ok(());
        }
        let acts: Vec<&Act> = acts.iter().collect();
        // The VNNI kernel's tiles (none for the others), from the pool.
        let n_tiles = if vnni { m.div_ceil(TILE) } else { 0 };
        let mut tiles = if vnni { take_tiles() } else { Vec::new() };
        if tiles.len() < n_tiles {
            tiles.resize_with(n_tiles, Tile::default);
        }
        let words = self.kind.words();
        if small {
            for (t, a) in tiles[..n_tiles].iter_mut().zip(acts.chunks(TILE)) {
                t.pack(a, words);
            }
        } else {
            tiles[..n_tiles]
                .par_iter_mut()
                .zip(acts.par_chunks(TILE))
                .for_each(|(t, a)| t.pack(a, words));
        }
        let tiles_in = &tiles[..n_tiles];
        // At least four chunks a thread; at most 64 rows (64 x 1536 4-bit weights: ~60 KB).
        let threads = rayon::current_num_threads().max(1);
        let rows_per = self
            .rows
            .div_ceil(4 * threads)
            .next_multiple_of(G)
            .clamp(G, 64);
        let out = SendPtr(y.as_mut_ptr());
        (0..self.rows.div_ceil(rows_per))
            .into_par_iter()
            .for_each(|c| {
                let r0 = c * rows_per;
                let len = rows_per.min(self.rows - r0);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: VNNI or AVX2 checked above; r0 starts a group, rows r0..r0 + len
                // exist, and the chunks write disjoint columns r0..r0 + len of y's m rows
                // (checked to be m x rows long).
                unsafe {
                    if vnni {
                        self.rows_vnni(tiles_in, r0, len, out.at(r0), self.rows)
                    } else {
                        self.rows_avx2(&acts, r0, len, out.at(r0), self.rows)
                    }
                };
            });
        if vnni {
            give_tiles(tiles);
        }
        Ok(())
    }

    /// Row `r`'s block `b` times the activations' block `b`, in scalar code: per half,
    /// `scale s sum(v a) + offset s sum(a)`.
    fn block_product(&self, act: &Act, r: usize, b: usize) -> f32 {
        let rb = self.row_block(r, b);
        let a = &act.a[b * QK..(b + 1) * QK];
        (0..2)
            .map(|h| {
                let (d, m) = self.params(&rb, 16 * h);
                let (dot, sum) = (16 * h..16 * h + 16).fold((0i32, 0i32), |(d, s), j| {
                    (d + rb.v[j] as i32 * a[j] as i32, s + a[j] as i32)
                });
                d * act.s[b] * dot as f32 + m * act.s[b] * sum as f32
            })
            .sum()
    }

    fn rows_portable(&self, act: &Act, r0: usize, y: &mut [f32]) {
        for (i, out) in y.iter_mut().enumerate() {
            *out = (0..self.nb())
                .map(|b| self.block_product(act, r0 + i, b))
                .sum();
        }
    }

    /// Rows `r0..r0 + len` (`r0` a group's first) times every activation of `tiles`: row
    /// `r0 + i`'s product with activation `j` (row `j % 8` of tile `j / 8`; every tile but the
    /// last is full) goes to `y[j * stride + i]`. Activations in panels of 64 (their int8
    /// rows stay in L2 while the rows' groups pass), one tile of eight at a time per group.
    ///
    /// # Safety
    /// VNNI present; the tiles packed for this matrix's kind and columns; `y` valid for writes
    /// at `j * stride + i` for every activation `j` and `i < len`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")]
    unsafe fn rows_vnni(&self, tiles: &[Tile], r0: usize, len: usize, y: *mut f32, stride: usize) {
        debug_assert!(r0.is_multiple_of(G));
        const PANEL: usize = 64 / TILE;
        for (p, panel) in tiles.chunks(PANEL).enumerate() {
            let mut i = 0;
            while i < len {
                let lanes = (len - i).min(G);
                let g = (r0 + i) / G;
                for (t, tile) in panel.iter().enumerate() {
                    let out = y.add((p * PANEL + t) * TILE * stride + i);
                    match self.kind {
                        QKind::Q6 => self.tile_vnni::<HALVES_Q6>(tile, g, out, stride, lanes),
                        QKind::Q2_16 | QKind::Q3_16 => {
                            self.tile_vnni::<HALVES_MIN>(tile, g, out, stride, lanes)
                        }
                        _ => self.tile_vnni::<WHOLE>(tile, g, out, stride, lanes),
                    }
                }
                i += lanes;
            }
        }
    }

    /// [`QMatrix::group_vnni`] for a tile of 1 to 8 activations.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn tile_vnni<const H: u8>(
        &self,
        tile: &Tile,
        g: usize,
        out: *mut f32,
        stride: usize,
        lanes: usize,
    ) {
        match tile.rows {
            1 => self.group_vnni::<1, H>(tile, g, out, stride, lanes),
            2 => self.group_vnni::<2, H>(tile, g, out, stride, lanes),
            3 => self.group_vnni::<3, H>(tile, g, out, stride, lanes),
            4 => self.group_vnni::<4, H>(tile, g, out, stride, lanes),
            5 => self.group_vnni::<5, H>(tile, g, out, stride, lanes),
            6 => self.group_vnni::<6, H>(tile, g, out, stride, lanes),
            7 => self.group_vnni::<7, H>(tile, g, out, stride, lanes),
            _ => self.group_vnni::<8, H>(tile, g, out, stride, lanes),
        }
    }

    /// Group `g` (16 rows) times `J` activations: per block, the group's weights unpacked
    /// once into eight vectors of 16 rows x 4 weights, each times a broadcast word of each
    /// activation (`vpdpbusd`: unsigned weights, signed activations), then per activation
    /// `acc += d s dot + m ssum` on the 16 rows at once (`H` not [`WHOLE`]: per half of the
    /// block, with its own scale). The first `lanes` rows are stored, activation j's at
    /// `out + j * stride`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512dq,avx512vnni")]
    #[inline]
    unsafe fn group_vnni<const J: usize, const H: u8>(
        &self,
        tile: &Tile,
        g: usize,
        out: *mut f32,
        stride: usize,
        lanes: usize,
    ) {
        use std::arch::x86_64::*;
        let nb = self.nb();
        let kind = self.kind;
        let (qb, per) = (kind.qbytes() * G, kind.scales_per_block() * G);
        #[allow(non_snake_case)]
        let (Q6, Q16) = (H == HALVES_Q6, H == HALVES_MIN);
        let (packed, has_min, iq4) = (kind.packed(), kind.has_min(), kind == QKind::Iq4);
        let (two_bit, plane_bit) = (kind.two_bit(), kind.plane_bit());
        let (three, bit) = (_mm512_set1_epi8(3), _mm512_set1_epi8(plane_bit as i8));
        let levels = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_UNSIGNED.as_ptr().cast()));
        let low = _mm512_set1_epi8(0x0f);
        let low_i32 = _mm512_set1_epi32(0x0f);
        let offset = _mm512_set1_ps(kind.offset());
        let mut acc = [_mm512_setzero_ps(); J];
        debug_assert_eq!(tile.rows, J);
        debug_assert!(tile.w.len() >= nb * 8 * J && tile.hs.len() >= 2 * nb * J);
        let (tw, ts, tss, ths) = (
            tile.w.as_ptr(),
            tile.s.as_ptr(),
            tile.ss.as_ptr(),
            tile.hs.as_ptr(),
        );
        let pair_bits = _mm512_set1_epi8(0x30);
        let (qend, send) = (self.q.as_ptr_range().end, self.scales.as_ptr_range().end);
        for b in 0..nb {
            let blk = g * nb + b;
            let wp = self.q.as_ptr().add(blk * qb);
            let sp = self.scales.as_ptr().add(blk * per);
            // The weights PREFETCH bytes on, towards L1/L2 (within the matrix).
            let ahead = wp.wrapping_add(PREFETCH);
            if ahead < qend {
                for l in 0..qb / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(64 * l).cast());
                }
                let sa = sp.wrapping_add(PREFETCH / qb * per);
                if sa < send {
                    _mm_prefetch::<_MM_HINT_T0>(sa.cast());
                }
            }
            let mut w = [_mm512_setzero_si512(); 8];
            if two_bit {
                // Vector t's values are bits 2 (t % 4).. of chunk t / 4's bytes.
                let l = [
                    _mm512_loadu_si512(wp.cast()),
                    _mm512_loadu_si512(wp.add(64).cast()),
                ];
                for (t, wt) in w.iter_mut().enumerate() {
                    let v = l[t / 4];
                    let at = match t % 4 {
                        0 => v,
                        1 => _mm512_srli_epi16::<2>(v),
                        2 => _mm512_srli_epi16::<4>(v),
                        _ => _mm512_srli_epi16::<6>(v),
                    };
                    *wt = _mm512_and_si512(at, three);
                }
            } else if packed {
                for c in 0..4 {
                    let l = _mm512_loadu_si512(wp.add(64 * c).cast());
                    w[2 * c] = _mm512_and_si512(l, low);
                    w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16::<4>(l), low);
                }
                if iq4 {
                    for wt in w.iter_mut() {
                        *wt = _mm512_shuffle_epi8(levels, *wt);
                    }
                }
                if Q6 {
                    // Each vector's high bit pairs to bits 4..6 of its bytes.
                    let hp = self.hi2.as_ptr().add(blk * 128);
                    let h = [
                        _mm512_loadu_si512(hp.cast()),
                        _mm512_loadu_si512(hp.add(64).cast()),
                    ];
                    for (t, wt) in w.iter_mut().enumerate() {
                        let v = h[t / 4];
                        let at = match t % 4 {
                            0 => _mm512_slli_epi16::<4>(v),
                            1 => _mm512_slli_epi16::<2>(v),
                            2 => v,
                            _ => _mm512_srli_epi16::<2>(v),
                        };
                        *wt = _mm512_or_si512(*wt, _mm512_and_si512(at, pair_bits));
                    }
                }
            } else {
                for (c, wt) in w.iter_mut().enumerate() {
                    *wt = _mm512_loadu_si512(wp.add(64 * c).cast());
                }
            }
            if plane_bit != 0 {
                // Q5's fifth bits, Q3_16's third: one 64-bit byte mask per vector.
                let h = self.hi.as_ptr().add(blk * 8);
                for (t, wt) in w.iter_mut().enumerate() {
                    *wt = _mm512_or_si512(*wt, _mm512_maskz_mov_epi8(*h.add(t), bit));
                }
            }
            // Q2_16 and Q3_16: per half, `d` and `m` from the sub-scale bytes and the
            // super-block's `d` (and `dmin`); `dv` and `mv` the halves' scales, `m16` their
            // minimums.
            let (dv, mv, m16) = if Q16 {
                let su = self.sup.as_ptr().add((g * nb.div_ceil(8) + b / 8) * 2 * G);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(su.cast()));
                let words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(sp.cast()));
                let byte = [
                    _mm512_and_si512(words, _mm512_set1_epi32(0xff)),
                    _mm512_srli_epi32::<8>(words),
                ];
                if plane_bit != 0 {
                    // Q3_16: d (sc - 32), and -4 times it.
                    let off = _mm512_set1_epi32(32);
                    let dh = byte
                        .map(|x| _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(x, off))));
                    let m4 = _mm512_set1_ps(-4.0);
                    (
                        dh[0],
                        dh[1],
                        [_mm512_mul_ps(dh[0], m4), _mm512_mul_ps(dh[1], m4)],
                    )
                } else {
                    // Q2_16: d (sc & 15), -dmin (sc >> 4).
                    let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(su.add(G).cast()));
                    let neg = _mm512_sub_ps(_mm512_setzero_ps(), dmin);
                    let dh = byte.map(|x| {
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(x, low_i32)))
                    });
                    let mh = byte
                        .map(|x| _mm512_mul_ps(neg, _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(x))));
                    (dh[0], dh[1], mh)
                }
            } else {
                let dv = _mm512_cvtph_ps(_mm256_loadu_si256(sp.cast()));
                let mv = if has_min || Q6 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(G).cast()))
                } else {
                    _mm512_mul_ps(dv, offset)
                };
                (dv, mv, [_mm512_setzero_ps(); 2])
            };
            // Q6, Q2_16, Q3_16: elements 0..16 (even vectors) and 16..32 (odd) apart, for their
            // scales.
            let mut dot = [_mm512_setzero_si512(); J];
            let mut dot_hi = [_mm512_setzero_si512(); J];
            let word = |j: usize, t: usize| _mm512_set1_epi32(*tw.add((b * 8 + t) * J + j));
            let s = |j: usize| *ts.add(b * J + j);
            let hs = |j: usize, h: usize| *ths.add((2 * b + h) * J + j);
            // Even and odd vectors in loops of their own: each accumulator is then known at
            // compile time (a choice per vector, in a loop the compiler does not unroll, put
            // the half-block kinds' accumulators in memory: 3.5x slower).
            for c in 0..4 {
                for (j, d) in dot.iter_mut().enumerate() {
                    *d = _mm512_dpbusd_epi32(*d, w[2 * c], word(j, 2 * c));
                }
                for j in 0..J {
                    let t = 2 * c + 1;
                    if H == WHOLE {
                        dot[j] = _mm512_dpbusd_epi32(dot[j], w[t], word(j, t));
                    } else {
                        dot_hi[j] = _mm512_dpbusd_epi32(dot_hi[j], w[t], word(j, t));
                    }
                }
            }
            if Q6 {
                // scale (sum(q a) - 32 sum(a)) per half, the offset exact in integers.
                for j in 0..J {
                    let sv = _mm512_set1_ps(s(j));
                    let off = |h: usize| _mm512_set1_epi32(32 * hs(j, h));
                    let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot[j], off(0)));
                    let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(dot_hi[j], off(1)));
                    acc[j] = _mm512_fmadd_ps(lo, _mm512_mul_ps(dv, sv), acc[j]);
                    acc[j] = _mm512_fmadd_ps(hi, _mm512_mul_ps(mv, sv), acc[j]);
                }
                continue;
            }
            if Q16 {
                // d_h s sum(v a) + m_h s sum(a) per half.
                let [m_lo, m_hi] = m16;
                for j in 0..J {
                    let sj = s(j);
                    let sv = _mm512_set1_ps(sj);
                    let lo = _mm512_cvtepi32_ps(dot[j]);
                    let hi = _mm512_cvtepi32_ps(dot_hi[j]);
                    let sum = |h: usize| _mm512_set1_ps(sj * hs(j, h) as f32);
                    acc[j] = _mm512_fmadd_ps(lo, _mm512_mul_ps(dv, sv), acc[j]);
                    acc[j] = _mm512_fmadd_ps(hi, _mm512_mul_ps(mv, sv), acc[j]);
                    acc[j] = _mm512_fmadd_ps(m_lo, sum(0), acc[j]);
                    acc[j] = _mm512_fmadd_ps(m_hi, sum(1), acc[j]);
                }
                continue;
            }
            for j in 0..J {
                let ds = _mm512_mul_ps(dv, _mm512_set1_ps(s(j)));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[j]), ds, acc[j]);
                acc[j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(*tss.add(b * J + j)), acc[j]);
            }
        }
        let mask: __mmask16 = if lanes >= G {
            0xffff
        } else {
            (1u16 << lanes) - 1
        };
        for (j, v) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(j * stride), mask, *v);
        }
    }
}

/// Q8_0 blocks of `w` (whole blocks of 32) into `out` (34 bytes a block): `d = amax / 127`
/// in f16, `q = round(w / d)`, halves away from zero (as `f32::round` and llama.cpp).
fn q8_blocks(w: &[f32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        // SAFETY: AVX-512 checked at run time (VNNI implies F and BW here).
        unsafe { q8_blocks_avx512(w, out) };
        return;
    }
    q8_blocks_scalar(w, out)
}

/// [`q8_blocks`] in scalar code (the definition the vector code matches bit for bit).
fn q8_blocks_scalar(w: &[f32], out: &mut [u8]) {
    for (blk, o) in w.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        // Branch-free, so these loops vectorise (`f32::max` and `all` would not).
        let (mut amax, mut finite) = (0f32, true);
        for x in blk {
            let a = x.abs();
            amax = if a > amax { a } else { amax };
            finite &= a < f32::INFINITY;
        }
        let Some(inv) = q8_scale(finite, amax, o) else {
            continue;
        };
        for (q, x) in o[2..].iter_mut().zip(blk) {
            *q = round_away(x * inv) as i8 as u8;
        }
    }
}

/// A Q8_0 block's scale `amax / 127` in f16 into `o`'s first two bytes, and its inverse;
/// `None` (the scale NaN, the values 0) for a block with a NaN or infinite weight, so every
/// product reading it is NaN (and the forward pass stops there) instead of the weight
/// rounding to 0.
fn q8_scale(finite: bool, amax: f32, o: &mut [u8]) -> Option<f32> {
    if !finite {
        o[..2].copy_from_slice(&f16::NAN.to_le_bytes());
        o[2..].fill(0);
        return None;
    }
    let d = f16::from_f32(amax / 127.0);
    o[..2].copy_from_slice(&d.to_le_bytes());
    Some(if d.to_f32() > 0.0 {
        1.0 / d.to_f32()
    } else {
        0.0
    })
}

/// `v.round().clamp(-127, 127)` for a finite `v` without a call to `roundf`, so the loop
/// vectorises: the truncation is exact below 2^23, and so is the fraction left.
#[inline(always)]
fn round_away(v: f32) -> i32 {
    let v = if v < -127.0 { -127.0 } else { v };
    let v = if v > 127.0 { 127.0 } else { v };
    // SAFETY: finite (the caller's) and within i32 after the clamp.
    let t = unsafe { v.to_int_unchecked::<i32>() };
    let f = v - t as f32;
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// [`q8_blocks_scalar`] 32 weights at a time, to the same bits (an expert brought in from
/// disk, or a bf16 weight made into a fast-path copy, spent a third of its time here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,f16c")]
unsafe fn q8_blocks_avx512(w: &[f32], out: &mut [u8]) {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_epi32(1));
    for (blk, o) in w.chunks_exact(QK).zip(out.chunks_exact_mut(34)) {
        let v = [
            _mm512_loadu_ps(blk.as_ptr()),
            _mm512_loadu_ps(blk.as_ptr().add(16)),
        ];
        let a = v.map(|x| _mm512_abs_ps(x));
        let inf = _mm512_set1_ps(f32::INFINITY);
        // Every |x| < inf is false for a NaN or an infinity.
        let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a[0], inf)
            & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a[1], inf);
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(a[0], a[1]));
        let Some(inv) = q8_scale(finite == 0xffff, amax, o) else {
            continue;
        };
        let inv = _mm512_set1_ps(inv);
        for (h, x) in v.iter().enumerate() {
            // round_away: clamp, truncate, then one up or down from the exact remainder.
            let x = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(*x, inv), lo), hi);
            let t = _mm512_cvttps_epi32(x);
            let f = _mm512_sub_ps(x, _mm512_cvtepi32_ps(t));
            let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(f, half);
            let down =
                _mm512_cmp_ps_mask::<_CMP_LE_OQ>(f, _mm512_sub_ps(_mm512_setzero_ps(), half));
            let t = _mm512_mask_add_epi32(t, up, t, one);
            let t = _mm512_mask_sub_epi32(t, down, t, one);
            _mm_storeu_si128(
                o.as_mut_ptr().add(2 + 16 * h).cast(),
                _mm512_cvtepi32_epi8(t),
            );
        }
    }
}

/// A matrix of super-block rows as `kind`'s GGUF blocks, each super-block converted by
/// `conv` (rows in parallel: loading converts every weight), then laid out as they are.
fn super_blocks_as(rows_in: &StoredRows, kind: QKind, conv: fn(&[u8], &mut Vec<u8>)) -> QMatrix {
    let (rows, cols) = (rows_in.rows, rows_in.cols);
    let sb = rows_in.format.block_bytes();
    let row_bytes = sb * (cols / 256);
    // StoredRows checked the super-blocks, so the blocks made from them are whole.
    QMatrix::rows_as(kind, rows, cols, |r, buf| {
        for b in rows_in.bytes[r * row_bytes..(r + 1) * row_bytes].chunks_exact(sb) {
            conv(b, buf);
        }
    })
}

/// One Q4_K super-block as eight Q4_1 blocks: sub-block `s` is `x = (d sc_s) q - dmin m_s`,
/// so its Q4_1 scale is `d sc_s` and its minimum `-dmin m_s`; its nibbles are the low (even
/// `s`) or high (odd `s`) halves of 32 bytes, laid out again as Q4_1's (byte j: elements j
/// and j + 16).
fn q4_k_as_q4_1(sb: &[u8], out: &mut Vec<u8>) {
    k_as_blocks(sb, None, &sb[16..144], out)
}

/// One Q5_K super-block as eight Q5_1 blocks: Q4_K's conversion, and each element's fifth
/// bit (bit `s` of `qh[l]` for element l of sub-block s) to bit l of the block's `qh`.
fn q5_k_as_q5_1(sb: &[u8], out: &mut Vec<u8>) {
    k_as_blocks(sb, Some(&sb[16..48]), &sb[48..176], out)
}

/// Q4_K's or Q5_K's super-block (`d`, `dmin` and the packed scales first; fifth bits `qh`
/// for Q5_K; nibbles `qs`) as eight Q4_1 or Q5_1 blocks.
fn k_as_blocks(sb: &[u8], qh: Option<&[u8]>, qs: &[u8], out: &mut Vec<u8>) {
    let h = |i: usize| f16::from_le_bytes([sb[i], sb[i + 1]]).to_f32();
    let (d, dmin, sc) = (h(0), h(2), &sb[4..16]);
    for s in 0..8 {
        let (scale, min) = crate::formats::q4_k_sub_block(s, d, dmin, sc);
        out.extend_from_slice(&f16::from_f32(scale).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(-min).to_le_bytes());
        if let Some(qh) = qh {
            let bits = (0..32).fold(0u32, |m, l| m | ((((qh[l] >> s) & 1) as u32) << l));
            out.extend_from_slice(&bits.to_le_bytes());
        }
        // Byte j: element j's nibble low, j + 16's high; 16 bytes at once.
        let q = &qs[32 * (s / 2)..32 * (s / 2) + 32];
        let half = |h: usize| u128::from_le_bytes(q[16 * h..16 * h + 16].try_into().expect("16"));
        let (lo, hi) = (half(0), half(1));
        const LOW: u128 = u128::from_le_bytes([0x0f; 16]);
        let bytes = if s % 2 == 0 {
            (lo & LOW) | ((hi & LOW) << 4)
        } else {
            ((lo >> 4) & LOW) | (hi & !LOW)
        };
        out.extend_from_slice(&bytes.to_le_bytes());
    }
}

/// One IQ4_XS super-block as eight IQ4_NL blocks: block `ib`'s scale `d (ls - 32)`
/// (rounded to f16) and its 16 bytes of nibbles as they are.
fn iq4_xs_as_iq4_nl(sb: &[u8], out: &mut Vec<u8>) {
    let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
    let sh = u16::from_le_bytes([sb[2], sb[3]]) as i32;
    let (sl, qs) = (&sb[4..8], &sb[8..136]);
    for ib in 0..8 {
        let ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0x0f) as i32 | (((sh >> (2 * ib)) & 3) << 4);
        out.extend_from_slice(&f16::from_f32(d * (ls - 32) as f32).to_le_bytes());
        out.extend_from_slice(&qs[16 * ib..16 * ib + 16]);
    }
}

/// Q2_K and Q3_K super-blocks as [`QKind::Q2_16`] and [`QKind::Q3_16`] blocks, row by row
/// straight into the groups ([`place_k16_row`]: loading prepares every weight so, and an
/// expert left on disk at each miss; block by block through [`RowBlock`]s took ~60% of a
/// Q2_K MoE's decode under a small `--expert-budget`).
fn k16_as_half_blocks(rows_in: &StoredRows) -> QMatrix {
    let (rows, cols) = (rows_in.rows, rows_in.cols);
    let q3 = rows_in.format == Format::Q3_K;
    let kind = if q3 { QKind::Q3_16 } else { QKind::Q2_16 };
    let row_bytes = cols / 256 * rows_in.format.block_bytes();
    QMatrix::planes(kind, rows, cols, |g, mut p| {
        for r in g * G..(g * G + G).min(rows) {
            let row = &rows_in.bytes[r * row_bytes..(r + 1) * row_bytes];
            place_k16_row(q3, row, r % G, &mut p);
        }
    })
}

/// The little-endian `u32` at byte `at` of `b`.
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A block's 2-bit values (`v[w]`: elements `4w..4w + 4`, one a byte) as the two chunks of a
/// plane of bit pairs into lane `lane` of `dst`: chunk `h`'s byte `4 lane + i` holds at bits
/// `2u` element `16 (u % 2) + 8 h + 4 (u / 2) + i` (the unpacked vector `4h + u`'s byte `i`,
/// see [`QMatrix::pack`]). Q2_K's and Q3_K's values, Q6_K's high pairs.
fn place_pair_planes(v: &[u32; 8], lane: usize, dst: &mut [u8]) {
    for (h, w) in [[0, 4, 1, 5], [2, 6, 3, 7]].iter().enumerate() {
        let x = v[w[0]] | v[w[1]] << 2 | v[w[2]] << 4 | v[w[3]] << 6;
        dst[h * 64 + 4 * lane..h * 64 + 4 * lane + 4].copy_from_slice(&x.to_le_bytes());
    }
}

/// One row's Q2_K or Q3_K super-blocks into lane `lane` of its group. Element `32 bb + e` of
/// a super-block (block `bb` = `4n + j`, half `h = e / 16`) takes bits `2j..2j + 2` of
/// `qs[32n + e]` and the sub-scale `2 bb + h`; Q3_K's third bit is bit `4n + j` of
/// `hmask[e]`, unset meaning -4. Four elements at a time as the bytes of a `u32`: the plane
/// byte `4 lane + i` of chunk `ch` holds, at bits `2u`, element `16 (u % 2) + 8 ch + 4 (u /
/// 2) + i` (the unpacked vector `4 ch + u`'s byte `i`, see [`QMatrix::pack`]).
fn place_k16_row(q3: bool, row: &[u8], lane: usize, p: &mut GroupPlanes) {
    let sb_bytes = if q3 { Format::Q3_K } else { Format::Q2_K }.block_bytes();
    let qb = 8 * G;
    for (s, sb) in row.chunks_exact(sb_bytes).enumerate() {
        let (qs, subs, d, dmin) = if q3 {
            let sc = crate::formats::q3_k_scales(&sb[96..108]);
            (&sb[32..96], sc, [sb[108], sb[109]], 0u16)
        } else {
            let mut sc = [0u8; 16];
            sc.copy_from_slice(&sb[0..16]);
            (
                &sb[16..80],
                sc,
                [sb[80], sb[81]],
                u16::from_le_bytes([sb[82], sb[83]]),
            )
        };
        let at = s * 2 * G + lane;
        (p.sup[at], p.sup[at + G]) = (u16::from_le_bytes(d), dmin);
        for bb in 0..8 {
            let (n, j) = (bb / 4, bb % 4);
            let b = 8 * s + bb;
            p.scales[b * G + lane] = subs[2 * bb] as u16 | (subs[2 * bb + 1] as u16) << 8;
            // Elements 4k..4k + 4 of the block, one a byte.
            let v: [u32; 8] =
                std::array::from_fn(|k| (u32_at(qs, 32 * n + 4 * k) >> (2 * j)) & 0x0303_0303);
            let dst = &mut p.q[b * qb..(b + 1) * qb];
            place_pair_planes(&v, lane, dst);
            if q3 {
                // Third bits: vector t's byte i is element 16 (t % 2) + 4 (t / 2) + i.
                let hm = &sb[0..32];
                for t in 0..8 {
                    let e0 = 16 * (t % 2) + 4 * (t / 2);
                    let nib = (0..4).fold(0u64, |m, i| {
                        m | ((((hm[e0 + i] >> (4 * n + j)) & 1) as u64) << i)
                    });
                    p.hi[b * 8 + t] |= nib << (4 * lane);
                }
            }
        }
    }
}

/// Q6_K super-blocks (256 weights: `ql` nibbles, `qh` bit pairs, 16 int8 scales, f16 `d`)
/// as Q6 blocks: element `128n + 32k + l` of a super-block is `d sc[8n + 2k + l / 16] (q -
/// 32)`, so 32-weight block `4n + k` has the scales `d sc[2(4n + k)]`, `d sc[2(4n + k) + 1]`
/// (rounded to f16) and the same 6-bit `q`. Row by row straight into the groups, four
/// elements a word (block by block through [`RowBlock`]s took ~15% of a Q4_K_M MoE's
/// decode under a small `--expert-budget`: its experts' down projections are Q6_K).
fn q6_k_as_q6(rows_in: &StoredRows) -> QMatrix {
    let (rows, cols) = (rows_in.rows, rows_in.cols);
    let row_bytes = cols / 256 * Format::Q6_K.block_bytes();
    QMatrix::planes(QKind::Q6, rows, cols, |g, mut p| {
        for r in g * G..(g * G + G).min(rows) {
            let row = &rows_in.bytes[r * row_bytes..(r + 1) * row_bytes];
            place_q6_row(row, r % G, &mut p);
        }
    })
}

/// One row's Q6_K super-blocks into lane `lane` of its group: the low nibbles as the packed
/// kinds hold them (chunk `c`'s byte `4 lane + i`: elements `4c + i` and `16 + 4c + i`), the
/// high bit pairs as [`QMatrix::hi2`] does (chunk `h`'s byte `4 lane + i` holds at bits `2u`
/// the pair of element `16 (u % 2) + 8 h + 4 (u / 2) + i`).
fn place_q6_row(row: &[u8], lane: usize, p: &mut GroupPlanes) {
    let (qb, per) = (16 * G, 2 * G);
    for (s, sb) in row.chunks_exact(Format::Q6_K.block_bytes()).enumerate() {
        let d = f16::from_le_bytes([sb[208], sb[209]]).to_f32();
        for bb in 0..8 {
            let (n, k) = (bb / 4, bb % 4);
            let b = 8 * s + bb;
            let scale = |h: usize| f16::from_f32(d * sb[192 + 2 * bb + h] as i8 as f32).to_bits();
            (p.scales[b * per + lane], p.scales[b * per + G + lane]) = (scale(0), scale(1));
            // Elements 4w..4w + 4 of the block, one a byte: low nibbles and high pairs.
            let (ql, qh) = (64 * n + 32 * (k % 2), 128 + 32 * n);
            let lo: [u32; 8] =
                std::array::from_fn(|w| (u32_at(sb, ql + 4 * w) >> (4 * (k / 2))) & 0x0f0f_0f0f);
            let hi: [u32; 8] =
                std::array::from_fn(|w| (u32_at(sb, qh + 4 * w) >> (2 * k)) & 0x0303_0303);
            let dst = &mut p.q[b * qb..(b + 1) * qb];
            for c in 0..4 {
                let x = lo[c] | lo[4 + c] << 4;
                dst[c * 64 + 4 * lane..c * 64 + 4 * lane + 4].copy_from_slice(&x.to_le_bytes());
            }
            let dst = &mut p.hi2[b * 128..(b + 1) * 128];
            place_pair_planes(&hi, lane, dst);
        }
    }
}

/// y's base pointer shared by the chunks of a product, which write disjoint parts of it.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for writes to disjoint elements, each by one task, within one call.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Activations quantised per block of 32: `x ~ s[b] * a`, with `ssum[b] = s[b] * sum(a)`.
#[derive(Default)]
struct Act {
    a: Vec<i8>,
    s: Vec<f32>,
    ssum: Vec<f32>,
    /// Per block, `sum(a)` of elements 0..16 and 16..32 (Q6's scale per half).
    hsum: Vec<i32>,
}

thread_local! {
    /// Each calling thread's quantised activation rows, reused by every product.
    static ACTS: std::cell::RefCell<Vec<Act>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Sets of tiles kept between products, one taken by each product running (so their memory
/// follows how many products run at once, not which thread runs the next one).
static TILE_SETS: std::sync::Mutex<Vec<Vec<Tile>>> = std::sync::Mutex::new(Vec::new());

fn take_tiles() -> Vec<Tile> {
    TILE_SETS
        .lock()
        .map(|mut sets| sets.pop().unwrap_or_default())
        .unwrap_or_default()
}

fn give_tiles(tiles: Vec<Tile>) {
    if let Ok(mut sets) = TILE_SETS.lock() {
        sets.push(tiles);
    }
}

/// Activation rows per [`Tile`]: the VNNI kernel's accumulators for 16 weight rows each.
const TILE: usize = 8;

/// Up to [`TILE`] quantised activation rows interleaved for [`QMatrix::group_vnni`]: per
/// block, the eight words the unpacked weight vectors take in turn (the kind's
/// [`QKind::words`] order), each with every row's side by side; then per block the rows'
/// scales, scaled sums and half sums. The kernel reads a tile through one pointer at offsets
/// known when it is compiled: with a pointer per row, eight rows' pointers (four arrays each)
/// did not fit the registers, and the compiler, to reload each spilled pointer once, ordered
/// the integer products one row's dependent chain after another, a quarter of the rate the
/// chip's two products a cycle allow.
#[derive(Default)]
struct Tile {
    rows: usize,
    /// `[block][vector t][row]`: the word (4 int8) vector `t` multiplies.
    w: Vec<i32>,
    /// `[block][row]`.
    s: Vec<f32>,
    ss: Vec<f32>,
    /// `[block][half][row]`.
    hs: Vec<i32>,
}

impl Tile {
    /// `acts` (1 to [`TILE`] rows of the same length) in the tile's layout, word `words[t]`
    /// of each block for vector `t`.
    fn pack(&mut self, acts: &[&Act], words: &[usize; 8]) {
        let j = acts.len();
        debug_assert!((1..=TILE).contains(&j));
        let nb = acts[0].s.len();
        self.rows = j;
        self.w.resize(nb * 8 * j, 0);
        self.s.resize(nb * j, 0.0);
        self.ss.resize(nb * j, 0.0);
        self.hs.resize(2 * nb * j, 0);
        // Written in order, each row's blocks read in order: a few percent of a prefill.
        let word = |act: &Act, i: usize| {
            let q: [i8; 4] = act.a[i..i + 4].try_into().expect("4 bytes");
            i32::from_le_bytes(q.map(|v| v as u8))
        };
        for (b, wb) in self.w.chunks_exact_mut(8 * j).enumerate() {
            for (t, wt) in wb.chunks_exact_mut(j).enumerate() {
                let at = b * QK + 4 * words[t];
                for (o, act) in wt.iter_mut().zip(acts) {
                    *o = word(act, at);
                }
            }
        }
        for (r, act) in acts.iter().enumerate() {
            debug_assert_eq!(act.s.len(), nb);
            for b in 0..nb {
                self.s[b * j + r] = act.s[b];
                self.ss[b * j + r] = act.ssum[b];
                for h in 0..2 {
                    self.hs[(2 * b + h) * j + r] = act.hsum[2 * b + h];
                }
            }
        }
    }
}

impl Act {
    /// `x` quantised into this row's buffers (grown, never shrunk), as [`Act::quantize`].
    fn quantize_into(&mut self, x: &[f32]) {
        let nb = x.len() / QK;
        self.a.resize(x.len(), 0);
        self.s.resize(nb, 0.0);
        self.ssum.resize(nb, 0.0);
        self.hsum.resize(2 * nb, 0);
        let (a, s, ssum, hsum) = (&mut self.a, &mut self.s, &mut self.ssum, &mut self.hsum);
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            // SAFETY: AVX-512 checked at run time; the buffers hold nb blocks.
            unsafe { quantize_avx512(x, a, s, ssum, hsum) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: AVX2 checked at run time; the buffers hold nb blocks.
            unsafe { avx2::quantize(x, a, s, ssum, hsum) };
            return;
        }
        quantize_scalar(x, a, s, ssum, hsum);
    }

    fn quantize(x: &[f32]) -> Act {
        let nb = x.len() / QK;
        let mut a = vec![0i8; x.len()];
        let (mut s, mut ssum) = (vec![0f32; nb], vec![0f32; nb]);
        let mut hsum = vec![0i32; 2 * nb];
        #[cfg(target_arch = "x86_64")]
        if vnni_available() {
            // SAFETY: AVX-512 checked at run time; the buffers hold nb blocks.
            unsafe { quantize_avx512(x, &mut a, &mut s, &mut ssum, &mut hsum) };
            return Act { a, s, ssum, hsum };
        }
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: AVX2 checked at run time; the buffers hold nb blocks.
            unsafe { avx2::quantize(x, &mut a, &mut s, &mut ssum, &mut hsum) };
            return Act { a, s, ssum, hsum };
        }
        quantize_scalar(x, &mut a, &mut s, &mut ssum, &mut hsum);
        Act { a, s, ssum, hsum }
    }
}

fn quantize_scalar(x: &[f32], a: &mut [i8], s: &mut [f32], ssum: &mut [f32], hsum: &mut [i32]) {
    {
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
            for (j, (o, v)) in ab.iter_mut().zip(xb).enumerate() {
                let q = ((v * inv + SHIFT) - SHIFT) as i8;
                *o = q;
                sum += q as i32;
                hsum[2 * b + j / 16] += q as i32;
            }
            s[b] = scale;
            ssum[b] = scale * sum as f32;
        }
    }
}

/// [`Act::quantize`] 32 floats at a time, to the same bits: the same scale and inverse,
/// products rounded to nearest even (the conversion's default mode, as the scalar shift).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_avx512(
    x: &[f32],
    a: &mut [i8],
    s: &mut [f32],
    ssum: &mut [f32],
    hsum: &mut [i32],
) {
    use std::arch::x86_64::*;
    for (b, (xb, ab)) in x.chunks_exact(QK).zip(a.chunks_exact_mut(QK)).enumerate() {
        let v0 = _mm512_loadu_ps(xb.as_ptr());
        let v1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        // x - x is 0 for finite x, NaN for an infinity or a NaN.
        let zero = _mm512_setzero_ps();
        let finite = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v0, v0), zero)
            & _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_sub_ps(v1, v1), zero);
        let scale = if finite == 0xffff {
            amax / 127.0
        } else {
            f32::NAN
        };
        let inv = _mm512_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
        let q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv));
        let q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128(ab.as_mut_ptr().cast(), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128(ab.as_mut_ptr().add(16).cast(), _mm512_cvtsepi32_epi8(q1));
        let (h0, h1) = (_mm512_reduce_add_epi32(q0), _mm512_reduce_add_epi32(q1));
        (hsum[2 * b], hsum[2 * b + 1]) = (h0, h1);
        let sum = h0 + h1;
        s[b] = scale;
        ssum[b] = scale * sum as f32;
    }
}

fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *V.get_or_init(|| {
            std::env::var_os("LONGCTX_NO_VNNI").is_none()
                && crate::Isa::detect() == crate::Isa::Avx512
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

    /// The vectorisable rounding is `f32::round` then the clamp, on halves, near-halves,
    /// the clamp's edges, infinities and NaN as on random values.
    #[test]
    fn round_away_is_round_then_clamp() {
        let mut rng = rand::rng();
        let mut xs = vec![
            0.5f32,
            -0.5,
            1.5,
            -1.5,
            126.5,
            -126.5,
            127.4,
            127.6,
            -128.0,
            1e9,
            -1e9,
            0.49999997,
            -0.49999997,
            2.5000002,
            0.0,
            -0.0,
        ];
        xs.extend((0..100_000).map(|_| rng.random_range(-140.0f32..140.0)));
        xs.extend((0..1000).map(|_| rng.random_range(-130i32..130) as f32 + 0.5));
        for x in xs {
            let want = x.round().clamp(-127.0, 127.0) as i32;
            assert_eq!(round_away(x), want, "{x}");
        }
    }

    fn blocks(kind: QKind, rows: usize, cols: usize, rng: &mut impl Rng) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32(rng.random_range(0.001..0.05));
            out.extend_from_slice(&d.to_le_bytes());
            if kind.has_min() {
                out.extend_from_slice(&f16::from_f32(rng.random_range(-0.3..0.3)).to_le_bytes());
            }
            let n = match kind {
                QKind::Q8_0 => 32,
                QKind::Q5_0 | QKind::Q5_1 => 20,
                _ => 16,
            };
            out.extend((0..n).map(|_| rng.random::<u8>()));
        }
        out
    }

    const KINDS: [QKind; 9] = [
        QKind::Q4_0,
        QKind::Q4_1,
        QKind::Q5_0,
        QKind::Q5_1,
        QKind::Q8_0,
        QKind::Q6,
        QKind::Iq4,
        QKind::Q2_16,
        QKind::Q3_16,
    ];

    /// A random matrix of `kind` and its column count: Q6 from random Q6_K super-blocks,
    /// Q2_16 and Q3_16 from Q2_K and Q3_K ones (columns rounded up to whole super-blocks), the others
    /// from random GGUF blocks.
    fn matrix(kind: QKind, rows: usize, cols: usize, rng: &mut impl Rng) -> (QMatrix, usize) {
        let from = match kind {
            QKind::Q6 => Some(Format::Q6_K),
            QKind::Q2_16 => Some(Format::Q2_K),
            QKind::Q3_16 => Some(Format::Q3_K),
            _ => None,
        };
        if let Some(f) = from {
            let cols = cols.next_multiple_of(256);
            let b = crate::formats::tests::random_blocks(f, rows * cols, rng);
            let w = QMatrix::from_stored(StoredRows::new(f, &b, rows, cols).unwrap());
            let w = w.unwrap();
            assert_eq!(w.kind(), kind);
            return (w, cols);
        }
        let b = blocks(kind, rows, cols, rng);
        (QMatrix::from_gguf(kind, &b, rows, cols).unwrap(), cols)
    }

    /// The quantised product against the float64 product of the same (dequantised) weights:
    /// within int8 activation rounding; and the vector path equal to the portable one.
    /// The largest weights of each kind times the largest activations (every int8 at 127,
    /// both signs): the AVX2 path's 16-bit partial sums must not saturate or wrap.
    #[test]
    fn extreme_weights_and_activations_do_not_overflow() {
        for kind in KINDS {
            for fill in [0xffu8, 0x00, 0x80, 0x7f] {
                let (rows, cols) = (20, 256);
                let (mut w, cols) = matrix(kind, rows, cols, &mut rand::rng());
                w.q.fill(fill);
                w.hi.fill(if fill >= 0x80 { u64::MAX } else { 0 });
                w.hi2.fill(if fill >= 0x80 { 0xff } else { 0 });
                for sign in [1.0f32, -1.0] {
                    let x = vec![sign; cols];
                    let mut y = vec![0f32; rows];
                    w.gemv(&x, &mut y).unwrap();
                    for (r, got) in y.iter().enumerate() {
                        let want: f64 = (0..cols).map(|c| w.get(r, c) as f64 * sign as f64).sum();
                        // Relative to what the kernels add up, not only to the weights: a
                        // stored offset (Q8_0's 0x80 fill is a row of zeros held as 128 - 128)
                        // cancels in f32 to a residual of ~1e-7 of 128 |d| per weight. An
                        // overflow of a 16-bit partial sum is ~2^16 |d| a block, far above it.
                        let scale: f64 = (0..cols)
                            .map(|c| {
                                let (d, m) = w.params(&w.row_block(r, c / QK), c % QK);
                                (w.get(r, c).abs() + 128.0 * d.abs() + m.abs()) as f64
                            })
                            .sum();
                        assert!(
                            (*got as f64 - want).abs() <= 1e-4 * scale + 1e-6,
                            "{kind:?} fill {fill:#x} sign {sign} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gemv_matches_the_dequantised_product() {
        let mut rng = rand::rng();
        for kind in KINDS {
            for (rows, cols) in [(1, 32), (7, 96), (130, 576), (67, 1536)] {
                let (w, cols) = matrix(kind, rows, cols, &mut rng);
                let x: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut y = vec![0f32; rows];
                w.gemv(&x, &mut y).unwrap();
                let act = Act::quantize(&x);
                let mut y_port = vec![0f32; rows];
                w.rows_portable(&act, 0, &mut y_port);
                // The AVX2 path too where the CPU also has VNNI (which gemv prefers).
                let mut y_avx2 = y_port.clone();
                #[cfg(target_arch = "x86_64")]
                if avx2::available() {
                    // SAFETY: AVX2 checked; rows 0..rows from group 0, y_avx2 holds them.
                    unsafe { w.rows_avx2(&[&act], 0, rows, y_avx2.as_mut_ptr(), 0) };
                }
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
                    let a = y_avx2[r] as f64;
                    assert!(
                        (a - b).abs() <= 0.05 * bound,
                        "{kind:?}: AVX2 {a} and portable {b} paths differ"
                    );
                }
            }
        }
    }

    /// Q8_0 quantisation of f32 rows (weights without GGUF blocks): every weight within half a
    /// step (amax / 254) of its value, at amplitudes below and above 127 (so the scale is a
    /// division, not a remainder), all-zero blocks exactly zero.
    /// A batched product is each row's vector product, bit for bit (the same int8
    /// activations and the same kernel), at row counts that are not multiples of a chunk,
    /// with few activation rows (quantised serially) and many (in parallel).
    #[test]
    fn gemm_rows_are_their_gemvs() {
        let mut rng = rand::rng();
        for kind in KINDS {
            for (rows, cols, m) in [
                (1, 32, 2),
                (7, 96, 3),
                (130, 576, 5),
                (67, 1536, 17),
                (33, 64, 70),
                // Past SERIAL_ELEMS: the activations quantised and packed in parallel.
                (9, 1536, 23),
            ] {
                let (w, cols) = matrix(kind, rows, cols, &mut rng);
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

    /// The vector activation quantiser gives the scalar one's bits (finite inputs, ties,
    /// an all-zero block); a non-finite block's scale is NaN in both.
    #[test]
    fn activation_quantisers_agree() {
        let mut rng = rand::rng();
        let mut x: Vec<f32> = (0..QK * 9).map(|_| rng.random_range(-3.0..3.0)).collect();
        x[QK..2 * QK].fill(0.0);
        // Exact halves of the step: ties to even.
        for (i, v) in x[2 * QK..3 * QK].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { i as f32 + 0.5 };
        }
        x[3 * QK + 5] = f32::INFINITY;
        x[4 * QK + 7] = f32::NAN;
        let n = x.len() / QK;
        let (mut a, mut s, mut ss) = (vec![0i8; x.len()], vec![0f32; n], vec![0f32; n]);
        let mut hs = vec![0i32; 2 * n];
        quantize_scalar(&x, &mut a, &mut s, &mut ss, &mut hs);
        // The best quantiser of this CPU, and the AVX2 one where it is not that.
        let mut each = vec![Act::quantize(&x)];
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            let mut v = Act {
                a: vec![0; x.len()],
                s: vec![0.0; n],
                ssum: vec![0.0; n],
                hsum: vec![0; 2 * n],
            };
            // SAFETY: AVX2 checked; the buffers hold n blocks.
            unsafe { avx2::quantize(&x, &mut v.a, &mut v.s, &mut v.ssum, &mut v.hsum) };
            each.push(v);
        }
        for v in each {
            for b in (0..n).filter(|b| !(3..5).contains(b)) {
                assert_eq!(
                    &v.a[b * QK..(b + 1) * QK],
                    &a[b * QK..(b + 1) * QK],
                    "block {b}"
                );
                assert_eq!(
                    (v.s[b].to_bits(), v.ssum[b].to_bits()),
                    (s[b].to_bits(), ss[b].to_bits())
                );
                assert_eq!(&v.hsum[2 * b..2 * b + 2], &hs[2 * b..2 * b + 2]);
            }
            assert!(v.s[3].is_nan() && v.s[4].is_nan() && s[3].is_nan() && s[4].is_nan());
        }
    }

    #[test]
    fn q8_blocks_vector_is_the_scalar_bits() {
        let mut rng = rand::rng();
        let mut w: Vec<f32> = (0..QK * 40).map(|_| rng.random_range(-3.0..3.0)).collect();
        // Exact halves of a step (ties away from zero), a zero block, a block of one value,
        // tiny values, a NaN and an infinity (their blocks NaN-scaled), amax at either end.
        for (i, v) in w[..QK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        w[QK..2 * QK].fill(0.0);
        w[2 * QK..3 * QK].fill(-1.25);
        for v in &mut w[3 * QK..4 * QK] {
            *v *= 1e-30;
        }
        w[4 * QK + 7] = f32::NAN;
        w[5 * QK + 31] = f32::NEG_INFINITY;
        w[6 * QK] = 1e4;
        w[7 * QK + 31] = -1e4;
        let (mut a, mut b) = (vec![0u8; 40 * 34], vec![0u8; 40 * 34]);
        q8_blocks(&w, &mut a);
        q8_blocks_scalar(&w, &mut b);
        assert_eq!(a, b);
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
        // What a product streams: the file's bytes per block (Q4_1: 20 for 32 weights), for
        // rows in whole groups of 16 (the last one padded).
        assert_eq!(c.bytes(), 16 * 2 * 20);
        for kind in [
            QKind::Q4_0,
            QKind::Q4_1,
            QKind::Q5_0,
            QKind::Q5_1,
            QKind::Q8_0,
            QKind::Iq4,
        ] {
            let q = m(kind, 35, 96, &mut rng);
            assert_eq!(q.bytes(), 48 * 3 * kind.block_bytes(), "{kind:?}");
        }
        for col in 0..64 {
            assert_eq!(c.get(1, col), a.get(1, col));
            assert_eq!(c.get(4, col), b.get(1, col));
        }
        // Parts of whole groups stack as they are; the others are laid out again: both
        // give the parts' rows, and the products of the rows stacked.
        for kind in [
            QKind::Q5_0,
            QKind::Q5_1,
            QKind::Q8_0,
            QKind::Iq4,
            QKind::Q2_16,
            QKind::Q3_16,
        ] {
            for (ra, rb) in [(16, 32), (17, 5)] {
                let (a, b) = (
                    matrix(kind, ra, 96, &mut rng).0,
                    matrix(kind, rb, 96, &mut rng).0,
                );
                let c = QMatrix::concat(&[&a, &b]).unwrap();
                let x: Vec<f32> = (0..a.cols()).map(|_| rng.random_range(-1.0..1.0)).collect();
                let (mut ya, mut yb, mut yc) = (vec![0.0; ra], vec![0.0; rb], vec![0.0; ra + rb]);
                a.gemv(&x, &mut ya).unwrap();
                b.gemv(&x, &mut yb).unwrap();
                c.gemv(&x, &mut yc).unwrap();
                assert_eq!(yc, [ya, yb].concat(), "{kind:?} {ra} + {rb}");
                for col in (0..a.cols()).step_by(5) {
                    assert_eq!(c.get(ra + rb - 1, col), b.get(rb - 1, col));
                }
            }
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
            (QKind::Q5_1, Format::Q5_1),
            (QKind::Q8_0, Format::Q8_0),
            (QKind::Iq4, Format::IQ4_NL),
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
    /// the file's dequantised weights. Every block format is held as its own values: exactly
    /// where it is kept as stored (Q2_K and Q3_K too: their sub-scales and super-block scales
    /// as the file has them, in as many bytes as the file, Q3_K's 5% more); where its
    /// super-blocks are converted (Q4_K, Q5_K, IQ4_XS and Q6_K), every weight within f16
    /// rounding of its scales.
    #[test]
    fn every_stored_format_multiplies_from_its_blocks() {
        let mut rng = rand::rng();
        for f in crate::formats::ALL {
            let (rows, cols) = (37, 2 * 256 + if f.block_elems() == 256 { 0 } else { 64 });
            let bytes = crate::formats::tests::random_blocks(f, rows * cols, &mut rng);
            let stored = StoredRows::new(f, &bytes, rows, cols).unwrap();
            let w = QMatrix::from_stored(stored).unwrap();
            let fast = match f {
                Format::Q4_0 => QKind::Q4_0,
                Format::Q4_1 | Format::Q4_K => QKind::Q4_1,
                Format::Q5_0 => QKind::Q5_0,
                Format::Q5_1 | Format::Q5_K => QKind::Q5_1,
                Format::IQ4_NL | Format::IQ4_XS => QKind::Iq4,
                Format::Q2_K => QKind::Q2_16,
                Format::Q3_K => QKind::Q3_16,
                Format::Q6_K => QKind::Q6,
                _ => QKind::Q8_0,
            };
            assert_eq!(w.kind(), fast, "{f}: the layout");
            let wf = f.to_f32(&bytes, rows * cols).unwrap();
            let as_stored = matches!(
                f,
                Format::Q4_0
                    | Format::Q4_1
                    | Format::Q5_0
                    | Format::Q5_1
                    | Format::Q8_0
                    | Format::IQ4_NL
                    | Format::Q2_K
                    | Format::Q3_K
            );
            // Rows held in whole groups of 16, the last one padded.
            let file = rows.next_multiple_of(16) * cols / 256 * f.block_bytes();
            match f {
                Format::Q2_K => assert_eq!(w.bytes(), file, "{f}"),
                Format::Q3_K => assert!(w.bytes() <= file * 106 / 100, "{f}"),
                _ => {}
            }
            if fast != QKind::Q8_0 {
                for (i, &e) in wf.iter().enumerate() {
                    let (r, c) = (i / cols, i % cols);
                    let g = w.get(r, c);
                    // Each scale and minimum rounded to f16: 2^-11 of itself at most.
                    let rb = w.row_block(r, c / QK);
                    let (d, m) = w.params(&rb, c % QK);
                    let bound = if as_stored {
                        1e-6 * e.abs().max(1e-30)
                    } else {
                        (d.abs() * rb.v[c % QK] as f32 + m.abs()) / 2048.0 * 1.01 + 1e-30
                    };
                    assert!((g - e).abs() <= bound, "{f} [{i}]: {g} vs {e}");
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
