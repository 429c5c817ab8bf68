//! Schedules and application against transformers' goldens (tests/reference/rope_goldens.py)
//! and against a float64 reference at positions up to 10,485,760.

use super::*;
use half::bf16;
use rand::Rng;
use serde_json::Value;

const GOLDENS: &str = include_str!("../../tests/reference/rope_goldens.json");
const F64_GOLDENS: &str = include_str!("../../tests/reference/rope_f64_goldens.json");

fn goldens() -> Value {
    serde_json::from_str(GOLDENS).expect("goldens parse")
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Norm-wise relative error.
fn rel(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

#[test]
fn schedules_match_transformers() {
    let g = goldens();
    let cases = g["schedules"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let rope =
            from_config_json(&c["config"].to_string()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let seq_len = c["seq_len"].as_u64().unwrap_or(0) as usize;
        let got = rope.inv_freq(seq_len);
        let want = floats(&c["inv_freq"]);
        assert_eq!(got.len(), want.len(), "{name}");
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // transformers computes in f32: its values carry ~1e-7 relative rounding.
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}[{i}]: {a} vs {b}");
        }
        let af = c["attention_factor"].as_f64().unwrap();
        assert!(
            (rope.attention_factor() - af).abs() <= 1e-6 * af,
            "{name}: attention factor"
        );
    }
}

#[test]
fn static_ntk_raises_the_base() {
    let d = 128.0f64;
    let rope = Rope::new(10000.0, 128, Scaling::Ntk { factor: 4.0 }).unwrap();
    let theta = 10000.0 * 4f64.powf(d / (d - 2.0));
    for (i, f) in rope.inv_freq(0).iter().enumerate() {
        let want = theta.powf(-(2.0 * i as f64) / d);
        assert!((f - want).abs() <= 1e-12 * want);
    }
}

/// The rotation as transformers computes it for one golden case: f32 angles from its f32
/// inverse frequencies, then our layout code. Checks the pairing, signs and attention factor
/// to f32 rounding.
#[test]
fn apply_matches_transformers_rotate_half_and_complex_forms() {
    let g = goldens();
    for c in g["apply"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let layout = match c["layout"].as_str().unwrap() {
            "interleaved" => Layout::Interleaved,
            _ => Layout::RotateHalf,
        };
        let rope = from_config_json(&c["config"].to_string()).unwrap();
        let inv32: Vec<f32> = rope.inv_freq(0).iter().map(|x| *x as f32).collect();
        let af = rope.attention_factor() as f32;
        let positions: Vec<usize> = c["positions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap() as usize)
            .collect();
        let d = c["d"].as_u64().unwrap() as usize;
        for (key, h) in [
            ("q", c["h_q"].as_u64().unwrap()),
            ("k", c["h_kv"].as_u64().unwrap()),
        ] {
            let h = h as usize;
            let x = floats(&c[key]);
            let want = floats(&c[&format!("{key}_out")]);
            for (i, &p) in positions.iter().enumerate() {
                let row = i * h * d..(i + 1) * h * d;
                // transformers' angles: f32(position) * f32(inv_freq), in f32.
                let cos: Vec<f32> = inv32.iter().map(|f| (p as f32 * f).cos() * af).collect();
                let sin: Vec<f32> = inv32.iter().map(|f| (p as f32 * f).sin() * af).collect();
                let table = RopeTable::from_parts(p, 1, cos, sin);
                let mut got: Vec<f32> = x[row.clone()].iter().map(|v| *v as f32).collect();
                apply_table(&mut got, (1, h, d), p, &table, layout).unwrap();
                let got: Vec<f64> = got.iter().map(|v| *v as f64).collect();
                let e = rel(&got, &want[row.clone()]);
                // transformers' f32 output drifts from any exact rotation as the position grows
                // (measured against ours: 1.3e-7 at 17, 4.8e-5 at 4095, 1.2e-2 at 1,048,575),
                // so it is compared where it is still accurate; larger positions are checked
                // against the float64 goldens (`float64_goldens_to_ten_million_positions`).
                if p > 17 {
                    continue;
                }
                let tol = 1e-6;
                assert!(e <= tol, "{name} {key} position {p}: rel err {e:.2e}");

                // Our exact path agrees where f32 angles are still exact enough.
                if p <= 17 {
                    let mut exact: Vec<f32> = x[row.clone()].iter().map(|v| *v as f32).collect();
                    apply(&mut exact, (1, h, d), p, &rope, 0, layout).unwrap();
                    let exact: Vec<f64> = exact.iter().map(|v| *v as f64).collect();
                    let e = rel(&exact, &want[row.clone()]);
                    assert!(e <= 1e-5, "{name} {key} exact at {p}: rel err {e:.2e}");
                }
            }
        }
    }
}

/// The float64 goldens of `tests/reference/rope_f64_goldens.py` (schedules derived there from
/// transformers' definitions, checked against its f32 values; rotations in float64): our
/// inverse frequencies to 1e-12 and the rotation of f32 inputs at positions up to 10,485,759
/// at one fixed tolerance, whatever the position.
#[test]
fn float64_goldens_to_ten_million_positions() {
    let g: Value = serde_json::from_str(F64_GOLDENS).expect("goldens parse");
    let mut worst = 0f64;
    for c in g["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let rope = from_config_json(&c["config"].to_string()).unwrap();
        let layout = match c["layout"].as_str().unwrap() {
            "interleaved" => Layout::Interleaved,
            _ => Layout::RotateHalf,
        };
        for (i, (a, b)) in rope
            .inv_freq(0)
            .iter()
            .zip(floats(&c["inv_freq"]))
            .enumerate()
        {
            assert!(
                (a - b).abs() <= 1e-12 * b,
                "{name} inv_freq[{i}]: {a} vs {b}"
            );
        }
        let af = c["attention_factor"].as_f64().unwrap();
        assert!((rope.attention_factor() - af).abs() <= 1e-12 * af, "{name}");
        let d = c["d"].as_u64().unwrap() as usize;
        for row in c["rows"].as_array().unwrap() {
            let p = row["position"].as_u64().unwrap() as usize;
            let mut x: Vec<f32> = floats(&row["x"]).iter().map(|v| *v as f32).collect();
            apply(&mut x, (1, 1, d), p, &rope, 0, layout).unwrap();
            let got: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            let e = rel(&got, &floats(&row["out"]));
            worst = worst.max(e);
            // f32 output rounding plus f32 arithmetic: measured 5.4e-8 at worst.
            assert!(e <= 5e-7, "{name} position {p}: rel err {e:.2e}");
        }
    }
    eprintln!("float64 goldens: worst rel err {worst:.2e}");
}

/// f64 reference: the rotation with angles `pos * inv_freq` computed and taken sin/cos of
/// in f64.
fn reference(x: &[f32], h: usize, d: usize, pos0: usize, rope: &Rope, layout: Layout) -> Vec<f64> {
    let inv = rope.inv_freq(0);
    let af = rope.attention_factor();
    let half = inv.len();
    let mut out: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    for (i, row) in out.chunks_mut(h * d).enumerate() {
        let p = (pos0 + i) as f64;
        for head in row.chunks_mut(d) {
            for (j, f) in inv.iter().enumerate() {
                let (s, c) = (p * f).sin_cos();
                let (ia, ib) = match layout {
                    Layout::Interleaved => (2 * j, 2 * j + 1),
                    Layout::RotateHalf => (j, j + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = (a * c - b * s) * af;
                head[ib] = (b * c + a * s) * af;
            }
        }
    }
    out
}

fn scout() -> Rope {
    let g = goldens();
    from_config_json(&g["schedules"][0]["config"].to_string()).unwrap()
}

#[test]
fn exact_at_ten_million_positions() {
    let mut rng = rand::rng();
    let (h, d) = (3, 128);
    for rope in [
        scout(),
        from_config_json(&goldens()["schedules"][7]["config"].to_string()).unwrap(),
    ] {
        for layout in [Layout::Interleaved, Layout::RotateHalf] {
            // A window ending at 10,485,760, crossing anchors, and a few scattered rows.
            for (pos0, n) in [
                (10_485_760 - 300, 301),
                (9_999_937, 5),
                (4_194_303, 2),
                (0, 70),
            ] {
                let x: Vec<f32> = (0..n * h * d)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let want = reference(&x, h, d, pos0, &rope, layout);
                let mut got = x.clone();
                apply(&mut got, (n, h, d), pos0, &rope, 0, layout).unwrap();
                for (i, (g, w)) in got.chunks(h * d).zip(want.chunks(h * d)).enumerate() {
                    let g: Vec<f64> = g.iter().map(|v| *v as f64).collect();
                    let e = rel(&g, w);
                    assert!(
                        e <= 1e-6,
                        "{layout:?} position {}: rel err {e:.2e}",
                        pos0 + i
                    );
                }
                // bf16 storage: the same rotation, rounded.
                let mut b: Vec<bf16> = x.iter().map(|v| bf16::from_f32(*v)).collect();
                let xb: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
                let want = reference(&xb, h, d, pos0, &rope, layout);
                apply(&mut b, (n, h, d), pos0, &rope, 0, layout).unwrap();
                let g: Vec<f64> = b.iter().map(|v| v.to_f32() as f64).collect();
                assert!(rel(&g, &want) <= 1e-2, "{layout:?} bf16 at {pos0}");
            }
        }
    }
}

#[test]
fn partial_rotary_leaves_the_other_dims_alone() {
    let g = goldens();
    let rope = from_config_json(&g["schedules"][11]["config"].to_string()).unwrap();
    assert_eq!((rope.head_dim, rope.rotary_dim), (128, 64));
    let mut rng = rand::rng();
    let x: Vec<f32> = (0..2 * 128).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut y = x.clone();
    apply(&mut y, (2, 1, 128), 12345, &rope, 0, Layout::RotateHalf).unwrap();
    for r in 0..2 {
        assert_eq!(
            &y[r * 128 + 64..(r + 1) * 128],
            &x[r * 128 + 64..(r + 1) * 128]
        );
        assert_ne!(&y[r * 128..r * 128 + 64], &x[r * 128..r * 128 + 64]);
    }
}

#[test]
fn dynamic_ntk_follows_transformers_cache_rules() {
    let rope = Rope::new(
        10000.0,
        64,
        Scaling::Dynamic {
            factor: 4.0,
            max_pos: 4096,
        },
    )
    .unwrap();
    let mut dynamic = DynamicNtk::new(rope.clone()).unwrap();
    let original = rope.inv_freq(0);
    assert_eq!(dynamic.update(100), &original[..]);
    // Growth recomputes; a shorter sequence above the original length keeps the cache.
    assert_eq!(dynamic.update(9999), &rope.inv_freq(10000)[..]);
    assert_eq!(dynamic.update(5000), &rope.inv_freq(10000)[..]);
    // Below the original length: back to the original frequencies.
    assert_eq!(dynamic.update(10), &original[..]);
}

#[test]
fn bad_configs_are_clear_errors() {
    let e = from_config_json(r#"{"head_dim": 64, "rope_scaling": {"rope_type": "longrope2"}}"#)
        .unwrap_err();
    assert!(e.to_string().contains("longrope2"), "{e}");
    let e =
        from_config_json(r#"{"head_dim": 64, "rope_scaling": {"type": "linear"}}"#).unwrap_err();
    assert!(e.to_string().contains("factor"), "{e}");
    let e = from_config_json(r#"{"head_dim": 64, "rope_parameters": {"full_attention": {}}}"#)
        .unwrap_err();
    assert!(e.to_string().contains("per-layer"), "{e}");
    assert!(from_config_json("{not json").is_err());
    assert!(from_config_json(r#"{"rope_theta": 10000}"#).is_err());
    let e = from_config_json(r#"{"head_dim": 64, "rope_theta": 0.5}"#).unwrap_err();
    assert!(e.to_string().contains("rope_theta"), "{e}");
    let rope = scout();
    let mut x = vec![0f32; 10];
    assert!(apply(&mut x, (1, 1, 128), 0, &rope, 0, Layout::Interleaved).is_err());
    let table = RopeTable::for_rope(&rope, 0, 100, 10);
    let mut x = vec![0f32; 128];
    assert!(apply_table(&mut x, (1, 1, 128), 99, &table, Layout::Interleaved).is_err());
}

#[test]
fn llama4_multimodal_config_reads_text_config() {
    let g = goldens();
    let text = g["schedules"][0]["config"].clone();
    let mm = serde_json::json!({ "architectures": ["Llama4ForConditionalGeneration"], "text_config": text });
    assert_eq!(from_config_json(&mm.to_string()).unwrap(), scout());
}

/// More rows than `apply`'s window of 4096 positions, several heads: the windows after the
/// first start at their own positions (each row equals the same row rotated alone).
#[test]
fn apply_across_windows_matches_one_row_at_a_time() {
    let rope = Rope::new(10000.0, 8, Scaling::Default).unwrap();
    let (n, h, d) = (4096 * 2 + 5, 3, 8);
    let mut rng = rand::rng();
    let x: Vec<f32> = (0..n * h * d)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let mut all = x.clone();
    let pos0 = 777;
    apply(&mut all, (n, h, d), pos0, &rope, 20000, Layout::RotateHalf).unwrap();
    for i in [0, 1, 4095, 4096, 4097, 8191, 8192, n - 1] {
        let mut one = x[i * h * d..(i + 1) * h * d].to_vec();
        apply(
            &mut one,
            (1, h, d),
            pos0 + i,
            &rope,
            20000,
            Layout::RotateHalf,
        )
        .unwrap();
        assert_eq!(&all[i * h * d..(i + 1) * h * d], &one[..], "row {i}");
    }
}

/// A table's window and the shapes it accepts: positions inside it (not only its exact
/// span) rotate, positions outside it and rotary dims it cannot give are errors.
#[test]
fn tables_cover_their_window_and_check_shapes() {
    let rope = Rope::new(10000.0, 6, Scaling::Default).unwrap();
    let table = RopeTable::for_rope(&rope, 0, 100, 10);
    assert_eq!(
        (table.start(), table.len(), table.is_empty()),
        (100, 10, false)
    );
    assert!(RopeTable::for_rope(&rope, 0, 7, 0).is_empty());
    let mut rng = rand::rng();
    let x: Vec<f32> = (0..2 * 6).map(|_| rng.random_range(-1.0..1.0)).collect();
    // Rows 101..103 of a table over 100..110: the same as `apply` at those positions (a head
    // dim of 6: three rotated pairs, an odd half).
    let mut a = x.clone();
    apply_table(&mut a, (2, 1, 6), 101, &table, Layout::Interleaved).unwrap();
    let mut b = x.clone();
    apply(&mut b, (2, 1, 6), 101, &rope, 0, Layout::Interleaved).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, x);
    let mut c = x.clone();
    assert!(apply_table(&mut c, (2, 1, 6), 109, &table, Layout::Interleaved).is_err());
    assert!(apply_table(&mut c, (2, 1, 6), 99, &table, Layout::Interleaved).is_err());
    // A table of head dim 6 on heads of 4 (its 6 rotary dims do not fit).
    let mut y = vec![0f32; 2 * 4];
    assert!(apply_table(&mut y, (2, 1, 4), 101, &table, Layout::Interleaved).is_err());
    // Rotary dims that are odd or beyond the head, and heads beyond 1024, are refused.
    let mut z = vec![0f32; 2048];
    for (rotary, d) in [(5, 8), (10, 8), (1026, 1026)] {
        let mut r = Rope::new(10000.0, d, Scaling::Default).unwrap();
        r.rotary_dim = rotary;
        let n = 2048 / d;
        let e = apply(&mut z[..n * d], (n, 1, d), 0, &r, 0, Layout::RotateHalf);
        assert!(e.is_err(), "rotary {rotary} of head dim {d}");
    }
    let r = Rope::new(10000.0, 1024, Scaling::Default).unwrap();
    assert!(apply(&mut z, (2, 1, 1024), 0, &r, 0, Layout::RotateHalf).is_ok());
}

/// llama.cpp's `rope_freqs` factors, as `convert_hf_to_gguf.py` computes them from llama3's
/// parameters (Scout's: factor 16, low 1, high 1, original 8192), give llama3's frequencies;
/// factors of the wrong count or not positive are refused.
#[test]
fn gguf_frequency_factors_equal_the_scaling_they_were_made_from() {
    let (theta, d) = (500000.0, 128);
    let llama3 = Rope::new(
        theta,
        d,
        Scaling::Llama3 {
            factor: 16.0,
            low_freq_factor: 1.0,
            high_freq_factor: 1.0,
            original_max_pos: 8192,
        },
    )
    .unwrap();
    let base = Rope::new(theta, d, Scaling::Default).unwrap().inv_freq(1);
    // convert_hf_to_gguf.py's loop (in f32 there; the factors it picks are 1 or 16 here).
    let factors: Vec<f64> = base
        .iter()
        .map(|f| {
            let wl = 2.0 * std::f64::consts::PI / f;
            if wl < 8192.0 {
                1.0
            } else {
                16.0
            }
        })
        .collect();
    let r = Rope::new(theta, d, Scaling::Factors(factors.clone())).unwrap();
    for (a, b) in r.inv_freq(1).iter().zip(llama3.inv_freq(1)) {
        assert!((a / b - 1.0).abs() < 1e-15, "{a} vs {b}");
    }
    assert!(Rope::new(theta, d, Scaling::Factors(factors[1..].to_vec())).is_err());
    let mut bad = factors;
    bad[3] = 0.0;
    assert!(Rope::new(theta, d, Scaling::Factors(bad.clone())).is_err());
    bad[3] = f64::NAN;
    assert!(Rope::new(theta, d, Scaling::Factors(bad)).is_err());
}

/// Short windows reuse their tables: the same bits as a fresh table every time, and two
/// schedules (or seq_lens) at the same positions never take each other's.
#[test]
fn kept_tables_give_a_fresh_tables_bits_and_are_never_confused() {
    let mut rng = rand::rng();
    let (h, d) = (3, 64);
    let ropes = [
        Rope::new(10000.0, d, Scaling::Default).unwrap(),
        Rope::new(10000.0, d, Scaling::Linear { factor: 4.0 }).unwrap(),
        Rope::new(
            10000.0,
            d,
            Scaling::Dynamic {
                factor: 4.0,
                max_pos: 128,
            },
        )
        .unwrap(),
    ];
    for round in 0..3 {
        for (i, rope) in ropes.iter().enumerate() {
            for (pos0, n, seq_len) in [(0, 1, 1), (5000, 3, 9000), (5000, 3, 5003), (77, 64, 141)] {
                let x: Vec<f32> = (0..n * h * d)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let mut got = x.clone();
                apply(&mut got, (n, h, d), pos0, rope, seq_len, Layout::RotateHalf).unwrap();
                let table =
                    RopeTable::new(&rope.inv_freq(seq_len), rope.attention_factor(), pos0, n);
                let mut want = x;
                apply_table(&mut want, (n, h, d), pos0, &table, Layout::RotateHalf).unwrap();
                assert_eq!(
                    got, want,
                    "round {round} rope {i} at {pos0} x {n} of {seq_len}"
                );
            }
        }
    }
}
