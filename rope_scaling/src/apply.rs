//! Rotating q/k buffers `[n, h, d]` in place at absolute positions.

use crate::{Rope, RopeError};
use longctx_kernels::{Element, Isa};
use rayon::prelude::*;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::f64::consts::TAU;
use std::rc::Rc;

/// How the rotated dimensions are paired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Pairs `(x[2i], x[2i+1])`: Meta's Llama 4 (complex multiplication).
    Interleaved,
    /// Pairs `(x[i], x[i + r/2])` over the `r` rotated dims: Hugging Face Llama, SmolLM2.
    RotateHalf,
}

/// Positions between exact anchors when a table is built by angle addition; the f64
/// recurrence drifts by ~1e-16 per step, far below f32 rounding.
const ANCHOR: usize = 64;

/// cos and sin (times the attention factor) for a window of positions `[start, start + len)`,
/// `half = rotary_dim / 2` of each per position.
#[derive(Clone, Debug)]
pub struct RopeTable {
    start: usize,
    len: usize,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Builds the table: every `ANCHOR` positions an exact angle `pos * inv_freq` in f64,
    /// reduced modulo 2π, then f64 angle-addition steps between anchors.
    pub fn new(inv_freq: &[f64], attention_factor: f64, start: usize, len: usize) -> RopeTable {
        let half = inv_freq.len();
        let mut cos = vec![0f32; len * half];
        let mut sin = vec![0f32; len * half];
        let steps: Vec<(f64, f64)> = inv_freq.iter().map(|f| f.sin_cos()).collect();
        cos.par_chunks_mut(ANCHOR * half)
            .zip(sin.par_chunks_mut(ANCHOR * half))
            .enumerate()
            .for_each(|(b, (cb, sb))| {
                let p0 = start + b * ANCHOR;
                let mut cur: Vec<(f64, f64)> = inv_freq
                    .iter()
                    .map(|f| ((p0 as f64 * f).rem_euclid(TAU)).sin_cos())
                    .collect();
                for (crow, srow) in cb.chunks_mut(half).zip(sb.chunks_mut(half)) {
                    for (i, (s, c)) in cur.iter_mut().enumerate() {
                        crow[i] = (*c * attention_factor) as f32;
                        srow[i] = (*s * attention_factor) as f32;
                        let (ds, dc) = steps[i];
                        (*s, *c) = (*s * dc + *c * ds, *c * dc - *s * ds);
                    }
                }
            });
        RopeTable {
            start,
            len,
            half,
            cos,
            sin,
        }
    }

    /// A table from given cos/sin rows (`len` rows of `half` each).
    #[cfg(test)]
    pub(crate) fn from_parts(start: usize, len: usize, cos: Vec<f32>, sin: Vec<f32>) -> RopeTable {
        let half = cos.len() / len.max(1);
        RopeTable {
            start,
            len,
            half,
            cos,
            sin,
        }
    }

    /// The table of `rope` (frequencies for a sequence of `seq_len`) over a window.
    pub fn for_rope(rope: &Rope, seq_len: usize, start: usize, len: usize) -> RopeTable {
        RopeTable::new(&rope.inv_freq(seq_len), rope.attention_factor(), start, len)
    }

