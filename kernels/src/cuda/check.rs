//! The GPU self-test (every kernel against the CPU kernel or a float64 reference, on fresh
//! random inputs at awkward sizes) and the attention timing, shared by the unit tests and
//! `longctx bench gpu`, so the GPU check needs only the one binary.

use super::{Gpu, GpuElem, GpuError, KvLayout};
use crate::attention::reference::{
    errors, inputs, reference, rel_error, Inputs, Reference, TestRng,
};
use crate::{AttnParams, AttnShape, Element, Mask};
use cudarc::driver::sys::CUevent_flags;
use std::time::{SystemTime, UNIX_EPOCH};

/// One check: its errors against the reference and their bounds, or the error that stopped
/// it. Every case gets a row, run or not, so the table is always whole.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub name: String,
    /// Norm-wise relative error over the whole output (NaN when the case did not run).
    pub rel_err: f64,
    /// The worst row's relative error, so that a few wrong rows among thousands are not
    /// averaged away (attention: `||got_r - want_r|| / ||sum_j p_j |v_j| ||`; a row that
    /// sees no key must be exactly zeros and `-inf`).
    pub row_err: f64,
    /// Attention: the largest absolute error of the log-sum-exp (natural log).
    pub lse_abs: Option<f64>,
    /// Bound of `rel_err` and of `row_err`.
    pub tol: f64,
    /// Bound of `lse_abs`.
    pub lse_tol: f64,
    /// Why the case did not run or finish: a GPU error, or an earlier fault that left the
    /// context unusable.
    pub error: Option<String>,
}

impl CheckRow {
    pub fn pass(&self) -> bool {
        self.error.is_none()
            && self.rel_err <= self.tol
            && self.row_err <= self.tol
            && self.lse_abs.is_none_or(|e| e <= self.lse_tol)
    }
}

/// The self-test's result: the seed its inputs came from (rerun with it to get the same
/// inputs) and one row per case.
#[derive(Clone, Debug)]
pub struct SelfTest {
    pub seed: u64,
    pub rows: Vec<CheckRow>,
}

/// bf16/f16 storage with f32 accumulation: the bound the kernels are held to, norm-wise and
/// per row.
pub const CHECK_TOL: f64 = 1e-2;
/// The LSE is f32 arithmetic on the same rounded inputs as the reference: far tighter.
pub const CHECK_LSE_TOL: f64 = 1e-3;

/// What one case measured.
pub(crate) struct Measured {
    pub rel_err: f64,
    pub row_err: f64,
    pub lse_abs: Option<f64>,
}

impl Measured {
    /// An op with no LSE: norm-wise and worst-row errors, rows of `row`.
    fn op(got: &[f32], want: &[f64], row: usize) -> Measured {
        Measured {
            rel_err: rel_error(got, want),
            row_err: worst_row(got, want, row),
            lse_abs: None,
        }
    }
}

/// The largest `||got_r - want_r|| / ||want_r||` over rows of `row` (NaN counts as infinite).
fn worst_row(got: &[f32], want: &[f64], row: usize) -> f64 {
    got.chunks(row.max(1))
        .zip(want.chunks(row.max(1)))
        .map(|(g, w)| {
            let e = rel_error(g, w);
            if e.is_nan() {
                f64::INFINITY
            } else {
                e
            }
        })
        .fold(0.0, f64::max)
}

/// Runs the cases one at a time, recording each: an error becomes that case's row, and a
/// fault that leaves the context unusable (sticky on CUDA) marks every later case as not
/// run, instead of losing the table.
struct Recorder<'g> {
    gpu: &'g Gpu,
    rows: Vec<CheckRow>,
    /// The case whose fault poisoned the context.
    lost: Option<String>,
}

impl Recorder<'_> {
    fn run(&mut self, name: String, case: impl FnOnce() -> Result<Measured, GpuError>) {
        let mut row = CheckRow {
            name,
            rel_err: f64::NAN,
            row_err: f64::NAN,
            lse_abs: None,
            tol: CHECK_TOL,
            lse_tol: CHECK_LSE_TOL,
            error: None,
        };
        if let Some(at) = &self.lost {
            row.error = Some(format!("not run: the GPU context failed at \"{at}\""));
            self.rows.push(row);
            return;
        }
        match case().and_then(|m| {
            self.gpu.stream().synchronize()?;
            Ok(m)
        }) {
            Ok(m) => {
                row.rel_err = m.rel_err;
                row.row_err = m.row_err;
                row.lse_abs = m.lse_abs;
            }
            Err(e) => {
                row.error = Some(e.to_string());
                if self.gpu.stream().synchronize().is_err() {
                    self.lost = Some(row.name.clone());
                }
            }
        }
        self.rows.push(row);
    }
}

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn fill<T: GpuElem>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.unit())).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A seed from the clock, for a run that was not given one.
pub fn fresh_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}

