//! llama.cpp's k-quants: 256-element super-blocks of 16 or 32-element sub-blocks, each with
//! its own quantised scale (and minimum) under one or two f16 super-block scales.
//! Q2_K, Q3_K and Q6_K have sixteen 16-element sub-blocks, Q4_K and Q5_K eight of 32 with
//! 6-bit scales and minimums packed into 12 bytes.

use super::f16_at;

pub(super) const Q2_K_BYTES: usize = 84;
pub(super) const Q3_K_BYTES: usize = 110;
pub(super) const Q4_K_BYTES: usize = 144;
pub(super) const Q5_K_BYTES: usize = 176;
pub(super) const Q6_K_BYTES: usize = 210;

/// `{scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16}`: 2-bit values, a 4-bit scale and a
/// 4-bit minimum per 16 elements: `x = d sc q - dmin m`.
pub(super) fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * (sc & 0x0f) as f32, dmin * (sc >> 4) as f32);
                let y = &mut o[128 * n + 32 * j + 16 * half..][..16];
                for (l, v) in y.iter_mut().enumerate() {
                    *v = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                }
            }
        }
    }
}

/// `{hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16}`: 3-bit values (two low bits
/// in `qs`, the high bit in `hmask`, unset meaning -4) and 6-bit scales biased by 32.
pub(super) fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hm, qs) = (&b[0..32], &b[32..96]);
    let d = f16_at(b, 108);
    let scales = q3_k_scales(&b[96..108]);
    let mut is = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &qs[32 * n..32 * n + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for half in 0..2 {
                let dl = d * (scales[is] as i32 - 32) as f32;
                is += 1;
                let y = &mut o[128 * n + 32 * j + 16 * half..][..16];
                for (l, v) in y.iter_mut().enumerate() {
                    let i = 16 * half + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let sub = if hm[i] & m != 0 { 0 } else { 4 };
                    *v = dl * (low - sub) as f32;
                }
            }
            m <<= 1;
        }
    }
}

/// Q3_K's sixteen 6-bit scales from their 12 bytes: the low 4 bits of scales 0..7 and 8..15
/// are the nibbles of bytes 0..7, the high 2 bits the bit pairs of bytes 8..11.
pub(crate) fn q3_k_scales(s: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = low | (high << 4);
    }
    out
}

/// Scale and minimum `j` (0..8) of Q4_K and Q5_K, 6 bits each (`get_scale_min_k4`).
#[inline]
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Sub-block `j`'s scale `d sc_j` and minimum `dmin m_j` (Q4_K, Q5_K: `x = scale q - min`).
#[inline]
pub(crate) fn sub_block(j: usize, d: f32, dmin: f32, sc: &[u8]) -> (f32, f32) {
    let (s, m) = scale_min(j, sc);
    (d * s as f32, dmin * m as f32)
}

/// `{d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]}`: 4-bit values; 32 bytes of `qs`
/// hold sub-blocks `2i` (low nibbles) and `2i + 1` (high): `x = d sc q - dmin m`.
pub(super) fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, qs) = (&b[4..16], &b[16..144]);
    for i in 0..4 {
        let q = &qs[32 * i..32 * i + 32];
        let (d1, m1) = sub_block(2 * i, d, dmin, sc);
        let (d2, m2) = sub_block(2 * i + 1, d, dmin, sc);
        for (l, v) in q.iter().enumerate() {
            o[64 * i + l] = d1 * (v & 0x0f) as f32 - m1;
            o[64 * i + 32 + l] = d2 * (v >> 4) as f32 - m2;
        }
    }
}

/// `{d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]}`: Q4_K with a fifth
/// bit per element, bit `2i` / `2i + 1` of `qh[l]` for sub-blocks `2i` / `2i + 1`.
pub(super) fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for i in 0..4 {
        let q = &qs[32 * i..32 * i + 32];
        let (d1, m1) = sub_block(2 * i, d, dmin, sc);
        let (d2, m2) = sub_block(2 * i + 1, d, dmin, sc);
        let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
        for (l, v) in q.iter().enumerate() {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            o[64 * i + l] = d1 * ((v & 0x0f) + h1) as f32 - m1;
            o[64 * i + 32 + l] = d2 * ((v >> 4) + h2) as f32 - m2;
        }
    }
}

/// `{ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16}`: 6-bit values biased by 32
/// (low 4 bits in `ql`, high 2 in `qh`) and an int8 scale per 16 elements: `x = d sc q`.
pub(super) fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for n in 0..2 {
        let ql = &b[64 * n..64 * n + 64];
        let qh = &b[128 + 32 * n..128 + 32 * n + 32];
        let sc = &b[192 + 8 * n..192 + 8 * n + 8];
        let y = &mut o[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}
