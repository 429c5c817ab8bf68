//! The arithmetic peaks the kernels' GFLOP/s are measured against: a loop of independent
//! `vdpbf16ps` (or f32 FMA) chains on registers alone, on every thread of the pool at once,
//! so a benchmark can say what share of the unit a kernel reaches on this machine, in this
//! minute (a shared guest's clock moves).

use std::time::Duration;

/// Which unit [`peak_gflops`] measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peak {
    /// `vdpbf16ps`: 64 flops an instruction (32 products and their sums).
    Bf16Dot,
    /// `vfmadd231ps` on 16 f32 lanes: 32 flops an instruction.
    F32Fma,
}

/// Sums, over the threads of the current rayon pool running at once, the GFLOP/s of `peak`'s
/// instruction in a register-only loop of about `time`; `None` where this CPU lacks it (the
/// bf16 dot product needs AVX512_BF16, the f32 loop AVX-512F).
pub fn peak_gflops(peak: Peak, time: Duration) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let have = match peak {
            Peak::Bf16Dot => super::bf16_dot_available(),
            Peak::F32Fma => is_x86_feature_detected!("avx512f"),
        };
        if !have {
            return None;
        }
        let per = rayon::broadcast(|_| {
            let start = std::time::Instant::now();
            let mut instr = 0u64;
            while start.elapsed() < time {
                // SAFETY: the instruction set was checked above.
                instr += unsafe {
                    match peak {
                        Peak::Bf16Dot => x86::bf16_dot_rounds(ROUNDS),
                        Peak::F32Fma => x86::f32_fma_rounds(ROUNDS),
                    }
                };
            }
            instr as f64 / start.elapsed().as_secs_f64()
        });
        let flops_per = match peak {
            Peak::Bf16Dot => 64.0,
            Peak::F32Fma => 32.0,
        };
        Some(per.iter().sum::<f64>() * flops_per / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (peak, time);
        None
    }
}

/// Rounds of 12 instructions between clock reads (~0.2 ms).
const ROUNDS: u64 = 1 << 16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Twelve independent accumulators: enough chains to cover the instruction's latency
    /// at two a cycle.
    macro_rules! rounds {
        ($name:ident, $feat:literal, $zero:expr, $op:expr) => {
            #[target_feature(enable = $feat)]
            pub unsafe fn $name(rounds: u64) -> u64 {
                let mut a = [$zero; 12];
                let (x, y) = (
                    std::hint::black_box(_mm512_set1_ps(1e-30)),
                    std::hint::black_box(_mm512_set1_ps(1e-30)),
                );
                for _ in 0..rounds {
                    for acc in a.iter_mut() {
                        *acc = $op(*acc, x, y);
                    }
                }
                std::hint::black_box(a);
                12 * rounds
            }
        };
    }

    rounds!(
        bf16_dot_rounds,
        "avx512f,avx512bf16",
        _mm512_setzero_ps(),
        |acc, x, y| _mm512_dpbf16_ps(
            acc,
            std::mem::transmute::<__m512, __m512bh>(x),
            std::mem::transmute::<__m512, __m512bh>(y)
        )
    );
    rounds!(
        f32_fma_rounds,
        "avx512f",
        _mm512_setzero_ps(),
        |acc, x, y| _mm512_fmadd_ps(x, y, acc)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each peak is a positive, finite figure where the CPU has the unit (and `None` where
    /// not), the bf16 dot product at least the f32 FMA's rate (two products a lane).
    #[test]
    fn peaks_are_measured_where_the_units_exist() {
        let t = Duration::from_millis(20);
        let (dot, fma) = (peak_gflops(Peak::Bf16Dot, t), peak_gflops(Peak::F32Fma, t));
        for p in [dot, fma].into_iter().flatten() {
            assert!(p.is_finite() && p > 0.0, "{p}");
        }
        assert_eq!(dot.is_some(), crate::cpu::bf16_dot_available());
        if let (Some(d), Some(f)) = (dot, fma) {
            // Timing on a shared machine: only a loose bound.
            assert!(d > 0.5 * f, "bf16 dot {d} against f32 FMA {f}");
        }
    }
}