fn to_f64<T: GpuElem>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn to_f32<T: GpuElem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// One attention case of the self-test (the CPU kernel runs the same list in CI).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttnCase {
    pub n_q: usize,
    pub n_kv: usize,
    pub h_q: usize,
    pub h_kv: usize,
    pub d: usize,
    pub mask: Mask,
    /// (q_pos, k_pos); None: the prefill default.
    pub at: Option<(usize, usize)>,
    /// Decode: the number of KV splits (None: the kernel's own choice).
    pub splits: Option<usize>,
    /// Check only this many query rows (spread, the first and last among them) against the
    /// float64 reference: a benchmark-sized case whose full reference would take minutes.
    pub sample: Option<usize>,
}

impl AttnCase {
    pub fn shape(&self) -> AttnShape {
        AttnShape {
            n_q: self.n_q,
            n_kv: self.n_kv,
            h_q: self.h_q,
            h_kv: self.h_kv,
            d: self.d,
        }
    }

    pub fn params(&self) -> AttnParams {
        let p = AttnParams::new(&self.shape(), self.mask);
        match self.at {
            Some((qp, kp)) => p.at(qp, kp),
            None => p,
        }
    }

    /// The query rows checked against the reference.
    pub fn rows(&self) -> Vec<usize> {
        match self.sample {
            Some(n) if n < self.n_q => {
                let mut r: Vec<usize> = (0..n).map(|i| i * (self.n_q - 1) / (n - 1)).collect();
                r.dedup();
                r
            }
            _ => (0..self.n_q).collect(),
        }
    }

    fn label(&self, decode: bool, dtype: &str) -> String {
        format!(
            "{} {dtype} n_q={} n_kv={} h={}/{} d={} {}{}{}{}",
            if decode { "decode" } else { "flash_fwd" },
            self.n_q,
            self.n_kv,
            self.h_q,
            self.h_kv,
            self.d,
            match self.mask {
                Mask::ChunkedLocal { chunk } if chunk == usize::MAX =>
                    "ChunkedLocal(unbounded)".into(),
                m => format!("{m:?}"),
            },
            self.at
                .map(|(a, b)| format!(" at q{a}/k{b}"))
                .unwrap_or_default(),
            self.splits
                .map(|s| format!(" splits={s}"))
                .unwrap_or_default(),
            self.sample
                .map(|s| format!(" ({s} rows checked)"))
                .unwrap_or_default(),
        )
    }
}

const fn case(n_q: usize, n_kv: usize, h_q: usize, h_kv: usize, d: usize, mask: Mask) -> AttnCase {
    AttnCase {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
        mask,
        at: None,
        splits: None,
        sample: None,
    }
}

pub(crate) fn prefill_cases() -> Vec<AttnCase> {
    vec![
        case(1, 1, 4, 4, 64, Mask::Causal),
        case(77, 77, 8, 2, 64, Mask::Causal),
        case(200, 333, 4, 4, 128, Mask::None),
        case(130, 130, 8, 1, 96, Mask::ChunkedLocal { chunk: 48 }),
        case(65, 1000, 16, 2, 80, Mask::Causal),
        AttnCase {
            at: Some((1000, 600)),
            ..case(300, 700, 8, 8, 128, Mask::Causal)
        },
        case(1500, 1500, 32, 4, 128, Mask::ChunkedLocal { chunk: 512 }),
        // Queries 90..130 over keys 100..164: the first ten rows see no key (a ring shard
        // from the future), beside rows that do, in one tile.
        AttnCase {
            at: Some((90, 100)),
            ..case(40, 64, 8, 2, 128, Mask::Causal)
        },
        // No keys at all: zeros and -inf.
        case(5, 0, 4, 4, 64, Mask::Causal),
        // Chunked-local at positions far from 0, the chunk boundaries 8128, 8192, 8256
        // crossing both queries and keys.
        AttnCase {
            at: Some((8150, 7950)),
            ..case(100, 300, 8, 2, 64, Mask::ChunkedLocal { chunk: 64 })
        },
        // An unbounded chunk is plain causal (a wrapped conversion made it one key a row).
        case(70, 70, 4, 1, 64, Mask::ChunkedLocal { chunk: usize::MAX }),
        // Benchmark-sized: 4K causal, GQA 8, sampled rows against the reference.
        AttnCase {
            sample: Some(40),
            ..case(4096, 4096, 16, 2, 128, Mask::Causal)
        },
    ]
}

