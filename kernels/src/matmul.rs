//! Dense matrix products for the linear layers: `y[m, n] = x[m, k] . B[k, n]`, with `B` the
//! weight stored input-major (a Hugging Face `[out, in]` weight transposed once at load).
//!
//! The work is cut into tiles of output (rows x columns), spread over the rayon pool; each
//! tile runs the same register-blocked micro-kernel as attention (6 x 64 accumulators on
//! AVX-512) over `k` in slices that keep the tile's part of `B` in L2. With one row (decode)
//! the tiles are column strips, so the weight streams from memory once across all threads.

use crate::cpu::{Isa, Ops, RowElem};
use crate::formats::StoredRows;
use crate::KernelError;
use rayon::prelude::*;

/// `B[k, n]`, row-major with row stride `ld` (`ld >= n`: a column window of a wider matrix).
#[derive(Clone, Copy, Debug)]
pub struct Weight<'a> {
    pub data: &'a [f32],
    pub k: usize,
    pub n: usize,
    pub ld: usize,
}

impl<'a> Weight<'a> {
    /// A whole `[k, n]` row-major matrix.
    pub fn new(data: &'a [f32], k: usize, n: usize) -> Weight<'a> {
        Weight { data, k, n, ld: n }
    }

    /// Columns `c0..c0 + n` of a `[k, width]` row-major matrix.
    pub fn columns(data: &'a [f32], k: usize, width: usize, c0: usize, n: usize) -> Weight<'a> {
        Weight {
            data: data.get(c0..).unwrap_or(&[]),
            k,
            n,
            ld: width,
        }
    }
}

/// Rows per tile (a multiple of the micro-kernel's 6).
const MB: usize = 96;
/// Columns per tile.
const NB: usize = 256;
/// Depth per pass (B's slice of a tile: `KB x NB` floats, 256 KiB).
const KB: usize = 256;

/// `y[m, n] = x[m, k] . w`.
pub fn matmul(x: &[f32], m: usize, w: Weight, y: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "matmul";
    let (k, n) = (w.k, w.n);
    crate::attention::check_len(OP, "x", m * k, x.len())?;
    crate::attention::check_len(OP, "y", m * n, y.len())?;
    if w.ld < n || (k > 0 && n > 0 && w.data.len() < (k - 1) * w.ld + n) {
        return Err(KernelError::Unsupported {
            op: OP,
            reason: format!(
                "weight of {} values cannot hold [{k}, {n}] with row stride {}",
                w.data.len(),
                w.ld
            ),
        });
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let ops = Ops::new(Isa::detect());
    let threads = rayon::current_num_threads().max(1);
    if m == 1 {
        gemv(&ops, x, w.data, w.ld, n, y);
        return Ok(());
    }
    // Narrower column strips when there are few rows, so every thread has work.
    let nb = if m <= MB {
        NB.min(n.div_ceil(threads * 4).next_multiple_of(64)).max(64)
    } else {
        NB
    };
    let (row_tiles, col_tiles) = (m.div_ceil(MB), n.div_ceil(nb));
    let tiles: Vec<(usize, usize)> = (0..row_tiles)
        .flat_map(|r| (0..col_tiles).map(move |c| (r, c)))
        .collect();
    let out = SendPtr(y.as_mut_ptr());
    tiles.par_iter().for_each(|&(rt, ct)| {
        with_scratch(|[buf, _, _]| {
            let (i0, j0) = (rt * MB, ct * nb);
            let (mb, cols) = (MB.min(m - i0), nb.min(n - j0));
            // SAFETY: the weight holds rows 0..k from column j0, cols wide, at stride ld
            // (checked above); tiles are disjoint, so each output element has one writer.
            unsafe {
                tile(
                    &ops,
                    x,
                    k,
                    (i0, mb),
                    (j0, cols, n),
                    w.data.as_ptr().add(j0),
                    w.ld,
                    buf,
                    out,
                )
            };
        })
    });
    Ok(())
}

/// One output tile: rows `i0..i0 + mb` of `x` (`[m, k]`) times `cols` columns of `B`
/// (`b`, `k` rows at stride `ldb`), over `k` in slices of `KB`, through the local buffer
/// `buf`, into columns `j0..j0 + cols` of `y` (`[m, n]`, behind `out`).
///
/// # Safety
/// `b` is valid for `(k - 1) * ldb + cols` elements; no other task writes this tile of `y`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    ops: &Ops,
    x: &[f32],
    k: usize,
    (i0, mb): (usize, usize),
    (j0, cols, n): (usize, usize, usize),
    b: *const f32,
    ldb: usize,
    buf: &mut Vec<f32>,
    out: SendPtr,
) {
    // The micro-kernel writes whole 16-wide vectors: a padded local tile.
    let ldc = cols.next_multiple_of(16);
    buf.resize(mb * ldc, 0.0);
    let mut k0 = 0;
    while k0 < k {
        let kb = KB.min(k - k0);
        // a: rows i0.. of x (stride k) from column k0, kb deep; b: rows k0.., cols wide.
        ops.gemm(
            mb,
            cols,
            kb,
            x.as_ptr().add(i0 * k + k0),
            k,
            1,
            b.add(k0 * ldb),
            ldb,
            buf.as_mut_ptr(),
            ldc,
            k0 > 0,
        );
        k0 += kb;
    }
    for r in 0..mb {
        std::ptr::copy_nonoverlapping(
            buf.as_ptr().add(r * ldc),
            out.get().add((i0 + r) * n + j0),
            cols,
        );
    }
}

/// The fewest rows of `x` a task of [`matmul_stored`] takes when rows are split: each task
/// dequantises its strip of the weight once for its rows, ~1/1000 of the multiply-adds.
const STORED_ROWS: usize = 512;
/// Weight rows dequantised at a time by the one-row product.
const STORED_GEMV_ROWS: usize = 16;

/// `y[m, n] = x[m, k] . W^T` with `W` a stored `[n, k]` matrix (a Hugging Face `[out, in]`
/// weight in its file's format): the exact path. Each task dequantises a strip of `W`
/// (`nb` output rows, all of `k`) to f32, transposed into the micro-kernel's `[k, nb]`
/// layout, and multiplies it in f32 with the same tiles as [`matmul`]; one row (decode)
/// dequantises a few weight rows at a time and takes their dot products with `x`.
pub fn matmul_stored(x: &[f32], m: usize, w: StoredRows, y: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "matmul_stored";
    let (k, n) = (w.cols, w.rows);
    crate::attention::check_len(OP, "x", m * k, x.len())?;
    crate::attention::check_len(OP, "y", m * n, y.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let ops = Ops::new(Isa::detect());
    let threads = rayon::current_num_threads().max(1);
    if m == 1 {
        let per = n
            .div_ceil(threads * 4)
            .next_multiple_of(STORED_GEMV_ROWS)
            .max(STORED_GEMV_ROWS);
        y.par_chunks_mut(per).enumerate().for_each(|(c, yc)| {
            with_scratch(|[buf, _, _]| {
                buf.resize(STORED_GEMV_ROWS * k, 0.0);
                let mut st = [0f32; STORED_GEMV_ROWS * 16];
                for (g, yg) in yc.chunks_mut(STORED_GEMV_ROWS).enumerate() {
                    let r0 = c * per + g * STORED_GEMV_ROWS;
                    w.dequantize_rows(r0, yg.len(), buf);
                    // SAFETY: buf holds yg.len() rows of k; st holds (kt - 1) * 16 + 16.
                    unsafe {
                        ops.scores_dot(
                            1,
                            yg.len(),
                            k,
                            x.as_ptr(),
                            buf.as_ptr(),
                            k,
                            st.as_mut_ptr(),
                            16,
                        )
                    };
                    for (j, v) in yg.iter_mut().enumerate() {
                        *v = st[j * 16];
                    }
                }
            })
        });
        return Ok(());
    }
    // Narrow column strips, so that there are tasks for every thread with each strip
    // dequantised once for all rows; rows are split only when there are still too few.
    let nb = NB.min(n.div_ceil(threads * 4).next_multiple_of(64)).max(64);
    let col_tiles = n.div_ceil(nb);
    let splits = (threads * 4)
        .div_ceil(col_tiles)
        .min(m.div_ceil(STORED_ROWS))
        .max(1);
    let rg = m.div_ceil(splits).next_multiple_of(MB);
    let row_groups = m.div_ceil(rg);
    let tasks: Vec<(usize, usize)> = (0..col_tiles)
        .flat_map(|c| (0..row_groups).map(move |r| (r, c)))
        .collect();
    let out = SendPtr(y.as_mut_ptr());
    tasks.par_iter().for_each(|&(rg_i, ct)| {
        with_scratch(|[rows, strip, buf]| {
            let j0 = ct * nb;
            let cols = nb.min(n - j0);
            // The strip [k, ldb]: weight rows j0..j0 + cols as columns.
            let ldb = cols.next_multiple_of(16);
            rows.resize(cols * k, 0.0);
            w.dequantize_rows(j0, cols, rows);
            strip.resize(k * ldb, 0.0);
            for (j, row) in rows.chunks_exact(k).enumerate() {
                for (t, v) in row.iter().enumerate() {
                    strip[t * ldb + j] = *v;
                }
            }
            let (g0, g1) = (rg_i * rg, ((rg_i + 1) * rg).min(m));
            for i0 in (g0..g1).step_by(MB) {
                let mb = MB.min(g1 - i0);
                // SAFETY: the strip holds k rows of cols at stride ldb; tasks cover
                // disjoint (rows, columns) of the output.
                unsafe {
                    tile(
                        &ops,
                        x,
                        k,
                        (i0, mb),
                        (j0, cols, n),
                        strip.as_ptr(),
                        ldb,
                        buf,
                        out,
                    )
                };
            }
        })
    });
    Ok(())
}

thread_local! {
    /// Each pool thread's tile buffers, kept between products: `for_each_init` made fresh
    /// ones for every split of every product (tens of KiB each, every layer of every step).
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = const {
        std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// Runs `f` with this thread's three scratch buffers (fresh ones if `f` is re-entered on
/// the same thread, as a work-stealing wait could do).
fn with_scratch<R>(f: impl FnOnce(&mut [Vec<f32>; 3]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut [Vec::new(), Vec::new(), Vec::new()]),
    })
}

/// `y[n] = x[k] . B[k, n]` with `B` stored as bf16 bit patterns, row-major: the decode
/// product on weights kept in bf16 (half the bytes of f32; each widened exactly to f32).
pub fn matvec_bf16(x: &[f32], b: &[u16], n: usize, y: &mut [f32]) -> Result<(), KernelError> {
    const OP: &str = "matvec_bf16";
    crate::attention::check_len(OP, "b", x.len() * n, b.len())?;
    crate::attention::check_len(OP, "y", n, y.len())?;
    if n > 0 {
        gemv(&Ops::new(Isa::detect()), x, b, n, n, y);
    }
    Ok(())
}

/// One row (decode): memory-bound, so the weight (`x.len()` rows of `n` at stride `ld`) is
/// streamed row after row (contiguous reads), its rows split across threads, each
/// accumulating a partial `y` that is summed at the end. The caller has checked that `b`
/// holds the rows.
fn gemv<T: RowElem>(ops: &Ops, x: &[f32], b: &[T], ld: usize, n: usize, y: &mut [f32]) {
    let k = x.len();
    // At least 64 rows per part so the partial sums stay cheap next to the streaming.
    let parts = rayon::current_num_threads().min(k.div_ceil(64)).max(1);
    let per = k.div_ceil(parts).max(1);
    let partials: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|p| {
            let (r0, r1) = ((p * per).min(k), ((p + 1) * per).min(k));
            let mut acc = vec![0f32; n];
            if r0 < r1 {
                // SAFETY: rows r0..r1, each n long at stride ld, lie inside `b` (checked by
                // the caller).
                unsafe { ops.axpy_rows(&mut acc, &x[r0..r1], b.as_ptr().add(r0 * ld), ld, n) };
            }
            acc
        })
        .collect();
    y.fill(0.0);
    for p in &partials {
        for (a, v) in y.iter_mut().zip(p) {
            *a += v;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to write disjoint tiles of one output buffer from the pool's threads.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn matches_f64_products_at_awkward_sizes_and_windows() {
        let mut rng = rand::rng();
        for (m, k, n) in [
            (1, 1, 1),
            (1, 576, 1536),
            (7, 33, 19),
            (97, 300, 257),
            (200, 70, 600),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            // A window of columns 5..5+n of a [k, n + 9] matrix.
            let width = n + 9;
            let w: Vec<f32> = (0..k * width)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut y = vec![0f32; m * n];
            matmul(&x, m, Weight::columns(&w, k, width, 5, n), &mut y).unwrap();
            let (mut num, mut den) = (0f64, 0f64);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[t * width + 5 + j] as f64)
                        .sum();
                    num += (y[i * n + j] as f64 - want).powi(2);
                    den += want * want;
                }
            }
            let e = (num / den).sqrt();
            assert!(e < 1e-6, "{m}x{k}x{n}: {e:e}");
        }
    }

