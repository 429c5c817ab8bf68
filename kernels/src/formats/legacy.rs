//! llama.cpp's first block formats: 32 elements, one f16 scale (and an f16 minimum for the
//! `_1` kinds), 4, 5 or 8 bits per element. In a 4- or 5-bit block byte `j` holds elements
//! `j` (low nibble) and `j + 16` (high nibble); Q5's fifth bits are the 32 bits of `qh`.

use super::f16_at;

pub(super) const Q4_0_BYTES: usize = 18;
pub(super) const Q4_1_BYTES: usize = 20;
pub(super) const Q5_0_BYTES: usize = 22;
pub(super) const Q5_1_BYTES: usize = 24;
pub(super) const Q8_0_BYTES: usize = 34;

/// `{d: f16, qs: [u8; 16]}`: `x = d (q - 8)`.
pub(super) fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, q) in b[2..18].iter().enumerate() {
        o[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// `{d: f16, m: f16, qs: [u8; 16]}`: `x = d q + m`.
pub(super) fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, q) in b[4..20].iter().enumerate() {
        o[j] = (q & 0x0f) as f32 * d + m;
        o[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The fifth bits of elements `j` and `j + 16` of a Q5 block, as 0 or 16.
#[inline]
fn high(qh: u32, j: usize) -> (i32, i32) {
    (
        (((qh >> j) << 4) & 0x10) as i32,
        ((qh >> (j + 12)) & 0x10) as i32,
    )
}

/// `{d: f16, qh: u32, qs: [u8; 16]}`: `x = d (q - 16)`.
pub(super) fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, q) in b[6..22].iter().enumerate() {
        let (h0, h1) = high(qh, j);
        o[j] = (((q & 0x0f) as i32 | h0) - 16) as f32 * d;
        o[j + 16] = (((q >> 4) as i32 | h1) - 16) as f32 * d;
    }
}

/// `{d: f16, m: f16, qh: u32, qs: [u8; 16]}`: `x = d q + m`.
pub(super) fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, q) in b[8..24].iter().enumerate() {
        let (h0, h1) = high(qh, j);
        o[j] = ((q & 0x0f) as i32 | h0) as f32 * d + m;
        o[j + 16] = ((q >> 4) as i32 | h1) as f32 * d + m;
    }
}

/// `{d: f16, qs: [i8; 32]}`: `x = d q`.
pub(super) fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, q) in o.iter_mut().zip(&b[2..34]) {
        *x = (*q as i8) as f32 * d;
    }
}
