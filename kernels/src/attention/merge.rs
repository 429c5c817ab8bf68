//! Merging partial attention results by their log-sum-exp.
//!
//! Two partial results over disjoint key sets, `(o_a, lse_a)` and `(o_b, lse_b)`, combine
//! exactly: `lse = log(exp(lse_a) + exp(lse_b))`, `o = exp(lse_a - lse) o_a +
//! exp(lse_b - lse) o_b`, computed around the larger of the two so nothing overflows. A part
//! that saw no key has `lse = -inf` and weighs nothing; if no part saw a key the result is
//! `lse = -inf` and zeros, never NaN. Ring attention and split-KV decode are built on this.

use super::check_len;
use crate::KernelError;

/// Merges the part `(part_out, part_lse)` into the accumulator `(out, lse)`, row by row.
/// `out`/`part_out` hold rows of `d` values, `lse`/`part_lse` one value per row.
pub fn merge_into(
    out: &mut [f32],
    lse: &mut [f32],
    part_out: &[f32],
    part_lse: &[f32],
    d: usize,
) -> Result<(), KernelError> {
    let rows = lse.len();
    check_len("merge", "out", rows * d, out.len())?;
    check_len("merge", "part_lse", rows, part_lse.len())?;
    check_len("merge", "part_out", rows * d, part_out.len())?;
    for r in 0..rows {
        let (a, b) = (lse[r], part_lse[r]);
        let mx = a.max(b);
        if mx == f32::NEG_INFINITY {
            // Neither side saw a key (or only the accumulator, which is zeros then).
            lse[r] = f32::NEG_INFINITY;
            out[r * d..(r + 1) * d].fill(0.0);
            continue;
        }
        let (wa, wb) = ((a - mx).exp(), (b - mx).exp());
        let total = wa + wb;
        let (wa, wb) = (wa / total, wb / total);
        lse[r] = mx + total.ln();
        let o = &mut out[r * d..(r + 1) * d];
        let p = &part_out[r * d..(r + 1) * d];
        for (x, y) in o.iter_mut().zip(p) {
            *x = wa * *x + wb * *y;
        }
    }
    Ok(())
}

/// Merges any number of parts into `(out, lse)`, which are overwritten.
pub fn merge(
    parts: &[(&[f32], &[f32])],
    d: usize,
    out: &mut [f32],
    lse: &mut [f32],
) -> Result<(), KernelError> {
    lse.fill(f32::NEG_INFINITY);
    out.fill(0.0);
    for (po, pl) in parts {
        merge_into(out, lse, po, pl, d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_parts_give_zeros_and_neg_inf_never_nan() {
        let d = 3;
        let mut out = vec![1.0; 2 * d];
        let mut lse = vec![0.0; 2];
        let ninf = [f32::NEG_INFINITY; 2];
        let zeros = [0.0; 6];
        merge(&[(&zeros, &ninf), (&zeros, &ninf)], d, &mut out, &mut lse).unwrap();
        assert!(lse.iter().all(|x| *x == f32::NEG_INFINITY));
        assert!(out.iter().all(|x| *x == 0.0));
        // merge_into on an accumulator that saw no key but holds stale values (a reused
        // buffer): every row of the result is zeros, the last one included.
        let mut out = vec![7.0; 2 * d];
        let mut lse = ninf.to_vec();
        merge_into(&mut out, &mut lse, &zeros, &ninf, d).unwrap();
        assert!(out.iter().all(|x| *x == 0.0), "{out:?}");
    }

    #[test]
    fn one_empty_part_leaves_the_other_unchanged() {
        let d = 2;
        let (o1, l1) = ([0.5f32, -2.0], [3.25f32]);
        let (o2, l2) = ([9.0f32, 9.0], [f32::NEG_INFINITY]);
        let (mut out, mut lse) = (vec![0.0; 2], vec![0.0; 1]);
        merge(&[(&o2, &l2), (&o1, &l1)], d, &mut out, &mut lse).unwrap();
        assert_eq!(lse, l1);
        assert_eq!(out, o1);
    }

    #[test]
    fn huge_lse_values_do_not_overflow() {
        let d = 1;
        let (mut out, mut lse) = (vec![1.0f32], vec![1000.0f32]);
        merge_into(&mut out, &mut lse, &[3.0], &[1000.0], d).unwrap();
        assert!((lse[0] - (1000.0 + 2f32.ln())).abs() < 1e-3);
        assert!((out[0] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = vec![0.0; 4];
        let mut lse = vec![0.0; 2];
        let err = merge_into(&mut out, &mut lse, &[0.0; 3], &[0.0; 2], 2).unwrap_err();
        assert!(matches!(
            err,
            KernelError::ShapeMismatch {
                buffer: "part_out",
                ..
            }
        ));
    }
}
