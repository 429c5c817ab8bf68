//! The naive float64 attention every kernel is tested against: scores, softmax and the
//! weighted sum written out directly, with no tiling and no online rescaling, and its masks
//! taken from their written definitions (not from [`super::Mask::visible`], which the kernels
//! call: a bug there must not cancel out). Also the error measures and the hard inputs the
//! attention tests of every crate share.

use super::{AttnParams, AttnShape, Mask};
use crate::Element;

/// Whether a query at absolute position `q` sees a key at absolute position `k`, from the
/// definitions: causal `k <= q`; chunked-local the same chunk (integer division of the
/// absolute positions) and `k <= q`.
pub fn sees(mask: Mask, q: usize, k: usize) -> bool {
    match mask {
        Mask::None => true,
        Mask::Causal => k <= q,
        Mask::ChunkedLocal { chunk } => k <= q && k / chunk == q / chunk,
    }
}

/// The float64 result of one attention call.
pub struct Reference {
    /// `[n_q, h_q, d]`.
    pub out: Vec<f64>,
    /// `[n_q, h_q]`; `-inf` for a row that sees no key.
    pub lse: Vec<f64>,
    /// `[n_q, h_q, d]`: `sum_j p_j |v_j|`, the size an output entry's rounding error scales
    /// with (an output that cancels to near zero is not held to a tighter bound than its
    /// terms allow).
    pub out_abs: Vec<f64>,
    /// `[n_q, h_q]`: the largest `|score|` a row sees, which an LSE's error scales with.
    pub max_abs_score: Vec<f64>,
    pub d: usize,
}

/// Output `[n_q, h_q, d]` and log-sum-exp `[n_q, h_q]` in f64, computed naively from the
/// same inputs and parameters as [`super::attention`]. The scale is applied in f64.
pub fn attention_f64<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    params: &AttnParams,
) -> (Vec<f64>, Vec<f64>) {
    let r = reference(q, k, v, shape, params);
    (r.out, r.lse)
}

/// [`attention_f64`] with the per-row error scales.
pub fn reference<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    params: &AttnParams,
) -> Reference {
    let AttnShape {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
    } = shape;
    let g = h_q / h_kv;
    let f = |x: &T| x.to_f32() as f64;
    let mut out = vec![0f64; n_q * h_q * d];
    let mut out_abs = vec![0f64; n_q * h_q * d];
    let mut lse = vec![f64::NEG_INFINITY; n_q * h_q];
    let mut max_abs_score = vec![0f64; n_q * h_q];
    let scale = params.scale as f64;
    let mut s = vec![0f64; n_kv];
    for i in 0..n_q {
        let keys: Vec<usize> = (0..n_kv)
            .filter(|&j| sees(params.mask, params.q_pos + i, params.k_pos + j))
            .collect();
        if keys.is_empty() {
            continue;
        }
        for h in 0..h_q {
            let hk = h / g;
            let row = i * h_q + h;
            let qr = &q[row * d..][..d];
            for &j in &keys {
                let kr = &k[(j * h_kv + hk) * d..][..d];
                s[j] = scale * qr.iter().zip(kr).map(|(a, b)| f(a) * f(b)).sum::<f64>();
            }
            let mx = keys.iter().map(|&j| s[j]).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = keys.iter().map(|&j| (s[j] - mx).exp()).sum();
            lse[row] = mx + sum.ln();
            max_abs_score[row] = keys.iter().map(|&j| s[j].abs()).fold(0.0, f64::max);
            let o = &mut out[row * d..][..d];
            let oa = &mut out_abs[row * d..][..d];
            for &j in &keys {
                let p = (s[j] - mx).exp() / sum;
                let vr = &v[(j * h_kv + hk) * d..][..d];
                for ((x, a), y) in o.iter_mut().zip(oa.iter_mut()).zip(vr) {
                    *x += p * f(y);
                    *a += p * f(y).abs();
                }
            }
        }
    }
    Reference {
        out,
        lse,
        out_abs,
        max_abs_score,
        d,
    }
}

/// Norm-wise relative error `||got - want|| / ||want||` over the finite entries of `want`;
/// an entry that is infinite in one and not identical in the other counts as an infinite
/// error (a fully masked row must give exactly `-inf`).
pub fn rel_error(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "rel_error: lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !w.is_finite() || !g.is_finite() {
            if g as f64 != w {
                return f64::INFINITY;
            }
            continue;
        }
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// How far a kernel's result is from the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Errors {
    /// Norm-wise over the whole output, and over the whole LSE.
    pub out: f64,
    pub lse: f64,
    /// The worst row: `||got_r - want_r|| / ||sum_j p_j |v_j| ||` for the output (so one
    /// wrong row among thousands is not averaged away), `|got - want| / max(1, max |score|)`
    /// for the LSE. A row that sees no key must be exactly zeros and `-inf`.
    pub row_out: f64,
    pub row_lse: f64,
}

