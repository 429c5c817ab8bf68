//! Store tests of the block KV types, q8_0 and FP8: the blocks of 32 values (36 and 33 bytes)
//! go through append, read, every tier, fork, truncate, snapshots and attention exactly as the
//! 16- and 32-bit types. Each test is written once, over the block type, and run for both.

use super::*;
use crate::tests::{seeded, TempDir};
use longctx_kernels::attention::reference::{errors, inputs, reference, Inputs, TestRng};
use longctx_kernels::{AttnParams, AttnShape, BlockF8, BlockQ8, DType, Isa, KvBlock, Mask};
use rand::rngs::StdRng;
use rand::Rng;

const H_KV: usize = 2;
const D: usize = 64;
/// q8 blocks of one token's K (or V).
const ROW: usize = H_KV * D / 32;

/// Bytes of one block of `B`.
fn unit<B>() -> usize {
    std::mem::size_of::<B>()
}

fn q8_config<B: KvBlock>(dir: &TempDir, bt: usize, blocks: [u64; 3], policy: Policy) -> KvConfig {
    let bb = (2 * bt * ROW * unit::<B>()) as u64;
    KvConfig {
        block_tokens: bt,
        h_kv: H_KV,
        d: D,
        dtype: B::KV_DTYPE,
        layers: vec![Retention::Full, Retention::ChunkedLocal { chunk: 8 }],
        budgets: Budgets {
            device: blocks[0] * bb,
            host: blocks[1] * bb,
            disk: blocks[2] * bb,
        },
        policy,
        spill_dir: dir.0.clone(),
    }
}

fn quant<B: KvBlock + Default>(x: &[f32]) -> Vec<B> {
    longctx_kernels::quantize_blocks_vec(B::KV_DTYPE.name(), x).unwrap()
}

fn q8_rows<B: KvBlock + Default>(rng: &mut StdRng, n: usize) -> Vec<B> {
    let x: Vec<f32> = (0..n * H_KV * D)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    quant(&x)
}

#[test]
fn blocks_are_36_and_33_bytes_and_a_head_dim_off_the_block_is_refused() {
    let dir = TempDir::new("q8cfg");
    for (cfg, bytes) in [
        (
            q8_config::<BlockQ8>(&dir, 4, [10, 0, 0], Policy::KeepNewest),
            36,
        ),
        (
            q8_config::<BlockF8>(&dir, 4, [10, 0, 0], Policy::KeepNewest),
            33,
        ),
    ] {
        assert_eq!(cfg.token_bytes(), ROW * bytes);
        let bad = KvConfig { d: 72, ..cfg };
        let e = KvStore::new(bad).err().expect("d = 72 is not whole blocks");
        assert!(e.to_string().contains("multiple of 32"), "{e}");
    }
}

#[test]
fn q8_appends_read_back_through_every_tier_fork_and_truncate() {
    appends_read_back::<BlockQ8>();
}

#[test]
fn fp8_appends_read_back_through_every_tier_fork_and_truncate() {
    appends_read_back::<BlockF8>();
}

