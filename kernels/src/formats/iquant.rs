//! The non-linear 4-bit formats: each nibble indexes a fixed table of 16 int8 levels
//! (`kvalues_iq4nl`), denser near zero where weights are. IQ4_NL is a 32-element block with
//! an f16 scale; IQ4_XS a 256-element super-block of eight 32-element blocks with 6-bit
//! scales (biased by 32) under one f16.

use super::f16_at;

pub(super) const IQ4_NL_BYTES: usize = 18;
pub(super) const IQ4_XS_BYTES: usize = 136;

/// ggml's `kvalues_iq4nl`.
pub const IQ4_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// 16 bytes of nibbles into 32 elements `d * level`.
#[inline]
fn nibbles(qs: &[u8], d: f32, o: &mut [f32]) {
    for (j, q) in qs[..16].iter().enumerate() {
        o[j] = d * IQ4_LEVELS[(q & 0x0f) as usize] as f32;
        o[j + 16] = d * IQ4_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// `{d: f16, qs: [u8; 16]}`.
pub(super) fn iq4_nl(b: &[u8], o: &mut [f32]) {
    nibbles(&b[2..18], f16_at(b, 0), o);
}

/// `{d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]}`.
pub(super) fn iq4_xs(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let sh = u16::from_le_bytes([b[2], b[3]]) as i32;
    let (sl, qs) = (&b[4..8], &b[8..136]);
    for ib in 0..8 {
        let ls = ((sl[ib / 2] >> (4 * (ib % 2))) & 0x0f) as i32 | (((sh >> (2 * ib)) & 3) << 4);
        let dl = d * (ls - 32) as f32;
        nibbles(&qs[16 * ib..], dl, &mut o[32 * ib..32 * ib + 32]);
    }
}
