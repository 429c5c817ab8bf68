//! The GPU self-test (every kernel against the CPU kernel or a float64 reference, on fresh
//! random inputs at awkward sizes) and the attention timing, shared by the unit tests and
//! `longctx bench gpu`, so the GPU check needs only the one binary.

use super::{Gpu, GpuElem, GpuError, KvLayout};
use crate::attention::reference::{errors, inputs, reference, rel_error, Inputs, TestRng};
use crate::{AttnParams, AttnShape, Element, Mask};
use cudarc::driver::sys::CUevent_flags;
use std::time::{SystemTime, UNIX_EPOCH};

/// One comparison: relative error of the GPU result against the reference, and the bound.
#[derive(Clone, Debug)]
pub struct CheckRow {
    pub name: String,
    pub rel_err: f64,
    pub tol: f64,
}

impl CheckRow {
    pub fn pass(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// bf16/f16 storage with f32 accumulation: the bound the kernels are held to.
const TOL: f64 = 1e-2;

struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t | 1)
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
        (self.next() % n as u64) as usize
    }
}

fn to_f64<T: GpuElem>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn to_f32<T: GpuElem>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

struct AttnCase {
    n_q: usize,
    n_kv: usize,
    h_q: usize,
    h_kv: usize,
    d: usize,
    mask: Mask,
    /// (q_pos, k_pos); None: the prefill default.
    at: Option<(usize, usize)>,
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
    }
}

fn prefill_cases() -> Vec<AttnCase> {
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
    ]
}

