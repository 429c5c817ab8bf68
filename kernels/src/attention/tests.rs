//! Every path of the CPU attention against the float64 reference, on fresh random inputs at
//! awkward sizes, for every instruction set this CPU has.

use super::reference::{errors, inputs, reference, Inputs, TestRng};
use super::*;
use crate::{Element, Isa};
use half::bf16;
use rand::{Rng, SeedableRng};

/// f32 outputs (and every LSE, f32 whatever the inputs): f32 arithmetic only. Worst measured
/// over these tests: out 1.3e-6, row 2.0e-6, LSE row 2e-7 (`--nocapture` prints each test's).
const TOL_F32: f64 = 1e-5;
/// bf16 / f16 outputs: one rounding of each output to 8 (11) bits, 2^-9 = 2e-3 relative at
/// worst; measured 1.9e-3 (bf16 row), 2.4e-4 (f16).
const TOL_BF16: f64 = 1e-2;
/// bf16 inputs on the bf16 dot-product tiles (blocks of more than 16 rows on a CPU with
/// AVX512_BF16): P is rounded to bf16 before `P V`, 2^-9 = 1.95e-3 of each product, and the
/// error measure is relative to `|P| |V|`, so at most ~2e-3 (measured 1.2e-3). A wrong pair
/// order or a lost tile shows as O(1).
const TOL_P_BF16: f64 = 3e-3;

/// The tolerance for bf16 inputs with f32 outputs: f32 arithmetic alone unless this CPU runs
/// the shape's tiles on the bf16 dot product ([`cpu::rounds_p_to_bf16`]), which rounds P.
fn tol_bf16_inputs(isa: Isa, shape: &AttnShape) -> f64 {
    // Only the detected ISA has the bf16 tiles (a lowered one widens to f32).
    if isa == Isa::detect() && cpu::rounds_p_to_bf16(shape) {
        TOL_P_BF16
    } else {
        TOL_F32
    }
}

/// Every way the inputs are drawn: two uniform amplitudes, and the hard case (keys of +-30,
/// scores of hundreds). Not uniform 30 on q and k: its scores of ~300 carry f32 rounding of
/// ~1e-4 (measured 8e-5 per row), a property of f32 dot products, not of a kernel.
const INPUTS: [Inputs; 3] = [Inputs::Uniform(1.0), Inputs::Uniform(4.0), Inputs::Hard];

struct Case {
    shape: AttnShape,
    params: AttnParams,
}

fn case(n_q: usize, n_kv: usize, h_kv: usize, ratio: usize, d: usize, mask: Mask) -> Case {
    let shape = AttnShape {
        n_q,
        n_kv,
        h_q: h_kv * ratio,
        h_kv,
        d,
    };
    Case {
        params: AttnParams::new(&shape, mask),
        shape,
    }
}

fn random<T: Element>(rng: &mut impl Rng, n: usize, amp: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-amp..amp)))
        .collect()
}

thread_local! {
    /// The worst errors this test (one thread) has measured: f32 outputs, 16-bit outputs,
    /// every LSE; printed at its end so tolerances can be kept near what is measured.
    static WORST: std::cell::Cell<[f64; 3]> = const { std::cell::Cell::new([0.0; 3]) };
}

fn note_worst(out_is_f32: bool, e: &reference::Errors) {
    let mut w = WORST.get();
    let i = if out_is_f32 { 0 } else { 1 };
    w[i] = w[i].max(e.out.max(e.row_out));
    w[2] = w[2].max(e.lse.max(e.row_lse));
    WORST.set(w);
}

fn print_worst(test: &str) {
    let w = WORST.get();
    eprintln!(
        "{test}: worst f32 out {:.2e}, 16-bit out {:.2e}, lse {:.2e}",
        w[0], w[1], w[2]
    );
}