    #[test]
    fn bf16_matvec_equals_the_f32_product_of_the_rounded_weights() {
        let mut rng = rand::rng();
        for (k, n) in [(1, 1), (7, 19), (576, 1536), (300, 257)] {
            let x: Vec<f32> = (0..k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let w: Vec<half::bf16> = (0..k * n)
                .map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            let bits: Vec<u16> = w.iter().map(|v| v.to_bits()).collect();
            let wf: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
            let (mut y, mut want) = (vec![0f32; n], vec![0f32; n]);
            matvec_bf16(&x, &bits, n, &mut y).unwrap();
            matmul(&x, 1, Weight::new(&wf, k, n), &mut want).unwrap();
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{k}x{n}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn stored_products_match_f64_for_every_format_at_awkward_sizes() {
        use crate::formats::{Format, ALL};
        let mut rng = rand::rng();
        for f in ALL {
            let per = f.block_elems().max(1);
            for (m, n, kb) in [
                (1, 1, 1),
                (1, 37, 3),
                (5, 70, 2),
                (97, 19, 1),
                (600, 300, 2),
            ] {
                let k = kb * per.max(32);
                // Random blocks: finite f16 scales by construction for the block formats.
                let w = crate::formats::tests::random_blocks(f, n * k, &mut rng);
                let rows = StoredRows::new(f, &w, n, k).unwrap();
                let mut wf = vec![0f32; n * k];
                rows.dequantize_rows(0, n, &mut wf);
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let mut y = vec![0f32; m * n];
                matmul_stored(&x, m, rows, &mut y).unwrap();
                // Relative to each product's sum of |terms|: f32 rounding scales with it, not
                // with the result, which cancellation can make tiny (one 32-term product at
                // 1x32x1 once erred 1.4e-5 of its result, a pass read as a failure).
                let (mut num, mut den) = (0f64, 0f64);
                for i in 0..m {
                    for j in 0..n {
                        let terms = (0..k).map(|t| x[i * k + t] as f64 * wf[j * k + t] as f64);
                        let want: f64 = terms.clone().sum();
                        let scale: f64 = terms.map(f64::abs).sum();
                        num += (y[i * n + j] as f64 - want).powi(2);
                        den += scale * scale;
                    }
                }
                let e = (num / den.max(1e-300)).sqrt();
                assert!(e < 1e-5, "{f} {m}x{k}x{n}: {e:e}");
            }
        }
        // Sizes that do not fit are errors, not reads past the end.
        let w = vec![0u8; 34];
        assert!(StoredRows::new(Format::Q8_0, &w, 2, 32).is_err());
        assert!(StoredRows::new(Format::Q8_0, &w, 1, 31).is_err());
        let rows = StoredRows::new(Format::Q8_0, &w, 1, 32).unwrap();
        assert!(matmul_stored(&[0.0; 31], 1, rows, &mut [0.0]).is_err());
    }

    #[test]
    fn bad_sizes_are_errors() {
        let w = vec![0f32; 5];
        let mut y = vec![0f32; 4];
        // [3, 2] needs 6 values.
        assert!(matmul(&[0.0; 6], 2, Weight::new(&w, 3, 2), &mut y).is_err());
        // x of the wrong length.
        assert!(matmul(&[0.0; 5], 2, Weight::new(&[0.0; 6], 3, 2), &mut y).is_err());
    }
}
