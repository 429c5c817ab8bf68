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

/// Streaming read bandwidth in GB/s: every thread sums its share of a `bytes`-sized buffer.
pub fn read_bandwidth_gbs(bytes: usize) -> f64 {
    let words = bytes / 8;
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let secs = median_secs(5, || {
        let chunk = words.div_ceil(rayon::current_num_threads() * 8);
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| {
                // Eight independent lanes so the adds do not serialise.
                let mut acc = [0u64; 8];
                for w in c.chunks_exact(8) {
                    for (a, x) in acc.iter_mut().zip(w) {
                        *a = a.wrapping_add(*x);
                    }
                }
                acc.iter().fold(0u64, |a, b| a.wrapping_add(*b))
            })
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        std::hint::black_box(s);
    });
    bytes as f64 / secs / 1e9
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
