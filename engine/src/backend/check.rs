//! Every backend op against a float64 reference, in one body generic over the backend
//! (llama.cpp's test-backend-ops): the unit tests run it on every backend this machine has,
//! and `longctx bench gpu` on the GPU, so a new backend meets the same checks. Random
//! inputs from a seed, awkward sizes, and buffers longer than each op's sizes (an op must
//! use only the prefix they name).

use super::*;
use crate::batch::Batch;
use crate::model::Logits;
use crate::ops::Linear;
use crate::weights::Tensor;
use crate::EngineError;
use longctx_kernels::attention::reference::{attention_f64, TestRng};
use longctx_kernels::{AttnParams, AttnShape, DType, Mask, QMatrix};
use longctx_kvstore::{Budgets, KvConfig, KvStore, Policy, Retention};
use longctx_rope::{Layout, Rope, Scaling};

/// One op's check: its relative error (norm-wise) against float64 and the bound (a
/// property that must hold: 0 when it does, infinity when not).
#[derive(Clone, Debug)]
pub struct OpCheck {
    pub name: String,
    pub err: f64,
    pub tol: f64,
}

impl OpCheck {
    pub fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

#[derive(Default)]
struct Checks(Vec<OpCheck>);

impl Checks {
    fn check(&mut self, name: impl Into<String>, _seed: u64, err: f64, tol: f64) {
        let err = if err.is_nan() { f64::INFINITY } else { err };
        self.0.push(OpCheck {
            name: name.into(),
            err,
            tol,
        });
    }

    fn holds(&mut self, name: &str, ok: bool) {
        let err = if ok { 0.0 } else { f64::INFINITY };
        self.0.push(OpCheck {
            name: name.into(),
            err,
            tol: 0.0,
        });
    }
}

/// int8 activations x q8 weights against f64: 1e-2 relative (norm-wise). Every other op is
/// held to the backend's own bound ([`Backend::tolerance`]: f32 1e-5, bf16 1e-2).
const Q8: f64 = 1e-2;

/// Norm-wise relative error of `got` against `want` (one backend's logits against
/// another's).
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let want: Vec<f64> = want.iter().map(|v| *v as f64).collect();
    rel(got, &want)
}

fn rel(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn random(rng: &mut TestRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.unit()).collect()
}

/// Uploads `host` into a fresh buffer with `spare` more elements of noise after it (ops
/// must use only the prefix their sizes name).
fn up<B: Backend>(be: &B, host: &[f32], spare: usize) -> Result<B::Buf> {
    let mut b = be.alloc(host.len() + spare)?;
    let mut full = host.to_vec();
    full.extend((0..spare).map(|i| 1e3 + i as f32));
    be.upload(&full, &mut b)?;
    Ok(b)
}

fn down<B: Backend>(be: &B, buf: &B::Buf, len: usize) -> Result<Vec<f32>> {
    let mut h = vec![0f32; len];
    be.download(buf, &mut h)?;
    Ok(h)
}

/// `y = x . W^T` in f64, W `[out, inp]`.
fn matmul64(x: &[f32], w: &[f32], m: usize, inp: usize, out: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * out];
    for r in 0..m {
        for o in 0..out {
            y[r * out + o] = (0..inp)
                .map(|i| x[r * inp + i] as f64 * w[o * inp + i] as f64)
                .sum();
        }
    }
    y
}