impl Errors {
    /// The largest of the four.
    pub fn worst(&self) -> f64 {
        self.out.max(self.lse).max(self.row_out).max(self.row_lse)
    }
}

/// Every error measure of `out` and `lse` against `want`.
pub fn errors(out: &[f32], lse: &[f32], want: &Reference) -> Errors {
    let d = want.d;
    assert_eq!(out.len(), want.out.len(), "errors: output lengths differ");
    assert_eq!(lse.len(), want.lse.len(), "errors: lse lengths differ");
    let (mut row_out, mut row_lse) = (0f64, 0f64);
    for (r, (&gl, &wl)) in lse.iter().zip(&want.lse).enumerate() {
        let go = &out[r * d..][..d];
        if wl == f64::NEG_INFINITY {
            if gl != f32::NEG_INFINITY || go.iter().any(|x| *x != 0.0) {
                row_out = f64::INFINITY;
            }
            continue;
        }
        let wo = &want.out[r * d..][..d];
        let wa = &want.out_abs[r * d..][..d];
        let num: f64 = go
            .iter()
            .zip(wo)
            .map(|(g, w)| (*g as f64 - w).powi(2))
            .sum();
        let den: f64 = wa.iter().map(|a| a * a).sum();
        let e = if den == 0.0 {
            if num == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (num / den).sqrt()
        };
        // NaN compares false: count it as infinite.
        row_out = if e.is_nan() {
            f64::INFINITY
        } else {
            row_out.max(e)
        };
        let el = (gl as f64 - wl).abs() / want.max_abs_score[r].max(1.0);
        row_lse = if el.is_nan() {
            f64::INFINITY
        } else {
            row_lse.max(el)
        };
    }
    Errors {
        out: rel_error(out, &want.out),
        lse: rel_error(lse, &want.lse),
        row_out,
        row_lse,
    }
}

/// How test inputs are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Inputs {
    /// q and k uniform in `[-amp, amp)`, v in `[-1, 1)`.
    Uniform(f32),
    /// A large dynamic range: queries with a common positive direction `c`, keys uniform in
    /// `[-4, 4)` except a spike key (`+30 c`: scores of hundreds, so a softmax without its
    /// running maximum overflows) and low keys (`-30 c`) at key 0 and at every chunk start,
    /// so rows whose only visible key is far below the keys they do not see exist under the
    /// causal and chunked-local masks.
    Hard,
}

/// The attention tests' generator: xorshift64*, no dependency, seeded by the caller so a
/// failure can print its seed.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> TestRng {
        TestRng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// q `[n_q, h_q, d]`, k and v `[n_kv, h_kv, d]` for one call of `shape` at `params`' positions.
