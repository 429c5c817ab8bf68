//! Store tests of a q8_0 KV: the blocks of 32 values (36 bytes each) go through append, read,
//! every tier, fork, truncate, snapshots and attention exactly as the 16- and 32-bit types.

use super::*;
use crate::tests::{seeded, TempDir};
use longctx_kernels::attention::reference::{errors, inputs, reference, Inputs, TestRng};
use longctx_kernels::{quantize_q8_vec, AttnParams, AttnShape, BlockQ8, DType, Mask};
use rand::rngs::StdRng;
use rand::Rng;

const H_KV: usize = 2;
const D: usize = 64;
/// q8 blocks of one token's K (or V).
const ROW: usize = H_KV * D / 32;

fn q8_config(dir: &TempDir, bt: usize, blocks: [u64; 3], policy: Policy) -> KvConfig {
    let bb = (2 * bt * ROW * 36) as u64;
    KvConfig {
        block_tokens: bt,
        h_kv: H_KV,
        d: D,
        dtype: DType::Q8_0,
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

fn q8_rows(rng: &mut StdRng, n: usize) -> Vec<BlockQ8> {
    let x: Vec<f32> = (0..n * H_KV * D)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    quantize_q8_vec(&x).unwrap()
}

#[test]
fn q8_blocks_are_36_bytes_and_a_head_dim_off_the_block_is_refused() {
    let dir = TempDir::new("q8cfg");
    let cfg = q8_config(&dir, 4, [10, 0, 0], Policy::KeepNewest);
    assert_eq!(cfg.token_bytes(), ROW * 36);
    let bad = KvConfig { d: 72, ..cfg };
    let e = KvStore::new(bad)
        .err()
        .expect("d = 72 is not whole q8 blocks");
    assert!(e.to_string().contains("multiple of 32"), "{e}");
}

#[test]
fn q8_appends_read_back_through_every_tier_fork_and_truncate() {
    let mut rng = seeded("q8-tiers");
    let dir = TempDir::new("q8tiers");
    // One block on the device, one in RAM, the rest spilled.
    let store = KvStore::new(q8_config(&dir, 5, [1, 1, 100], Policy::Lru)).unwrap();
    let s = store.create_seq();
    let (mut k, mut v) = (vec![], vec![]);
    for n in [1, 7, 13, 2] {
        let (kn, vn) = (q8_rows(&mut rng, n), q8_rows(&mut rng, n));
        store.append(s, 0, &kn, &vn).unwrap();
        k.extend(kn);
        v.extend(vn);
    }
    let u = store.usage();
    assert!(u.blocks[2] >= 3 && u.spill_writes >= 3, "{u:?}");
    let (k2, v2) = store.read::<BlockQ8>(s, 0, 0..23).unwrap();
    assert_eq!((k2, v2), (k.clone(), v.clone()));
    let (k3, _) = store.read::<BlockQ8>(s, 0, 6..17).unwrap();
    assert_eq!(k3, k[6 * ROW..17 * ROW]);
    // A stream yields the same blocks, spilled ones read back from disk.
    let mut at = 0;
    for b in store
        .stream::<BlockQ8>(s, 0, StreamOptions { prefetch: 2 })
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
    let (kf, vf) = (q8_rows(&mut rng, 4), q8_rows(&mut rng, 4));
    store.append(f, 0, &kf, &vf).unwrap();
    assert_eq!(store.read::<BlockQ8>(s, 0, 0..23).unwrap().0, k);
    assert_eq!(store.read::<BlockQ8>(f, 0, 23..27).unwrap().0, kf);
    // Truncate mid-block, append again.
    store.truncate(s, 9).unwrap();
    let (kt, vt) = (q8_rows(&mut rng, 3), q8_rows(&mut rng, 3));
    store.append(s, 0, &kt, &vt).unwrap();
    let (k4, v4) = store.read::<BlockQ8>(s, 0, 0..12).unwrap();
    assert_eq!(k4[..9 * ROW], k[..9 * ROW]);
    assert_eq!(k4[9 * ROW..], kt[..]);
    assert_eq!(v4[9 * ROW..], vt[..]);
    assert_eq!(
        store.read::<BlockQ8>(f, 0, 0..23).unwrap().0,
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
    let mut rng = seeded("q8-snap");
    let dir = TempDir::new("q8snap");
    let store = KvStore::new(q8_config(&dir, 4, [2, 1, 1000], Policy::KeepNewest)).unwrap();
    let s = store.create_seq();
    let mut kept = vec![];
    for l in 0..2 {
        let (k, v) = (q8_rows(&mut rng, 23), q8_rows(&mut rng, 23));
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
    let fresh = KvStore::new(q8_config(&dir, 4, [2, 1, 1000], Policy::KeepNewest)).unwrap();
    let s2 = fresh.load_snapshot(&snap, &meta).unwrap();
    assert_eq!(fresh.read::<BlockQ8>(s2, 0, 0..23).unwrap(), kept[0]);
    let from = fresh.held_from(s2, 1).unwrap();
    assert_eq!(
        fresh.read::<BlockQ8>(s2, 1, from..23).unwrap().1,
        kept[1].1[from * ROW..]
    );
    // A bf16 store of the same shape cannot load it, nor a q8 store a bf16 snapshot.
    let bf16_cfg = KvConfig {
        dtype: DType::BF16,
        ..q8_config(&dir, 4, [2, 1, 1000], Policy::KeepNewest)
    };
    let other = KvStore::new(bf16_cfg.clone()).unwrap();
    let e = other.load_snapshot(&snap, &meta).unwrap_err();
    assert!(e.to_string().contains("q8_0"), "{e}");
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
            let bb = (2 * bt * ROW * 36) as u64;
            let cfg = KvConfig {
                layers: vec![retention],
                budgets: Budgets {
                    device: 2 * bb,
                    host: bb,
                    disk: 1000 * bb,
                },
                ..q8_config(&dir, bt, [0, 0, 0], Policy::KeepNewest)
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
            let (kq, vq) = (quantize_q8_vec(&k).unwrap(), quantize_q8_vec(&v).unwrap());
            let split = n_kv - n_q;
            store
                .append(s, 0, &kq[..split * ROW], &vq[..split * ROW])
                .unwrap();
            store
                .append(s, 0, &kq[split * ROW..], &vq[split * ROW..])
                .unwrap();
            let deq = |b: &[BlockQ8]| -> Vec<f32> {
                let mut out = vec![0f32; b.len() * 32];
                longctx_kernels::dequantize_q8(b, &mut out);
                out
            };
            let want = reference(&q, &deq(&kq), &deq(&vq), shape, &params);
            let mut out = vec![0f32; n_q * h_q * D];
            let mut lse = vec![0f32; n_q * h_q];
            for prefetch in [0, 3] {
                attend_q8(
                    &store,
                    s,
                    0,
                    &q,
                    h_q,
                    &params,
                    StreamOptions { prefetch },
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