/// Asserts every error measure of `out`/`lse` against `want`: the output at `tol`, the LSE
/// (always f32) at `TOL_F32`.
fn assert_close<O: Element>(
    out: &[O],
    lse: &[f32],
    want: &reference::Reference,
    tol: f64,
    what: &dyn Fn() -> String,
) {
    let got: Vec<f32> = out.iter().map(|x| x.to_f32()).collect();
    let e = errors(&got, lse, want);
    note_worst(O::DTYPE == crate::DType::F32, &e);
    assert!(
        e.out <= tol && e.row_out <= tol && e.lse <= TOL_F32 && e.row_lse <= TOL_F32,
        "{}: {e:?} (tol {tol:.0e})",
        what()
    );
}

/// Runs one case with fresh inputs of `kind` and checks it.
fn run<T: Element>(c: &Case, opts: &CpuOptions, kind: Inputs, tol: f64) {
    let seed: u64 = rand::random();
    let mut rng = TestRng::new(seed);
    let AttnShape { n_q, h_q, d, .. } = c.shape;
    let (q, k, v) = inputs::<T>(&mut rng, &c.shape, &c.params, kind);
    let mut out = vec![T::default(); n_q * h_q * d];
    let mut lse = vec![0f32; n_q * h_q];
    attention_with(&q, &k, &v, c.shape, &c.params, &mut out, &mut lse, opts).unwrap();
    let want = reference(&q, &k, &v, c.shape, &c.params);
    assert_close(&out, &lse, &want, tol, &|| {
        format!(
            "{:?} {:?} {:?} {} {kind:?} (seed {seed})",
            c.shape,
            c.params,
            opts,
            T::DTYPE.name()
        )
    });
}