fn appends_read_back<B: KvBlock + Default + PartialEq + std::fmt::Debug>() {
    let mut rng = seeded("q8-tiers");
    let dir = TempDir::new("q8tiers");
    // One block on the device, one in RAM, the rest spilled.
    let store = KvStore::new(q8_config::<B>(&dir, 5, [1, 1, 100], Policy::Lru)).unwrap();
    let s = store.create_seq();
    let (mut k, mut v) = (vec![], vec![]);
    for n in [1, 7, 13, 2] {
        let (kn, vn) = (q8_rows::<B>(&mut rng, n), q8_rows::<B>(&mut rng, n));
        store.append(s, 0, &kn, &vn).unwrap();
        k.extend(kn);
        v.extend(vn);
    }
    let u = store.usage();
    assert!(u.blocks[2] >= 3 && u.spill_writes >= 3, "{u:?}");
    let (k2, v2) = store.read::<B>(s, 0, 0..23).unwrap();
    assert_eq!((k2, v2), (k.clone(), v.clone()));
    let (k3, _) = store.read::<B>(s, 0, 6..17).unwrap();
    assert_eq!(k3, k[6 * ROW..17 * ROW]);
    // A stream yields the same blocks, spilled ones read back from disk.
    let mut at = 0;
    for b in store
        .stream::<B>(
            s,
            0,
            StreamOptions {
                prefetch: 2,
                ..Default::default()
            },
        )
        .unwrap()
    {
        let b = b.unwrap();
        assert_eq!(b.pos, at);
        assert_eq!(b.k(), &k[at * ROW..(at + b.len) * ROW]);
        assert_eq!(b.v(), &v[at * ROW..(at + b.len) * ROW]);
        at += b.len;
    }
    assert_eq!(at, 23);
    // A fork shares; writing to it leaves the original alone.
    let f = store.fork(s).unwrap();
    let (kf, vf) = (q8_rows::<B>(&mut rng, 4), q8_rows::<B>(&mut rng, 4));
    store.append(f, 0, &kf, &vf).unwrap();
    assert_eq!(store.read::<B>(s, 0, 0..23).unwrap().0, k);
    assert_eq!(store.read::<B>(f, 0, 23..27).unwrap().0, kf);
    // Truncate mid-block, append again.
    store.truncate(s, 9).unwrap();
    let (kt, vt) = (q8_rows::<B>(&mut rng, 3), q8_rows::<B>(&mut rng, 3));
    store.append(s, 0, &kt, &vt).unwrap();
    let (k4, v4) = store.read::<B>(s, 0, 0..12).unwrap();
    assert_eq!(k4[..9 * ROW], k[..9 * ROW]);
    assert_eq!(k4[9 * ROW..], kt[..]);
    assert_eq!(v4[9 * ROW..], vt[..]);
    assert_eq!(
        store.read::<B>(f, 0, 0..23).unwrap().0,
        k,
        "the fork kept its own"
    );
    // The element type is checked: a q8 store takes no f32 rows.
    let e = store.append(s, 0, &[0f32; H_KV * D], &[0f32; H_KV * D]);
    assert!(e.is_err());
    // Units that are not whole tokens are refused.
    assert!(store.append(s, 0, &kt[..1], &vt[..1]).is_err());
}

#[test]
fn q8_snapshots_round_trip_and_other_types_are_refused() {
    snapshots_round_trip::<BlockQ8>();
}

#[test]
fn fp8_snapshots_round_trip_and_other_types_are_refused() {
    snapshots_round_trip::<BlockF8>();
}

fn snapshots_round_trip<B: KvBlock + Default + PartialEq + std::fmt::Debug>() {
    let mut rng = seeded("q8-snap");
    let dir = TempDir::new("q8snap");
    let store = KvStore::new(q8_config::<B>(&dir, 4, [2, 1, 1000], Policy::KeepNewest)).unwrap();
    let s = store.create_seq();
    let mut kept = vec![];
    for l in 0..2 {
        let (k, v) = (q8_rows::<B>(&mut rng, 23), q8_rows::<B>(&mut rng, 23));
        store.append(s, l, &k[..10 * ROW], &v[..10 * ROW]).unwrap();
        store.append(s, l, &k[10 * ROW..], &v[10 * ROW..]).unwrap();
        kept.push((k, v));
    }
    let tokens: Vec<u32> = (0..23).collect();
    let meta = SnapshotMeta {
        fingerprint: "model-q8",
        tokens: &tokens,
    };
    let snap = dir.0.join("snap");
    store.save_snapshot(s, &snap, &meta).unwrap();
    let fresh = KvStore::new(q8_config::<B>(&dir, 4, [2, 1, 1000], Policy::KeepNewest)).unwrap();
    let s2 = fresh.load_snapshot(&snap, &meta).unwrap();
    assert_eq!(fresh.read::<B>(s2, 0, 0..23).unwrap(), kept[0]);
    let from = fresh.held_from(s2, 1).unwrap();
    assert_eq!(
        fresh.read::<B>(s2, 1, from..23).unwrap().1,
        kept[1].1[from * ROW..]
    );
    // A bf16 store of the same shape cannot load it, nor a q8 store a bf16 snapshot.
    let bf16_cfg = KvConfig {
        dtype: DType::BF16,
        ..q8_config::<B>(&dir, 4, [2, 1, 1000], Policy::KeepNewest)
    };
    let other = KvStore::new(bf16_cfg.clone()).unwrap();
    let e = other.load_snapshot(&snap, &meta).unwrap_err();
    assert!(e.to_string().contains(B::KV_DTYPE.name()), "{e}");
    let b = KvStore::new(bf16_cfg).unwrap();
    let sb = b.create_seq();
    let z = vec![half::bf16::ZERO; 23 * H_KV * D];
    for l in 0..2 {
        b.append(sb, l, &z, &z).unwrap();
    }
    let snap_b = dir.0.join("snap-bf16");
    b.save_snapshot(sb, &snap_b, &meta).unwrap();
    let e = fresh.load_snapshot(&snap_b, &meta).unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
}