pub fn inputs<T: Element>(
    rng: &mut TestRng,
    shape: &AttnShape,
    params: &AttnParams,
    kind: Inputs,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let AttnShape {
        n_q,
        n_kv,
        h_q,
        h_kv,
        d,
    } = *shape;
    let mut fill =
        |n: usize, amp: f32| -> Vec<T> { (0..n).map(|_| T::from_f32(amp * rng.unit())).collect() };
    let v = fill(n_kv * h_kv * d, 1.0);
    match kind {
        Inputs::Uniform(amp) => {
            let q = fill(n_q * h_q * d, amp);
            let k = fill(n_kv * h_kv * d, amp);
            (q, k, v)
        }
        Inputs::Hard => {
            // q in [0, 2): a positive common part along c = (1, ..., 1).
            let q: Vec<T> = fill(n_q * h_q * d, 1.0)
                .iter()
                .map(|x| T::from_f32(x.to_f32() + 1.0))
                .collect();
            let mut k = fill(n_kv * h_kv * d, 4.0);
            let spike = 1 + rng.below(n_kv.saturating_sub(1));
            for j in 0..n_kv {
                let p = params.k_pos + j;
                let low = j == 0
                    || matches!(params.mask, Mask::ChunkedLocal { chunk } if p.is_multiple_of(chunk));
                let val = if j == spike && !low {
                    30.0
                } else if low {
                    -30.0
                } else {
                    continue;
                };
                for x in &mut k[j * h_kv * d..(j + 1) * h_kv * d] {
                    *x = T::from_f32(val);
                }
            }
            (q, k, v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Mask::visible`, which every kernel uses, by a table written out by hand.
    #[test]
    fn mask_visible_by_hand() {
        let m = usize::MAX;
        let table: [(Mask, usize, (usize, usize)); 12] = [
            (Mask::None, 0, (0, m)),
            (Mask::None, 77, (0, m)),
            (Mask::Causal, 0, (0, 1)),
            (Mask::Causal, 5, (0, 6)),
            (Mask::Causal, 1000, (0, 1001)),
            (Mask::ChunkedLocal { chunk: 1 }, 9, (9, 10)),
            (Mask::ChunkedLocal { chunk: 4 }, 0, (0, 1)),
            (Mask::ChunkedLocal { chunk: 4 }, 3, (0, 4)),
            (Mask::ChunkedLocal { chunk: 4 }, 4, (4, 5)),
            (Mask::ChunkedLocal { chunk: 4 }, 7, (4, 8)),
            (Mask::ChunkedLocal { chunk: 8192 }, 8191, (0, 8192)),
            (
                Mask::ChunkedLocal { chunk: 8192 },
                10_000_000,
                (9_994_240, 10_000_001),
            ),
        ];
        for (mask, p, want) in table {
            assert_eq!(mask.visible(p), want, "{mask:?} at {p}");
        }
        // And the range agrees with the written definition key by key.
        for mask in [
            Mask::None,
            Mask::Causal,
            Mask::ChunkedLocal { chunk: 3 },
            Mask::ChunkedLocal { chunk: 16 },
        ] {
            for q in 0..50 {
                let (lo, hi) = mask.visible(q);
                for k in 0..60 {
                    assert_eq!(
                        sees(mask, q, k),
                        (lo..hi).contains(&k),
                        "{mask:?} q {q} k {k}"
                    );
                }
            }
        }
    }

    /// `AttnParams::key_range` (absolute positions to indices, clamped) by hand.
    #[test]
    fn key_range_by_hand() {
        let shape = AttnShape {
            n_q: 4,
            n_kv: 10,
            h_q: 1,
            h_kv: 1,
            d: 8,
        };
        let causal = AttnParams::new(&shape, Mask::Causal);
        // Queries are the last 4 of 10: indices 6..10.
        assert_eq!(causal.key_range(0, 10), (0, 7));
        assert_eq!(causal.key_range(3, 10), (0, 10));
        // Keys from position 100, queries at 98: nothing visible; at 103: keys 0..=3.
        let p = causal.at(98, 100);
        assert_eq!(p.key_range(0, 10), (0, 0));
        assert_eq!(p.key_range(1, 10), (0, 0));
        assert_eq!(p.at(103, 100).key_range(0, 10), (0, 4));
        // Chunks of 4 from position 0, keys from 2: query at 9 sees positions 8, 9.
        let c = AttnParams::new(&shape, Mask::ChunkedLocal { chunk: 4 }).at(9, 2);
        assert_eq!(c.key_range(0, 10), (6, 8));
        assert_eq!(c.key_range(3, 10), (10, 10));
        assert_eq!(
            AttnParams::new(&shape, Mask::None)
                .at(0, 50)
                .key_range(0, 10),
            (0, 10)
        );
    }

    /// The FLOP count benchmarks report, and the group size, by hand.
    #[test]
    fn flops_and_group_by_hand() {
        let s = AttnShape {
            n_q: 3,
            n_kv: 5,
            h_q: 8,
            h_kv: 2,
            d: 16,
        };
        assert_eq!(s.flops(), 4.0 * 3.0 * 5.0 * 16.0 * 8.0);
        assert_eq!(s.group(), 4);
        assert_eq!(AttnShape { h_kv: 0, ..s }.group(), 8);
    }

    /// The error measures: one wrong row of many is seen by the row error, not the norm.
    #[test]
    fn one_wrong_row_is_seen() {
        let (rows, d) = (2000, 8);
        let want = Reference {
            out: vec![0.5; rows * d],
            lse: vec![1.0; rows],
            out_abs: vec![0.5; rows * d],
            max_abs_score: vec![1.0; rows],
            d,
        };
        let mut out = vec![0.5f32; rows * d];
        let lse = vec![1.0f32; rows];
        for x in &mut out[7 * d..8 * d] {
            *x = 0.65;
        }
        let e = errors(&out, &lse, &want);
        assert!(e.out < 1e-2, "{e:?}");
        assert!((e.row_out - 0.3).abs() < 1e-6, "{e:?}");
        out[7 * d] = f32::NAN;
        assert_eq!(errors(&out, &lse, &want).row_out, f64::INFINITY);
    }
}