pub(crate) fn decode_cases() -> Vec<AttnCase> {
    vec![
        case(1, 1, 8, 1, 128, Mask::Causal),
        case(1, 5000, 32, 4, 128, Mask::Causal),
        case(3, 4099, 8, 8, 64, Mask::Causal),
        case(1, 37000, 16, 2, 96, Mask::ChunkedLocal { chunk: 8192 }),
        case(2, 777, 8, 1, 80, Mask::None),
        // More splits than keys: most splits are empty.
        AttnCase {
            splits: Some(64),
            ..case(1, 40, 8, 2, 128, Mask::Causal)
        },
        // Chunked-local where every split before the last chunk is masked out.
        AttnCase {
            splits: Some(16),
            ..case(1, 20000, 8, 1, 128, Mask::ChunkedLocal { chunk: 8192 })
        },
        // Queries at 98, 99, 100 over keys from 100: two rows see nothing, one sees one key.
        AttnCase {
            at: Some((98, 100)),
            ..case(3, 500, 8, 2, 64, Mask::Causal)
        },
        case(1, 0, 8, 2, 64, Mask::Causal),
    ]
}

/// The float64 reference of `c` on the rows `c.rows()`, and those rows gathered from a
/// kernel's `out` and `lse`.
pub(crate) struct Expected {
    pub want: Reference,
    pub rows: Vec<usize>,
}

impl Expected {
    pub fn new<T: Element>(c: &AttnCase, q: &[T], k: &[T], v: &[T]) -> Expected {
        let (shape, params) = (c.shape(), c.params());
        let rows = c.rows();
        if rows.len() == c.n_q {
            return Expected {
                want: reference(q, k, v, shape, &params),
                rows,
            };
        }
        // One query at a time, at its own position.
        let per = c.h_q * c.d;
        let mut want = Reference {
            out: Vec::new(),
            lse: Vec::new(),
            out_abs: Vec::new(),
            max_abs_score: Vec::new(),
            d: c.d,
        };
        for &r in &rows {
            let one = AttnShape { n_q: 1, ..shape };
            let p = params.at(params.q_pos + r, params.k_pos);
            let part = reference(&q[r * per..][..per], k, v, one, &p);
            want.out.extend(part.out);
            want.lse.extend(part.lse);
            want.out_abs.extend(part.out_abs);
            want.max_abs_score.extend(part.max_abs_score);
        }
        Expected { want, rows }
    }

    /// Errors of a kernel's full `out` (`[n_q, h_q, d]`) and `lse` on the checked rows.
    pub fn measure(&self, c: &AttnCase, out: &[f32], lse: &[f32]) -> Measured {
        let per = c.h_q * c.d;
        let (mut o, mut l) = (Vec::new(), Vec::new());
        for &r in &self.rows {
            o.extend_from_slice(&out[r * per..][..per]);
            l.extend_from_slice(&lse[r * c.h_q..][..c.h_q]);
        }
        let e = errors(&o, &l, &self.want);
        let lse_abs = l
            .iter()
            .zip(&self.want.lse)
            .map(|(&g, &w)| {
                if w == f64::NEG_INFINITY && g == f32::NEG_INFINITY {
                    0.0
                } else {
                    let e = (g as f64 - w).abs();
                    if e.is_nan() {
                        f64::INFINITY
                    } else {
                        e
                    }
                }
            })
            .fold(0.0, f64::max);
        Measured {
            rel_err: e.out,
            row_err: e.row_out,
            lse_abs: Some(lse_abs),
        }
    }
}

