//! Criterion benches of the CPU attention: a causal prefill and a split-KV decode, in f32 and
//! bf16. The full side-by-side table with PyTorch is `scripts/bench_vs_torch.py`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use longctx_kernels::{attention, AttnParams, AttnShape, Element, Mask};

fn random<T: Element>(n: usize, seed: u64) -> Vec<T> {
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

fn run<T: Element>(c: &mut Criterion, name: &str, s: AttnShape, mask: Mask) {
    let q: Vec<T> = random(s.n_q * s.h_q * s.d, 1);
    let k: Vec<T> = random(s.n_kv * s.h_kv * s.d, 2);
    let v: Vec<T> = random(s.n_kv * s.h_kv * s.d, 3);
    let mut out = vec![T::default(); q.len()];
    let mut lse = vec![0f32; s.n_q * s.h_q];
    let p = AttnParams::new(&s, mask);
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements((s.flops() / 2.0) as u64));
    g.bench_function(BenchmarkId::from_parameter(T::DTYPE.name()), |b| {
        b.iter(|| attention(&q, &k, &v, s, &p, &mut out, &mut lse).unwrap())
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let prefill = AttnShape {
        n_q: 2048,
        n_kv: 2048,
        h_q: 8,
        h_kv: 8,
        d: 64,
    };
    let decode = AttnShape {
        n_q: 1,
        n_kv: 32768,
        h_q: 32,
        h_kv: 8,
        d: 128,
    };
    // The 0.55B Llama-4-shaped MoE's decode step at 2K (GQA 4): its KV within the caches.
    let decode_moe = AttnShape {
        n_q: 1,
        n_kv: 2048,
        h_q: 16,
        h_kv: 4,
        d: 64,
    };
    // SmolLM2's decode step (GQA 3, d 64) at 4K: its KV within the caches.
    let decode_smol = AttnShape {
        n_q: 1,
        n_kv: 4096,
        h_q: 9,
        h_kv: 3,
        d: 64,
    };
    run::<f32>(c, "prefill_causal_2k", prefill, Mask::Causal);
    run::<bf16>(c, "prefill_causal_2k", prefill, Mask::Causal);
    run::<f32>(c, "decode_32k", decode, Mask::Causal);
    run::<bf16>(c, "decode_32k", decode, Mask::Causal);
    run::<f32>(c, "decode_moe_2k", decode_moe, Mask::Causal);
    run::<bf16>(c, "decode_moe_2k", decode_moe, Mask::Causal);
    run::<bf16>(c, "decode_smol_4k", decode_smol, Mask::Causal);
}

criterion_group!(attention_benches, benches);
criterion_main!(attention_benches);