thread_local! {
    static NEXT_KIND: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Every input kind on small cases; on larger ones (the f64 reference is the cost) one kind
/// per call, rotating, so a loop over shapes still meets every kind on every path.
fn check<T: Element>(c: &Case, opts: &CpuOptions, tol: f64) {
    let s = c.shape;
    if s.n_q * s.n_kv * s.h_q * s.d <= 1 << 21 {
        for kind in INPUTS {
            run::<T>(c, opts, kind, tol);
        }
    } else {
        let i = NEXT_KIND.get();
        NEXT_KIND.set(i + 1);
        run::<T>(c, opts, INPUTS[i % INPUTS.len()], tol);
    }
}

fn opts(isa: Isa, strategy: Strategy) -> CpuOptions {
    CpuOptions { strategy, isa }
}

const MASKS: [Mask; 4] = [
    Mask::None,
    Mask::Causal,
    Mask::ChunkedLocal { chunk: 16 },
    Mask::ChunkedLocal { chunk: 37 },
];

#[test]
fn every_head_dim_ratio_and_mask_on_every_isa() {
    for isa in Isa::all_available() {
        for d in [64, 80, 96, 128] {
            for ratio in [1, 4, 5, 8] {
                for mask in MASKS {
                    let c = case(65, 65, 2, ratio, d, mask);
                    check::<f32>(&c, &opts(isa, Strategy::QueryTiles), TOL_F32);
                    check::<bf16>(&c, &opts(isa, Strategy::QueryTiles), TOL_BF16);
                }
            }
        }
    }
    print_worst("every_head_dim_ratio_and_mask_on_every_isa");
}

#[test]
fn awkward_lengths() {
    let o = CpuOptions::default();
    for n in [1, 7, 63, 65, 1000] {
        for mask in MASKS {
            let c = case(n, n, 2, 4, 64, mask);
            check::<f32>(&c, &o, TOL_F32);
            check::<bf16>(&c, &o, TOL_BF16);
        }
    }
    for d in [8, 24, 72, 136, 256] {
        let c = case(33, 70, 1, 2, d, Mask::Causal);
        check::<f32>(&c, &o, TOL_F32);
        check::<half::f16>(&c, &o, TOL_BF16);
    }
    print_worst("awkward_lengths");
}

#[test]
fn queries_offset_into_a_longer_kv() {
    // The chunked-prefill shape: a chunk of queries at the end of the KV, and a KV that
    // starts at an absolute position other than 0.
    let o = CpuOptions::default();
    for mask in MASKS {
        for (n_q, n_kv) in [(1, 1000), (37, 1000), (130, 333)] {
            let c = case(n_q, n_kv, 2, 4, 64, mask);
            check::<f32>(&c, &o, TOL_F32);
            let mut c = case(n_q, n_kv, 1, 8, 96, mask);
            c.params = c.params.at(5000 + n_kv - n_q, 5000);
            check::<f32>(&c, &o, TOL_F32);
        }
    }
    print_worst("queries_offset_into_a_longer_kv");
}

#[test]
fn split_kv_decode_matches_reference() {
    for isa in Isa::all_available() {
        for splits in [1, 2, 3, 7] {
            for mask in MASKS {
                for (n_q, ratio) in [(1, 8), (1, 5), (3, 4)] {
                    let c = case(n_q, 777, 2, ratio, 128, mask);
                    check::<f32>(&c, &opts(isa, Strategy::SplitKv { splits }), TOL_F32);
                    check::<bf16>(&c, &opts(isa, Strategy::SplitKv { splits }), TOL_BF16);
                }
            }
        }
    }
    // The automatic choice on a decode shape over a long KV.
    let c = case(1, 5000, 1, 8, 64, Mask::Causal);
    check::<f32>(&c, &CpuOptions::default(), TOL_F32);
    print_worst("split_kv_decode_matches_reference");
}

#[test]
fn rows_that_see_no_key_give_neg_inf_and_zeros() {
    // Keys at absolute positions 100..120, queries at 10..20: causal, nothing is visible.
    // Chunked-local with chunk 16: queries at 128..140 see only keys >= 128, i.e. none.
    let shape = AttnShape {
        n_q: 10,
        n_kv: 20,
        h_q: 4,
        h_kv: 1,
        d: 64,
    };
    for (mask, q_pos) in [(Mask::Causal, 10), (Mask::ChunkedLocal { chunk: 16 }, 128)] {
        for strategy in [Strategy::QueryTiles, Strategy::SplitKv { splits: 3 }] {
            let params = AttnParams::new(&shape, mask).at(q_pos, 100);
            let mut rng = rand::rng();
            let q: Vec<f32> = random(&mut rng, 10 * 4 * 64, 1.0);
            let k: Vec<f32> = random(&mut rng, 20 * 64, 1.0);
            let mut out = vec![1f32; 10 * 4 * 64];
            let mut lse = vec![0f32; 40];
            let o = opts(Isa::detect(), strategy);
            attention_with(&q, &k, &k, shape, &params, &mut out, &mut lse, &o).unwrap();
            assert!(lse.iter().all(|x| *x == f32::NEG_INFINITY), "{mask:?}");
            assert!(out.iter().all(|x| *x == 0.0), "{mask:?}");
        }
    }
}

#[test]
fn merging_parts_of_a_split_kv_equals_the_whole() {
    let mut rng = rand::rng();
    for mask in MASKS {
        let (n_q, n_kv, h_kv, g, d) = (40, 300, 2, 4, 80);
        let shape = AttnShape {
            n_q,
            n_kv,
            h_q: h_kv * g,
            h_kv,
            d,
        };
        let params = AttnParams::new(&shape, mask);
        let seed: u64 = rng.random();
        let (q, k, v) = inputs::<f32>(&mut TestRng::new(seed), &shape, &params, Inputs::Hard);
        let want = reference(&q, &k, &v, shape, &params);
        // Random cut points; each part is attention over a KV shard at its own position.
        let mut cuts: Vec<usize> = (0..3).map(|_| rng.random_range(0..=n_kv)).collect();
        cuts.extend([0, n_kv]);
        cuts.sort();
        let rows = n_q * h_kv * g;
        let mut parts = Vec::new();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let s = AttnShape {
                n_kv: b - a,
                ..shape
            };
            let p = params.at(params.q_pos, a);
            let (mut o, mut l) = (vec![0f32; rows * d], vec![0f32; rows]);
            let ks = &k[a * h_kv * d..b * h_kv * d];
            let vs = &v[a * h_kv * d..b * h_kv * d];
            attention(&q, ks, vs, s, &p, &mut o, &mut l).unwrap();
            parts.push((o, l));
        }
        let refs: Vec<(&[f32], &[f32])> = parts.iter().map(|(o, l)| (&o[..], &l[..])).collect();
        let (mut o, mut l) = (vec![0f32; rows * d], vec![0f32; rows]);
        merge(&refs, d, &mut o, &mut l).unwrap();
        assert_close(&o, &l, &want, TOL_F32, &|| {
            format!("{mask:?} cuts {cuts:?} (seed {seed})")
        });
    }
}