/// Builds a paged pool holding `k`/`v` (`[n_kv, h_kv, d]`) in shuffled blocks of `bt` tokens,
/// with spare blocks of noise: returns (pool, table).
fn paged<T: GpuElem>(
    k: &[T],
    v: &[T],
    n_kv: usize,
    hd: usize,
    bt: usize,
    rng: &mut Rng,
) -> (Vec<T>, Vec<i32>) {
    let needed = n_kv.div_ceil(bt).max(1);
    let blocks = needed + 3;
    let mut pool: Vec<T> = rng.fill(blocks * 2 * bt * hd);
    let mut order: Vec<usize> = (0..blocks).collect();
    for i in (1..blocks).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let table: Vec<i32> = order[..needed].iter().map(|&b| b as i32).collect();
    for t in 0..n_kv {
        let b = table[t / bt] as usize;
        let at = (b * 2 * bt + t % bt) * hd;
        pool[at..at + hd].copy_from_slice(&k[t * hd..(t + 1) * hd]);
        pool[at + bt * hd..at + bt * hd + hd].copy_from_slice(&v[t * hd..(t + 1) * hd]);
    }
    (pool, table)
}

/// `x` and one more element of noise.
fn padded<T: GpuElem>(x: &[T]) -> Vec<T> {
    let mut p = x.to_vec();
    p.push(T::from_f32(0.5));
    p
}

fn attention_rows<T: GpuElem + Element>(
    rec: &mut Recorder<'_>,
    rng: &mut Rng,
    decode: bool,
    scope: Scope,
) {
    let mut cases = if decode {
        decode_cases()
    } else {
        prefill_cases()
    };
    if scope == Scope::Small {
        cases.retain(|c| c.n_q * c.n_kv <= 5_000 && c.n_kv > 0);
    }
    // Uniform inputs, and the hard ones (keys of +-30, a spike key, rows whose only visible
    // key is far below the others): a kernel without its running maximum overflows on them.
    let kinds = [Inputs::Uniform(1.0), Inputs::Hard];
    for (c, kind) in cases
        .iter()
        .flat_map(|c| kinds.iter().map(move |k| (c, *k)))
    {
        let (shape, params) = (c.shape(), c.params());
        let (q, k, v) = inputs::<T>(&mut TestRng::new(rng.next()), &shape, &params, kind);
        let want = Expected::new(c, &q, &k, &v);
        for paged_bt in [None, Some(16usize), Some(48)] {
            let name = format!(
                "{} {kind:?}{}",
                c.label(decode, <T as GpuElem>::DTYPE.name()),
                paged_bt
                    .map(|bt| format!(" paged bt={bt}"))
                    .unwrap_or_default(),
            );
            let pool_seed = rng.next();
            let gpu = rec.gpu;
            rec.run(name, || {
                let s = gpu.stream();
                let q_d = s.clone_htod(&q)?;
                let (k_d, v_d, table) = match paged_bt {
                    // One spare element: the driver allocates no empty buffer (n_kv = 0).
                    None => (
                        s.clone_htod(&padded(&k))?,
                        s.clone_htod(&padded(&v))?,
                        Vec::new(),
                    ),
                    Some(bt) => {
                        let mut r = Rng::new(pool_seed);
                        let (pool, table) = paged(&k, &v, c.n_kv, c.h_kv * c.d, bt, &mut r);
                        let p = s.clone_htod(&pool)?;
                        (p.clone(), p, table)
                    }
                };
                let layout = match paged_bt {
                    None => KvLayout::Contiguous,
                    Some(bt) => KvLayout::Paged {
                        table: &table,
                        block_tokens: bt,
                    },
                };
                let mut out = s.alloc_zeros::<T>(q.len())?;
                let mut lse = s.alloc_zeros::<f32>(c.n_q * c.h_q)?;
                if decode {
                    gpu.decode(
                        &q_d, &k_d, &v_d, layout, shape, &params, c.splits, &mut out, &mut lse,
                    )?;
                } else {
                    gpu.attention(&q_d, &k_d, &v_d, layout, shape, &params, &mut out, &mut lse)?;
                }
                let got = to_f32(&s.clone_dtoh(&out)?);
                let got_lse = s.clone_dtoh(&lse)?;
                Ok(want.measure(c, &got, &got_lse))
            });
        }
    }
}

