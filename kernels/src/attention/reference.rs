//! The naive float64 attention every kernel is tested against: scores, softmax and the
//! weighted sum written out directly, with no tiling and no online rescaling.

use super::{AttnParams, AttnShape};
use crate::Element;

/// Output `[n_q, h_q, d]` and log-sum-exp `[n_q, h_q]` in f64, computed naively from the
/// same inputs and parameters as [`super::attention`]. The scale is applied in f64.
pub fn attention_f64<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttnShape,
    params: &AttnParams,
) -> (Vec<f64>, Vec<f64>) {
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
    let mut lse = vec![f64::NEG_INFINITY; n_q * h_q];
    let scale = params.scale as f64;
    let mut s = vec![0f64; n_kv];
    for i in 0..n_q {
        let (lo, hi) = params.key_range(i, n_kv);
        for h in 0..h_q {
            let hk = h / g;
            let qr = &q[(i * h_q + h) * d..][..d];
            for j in lo..hi {
                let kr = &k[(j * h_kv + hk) * d..][..d];
                s[j] = scale * qr.iter().zip(kr).map(|(a, b)| f(a) * f(b)).sum::<f64>();
            }
            if lo == hi {
                continue;
            }
            let mx = s[lo..hi].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s[lo..hi].iter().map(|x| (x - mx).exp()).sum();
            lse[i * h_q + h] = mx + sum.ln();
            let o = &mut out[(i * h_q + h) * d..][..d];
            for j in lo..hi {
                let p = (s[j] - mx).exp() / sum;
                let vr = &v[(j * h_kv + hk) * d..][..d];
                for (x, y) in o.iter_mut().zip(vr) {
                    *x += p * f(y);
                }
            }
        }
    }
    (out, lse)
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