#[test]
fn q8_attend_over_tiered_blocks_matches_the_reference_on_the_dequantised_kv() {
    attend_over_tiers::<BlockQ8>();
}

#[test]
fn fp8_attend_over_tiered_blocks_matches_the_reference_on_the_dequantised_kv() {
    attend_over_tiers::<BlockF8>();
}

fn attend_over_tiers<B: KvBlock + Default>() {
    let mut rng = seeded("q8-attend");
    for (bt, group, mask, n_kv, n_q) in [
        (16, 1, Mask::Causal, 100, 7),
        (7, 4, Mask::Causal, 61, 1),
        (32, 8, Mask::None, 200, 5),
        (5, 4, Mask::ChunkedLocal { chunk: 24 }, 90, 13),
        // Decode over more blocks than one kernel call takes (GROUP): groups merged.
        (5, 4, Mask::Causal, 401, 1),
        (16, 2, Mask::ChunkedLocal { chunk: 48 }, 300, 1),
        // Many rows (a prefill chunk): also in place.
        (16, 1, Mask::Causal, 150, 70),
    ] {
        for kind in [Inputs::Uniform(1.0), Inputs::Uniform(4.0), Inputs::Hard] {
            let dir = TempDir::new("q8attend");
            let h_q = H_KV * group;
            let retention = match mask {
                Mask::ChunkedLocal { chunk } => Retention::ChunkedLocal { chunk },
                _ => Retention::Full,
            };
            let bb = (2 * bt * ROW * unit::<B>()) as u64;
            let cfg = KvConfig {
                layers: vec![retention],
                budgets: Budgets {
                    device: 2 * bb,
                    host: bb,
                    disk: 1000 * bb,
                },
                ..q8_config::<B>(&dir, bt, [0, 0, 0], Policy::KeepNewest)
            };
            let store = KvStore::new(cfg).unwrap();
            let s = store.create_seq();
            let shape = AttnShape {
                n_q,
                n_kv,
                h_q,
                h_kv: H_KV,
                d: D,
            };
            let params = AttnParams::new(&shape, mask);
            let (q, k, v) = inputs::<f32>(&mut TestRng::new(rng.random()), &shape, &params, kind);
            let (kq, vq) = (quant::<B>(&k), quant::<B>(&v));
            let split = n_kv - n_q;
            store
                .append(s, 0, &kq[..split * ROW], &vq[..split * ROW])
                .unwrap();
            store
                .append(s, 0, &kq[split * ROW..], &vq[split * ROW..])
                .unwrap();
            let deq = |b: &[B]| -> Vec<f32> {
                let mut out = vec![0f32; b.len() * 32];
                B::widen(Isa::detect(), b, &mut out);
                out
            };
            let want = reference(&q, &deq(&kq), &deq(&vq), shape, &params);
            let mut out = vec![0f32; n_q * h_q * D];
            let mut lse = vec![0f32; n_q * h_q];
            for (prefetch, splits) in [(0, None), (3, None), (3, Some(1)), (0, Some(3))] {
                attend_blocks::<B>(
                    &store,
                    s,
                    0,
                    &q,
                    h_q,
                    &params,
                    StreamOptions { prefetch, splits },
                    &mut out,
                    &mut lse,
                )
                .unwrap();
                let e = errors(&out, &lse, &want);
                assert!(e.worst() < 1e-5, "bt {bt} {mask:?} {kind:?}: {e:?}");
            }
        }
    }
}