fn ops_rows<T: GpuElem>(rec: &mut Recorder<'_>, rng: &mut Rng)
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let gpu = rec.gpu;
    let s = gpu.stream();
    let name = |op: &str| format!("{op} {}", T::DTYPE.name());

    // RMSNorm, with and without a weight, on an odd row length.
    let (r, n) = (37, 1000);
    let x: Vec<T> = rng.fill(r * n);
    let w: Vec<T> = rng.fill(n);
    for weighted in [true, false] {
        let label = if weighted {
            "rms_norm"
        } else {
            "rms_norm (no weight)"
        };
        rec.run(name(label), || {
            let x_d = s.clone_htod(&x)?;
            let w_d = s.clone_htod(&w)?;
            let mut y_d = s.alloc_zeros::<T>(r * n)?;
            gpu.rms_norm(
                &x_d.as_view(),
                weighted.then_some(&w_d),
                &mut y_d.as_view_mut(),
                n,
                1e-5,
            )?;
            let got = to_f32(&s.clone_dtoh(&y_d)?);
            let xf = to_f64(&x);
            let mut want = vec![0f64; r * n];
            for i in 0..r {
                let row = &xf[i * n..(i + 1) * n];
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + 1e-5).sqrt();
                for j in 0..n {
                    let wj = if weighted { w[j].to_f32() as f64 } else { 1.0 };
                    want[i * n + j] = row[j] * inv * wj;
                }
            }
            Ok(Measured::op(&got, &want, n))
        });
    }

    // RoPE at far positions, both pairings, a partial rotary dim.
    let (tokens, heads, d, half) = (19, 3, 128, 48);
    let pos: Vec<i64> = (0..tokens).map(|i| 9_999_000 + 37 * i as i64).collect();
    let inv: Vec<f64> = (0..half)
        .map(|i| 500000f64.powf(-((2 * i) as f64) / (2 * half) as f64))
        .collect();
    for interleaved in [true, false] {
        let x: Vec<T> = rng.fill(tokens * heads * d);
        let label = if interleaved {
            "rope interleaved"
        } else {
            "rope rotate-half"
        };
        rec.run(name(label), || {
            let mut x_d = s.clone_htod(&x)?;
            gpu.rope(
                &mut x_d.as_view_mut(),
                &s.clone_htod(&pos)?,
                &s.clone_htod(&inv)?,
                heads,
                d,
                interleaved,
                1.0,
            )?;
            let got = to_f32(&s.clone_dtoh(&x_d)?);
            let mut want = to_f64(&x);
            for t in 0..tokens {
                for h in 0..heads {
                    let row = &mut want[(t * heads + h) * d..][..d];
                    for (i, f) in inv.iter().enumerate() {
                        let (sn, cs) = (pos[t] as f64 * f).sin_cos();
                        let (a, b) = if interleaved {
                            (2 * i, 2 * i + 1)
                        } else {
                            (i, i + half)
                        };
                        let (x0, x1) = (row[a], row[b]);
                        row[a] = x0 * cs - x1 * sn;
                        row[b] = x0 * sn + x1 * cs;
                    }
                }
            }
            Ok(Measured::op(&got, &want, d))
        });
    }

    // SwiGLU on a fused gate|up buffer; the residual add.
    let (r, n) = (33, 517);
    let gu: Vec<T> = rng.fill(r * 2 * n);
    rec.run(name("silu_mul"), || {
        let mut out_d = s.alloc_zeros::<T>(r * n)?;
        gpu.silu_mul(
            &s.clone_htod(&gu)?.as_view(),
            &mut out_d.as_view_mut(),
            r,
            n,
        )?;
        let got = to_f32(&s.clone_dtoh(&out_d)?);
        let g = to_f64(&gu);
        let want: Vec<f64> = (0..r * n)
            .map(|i| {
                let (row, j) = (i / n, i % n);
                let a = g[row * 2 * n + j];
                a / (1.0 + (-a).exp()) * g[row * 2 * n + n + j]
            })
            .collect();
        Ok(Measured::op(&got, &want, n))
    });
    let g: Vec<T> = rng.fill(r * n);
    let u: Vec<T> = rng.fill(r * n);
    rec.run(name("silu_mul (separate gate, up)"), || {
        let mut out_d = s.alloc_zeros::<T>(r * n)?;
        let (g_d, u_d) = (s.clone_htod(&g)?, s.clone_htod(&u)?);
        gpu.silu_mul_pair(
            &g_d.as_view(),
            &u_d.as_view(),
            &mut out_d.as_view_mut(),
            r,
            n,
        )?;
        let got = to_f32(&s.clone_dtoh(&out_d)?);
        let want: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(a, b)| {
                let a = a.to_f32() as f64;
                a / (1.0 + (-a).exp()) * b.to_f32() as f64
            })
            .collect();
        Ok(Measured::op(&got, &want, n))
    });
    // In-place weightless RMSNorm over heads of 128; row scales.
    let (rows, hd) = (29, 128);
    let x: Vec<T> = rng.fill(rows * hd);
    rec.run(name("rms_norm in place"), || {
        let mut x_d = s.clone_htod(&x)?;
        gpu.rms_norm_in_place(&mut x_d.as_view_mut(), hd, 1e-5)?;
        let got = to_f32(&s.clone_dtoh(&x_d)?);
        let xf = to_f64(&x);
        let want: Vec<f64> = xf
            .chunks(hd)
            .flat_map(|row| {
                let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / hd as f64 + 1e-5).sqrt();
                row.iter().map(move |v| v * inv)
            })
            .collect();
        Ok(Measured::op(&got, &want, hd))
    });
    let scales: Vec<f32> = (0..rows).map(|_| 1.0 + rng.unit().abs()).collect();
    rec.run(name("scale_rows"), || {
        let mut x_d = s.clone_htod(&x)?;
        gpu.scale_rows(&mut x_d.as_view_mut(), &scales, hd)?;
        let got = to_f32(&s.clone_dtoh(&x_d)?);
        let want: Vec<f64> = (0..rows * hd)
            .map(|i| x[i].to_f32() as f64 * scales[i / hd] as f64)
            .collect();
        Ok(Measured::op(&got, &want, hd))
    });
    let a: Vec<T> = rng.fill(4099);
    let b: Vec<T> = rng.fill(4099);
    rec.run(name("add"), || {
        let mut a_d = s.clone_htod(&a)?;
        gpu.add(&mut a_d.as_view_mut(), &s.clone_htod(&b)?.as_view())?;
        let got = to_f32(&s.clone_dtoh(&a_d)?);
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.to_f32() as f64 + y.to_f32() as f64)
            .collect();
        Ok(Measured::op(&got, &want, 64))
    });

    // MoE: gather with router scales, combine top-2 with one unused slot.
    let (tokens, n) = (11, 300);
    let x: Vec<T> = rng.fill(tokens * n);
    let pick: Vec<i32> = (0..7).map(|_| rng.below(tokens) as i32).collect();
    let scale: Vec<f32> = (0..7).map(|_| rng.unit().abs()).collect();
    let e: Vec<T> = rng.fill(7 * n);
    rec.run(name("moe_gather"), || {
        let mut e_d = s.alloc_zeros::<T>(7 * n)?;
        gpu.moe_gather(
            &s.clone_htod(&x)?.as_view(),
            &pick,
            Some(&scale),
            &mut e_d.as_view_mut(),
            n,
        )?;
        let got = to_f32(&s.clone_dtoh(&e_d)?);
        let want: Vec<f64> = (0..7 * n)
            .map(|i| x[pick[i / n] as usize * n + i % n].to_f32() as f64 * scale[i / n] as f64)
            .collect();
        Ok(Measured::op(&got, &want, n))
    });
    let slot: Vec<i32> = (0..tokens * 2)
        .map(|i| if i == 3 { -1 } else { rng.below(7) as i32 })
        .collect();
    let w: Vec<f32> = (0..tokens * 2).map(|_| rng.unit()).collect();
    rec.run(name("moe_combine"), || {
        let mut y_d = s.clone_htod(&x)?;
        gpu.moe_combine(
            &s.clone_htod(&e)?.as_view(),
            &slot,
            &w,
            2,
            &mut y_d.as_view_mut(),
            n,
        )?;
        let got = to_f32(&s.clone_dtoh(&y_d)?);
        let want: Vec<f64> = (0..tokens * n)
            .map(|i| {
                let (t, j) = (i / n, i % n);
                let mut acc = x[i].to_f32() as f64;
                for kk in 0..2 {
                    let sl = slot[t * 2 + kk];
                    if sl >= 0 {
                        acc += w[t * 2 + kk] as f64 * e[sl as usize * n + j].to_f32() as f64;
                    }
                }
                acc
            })
            .collect();
        Ok(Measured::op(&got, &want, n))
    });

    // A projection through cuBLAS at awkward sizes.
    let (m, k, n) = (37, 576, 1537);
    let x: Vec<T> = rng.fill(m * k);
    let w: Vec<T> = rng.fill(n * k);
    rec.run(name("linear (cuBLAS)"), || {
        let mut y_d = s.alloc_zeros::<T>(m * n)?;
        gpu.linear(
            &s.clone_htod(&x)?.as_view(),
            &s.clone_htod(&w)?.as_view(),
            &mut y_d.as_view_mut(),
            (m, k, n),
        )?;
        let got = to_f32(&s.clone_dtoh(&y_d)?);
        let (xf, wf) = (to_f64(&x), to_f64(&w));
        let want: Vec<f64> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..k).map(|j| xf[r * k + j] * wf[c * k + j]).sum()
            })
            .collect();
        Ok(Measured::op(&got, &want, n))
    });
}