#[test]
fn bf16_inputs_with_f32_outputs() {
    // The inputs are exact in both; only f32 arithmetic separates the two.
    for (n_q, n_kv, ratio, d, strategy) in [
        (50, 50, 4, 64, Strategy::QueryTiles),
        (1, 700, 4, 128, Strategy::SplitKv { splits: 3 }),
        (1, 333, 8, 128, Strategy::SplitKv { splits: 2 }),
        (2, 301, 2, 64, Strategy::SplitKv { splits: 1 }),
        // Several query rows whose key ranges end at different keys, over a whole number of
        // 16-key tiles, at most 6 rows (the fused decode step's): the last tile is whole but
        // masked for the earlier rows, so the fused step (unmasked tiles only) must not take it.
        (3, 320, 2, 64, Strategy::QueryTiles),
        (2, 336, 3, 128, Strategy::SplitKv { splits: 2 }),
        // The fused step's P V in passes of 64 dims and a last one of 32 (96), or 32 alone.
        (1, 210, 3, 96, Strategy::SplitKv { splits: 2 }),
        (1, 77, 6, 32, Strategy::QueryTiles),
    ] {
        for mask in MASKS {
            let c = case(n_q, n_kv, 1, ratio, d, mask);
            for kind in INPUTS {
                let seed: u64 = rand::random();
                let (q, k, v) = inputs::<bf16>(&mut TestRng::new(seed), &c.shape, &c.params, kind);
                let mut out = vec![0f32; n_q * ratio * d];
                let mut lse = vec![0f32; n_q * ratio];
                let o = opts(Isa::detect(), strategy);
                attention_with(&q, &k, &v, c.shape, &c.params, &mut out, &mut lse, &o).unwrap();
                let want = reference(&q, &k, &v, c.shape, &c.params);
                let tol = tol_bf16_inputs(o.isa, &c.shape);
                assert_close(&out, &lse, &want, tol, &|| {
                    format!("{:?} {mask:?} {strategy:?} {kind:?} (seed {seed})", c.shape)
                });
            }
        }
    }
    print_worst("bf16_inputs_with_f32_outputs");
}

/// Case `c` under `o` on bf16 inputs of every kind (seeds from `seed`) against f64, within
/// `tol`; `what` names the case's variant in a failure.
fn bf16_inputs_match_f64(c: &Case, o: &CpuOptions, tol: f64, seed: u64, what: &str) {
    let AttnShape { n_q, h_q, d, .. } = c.shape;
    for (i, kind) in INPUTS.into_iter().enumerate() {
        let seed = seed.wrapping_add(i as u64);
        let (q, k, v) = inputs::<bf16>(&mut TestRng::new(seed), &c.shape, &c.params, kind);
        let mut out = vec![0f32; n_q * h_q * d];
        let mut lse = vec![0f32; n_q * h_q];
        attention_with(&q, &k, &v, c.shape, &c.params, &mut out, &mut lse, o).unwrap();
        let want = reference(&q, &k, &v, c.shape, &c.params);
        assert_close(&out, &lse, &want, tol, &|| {
            format!("{:?} {what} {kind:?} (seed {seed})", c.shape)
        });
    }
}