    pub fn start(&self) -> usize {
        self.start
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn row(&self, pos: usize) -> (&[f32], &[f32]) {
        let at = (pos - self.start) * self.half;
        (&self.cos[at..at + self.half], &self.sin[at..at + self.half])
    }
}

fn check_shape<T>(x: &[T], n: usize, h: usize, d: usize, rotary: usize) -> Result<(), RopeError> {
    if x.len() != n * h * d {
        return Err(RopeError::Shape {
            n,
            h,
            d,
            got: x.len(),
        });
    }
    if rotary > d || !rotary.is_multiple_of(2) || d > 1024 {
        return Err(RopeError::Invalid(format!(
            "rotary dim {rotary} must be even and <= head_dim {d} (<= 1024)"
        )));
    }
    Ok(())
}

/// Rotates `x: [n, h, d]` whose row `i` is at absolute position `pos0 + i`, with the cos/sin
/// of `table` (which must cover those positions). The first `2 * table.half` dims of each
/// head rotate; the rest pass through.
pub fn apply_table<T: Element>(
    x: &mut [T],
    (n, h, d): (usize, usize, usize),
    pos0: usize,
    table: &RopeTable,
    layout: Layout,
) -> Result<(), RopeError> {
    check_shape(x, n, h, d, 2 * table.half)?;
    if n == 0 {
        return Ok(());
    }
    if pos0 < table.start || pos0 + n > table.start + table.len {
        return Err(RopeError::Invalid(format!(
            "positions {pos0}..{} are outside the table's {}..{}",
            pos0 + n,
            table.start,
            table.start + table.len
        )));
    }
    let isa = Isa::detect();
    x.par_chunks_mut(h * d)
        .enumerate()
        .with_min_len(16)
        .for_each_init(Vec::new, |buf, (i, row)| {
            let (c, s) = table.row(pos0 + i);
            buf.resize(h * d, 0.0);
            rotate(isa, row, buf, d, c, s, layout);
        });
    Ok(())
}

/// Rotates `x: [n, h, d]` (row `i` at position `pos0 + i`) by `rope`'s frequencies for a
/// sequence of `seq_len`, building cos/sin for a window of positions at a time: far
/// positions cost no table of their size.
pub fn apply<T: Element>(
    x: &mut [T],
    shape: (usize, usize, usize),
    pos0: usize,
    rope: &Rope,
    seq_len: usize,
    layout: Layout,
) -> Result<(), RopeError> {
    const WINDOW: usize = 4096;
    let (n, h, d) = shape;
    check_shape(x, n, h, d, rope.rotary_dim)?;
    if n <= MEMO_ROWS {
        let table = memo_table(rope, seq_len, pos0, n);
        return apply_table(x, (n, h, d), pos0, &table, layout);
    }
    let inv_freq = rope.inv_freq(seq_len);
    for (w, chunk) in x.chunks_mut(WINDOW * h * d).enumerate() {
        let rows = chunk.len() / (h * d);
        let start = pos0 + w * WINDOW;
        let table = RopeTable::new(&inv_freq, rope.attention_factor(), start, rows);
        apply_table(chunk, (rows, h, d), start, &table, layout)?;
    }
    Ok(())
}

/// Windows of at most this many positions (decode and batched-decode rows) have their tables
/// kept: a step rotates the same positions' q and k in every layer, and building a table
/// (the frequencies' `powf`s, exact `sin_cos`s and a parallel region) each time cost ~3% of
/// a 16-sequence decode step.
const MEMO_ROWS: usize = 64;
/// Tables kept per thread: a step over many sequences needs one per sequence.
const MEMO_TABLES: usize = 128;

/// A table for `rope` at `seq_len` over `[start, start + len)`, built once and then reused by
/// this thread while among its last [`MEMO_TABLES`] (a pure function of its key, so a reused
/// table is the one a fresh build gives, to the bit).
fn memo_table(rope: &Rope, seq_len: usize, start: usize, len: usize) -> Rc<RopeTable> {
    type Entry = (Rope, usize, usize, usize, Rc<RopeTable>);
    thread_local! {
        static MEMO: RefCell<VecDeque<Entry>> = const { RefCell::new(VecDeque::new()) };
    }
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        let hit = m
            .iter()
            .rev()
            .find(|e| e.1 == seq_len && e.2 == start && e.3 == len && e.0 == *rope);
        if let Some(e) = hit {
            return e.4.clone();
        }
        let t = Rc::new(RopeTable::new(
            &rope.inv_freq(seq_len),
            rope.attention_factor(),
            start,
            len,
        ));
        if m.len() == MEMO_TABLES {
            m.pop_front();
        }
        m.push_back((rope.clone(), seq_len, start, len, t.clone()));
        t
    })
}

/// One position: every head of `x` (rows of `d`), through an f32 buffer.
fn rotate<T: Element>(
    isa: Isa,
    x: &mut [T],
    buf: &mut [f32],
    d: usize,
    c: &[f32],
    s: &[f32],
    l: Layout,
) {
    match isa {
        // SAFETY: `detect` only returns instruction sets this CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { rotate_row_avx512(x, buf, d, c, s, l) },
        _ => rotate_row(x, buf, d, c, s, l),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn rotate_row_avx512<T: Element>(
    x: &mut [T],
    buf: &mut [f32],
    d: usize,
    c: &[f32],
    s: &[f32],
    l: Layout,
) {
    rotate_row(x, buf, d, c, s, l)
}

#[inline(always)]
fn rotate_row<T: Element>(x: &mut [T], buf: &mut [f32], d: usize, c: &[f32], s: &[f32], l: Layout) {
    T::widen(x, buf);
    for head in buf.chunks_mut(d) {
        rotate_f32(head, c, s, l);
    }
    T::narrow(buf, x);
}

/// One head: the portable loop, written so that it vectorises.
#[inline(always)]
fn rotate_f32(x: &mut [f32], c: &[f32], s: &[f32], layout: Layout) {
    let half = c.len();
    match layout {
        Layout::RotateHalf => {
            let (lo, hi) = x[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * c[i] - b * s[i];
                hi[i] = b * c[i] + a * s[i];
            }
        }
        Layout::Interleaved => {
            for (i, p) in x[..2 * half].chunks_exact_mut(2).enumerate() {
                let (a, b) = (p[0], p[1]);
                p[0] = a * c[i] - b * s[i];
                p[1] = b * c[i] + a * s[i];
            }
        }
    }
}