/// Which cases the self-test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every case, bf16 and f16.
    Full,
    /// Small bf16 cases of every kernel (the mixed empty rows and empty splits among them):
    /// for compute-sanitizer, which runs kernels hundreds of times slower.
    Small,
}

/// Runs every GPU kernel against its reference on random inputs drawn from `seed` (None: a
/// fresh one, in the result). Every case gets a row: one that fails to run is recorded with
/// its error, and the rest still run.
pub fn self_test(gpu: &Gpu, seed: Option<u64>, scope: Scope) -> SelfTest {
    let seed = seed.unwrap_or_else(fresh_seed);
    let mut rng = Rng::new(seed);
    let mut rec = Recorder {
        gpu,
        rows: Vec::new(),
        lost: None,
    };
    for decode in [false, true] {
        attention_rows::<half::bf16>(&mut rec, &mut rng, decode, scope);
        if scope == Scope::Full {
            attention_rows::<half::f16>(&mut rec, &mut rng, decode, scope);
        }
    }
    ops_rows::<half::bf16>(&mut rec, &mut rng);
    if scope == Scope::Full {
        ops_rows::<half::f16>(&mut rec, &mut rng);
    }
    SelfTest {
        seed,
        rows: rec.rows,
    }
}

/// One timing case: `batch` sequences of `l` tokens, `heads` heads of `d` (folded into one
/// `[l, batch * heads, d]` call: independent sequences of one length are just more heads).
#[derive(Clone, Copy, Debug)]
pub struct BenchCase {
    pub l: usize,
    pub batch: usize,
    pub heads: usize,
    pub d: usize,
    pub causal: bool,
}