#[test]
fn bf16_dot_tiles_match_f64_at_awkward_sizes() {
    // The bf16 dot-product tiles (blocks of more than 16 rows over a bf16 KV): every mask, GQA
    // 1/4/8, head dims not a multiple of 32 (pairs along d; head dims are multiples of 8),
    // key counts around the 64-key tile, both strategies; f32 outputs, the stricter measure.
    let bf16_tiles = crate::cpu::Ops::new(Isa::detect()).has_bf16_tiles();
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    for (n_q, n_kv, ratio, d) in [
        (17, 17, 1, 64),
        (40, 65, 4, 72),
        (9, 130, 8, 80),
        (100, 100, 4, 128),
        (33, 1, 1, 256),
        (21, 64, 1, 8),
        (30, 70, 1, 136),
    ] {
        for mask in MASKS {
            let mut c = case(n_q, n_kv, 2, ratio, d, mask);
            c.params = c.params.at(n_kv.saturating_sub(n_q), 0);
            let strategy = if rng.random() {
                Strategy::QueryTiles
            } else {
                Strategy::SplitKv {
                    splits: rng.random_range(1..4),
                }
            };
            let o = opts(Isa::detect(), strategy);
            let tol = tol_bf16_inputs(o.isa, &c.shape);
            // The case reaches the tiles where the CPU has them (else it tests nothing new).
            assert_eq!(tol == TOL_P_BF16, bf16_tiles, "{:?}", c.shape);
            bf16_inputs_match_f64(&c, &o, tol, rng.random(), &format!("{mask:?} {strategy:?}"));
        }
    }
    print_worst("bf16_dot_tiles_match_f64_at_awkward_sizes");
}

/// Query tiles over a bf16 KV run two row blocks an item, sharing each tile's packed V
/// (`Engine::block_pair`): halves whose keys start and end at different tiles (causal,
/// chunked-local masks whose chunks cut tiles, queries offset into a longer KV), a last
/// item of one block, a second half too small for the tiles (alone, on the decode path's
/// packing), GQA 1/4/8; against f64.
#[test]
fn paired_row_blocks_match_f64() {
    for (n_q, n_kv, ratio, d) in [
        (200, 200, 1, 64),
        (150, 400, 1, 64),
        (77, 77, 4, 128),
        (70, 133, 8, 72),
        (130, 130, 1, 96),
    ] {
        for mask in MASKS {
            let mut c = case(n_q, n_kv, 2, ratio, d, mask);
            c.params = c.params.at(n_kv - n_q, 0);
            let o = opts(Isa::detect(), Strategy::QueryTiles);
            let tol = tol_bf16_inputs(o.isa, &c.shape);
            bf16_inputs_match_f64(&c, &o, tol, rand::random(), &format!("{mask:?}"));
        }
    }
    print_worst("paired_row_blocks_match_f64");
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let s = AttnShape {
        n_q: 2,
        n_kv: 3,
        h_q: 4,
        h_kv: 2,
        d: 64,
    };
    let p = AttnParams::new(&s, Mask::Causal);
    let buf = vec![0f32; 2 * 4 * 64];
    let kv = vec![0f32; 3 * 2 * 64];
    let (mut out, mut lse) = (vec![0f32; 2 * 4 * 64], vec![0f32; 8]);
    let e = attention(&buf, &kv[1..], &kv, s, &p, &mut out, &mut lse).unwrap_err();
    assert!(
        matches!(e, KernelError::ShapeMismatch { buffer: "k", .. }),
        "{e}"
    );
    let e = attention(&buf, &kv, &kv, s, &p, &mut out, &mut lse[1..]).unwrap_err();
    assert!(
        matches!(e, KernelError::ShapeMismatch { buffer: "lse", .. }),
        "{e}"
    );
    for bad in [
        AttnShape { h_q: 3, ..s },
        AttnShape { d: 60, ..s },
        AttnShape { d: 264, ..s },
        AttnShape { h_kv: 0, ..s },
        AttnShape { h_q: 0, ..s },
        AttnShape { d: 0, ..s },
    ] {
        let e = attention(&buf, &kv, &kv, bad, &p, &mut out, &mut lse).unwrap_err();
        assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
    }
    let p0 = AttnParams::new(&s, Mask::ChunkedLocal { chunk: 0 });
    let e = attention(&buf, &kv, &kv, s, &p0, &mut out, &mut lse).unwrap_err();
    assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
}

