//! How a sequence of `n` tokens is cut over `p` ranks.
//!
//! A rank's tokens are a list of [`Run`]s: arithmetic progressions of absolute positions,
//! stored one after another in the rank's buffers. Contiguous and zigzag shards are runs of
//! stride 1; a striped shard (Brandon et al., "Striped Attention", 2023) is one run of stride
//! `p`. Within a pair of runs of equal stride, the masks reduce to the kernel's own masks at
//! local positions, which is what lets every partition use the one flash-attention kernel.

/// The partitions a ring can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Partition {
    /// Rank `r` holds the `r`-th of `p` near-equal pieces. Under a causal mask the last rank
    /// does `2p - 1` times the work of the first.
    Contiguous,
    /// `2p` near-equal chunks; rank `r` holds chunks `r` and `2p - 1 - r`, so every rank has
    /// one early and one late chunk and equal causal work (ring-flash-attention's zigzag).
    Zigzag,
    /// Token `i` on rank `i % p`.
    Striped,
}

impl Partition {
    pub const ALL: [Partition; 3] = [Partition::Contiguous, Partition::Zigzag, Partition::Striped];

    pub fn name(self) -> &'static str {
        match self {
            Partition::Contiguous => "contiguous",
            Partition::Zigzag => "zigzag",
            Partition::Striped => "striped",
        }
    }
}

/// Positions `start, start + stride, ...` (`len` of them), held at rows
/// `offset..offset + len` of the rank's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: usize,
    pub stride: usize,
    pub len: usize,
    pub offset: usize,
}

impl Run {
    /// Absolute position of local element `i`.
    pub fn pos(&self, i: usize) -> usize {
        self.start + i * self.stride
    }

    /// The last position (the run must not be empty).
    pub fn last(&self) -> usize {
        self.pos(self.len - 1)
    }

    /// Local indices `[lo, hi)` whose positions lie in `[a, b)`.
    pub fn indices_in(&self, a: usize, b: usize) -> (usize, usize) {
        let idx = |p: usize| {
            if p <= self.start {
                0
            } else {
                (p - self.start).div_ceil(self.stride).min(self.len)
            }
        };
        let (lo, hi) = (idx(a), idx(b));
        (lo, hi.max(lo))
    }
}

/// Every rank's runs: `layout[r]` is rank `r`'s shard.
pub fn layout(partition: Partition, n: usize, p: usize) -> Vec<Vec<Run>> {
    assert!(p > 0, "a ring has at least one rank");
    // Cut [0, n) into `parts` near-equal pieces (the first `n % parts` one longer).
    let piece = |parts: usize, i: usize| {
        let (q, r) = (n / parts, n % parts);
        let start = i * q + i.min(r);
        (start, q + usize::from(i < r))
    };
    (0..p)
        .map(|r| {
            let mut runs: Vec<Run> = Vec::new();
            let mut push = |start: usize, stride: usize, len: usize| {
                if len > 0 {
                    let offset = runs.iter().map(|x| x.len).sum();
                    runs.push(Run {
                        start,
                        stride,
                        len,
                        offset,
                    });
                }
            };
            match partition {
                Partition::Contiguous => {
                    let (s, l) = piece(p, r);
                    push(s, 1, l);
                }
                Partition::Zigzag => {
                    let (s, l) = piece(2 * p, r);
                    push(s, 1, l);
                    let (s, l) = piece(2 * p, 2 * p - 1 - r);
                    push(s, 1, l);
                }
                Partition::Striped => push(r, p, n.saturating_sub(r).div_ceil(p)),
            }
            runs
        })
        .collect()
}

/// Tokens a shard holds.
pub fn tokens(runs: &[Run]) -> usize {
    runs.iter().map(|r| r.len).sum()
}

/// Scatters a sequence's rows (`[n, row]`) into a rank's buffer in its run order.
pub fn gather_rows<T: Copy>(all: &[T], runs: &[Run], row: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(tokens(runs) * row);
    for run in runs {
        for i in 0..run.len {
            let p = run.pos(i);
            out.extend_from_slice(&all[p * row..(p + 1) * row]);
        }
    }
    out
}

/// Writes a rank's rows back to their places in a whole-sequence buffer.
pub fn scatter_rows<T: Copy>(part: &[T], runs: &[Run], row: usize, all: &mut [T]) {
    for run in runs {
        for i in 0..run.len {
            let (p, l) = (run.pos(i), run.offset + i);
            all[p * row..(p + 1) * row].copy_from_slice(&part[l * row..(l + 1) * row]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_covers_each_position_once() {
        for n in [0, 1, 5, 7, 16, 1001] {
            for p in [1, 2, 3, 4, 8] {
                for part in Partition::ALL {
                    let mut seen = vec![0u8; n];
                    for runs in layout(part, n, p) {
                        let mut off = 0;
                        for run in &runs {
                            assert_eq!(run.offset, off);
                            off += run.len;
                            for i in 0..run.len {
                                seen[run.pos(i)] += 1;
                            }
                        }
                    }
                    assert!(seen.iter().all(|c| *c == 1), "{part:?} n={n} p={p}");
                }
            }
        }
    }

    #[test]
    fn zigzag_pairs_an_early_chunk_with_a_late_one() {
        let l = layout(Partition::Zigzag, 16, 4);
        assert_eq!((l[0][0].start, l[0][1].start), (0, 14));
        assert_eq!((l[3][0].start, l[3][1].start), (6, 8));
        // Lengths not divisible by 2p: chunks differ by at most one token.
        let l = layout(Partition::Zigzag, 13, 3);
        let sizes: Vec<usize> = l.iter().map(|r| tokens(r)).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 13);
        assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 2);
    }

    #[test]
    fn run_indices_in_a_position_window() {
        let r = Run {
            start: 3,
            stride: 4,
            len: 5,
            offset: 0,
        }; // 3 7 11 15 19
        assert_eq!(r.indices_in(0, 3), (0, 0));
        assert_eq!(r.indices_in(0, 4), (0, 1));
        assert_eq!(r.indices_in(8, 16), (2, 4));
        assert_eq!(r.indices_in(20, 40), (5, 5));
    }
}