fn decode_cases() -> Vec<AttnCase> {
    vec![
        case(1, 1, 8, 1, 128, Mask::Causal),
        case(1, 5000, 32, 4, 128, Mask::Causal),
        case(3, 4099, 8, 8, 64, Mask::Causal),
        case(1, 37000, 16, 2, 96, Mask::ChunkedLocal { chunk: 8192 }),
        case(2, 777, 8, 1, 80, Mask::None),
    ]
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

fn attention_rows<T: GpuElem + Element>(
    gpu: &Gpu,
    rng: &mut Rng,
    decode: bool,
    out_rows: &mut Vec<CheckRow>,
) -> Result<(), GpuError> {
    let cases = if decode {
        decode_cases()
    } else {
        prefill_cases()
    };
    // Uniform inputs, and the hard ones (keys of +-30, a spike key, rows whose only visible
    // key is far below the others): a kernel without its running maximum overflows on them.
    let kinds = [Inputs::Uniform(1.0), Inputs::Hard];
    for (c, kind) in cases
        .iter()
        .flat_map(|c| kinds.iter().map(move |k| (c, *k)))
    {
        let shape = AttnShape {
            n_q: c.n_q,
            n_kv: c.n_kv,
            h_q: c.h_q,
            h_kv: c.h_kv,
            d: c.d,
        };
        let mut params = AttnParams::new(&shape, c.mask);
        if let Some((qp, kp)) = c.at {
            params = params.at(qp, kp);
        }
        let (q, k, v) = inputs::<T>(&mut TestRng::new(rng.next()), &shape, &params, kind);
        let want = reference(&q, &k, &v, shape, &params);
        let s = gpu.stream();
        let q_d = s.clone_htod(&q)?;
        for paged_bt in [None, Some(16usize), Some(48)] {
            let (k_d, v_d, table) = match paged_bt {
                None => (s.clone_htod(&k)?, s.clone_htod(&v)?, Vec::new()),
                Some(bt) => {
                    let (pool, table) = paged(&k, &v, c.n_kv, c.h_kv * c.d, bt, rng);
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
                    &q_d, &k_d, &v_d, layout, shape, &params, None, &mut out, &mut lse,
                )?;
            } else {
                gpu.attention(&q_d, &k_d, &v_d, layout, shape, &params, &mut out, &mut lse)?;
            }
            let got = to_f32(&s.clone_dtoh(&out)?);
            let got_lse = s.clone_dtoh(&lse)?;
            // Norm-wise and worst row, output and LSE.
            let err = errors(&got, &got_lse, &want).worst();
            out_rows.push(CheckRow {
                name: format!(
                    "{} {} n_q={} n_kv={} h={}/{} d={} {:?}{}{} {kind:?}",
                    if decode { "decode" } else { "flash_fwd" },
                    <T as GpuElem>::DTYPE.name(),
                    c.n_q,
                    c.n_kv,
                    c.h_q,
                    c.h_kv,
                    c.d,
                    c.mask,
                    c.at.map(|(a, b)| format!(" at q{a}/k{b}"))
                        .unwrap_or_default(),
                    paged_bt
                        .map(|bt| format!(" paged bt={bt}"))
                        .unwrap_or_default(),
                ),
                rel_err: err,
                tol: TOL,
            });
        }
    }
    Ok(())
}

fn ops_rows<T: GpuElem>(gpu: &Gpu, rng: &mut Rng, rows: &mut Vec<CheckRow>) -> Result<(), GpuError>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let s = gpu.stream();
    let name = |op: &str| format!("{op} {}", T::DTYPE.name());

    // RMSNorm, with and without a weight, on an odd row length.
    let (r, n) = (37, 1000);
    let x: Vec<T> = rng.fill(r * n);
    let w: Vec<T> = rng.fill(n);
    for weighted in [true, false] {
        let x_d = s.clone_htod(&x)?;
        let w_d = s.clone_htod(&w)?;
        let mut y_d = s.alloc_zeros::<T>(r * n)?;
        gpu.rms_norm(&x_d, weighted.then_some(&w_d), &mut y_d, n, 1e-5)?;
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
        rows.push(CheckRow {
            name: name(if weighted {
                "rms_norm"
            } else {
                "rms_norm (no weight)"
            }),
            rel_err: rel_error(&got, &want),
            tol: TOL,
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
        let mut x_d = s.clone_htod(&x)?;
        gpu.rope(
            &mut x_d,
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
        rows.push(CheckRow {
            name: name(if interleaved {
                "rope interleaved"
            } else {
                "rope rotate-half"
            }),
            rel_err: rel_error(&got, &want),
            tol: TOL,
        });
    }

    // SwiGLU on a fused gate|up buffer; the residual add.
    let (r, n) = (33, 517);
    let gu: Vec<T> = rng.fill(r * 2 * n);
    let mut out_d = s.alloc_zeros::<T>(r * n)?;
    gpu.silu_mul(&s.clone_htod(&gu)?, &mut out_d, r, n)?;
    let got = to_f32(&s.clone_dtoh(&out_d)?);
    let g = to_f64(&gu);
    let want: Vec<f64> = (0..r * n)
        .map(|i| {
            let (row, j) = (i / n, i % n);
            let a = g[row * 2 * n + j];
            a / (1.0 + (-a).exp()) * g[row * 2 * n + n + j]
        })
        .collect();
    rows.push(CheckRow {
        name: name("silu_mul"),
        rel_err: rel_error(&got, &want),
        tol: TOL,
    });
    let a: Vec<T> = rng.fill(4099);
    let b: Vec<T> = rng.fill(4099);
    let mut a_d = s.clone_htod(&a)?;
    gpu.add(&mut a_d, &s.clone_htod(&b)?)?;
    let got = to_f32(&s.clone_dtoh(&a_d)?);
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.to_f32() as f64 + y.to_f32() as f64)
        .collect();
    rows.push(CheckRow {
        name: name("add"),
        rel_err: rel_error(&got, &want),
        tol: TOL,
    });

    // MoE: gather with router scales, combine top-2 with one unused slot.
    let (tokens, n) = (11, 300);
    let x: Vec<T> = rng.fill(tokens * n);
    let pick: Vec<i32> = (0..7).map(|_| rng.below(tokens) as i32).collect();
    let scale: Vec<f32> = (0..7).map(|_| rng.unit().abs()).collect();
    let mut e_d = s.alloc_zeros::<T>(7 * n)?;
    let x_d = s.clone_htod(&x)?;
    gpu.moe_gather(&x_d, &pick, Some(&scale), &mut e_d, n)?;
    let e = s.clone_dtoh(&e_d)?;
    let want: Vec<f64> = (0..7 * n)
        .map(|i| x[pick[i / n] as usize * n + i % n].to_f32() as f64 * scale[i / n] as f64)
        .collect();
    rows.push(CheckRow {
        name: name("moe_gather"),
        rel_err: rel_error(&to_f32(&e), &want),
        tol: TOL,
    });
    let slot: Vec<i32> = (0..tokens * 2)
        .map(|i| if i == 3 { -1 } else { rng.below(7) as i32 })
        .collect();
    let w: Vec<f32> = (0..tokens * 2).map(|_| rng.unit()).collect();
    let mut y_d = s.clone_htod(&x)?;
    gpu.moe_combine(&e_d, &slot, &w, 2, &mut y_d, n)?;
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
    rows.push(CheckRow {
        name: name("moe_combine"),
        rel_err: rel_error(&got, &want),
        tol: TOL,
    });

    // A projection through cuBLAS at awkward sizes.
    let (m, k, n) = (37, 576, 1537);
    let x: Vec<T> = rng.fill(m * k);
    let w: Vec<T> = rng.fill(n * k);
    let mut y_d = s.alloc_zeros::<T>(m * n)?;
    gpu.linear(&s.clone_htod(&x)?, &s.clone_htod(&w)?, &mut y_d, (m, k, n))?;
    let got = to_f32(&s.clone_dtoh(&y_d)?);
    let (xf, wf) = (to_f64(&x), to_f64(&w));
    let want: Vec<f64> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k).map(|j| xf[r * k + j] * wf[c * k + j]).sum()
        })
        .collect();
    rows.push(CheckRow {
        name: name("linear (cuBLAS)"),
        rel_err: rel_error(&got, &want),
        tol: TOL,
    });
    Ok(())
}

/// Runs every GPU kernel against its reference on fresh random inputs.
pub fn self_test(gpu: &Gpu) -> Result<Vec<CheckRow>, GpuError> {
    let mut rng = Rng::new();
    let mut rows = Vec::new();
    for decode in [false, true] {
        attention_rows::<half::bf16>(gpu, &mut rng, decode, &mut rows)?;
        attention_rows::<half::f16>(gpu, &mut rng, decode, &mut rows)?;
    }
    ops_rows::<half::bf16>(gpu, &mut rng, &mut rows)?;
    ops_rows::<half::f16>(gpu, &mut rng, &mut rows)?;
    Ok(rows)
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
    let mut rng = Rng::new();
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