/// A KV cut into segments (random lengths, some empty or of one key, in shuffled order, each
/// at its own absolute position) gives what the same keys give in one piece.
/// Where a KV of `n_kv` keys is cut into segments, sorted: 0, `n_kv`, a one-key first
/// segment, and fewer than `most` random cuts (empty segments among them).
fn random_cuts(rng: &mut impl Rng, n_kv: usize, most: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = (0..rng.random_range(0..most))
        .map(|_| rng.random_range(0..=n_kv))
        .chain([0, n_kv, n_kv.min(1)])
        .collect();
    cuts.sort();
    cuts
}

#[test]
fn segments_equal_the_contiguous_kv() {
    use rand::seq::{IndexedRandom, SliceRandom};
    fn one<T: Element>(rng: &mut rand::rngs::StdRng, seed: u64, c: &Case, kind: Inputs) {
        let AttnShape { n_kv, h_kv, d, .. } = c.shape;
        let row = h_kv * d;
        let (q, k, v) = inputs::<T>(&mut TestRng::new(rng.random()), &c.shape, &c.params, kind);
        let cuts = random_cuts(rng, n_kv, 12);
        let mut segs: Vec<KvSegment<'_, T>> = cuts
            .windows(2)
            .map(|w| KvSegment {
                k: &k[w[0] * row..w[1] * row],
                v: &v[w[0] * row..w[1] * row],
                pos: c.params.k_pos + w[0],
            })
            .collect();
        segs.shuffle(rng);
        let mut out = vec![0f32; q.len() / d * d];
        let mut lse = vec![0f32; q.len() / d];
        // The machine's own split count, or one a wider machine would choose.
        let splits = *[None, Some(1), Some(2), Some(3), Some(7)]
            .choose(rng)
            .unwrap();
        cpu::attention_segments_split(&q, &segs, c.shape, &c.params, splits, &mut out, &mut lse)
            .unwrap();
        let want = reference(&q, &k, &v, c.shape, &c.params);
        // f32 outputs whatever the inputs: bf16 products are exact, so only f32 arithmetic
        // separates kernel and reference, except where the bf16 tiles round P.
        let tol = match T::DTYPE {
            crate::DType::BF16 => tol_bf16_inputs(Isa::detect(), &c.shape),
            _ => TOL_F32,
        };
        assert_close(&out, &lse, &want, tol, &|| {
            format!(
                "{:?} {:?} {} {kind:?} cuts {cuts:?} splits {splits:?} (seed {seed})",
                c.shape,
                c.params,
                T::DTYPE.name()
            )
        });
    }
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for mask in MASKS {
        for ratio in [1, 4, 8] {
            for n_q in [1, 3] {
                for d in [64, 72, 128] {
                    let n_kv = *[1, 7, 300, 1301].choose(&mut rng).unwrap();
                    let mut c = case(n_q, n_kv, 2, ratio, d, mask);
                    // Keys from an absolute position other than 0, the queries after them.
                    let base = rng.random_range(0..100);
                    c.params = c.params.at(base + n_kv.saturating_sub(n_q), base);
                    for kind in INPUTS {
                        one::<f32>(&mut rng, seed, &c, kind);
                        one::<bf16>(&mut rng, seed, &c, kind);
                    }
                }
            }
        }
    }
    // Wide rows (8 KV heads of 128: 2 KiB a key in bf16), where the fused decode step
    // prefetches its own rows ahead within a segment and the split loop the next segment's
    // first keys; GQA 4 and 5 (Scout's), segments shorter and longer than that distance.
    for ratio in [4, 5] {
        for n_kv in [37, 300, 700] {
            let mut c = case(1, n_kv, 8, ratio, 128, Mask::Causal);
            let base = rng.random_range(0..100);
            c.params = c.params.at(base + n_kv - 1, base);
            for kind in INPUTS {
                one::<bf16>(&mut rng, seed, &c, kind);
            }
        }
    }
    print_worst("segments_equal_the_contiguous_kv");
}