pub fn check_ops<B: Backend>(be: &B, seed: u64) -> Result<Vec<OpCheck>> {
    let mut rec = Checks::default();
    #[allow(non_snake_case)]
    let F32 = be.tolerance();
    let rng = &mut TestRng::new(seed);

    // upload / download_rows.
    let x = random(rng, 37);
    let b = up(be, &x, 5)?;
    let mut part = vec![0f32; 10];
    be.download_rows(&b, 20, &mut part)?;
    let want: Vec<f64> = x[20..30].iter().map(|v| *v as f64).collect();
    rec.check("upload, download_rows", seed, rel(&part, &want), F32);

    // embed: rows of a stored table; a token past it is an error.
    let (vocab, h) = (13, 40);
    let table = random(rng, vocab * h);
    let t = Tensor::new(vec![vocab, h], table.clone());
    let tokens = [3u32, 0, 12, 3];
    let mut xe = be.alloc(tokens.len() * h + 7)?;
    be.embed(&t, &tokens, &mut xe)?;
    let want: Vec<f64> = tokens
        .iter()
        .flat_map(|&t| {
            table[t as usize * h..(t as usize + 1) * h]
                .iter()
                .map(|v| *v as f64)
        })
        .collect();
    rec.check(
        "embed",
        seed,
        rel(&down(be, &xe, tokens.len() * h)?, &want),
        F32,
    );
    rec.holds(
        "embed: a token past the vocabulary is an error",
        be.embed(&t, &[13], &mut xe).is_err(),
    );

    // rms_norm, with and without a weight; in place.
    let (rows, dim) = (7, 72);
    let x = random(rng, rows * dim);
    let w = random(rng, dim);
    let norm64 = |w: Option<&[f32]>| -> Vec<f64> {
        let mut y = vec![0f64; rows * dim];
        for r in 0..rows {
            let xr = &x[r * dim..(r + 1) * dim];
            let ms = xr.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / dim as f64;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for j in 0..dim {
                y[r * dim + j] = xr[j] as f64 * inv * w.map_or(1.0, |w| w[j] as f64);
            }
        }
        y
    };
    let xb = up(be, &x, 3)?;
    let mut y = be.alloc(rows * dim)?;
    be.rms_norm(&xb, Some(&w), 1e-5, (rows, dim), &mut y)?;
    rec.check(
        "rms_norm",
        seed,
        rel(&down(be, &y, rows * dim)?, &norm64(Some(&w))),
        F32,
    );
    be.rms_norm(&xb, None, 1e-5, (rows, dim), &mut y)?;
    rec.check(
        "rms_norm (no weight)",
        seed,
        rel(&down(be, &y, rows * dim)?, &norm64(None)),
        F32,
    );
    let mut xi = up(be, &x, 0)?;
    be.rms_norm_in_place(&mut xi, 1e-5, (rows, dim))?;
    rec.check(
        "rms_norm_in_place",
        seed,
        rel(&down(be, &xi, rows * dim)?, &norm64(None)),
        F32,
    );

    // linear: the exact path's f32 copy, and the stored tensor itself; 1 and 5 rows.
    let (inp, out) = (64, 45);
    let wv = random(rng, out * inp);
    let mut lin = Linear::from_out_in(Tensor::new(vec![out, inp], wv.clone()))?;
    for f32_copy in [false, true] {
        if f32_copy {
            lin.enable_f32()?;
        }
        for m in [1, 5] {
            let x = random(rng, m * inp);
            let mut y = be.alloc(m * out + 9)?;
            be.linear(&lin, &up(be, &x, 2)?, m, &mut y)?;
            let err = rel(&down(be, &y, m * out)?, &matmul64(&x, &wv, m, inp, out));
            rec.check(format!("linear m={m} f32 copy {f32_copy}"), seed, err, F32);
        }
    }

    // stacked: a block-quantised Q|K|V, then split.
    let (qd, kd, inp) = (64, 32, 96);
    let width = qd + 2 * kd;
    let wv = random(rng, width * inp);
    let qm = QMatrix::quantize_q8(&wv, width, inp)?;
    let m = 3;
    let x = random(rng, m * inp);
    let mut qkv = be.alloc(m * width)?;
    match be.stacked(&qm, &up(be, &x, 0)?, m, &mut qkv) {
        Ok(()) => {
            let want = matmul64(&x, &wv, m, inp, width);
            rec.check(
                "stacked (q8)",
                seed,
                rel(&down(be, &qkv, m * width)?, &want),
                Q8,
            );
        }
        // A backend that reads no CPU block copies says so (its models have none).
        Err(EngineError::Unsupported(_)) => be.upload(&random(rng, m * width), &mut qkv)?,
        Err(e) => return Err(e),
    }
    let (mut q, mut k, mut v) = (be.alloc(m * qd)?, be.alloc(m * kd)?, be.alloc(m * kd)?);
    match be.split_qkv(&qkv, m, (qd, kd), &mut q, &mut k, &mut v) {
        Ok(()) => {
            let all = down(be, &qkv, m * width)?;
            let (gq, gk, gv) = (
                down(be, &q, m * qd)?,
                down(be, &k, m * kd)?,
                down(be, &v, m * kd)?,
            );
            let same = (0..m).all(|r| {
                let row = &all[r * width..(r + 1) * width];
                gq[r * qd..(r + 1) * qd] == row[..qd]
                    && gk[r * kd..(r + 1) * kd] == row[qd..qd + kd]
                    && gv[r * kd..(r + 1) * kd] == row[qd + kd..]
            });
            rec.holds("split_qkv: q, k and v are the stacked rows' parts", same);
        }
        Err(EngineError::Unsupported(_)) => {}
        Err(e) => return Err(e),
    }

    // silu_mul, separate and stacked.
    let (m, n) = (5, 37);
    let g = random(rng, m * n);
    let u = random(rng, m * n);
    let silu = |a: f32, b: f32| -> f64 {
        let a = a as f64;
        a / (1.0 + (-a).exp()) * b as f64
    };
    let want: Vec<f64> = g.iter().zip(&u).map(|(a, b)| silu(*a, *b)).collect();
    let mut o = be.alloc(m * n + 4)?;
    be.silu_mul(&up(be, &g, 4)?, &up(be, &u, 0)?, m * n, &mut o)?;
    rec.check("silu_mul", seed, rel(&down(be, &o, m * n)?, &want), F32);
    let gu: Vec<f32> = (0..m)
        .flat_map(|r| {
            g[r * n..(r + 1) * n]
                .iter()
                .chain(&u[r * n..(r + 1) * n])
                .copied()
        })
        .collect();
    let mut o = be.alloc(m * n)?;
    be.silu_mul_stacked(&up(be, &gu, 0)?, (m, n), &mut o)?;
    rec.check(
        "silu_mul_stacked",
        seed,
        rel(&down(be, &o, m * n)?, &want),
        F32,
    );

    // rope: rows 2..5 of 6 at positions far from 0, both layouts, a YaRN schedule.
    let (heads, hd, tokens) = (3, 64, 6);
    let rope = Rope::new(
        500_000.0,
        hd,
        Scaling::Yarn {
            factor: 8.0,
            original_max_pos: 8192,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.1,
            truncate: true,
        },
    )?;
    let (pos0, seq_len) = (9_999_990, 10_000_000);
    for layout in [Layout::RotateHalf, Layout::Interleaved] {
        let x = random(rng, tokens * heads * hd);
        let mut xb = up(be, &x, 0)?;
        be.rope(&mut xb, 2..5, (heads, hd), pos0, &rope, seq_len, layout)?;
        let inv = rope.inv_freq(seq_len);
        let f = rope.attention_factor();
        let mut want: Vec<f64> = x.iter().map(|v| *v as f64).collect();
        for t in 2..5 {
            let pos = (pos0 + t - 2) as f64;
            for hh in 0..heads {
                let row = &mut want[(t * heads + hh) * hd..][..hd];
                for (i, fr) in inv.iter().enumerate() {
                    let (s, c) = (pos * fr).sin_cos();
                    let (a, b) = match layout {
                        Layout::Interleaved => (2 * i, 2 * i + 1),
                        _ => (i, i + hd / 2),
                    };
                    let (x0, x1) = (row[a], row[b]);
                    row[a] = (x0 * c - x1 * s) * f;
                    row[b] = (x0 * s + x1 * c) * f;
                }
            }
        }
        let got = down(be, &xb, tokens * heads * hd)?;
        rec.check(format!("rope {layout:?}"), seed, rel(&got, &want), F32);
        let before: Vec<f64> = x[..2 * heads * hd].iter().map(|v| *v as f64).collect();
        rec.check(
            format!("rope {layout:?} leaves the rows before its range"),
            seed,
            rel(&got[..2 * heads * hd], &before),
            F32,
        );
    }

    // scale_rows, add.
    let (rows, width) = (6, 11);
    let x = random(rng, rows * width);
    let scales = [0.5f32, -2.0, 3.25];
    let mut xb = up(be, &x, 0)?;
    be.scale_rows(&mut xb, width, 2, &scales)?;
    let want: Vec<f64> = (0..rows * width)
        .map(|i| {
            let r = i / width;
            let s = if (2..5).contains(&r) {
                scales[r - 2] as f64
            } else {
                1.0
            };
            x[i] as f64 * s
        })
        .collect();
    rec.check(
        "scale_rows",
        seed,
        rel(&down(be, &xb, rows * width)?, &want),
        F32,
    );
    let y0 = random(rng, rows * width);
    let mut yb = up(be, &y0, 3)?;
    be.add(&mut yb, &up(be, &x, 0)?, rows * width)?;
    let want: Vec<f64> = y0
        .iter()
        .zip(&x)
        .map(|(a, b)| *a as f64 + *b as f64)
        .collect();
    rec.check("add", seed, rel(&down(be, &yb, rows * width)?, &want), F32);

    // non_finite_row: none, then a NaN in row 4 and an infinity in row 5.
    let mut x = random(rng, rows * width);
    let none = be.non_finite_row(&up(be, &x, 0)?, (rows, width))?;
    x[4 * width + 3] = f32::NAN;
    x[5 * width] = f32::INFINITY;
    let four = be.non_finite_row(&up(be, &x, 0)?, (rows, width))?;
    rec.holds(
        "non_finite_row: none, then the first of two bad rows",
        none.is_none() && four == Some(4),
    );

    // gather (scaled) and scatter_add: a MoE dispatch and combine.
    let x = random(rng, rows * width);
    let picks = [(4usize, 0.25f32), (0, 1.0), (4, -1.5)];
    let mut gb = be.alloc(picks.len() * width)?;
    be.gather(&up(be, &x, 0)?, width, &picks, &mut gb)?;
    let want: Vec<f64> = picks
        .iter()
        .flat_map(|&(r, s)| {
            x[r * width..(r + 1) * width]
                .iter()
                .map(move |v| *v as f64 * s as f64)
        })
        .collect();
    rec.check(
        "gather",
        seed,
        rel(&down(be, &gb, picks.len() * width)?, &want),
        F32,
    );
    let y0 = random(rng, rows * width);
    let mut yb = up(be, &y0, 0)?;
    let targets = [1usize, 5, 1];
    be.scatter_add(&gb, width, &targets, &mut yb)?;
    let g = down(be, &gb, picks.len() * width)?;
    let mut want: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
    for (j, &t) in targets.iter().enumerate() {
        for c in 0..width {
            want[t * width + c] += g[j * width + c] as f64;
        }
    }
    rec.check(
        "scatter_add",
        seed,
        rel(&down(be, &yb, rows * width)?, &want),
        F32,
    );

    // append_kv + attend: two sequences in one step, of different lengths and positions,
    // GQA 4, causal and chunked-local.
    let (h_q, h_kv, d) = (8, 2, 64);
    for mask in [Mask::Causal, Mask::ChunkedLocal { chunk: 5 }] {
        let store = KvStore::new(KvConfig {
            block_tokens: 4,
            h_kv,
            d,
            dtype: DType::F32,
            layers: vec![Retention::Full],
            budgets: Budgets {
                device: u64::MAX,
                host: 0,
                disk: 0,
            },
            policy: Policy::KeepNewest,
            spill_dir: std::env::temp_dir().join("longctx-backend-test"),
        })?;
        let (s1, s2) = (store.create_seq(), store.create_seq());
        // s1 holds 9 tokens already; s2 none.
        let old_k = random(rng, 9 * h_kv * d);
        let old_v = random(rng, 9 * h_kv * d);
        store.append(s1, 0, &old_k, &old_v)?;
        let (t1, t2) = ([0u32; 3], [0u32; 7]);
        let mut batch = Batch::new();
        batch.push(s1, &t1, 9, Logits::Last);
        batch.push(s2, &t2, 0, Logits::Last);
        let offs = batch.offsets();
        let n = 10;
        let kd = h_kv * d;
        let (q, k, v) = (
            random(rng, n * h_q * d),
            random(rng, n * kd),
            random(rng, n * kd),
        );
        let (kb, vb) = (up(be, &k, 0)?, up(be, &v, 0)?);
        be.append_kv(&store, s1, 0, &kb, &vb, 0..3, kd)?;
        be.append_kv(&store, s2, 0, &kb, &vb, 3..10, kd)?;
        let mut out = be.alloc(n * h_q * d)?;
        let mut lse = be.alloc(n * h_q)?;
        be.attend(
            &store,
            &batch,
            &offs,
            0,
            &up(be, &q, 0)?,
            (h_q, d),
            mask,
            0,
            &mut out,
            &mut lse,
        )?;
        let got = down(be, &out, n * h_q * d)?;
        let got_lse = down(be, &lse, n * h_q)?;
        // Each sequence against the reference over its whole KV.
        let k1: Vec<f32> = old_k.iter().chain(&k[..3 * kd]).copied().collect();
        let v1: Vec<f32> = old_v.iter().chain(&v[..3 * kd]).copied().collect();
        for (rows, kk, vv, pos0) in [
            (0..3, k1.as_slice(), v1.as_slice(), 9),
            (3..10, &k[3 * kd..], &v[3 * kd..], 0),
        ] {
            let shape = AttnShape {
                n_q: rows.len(),
                n_kv: kk.len() / kd,
                h_q,
                h_kv,
                d,
            };
            let params = AttnParams::new(&shape, mask).at(pos0, 0);
            let qs = &q[rows.start * h_q * d..rows.end * h_q * d];
            let (wo, wl) = attention_f64(qs, kk, vv, shape, &params);
            let go = &got[rows.start * h_q * d..rows.end * h_q * d];
            rec.check(
                format!("attend {mask:?} rows {rows:?}"),
                seed,
                rel(go, &wo),
                F32,
            );
            let gl = &got_lse[rows.start * h_q..rows.end * h_q];
            rec.check(format!("attend lse {mask:?}"), seed, rel(gl, &wl), F32);
        }
    }
    Ok(rec.0)
}
