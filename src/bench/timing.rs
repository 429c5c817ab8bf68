//! Timing helpers shared by the benchmarks: medians of repeated runs and this machine's
//! streaming read bandwidth (the ceiling of memory-bound kernels).

use rayon::prelude::*;
use std::time::Instant;

/// Median wall time in seconds of `reps` runs of `f`, after one warm-up run.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// Streaming read bandwidth in GB/s: every thread sums its share of a `bytes`-sized buffer
/// (see [`StreamRead::gbs`]).
pub fn read_bandwidth_gbs(bytes: usize) -> f64 {
    StreamRead::new(bytes).gbs()
}

/// A buffer to measure the streaming read bandwidth with, again and again in one run: this
/// machine's bandwidth swings tens of percent within minutes, so a memory-bound case is
/// compared with the bandwidth measured beside it, not once per run.
pub struct StreamRead {
    buf: Vec<u64>,
}

impl StreamRead {
    pub fn new(bytes: usize) -> StreamRead {
        StreamRead {
            buf: (0..(bytes / 8) as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9))
                .collect(),
        }
    }

    /// GB/s: the better median of plain loads and of loads with software prefetch 8 KiB
    /// ahead (as the kernels prefetch). In some minutes of this machine only the prefetched
    /// read reaches the peak (34 against 53 GB/s), and a yardstick below what a kernel
    /// reads would flatter every ratio to it.
    pub fn gbs(&self) -> f64 {
        let words = self.buf.len();
        if words == 0 {
            return 0.0;
        }
        let pass = |ahead: usize| {
            let secs = median_secs(5, || {
                let chunk = words.div_ceil(rayon::current_num_threads() * 8);
                let s: u64 = self
                    .buf
                    .par_chunks(chunk)
                    .map(|c| sum_words(c, ahead))
                    .reduce(|| 0, |a, b| a.wrapping_add(b));
                std::hint::black_box(s);
            });
            (8 * words) as f64 / secs / 1e9
        };
        pass(0).max(pass(8192))
    }
}

/// The wrapping sum of `c`, eight independent lanes (so the adds do not serialise), with a
/// prefetch `ahead` bytes on per 64-byte line when `ahead` is not 0.
fn sum_words(c: &[u64], ahead: usize) -> u64 {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ahead;
    let mut acc = [0u64; 8];
    for w in c.chunks_exact(8) {
        #[cfg(target_arch = "x86_64")]
        if ahead > 0 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(ahead / 8).cast()) };
        }
        for (a, x) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(*x);
        }
    }
    acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
}

/// Fills a buffer with pseudo-random values in [-1, 1) quickly (xorshift), for benchmarks.
pub fn fill_random<T: longctx_kernels::Element>(n: usize, seed: u64) -> Vec<T> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::from_f32((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// `n` token ids below `vocab`, the same for the same seed (xorshift64): distinct prompts
/// for the batching benchmarks.
pub fn random_tokens(n: usize, seed: u64, vocab: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % vocab as u64) as u32
        })
        .collect()
}