#[test]
fn segments_of_the_wrong_size_are_errors() {
    let shape = AttnShape {
        n_q: 1,
        n_kv: 10,
        h_q: 4,
        h_kv: 2,
        d: 8,
    };
    let p = AttnParams::new(&shape, Mask::Causal);
    let (q, k) = (vec![0.5f32; 32], vec![0.25f32; 160]);
    let (mut out, mut lse) = (vec![0f32; 32], vec![0f32; 4]);
    let seg = |a: usize, b: usize| KvSegment {
        k: &k[a..b],
        v: &k[a..b],
        pos: 0,
    };
    // 9 keys where the shape says 10; half a key row; K and V of different lengths.
    assert!(attention_segments(&q, &[seg(0, 144)], shape, &p, &mut out, &mut lse).is_err());
    assert!(
        attention_segments(&q, &[seg(0, 8), seg(8, 160)], shape, &p, &mut out, &mut lse).is_err()
    );
    let bad = KvSegment {
        k: &k[..160],
        v: &k[..144],
        pos: 0,
    };
    assert!(attention_segments(&q, &[bad], shape, &p, &mut out, &mut lse).is_err());
    assert!(attention_segments(&q, &[seg(0, 160)], shape, &p, &mut out, &mut lse).is_ok());
}

/// Attention called from inside parallel work, as a model's layers call it from rayon tasks:
/// a thread that steals another call while its own is in flight takes a fresh scratch (its
/// own is borrowed), and every result is still exact.
#[test]
fn calls_from_parallel_tasks_are_exact() {
    use rayon::prelude::*;
    let c = case(37, 300, 2, 4, 64, Mask::Causal);
    (0..48).into_par_iter().for_each(|i| {
        run::<f32>(
            &c,
            &CpuOptions::default(),
            INPUTS[i % INPUTS.len()],
            TOL_F32,
        );
    });
}

/// A q8 KV (quantised, cut into segments in any order, read in place) gives what the f64
/// reference gives on its dequantised keys and values, to f32 arithmetic: the kernel's only
/// rounding beyond f32 is the quantisation itself, which the reference sees too. Decode and
/// prefill row counts, GQA 1/4/8, every mask, lengths of 1 and off the tile.
#[test]
fn q8_segments_equal_the_reference_on_the_dequantised_kv() {
    block_segments_equal_the_reference::<crate::BlockQ8>(
        "q8_segments_equal_the_reference_on_the_dequantised_kv",
    );
}

/// The same for an FP8 KV (E4M3 blocks, widened through f16 in registers or tiles).
#[test]
fn fp8_segments_equal_the_reference_on_the_dequantised_kv() {
    block_segments_equal_the_reference::<crate::BlockF8>(
        "fp8_segments_equal_the_reference_on_the_dequantised_kv",
    );
}

