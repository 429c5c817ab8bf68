use half::bf16;
use longctx_kernels::*;
use std::time::Instant;

fn rnd(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() {
    let hq: usize = std::env::var("HQ")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let hkv: usize = std::env::var("HKV")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let d: usize = std::env::var("D")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let sizes: Vec<usize> = std::env::var("NKV")
        .ok()
        .map(|s| s.split(",").map(|x| x.parse().unwrap()).collect())
        .unwrap_or(vec![2048, 8192, 32768, 65536]);
    let only_bf = std::env::var("ONLY_BF").is_ok();
    for &n in &sizes {
        let s = AttnShape {
            n_q: 1,
            n_kv: n,
            h_q: hq,
            h_kv: hkv,
            d,
        };
        let params = AttnParams::new(&s, Mask::Causal);
        let reps = (4_000_000 / n).max(20);
        let qf = rnd(hq * d, 1);
        let kf = rnd(n * hkv * d, 2);
        let vf = rnd(n * hkv * d, 3);
        let q: Vec<bf16> = qf.iter().map(|&x| bf16::from_f32(x)).collect();
        let k: Vec<bf16> = kf.iter().map(|&x| bf16::from_f32(x)).collect();
        let v: Vec<bf16> = vf.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![bf16::ZERO; q.len()];
        let mut lse = vec![0f32; hq];
        attention(&q, &k, &v, s, &params, &mut out, &mut lse).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            attention(&q, &k, &v, s, &params, &mut out, &mut lse).unwrap();
        }
        let bf = t.elapsed().as_secs_f64() / reps as f64;
        if only_bf {
            println!(
                "n_kv {n}: bf16 {:.1} us {:.2} ns/key-head",
                bf * 1e6,
                bf * 1e9 / (n * hkv) as f64
            );
            continue;
        }
        let kq = quantize_blocks_vec::<BlockQ8>("p", &kf).unwrap();
        let vq = quantize_blocks_vec::<BlockQ8>("p", &vf).unwrap();
        let seg = [KvBlockSegment {
            k: &kq,
            v: &vq,
            pos: 0,
        }];
        let mut out32 = vec![0f32; q.len()];
        attention_segments_blocks(&qf, &seg, s, &params, &mut out32, &mut lse).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            attention_segments_blocks(&qf, &seg, s, &params, &mut out32, &mut lse).unwrap();
        }
        let q8 = t.elapsed().as_secs_f64() / reps as f64;
        let kh = (n * hkv) as f64;
        println!(
            "n_kv {n:6}: bf16 {:8.1} us {:5.2} ns/key-head {:5.1} GB/s | q8 {:8.1} us {:5.2} ns/key-head {:5.1} GB/s",
            bf * 1e6, bf * 1e9 / kh, (n * hkv * d * 4) as f64 / bf / 1e9,
            q8 * 1e6, q8 * 1e9 / kh, (n * hkv * d / 32 * 36 * 2) as f64 / q8 / 1e9
        );
    }
}
