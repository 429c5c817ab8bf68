use super::*;
use rand::Rng;

/// gguf-py's dequantisation of random blocks of every format
/// (`tests/reference/format_goldens.py`).
const GOLDENS: &str = include_str!("goldens.txt");

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn every_format_dequantises_as_gguf_py_does() {
    let mut lines = GOLDENS.lines();
    let mut seen = Vec::new();
    while let Some(name) = lines.next() {
        let bytes = hex_bytes(lines.next().unwrap());
        let want: Vec<f32> = lines
            .next()
            .unwrap()
            .split(' ')
            .map(|h| f32::from_bits(u32::from_str_radix(h, 16).unwrap()))
            .collect();
        let f = *ALL.iter().find(|f| f.name() == name).expect(name);
        assert_eq!(f.bytes_of(want.len()).unwrap(), bytes.len(), "{name}");
        let got = f.to_f32(&bytes, want.len()).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // gguf-py computes in f32 too, in places in another order: one rounding apart.
            let tol = 2.0 * f32::EPSILON * w.abs().max(1e-30);
            assert!((g - w).abs() <= tol, "{name}[{i}]: {g} vs {w}");
        }
        seen.push(f);
    }
    for f in ALL {
        assert!(seen.contains(&f), "no golden for {f}");
    }
}

#[test]
fn ids_round_trip_and_sizes_match_ggml() {
    // (elements, bytes) of each block, from ggml-common.h.
    let sizes = [
        (Format::Q4_0, 32, 18),
        (Format::Q4_1, 32, 20),
        (Format::Q5_0, 32, 22),
        (Format::Q5_1, 32, 24),
        (Format::Q8_0, 32, 34),
        (Format::Q2_K, 256, 84),
        (Format::Q3_K, 256, 110),
        (Format::Q4_K, 256, 144),
        (Format::Q5_K, 256, 176),
        (Format::Q6_K, 256, 210),
        (Format::IQ4_NL, 32, 18),
        (Format::IQ4_XS, 256, 136),
    ];
    for (f, n, b) in sizes {
        assert_eq!((f.block_elems(), f.block_bytes()), (n, b), "{f}");
    }
    for f in ALL {
        assert_eq!(Format::from_ggml(f.ggml_id()), Some(f));
    }
    // Types this build does not read.
    for id in [4, 5, 9, 15, 16, 19, 24, 28, 39, 1000] {
        assert_eq!(Format::from_ggml(id), None, "{id}");
    }
}

#[test]
fn partial_blocks_and_short_buffers_are_errors() {
    assert!(Format::Q4_K.bytes_of(255).is_err());
    assert!(Format::F32.bytes_of(usize::MAX).is_err());
    assert!(Format::Q8_0.to_f32(&[0u8; 33], 32).is_err());
    assert!(Format::Q8_0.to_f32(&[0u8; 35], 32).is_err());
    assert!(Format::Q6_K.to_f32(&[0u8; 210], 32).is_err());
    assert_eq!(
        Format::Q6_K.to_f32(&[0u8; 210], 256).unwrap(),
        vec![0.0; 256]
    );
}

/// `n` random elements of `f` (whole blocks): random bytes with the f16 scales replaced by
/// small finite values.
pub(crate) fn random_blocks(f: Format, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let blocks = n / f.block_elems();
    let size = f.block_bytes();
    let mut b: Vec<u8> = (0..blocks * size).map(|_| rng.random()).collect();
    let scales: &[usize] = match f {
        Format::F32 | Format::F16 | Format::BF16 => {
            let vals: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            return match f {
                Format::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Format::F16 => vals
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => vals
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
        }
        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => &[0, 2],
        Format::Q2_K => &[80, 82],
        Format::Q3_K => &[108],
        Format::Q6_K => &[208],
        _ => &[0],
    };
    for blk in b.chunks_exact_mut(size) {
        for &o in scales {
            let d = half::f16::from_f32(rng.random_range(-0.1..0.1));
            blk[o..o + 2].copy_from_slice(&d.to_le_bytes());
        }
    }
    b
}