impl BenchCase {
    /// FLOPs of the two products over the visible keys (half for causal).
    pub fn flops(&self) -> f64 {
        let f = 4.0 * (self.l * self.l * self.d * self.heads * self.batch) as f64;
        if self.causal {
            f / 2.0
        } else {
            f
        }
    }
}

/// Median milliseconds of our bf16 flash_fwd on `case` (CUDA events, after warm-up).
pub fn bench_attention(gpu: &Gpu, case: BenchCase, reps: usize) -> Result<f64, GpuError> {
    let h = case.batch * case.heads;
    let shape = AttnShape {
        n_q: case.l,
        n_kv: case.l,
        h_q: h,
        h_kv: h,
        d: case.d,
    };
    let mask = if case.causal {
        Mask::Causal
    } else {
        Mask::None
    };
    let params = AttnParams::new(&shape, mask);
    let mut rng = Rng::new(fresh_seed());
    let s = gpu.stream();
    let n = case.l * h * case.d;
    let q = s.clone_htod(&rng.fill::<half::bf16>(n))?;
    let k = s.clone_htod(&rng.fill::<half::bf16>(n))?;
    let v = s.clone_htod(&rng.fill::<half::bf16>(n))?;
    let mut out = s.alloc_zeros::<half::bf16>(n)?;
    let mut lse = s.alloc_zeros::<f32>(case.l * h)?;
    let mut run = || {
        gpu.attention(
            &q,
            &k,
            &v,
            KvLayout::Contiguous,
            shape,
            &params,
            &mut out,
            &mut lse,
        )
    };
    for _ in 0..3 {
        run()?;
    }
    let ctx = gpu.context();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        start.record(s)?;
        run()?;
        end.record(s)?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

#[cfg(test)]
mod tests {
    //! The self-test's attention cases through the CPU kernel, in CI: the cases themselves
    //! (rows that see no key beside rows that do, no keys, chunked-local far from 0, an
    //! unbounded chunk, empty splits, sampled rows) and their bounds are proven here before
    //! a GPU meets them.
    use super::*;
    use crate::attention::{attention_with, CpuOptions, Strategy};
    use half::bf16;

    fn run_on_cpu(c: &AttnCase, decode: bool, seed: u64) -> CheckRow {
        let (shape, params) = (c.shape(), c.params());
        let kind = if seed.is_multiple_of(2) {
            Inputs::Uniform(1.0)
        } else {
            Inputs::Hard
        };
        let (q, k, v) = inputs::<bf16>(&mut TestRng::new(seed), &shape, &params, kind);
        let want = Expected::new(c, &q, &k, &v);
        let strategy = match (decode, c.splits) {
            (true, Some(splits)) => Strategy::SplitKv { splits },
            _ => Strategy::Auto,
        };
        let opts = CpuOptions {
            strategy,
            ..CpuOptions::default()
        };
        let mut out = vec![bf16::ZERO; q.len()];
        let mut lse = vec![0f32; c.n_q * c.h_q];
        attention_with(&q, &k, &v, shape, &params, &mut out, &mut lse, &opts).unwrap();
        let m = want.measure(c, &to_f32(&out), &lse);
        CheckRow {
            name: format!("{} {kind:?} (seed {seed})", c.label(decode, "bf16")),
            rel_err: m.rel_err,
            row_err: m.row_err,
            lse_abs: m.lse_abs,
            tol: CHECK_TOL,
            lse_tol: CHECK_LSE_TOL,
            error: None,
        }
    }

    #[test]
    fn the_gpu_cases_pass_on_the_cpu_kernel_within_the_gpu_bounds() {
        let seed = fresh_seed();
        let mut failed = Vec::new();
        for decode in [false, true] {
            let cases = if decode {
                decode_cases()
            } else {
                prefill_cases()
            };
            for (i, c) in cases.iter().enumerate() {
                for j in 0..2 {
                    let r = run_on_cpu(c, decode, seed.wrapping_add(2 * i as u64 + j));
                    if !r.pass() {
                        failed.push(r);
                    }
                }
            }
        }
        assert!(failed.is_empty(), "{failed:#?}");
    }

    #[test]
    fn a_wrong_row_or_lse_fails_a_check_the_norm_would_pass() {
        // 16,384 rows, one of them zeroed: the norm-wise error stays under the bound, the
        // per-row one does not; an LSE off by 0.05 is caught absolutely.
        let c = case(4096, 64, 4, 4, 64, Mask::None);
        let (q, k, v) = inputs::<bf16>(
            &mut TestRng::new(7),
            &c.shape(),
            &c.params(),
            Inputs::Uniform(1.0),
        );
        let want = Expected::new(&c, &q, &k, &v);
        let mut out: Vec<f32> = want.want.out.iter().map(|x| *x as f32).collect();
        let mut lse: Vec<f32> = want.want.lse.iter().map(|x| *x as f32).collect();
        let good = want.measure(&c, &out, &lse);
        assert!(good.rel_err < 1e-6 && good.row_err < 1e-6 && good.lse_abs.unwrap() < 1e-5);
        out[100 * 64..101 * 64].fill(0.0);
        let bad_row = want.measure(&c, &out, &lse);
        assert!(
            bad_row.rel_err < CHECK_TOL && bad_row.row_err > CHECK_TOL,
            "{}",
            bad_row.row_err
        );
        out[100 * 64..101 * 64].copy_from_slice(
            &want.want.out[100 * 64..101 * 64]
                .iter()
                .map(|x| *x as f32)
                .collect::<Vec<_>>(),
        );
        lse[5] += 0.05;
        let bad_lse = want.measure(&c, &out, &lse);
        assert!(bad_lse.lse_abs.unwrap() > CHECK_LSE_TOL);
    }

    #[test]
    fn sampled_rows_are_spread_and_include_both_ends() {
        let c = AttnCase {
            sample: Some(40),
            ..case(4096, 4096, 16, 2, 128, Mask::Causal)
        };
        let r = c.rows();
        assert_eq!((r.len(), r[0], r[39]), (40, 0, 4095));
        assert!(r.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(case(5, 5, 1, 1, 64, Mask::None).rows(), vec![0, 1, 2, 3, 4]);
    }
}