fn block_segments_equal_the_reference<B: crate::KvBlock + Default>(name: &str) {
    use crate::Q8_BLOCK;
    use rand::seq::{IndexedRandom, SliceRandom};
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // (KV heads, GQA ratio, queries, head dim); the last two wide rows (8 KV heads of 128:
    // 1152 bytes a key), where the fused decode step prefetches its own rows ahead.
    let mut shapes: Vec<(usize, usize, usize, usize)> = vec![];
    for ratio in [1, 4, 8] {
        for n_q in [1, 3, 40] {
            for d in [32, 64, 128] {
                shapes.push((2, ratio, n_q, d));
            }
        }
    }
    shapes.extend([(8, 4, 1, 128), (8, 5, 1, 128)]);
    for mask in MASKS {
        for &(h_kv, ratio, n_q, d) in &shapes {
            let n_kv = *[1, 7, 65, 300, 1301].choose(&mut rng).unwrap();
            let mut c = case(n_q, n_kv, h_kv, ratio, d, mask);
            let base = rng.random_range(0..100);
            c.params = c.params.at(base + n_kv.saturating_sub(n_q), base);
            let kind = *INPUTS.choose(&mut rng).unwrap();
            let inner = rng.random();
            let (q, k, v) = inputs::<f32>(&mut TestRng::new(inner), &c.shape, &c.params, kind);
            let quant = |x: &[f32]| crate::quantize_blocks_vec::<B>("test", x).unwrap();
            let (kq, vq) = (quant(&k), quant(&v));
            // The portable loop's widening (every ISA's equals it: kvq8, kvf8 tests).
            let deq = |b: &[B]| -> Vec<f32> {
                let mut x = vec![0f32; b.len() * Q8_BLOCK];
                B::widen(Isa::Portable, b, &mut x);
                x
            };
            let (kd, vd) = (deq(&kq), deq(&vq));
            let row = h_kv * d / Q8_BLOCK;
            let cuts = random_cuts(&mut rng, n_kv, 6);
            let mut segs: Vec<KvBlockSegment<'_, B>> = cuts
                .windows(2)
                .map(|w| KvBlockSegment {
                    k: &kq[w[0] * row..w[1] * row],
                    v: &vq[w[0] * row..w[1] * row],
                    pos: c.params.k_pos + w[0],
                })
                .collect();
            segs.shuffle(&mut rng);
            let splits = *[None, Some(1), Some(2), Some(3)].choose(&mut rng).unwrap();
            let mut out = vec![0f32; q.len()];
            let mut lse = vec![0f32; q.len() / d];
            cpu::attention_segments_blocks_split(
                &q, &segs, c.shape, &c.params, splits, &mut out, &mut lse,
            )
            .unwrap();
            let want = reference(&q, &kd, &vd, c.shape, &c.params);
            assert_close(&out, &lse, &want, TOL_F32, &|| {
                format!(
                    "{:?} {:?} {kind:?} cuts {cuts:?} splits {splits:?} (seed {seed}, {inner})",
                    c.shape, c.params
                )
            });
        }
    }
    print_worst(name);
}

#[test]
fn q8_segments_of_a_bad_shape_are_errors() {
    use crate::BlockQ8;
    let shape = AttnShape {
        n_q: 1,
        n_kv: 2,
        h_q: 2,
        h_kv: 1,
        d: 72,
    };
    let p = AttnParams::new(&shape, Mask::None);
    let (q, mut out, mut lse) = (vec![0f32; 144], vec![0f32; 144], vec![0f32; 2]);
    let kv = vec![BlockQ8::default(); 4];
    let seg = [KvSegmentQ8 {
        k: &kv,
        v: &kv,
        pos: 0,
    }];
    // d = 72 is not whole q8 blocks.
    let e = attention_segments_blocks(&q, &seg, shape, &p, &mut out, &mut lse).unwrap_err();
    assert!(matches!(e, KernelError::Unsupported { .. }), "{e}");
    // d = 64 with 3 blocks where 2 keys need 4.
    let shape = AttnShape { d: 64, ..shape };
    let (q, mut out) = (vec![0f32; 128], vec![0f32; 128]);
    let seg = [KvSegmentQ8 {
        k: &kv[..3],
        v: &kv[..3],
        pos: 0,
    }];
    let e = attention_segments_blocks(&q, &seg, shape, &p, &mut out, &mut lse).unwrap_err();
    assert!(matches!(e, KernelError::ShapeMismatch { .. }), "{e}");
}
