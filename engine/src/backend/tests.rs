//! The op checks on every backend this machine has.

use super::check::check_ops;
use super::*;
use crate::ops::Linear;
use crate::weights::Tensor;
use longctx_kernels::QMatrix;

/// The `Backend` methods an altered CPU backend leaves as the CPU's.
macro_rules! delegate_rest {
    () => {
        fn embed(&self, t: &Tensor, tokens: &[u32], x: &mut Vec<f32>) -> crate::Result<()> {
            Cpu.embed(t, tokens, x)
        }
        fn rms_norm(
            &self,
            x: &Vec<f32>,
            w: Option<&[f32]>,
            eps: f32,
            shape: (usize, usize),
            y: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.rms_norm(x, w, eps, shape, y)
        }
        fn rms_norm_in_place(
            &self,
            x: &mut Vec<f32>,
            eps: f32,
            shape: (usize, usize),
        ) -> crate::Result<()> {
            Cpu.rms_norm_in_place(x, eps, shape)
        }
        fn linear(
            &self,
            w: &Linear,
            x: &Vec<f32>,
            m: usize,
            y: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.linear(w, x, m, y)
        }
        fn stacked(
            &self,
            w: &QMatrix,
            x: &Vec<f32>,
            m: usize,
            y: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.stacked(w, x, m, y)
        }
        fn split_qkv(
            &self,
            qkv: &Vec<f32>,
            m: usize,
            widths: (usize, usize),
            q: &mut Vec<f32>,
            k: &mut Vec<f32>,
            v: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.split_qkv(qkv, m, widths, q, k, v)
        }
        fn silu_mul(
            &self,
            g: &Vec<f32>,
            u: &Vec<f32>,
            len: usize,
            out: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.silu_mul(g, u, len, out)
        }
        fn silu_mul_stacked(
            &self,
            gu: &Vec<f32>,
            shape: (usize, usize),
            out: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.silu_mul_stacked(gu, shape, out)
        }
        fn rope(
            &self,
            x: &mut Vec<f32>,
            rows: std::ops::Range<usize>,
            heads: (usize, usize),
            pos0: usize,
            rope: &longctx_rope::Rope,
            seq_len: usize,
            layout: longctx_rope::Layout,
        ) -> crate::Result<()> {
            Cpu.rope(x, rows, heads, pos0, rope, seq_len, layout)
        }
        fn scale_rows(
            &self,
            x: &mut Vec<f32>,
            width: usize,
            row0: usize,
            scales: &[f32],
        ) -> crate::Result<()> {
            Cpu.scale_rows(x, width, row0, scales)
        }
        fn non_finite_row(
            &self,
            x: &Vec<f32>,
            shape: (usize, usize),
        ) -> crate::Result<Option<usize>> {
            Cpu.non_finite_row(x, shape)
        }
        fn gather(
            &self,
            x: &Vec<f32>,
            width: usize,
            picks: &[(usize, f32)],
            out: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.gather(x, width, picks, out)
        }
        fn scatter_add(
            &self,
            y: &Vec<f32>,
            width: usize,
            rows: &[usize],
            out: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.scatter_add(y, width, rows, out)
        }
        fn append_kv(
            &self,
            store: &longctx_kvstore::KvStore,
            seq: longctx_kvstore::SeqId,
            layer: usize,
            k: &Vec<f32>,
            v: &Vec<f32>,
            rows: std::ops::Range<usize>,
            kd: usize,
        ) -> crate::Result<()> {
            Cpu.append_kv(store, seq, layer, k, v, rows, kd)
        }
        fn attend(
            &self,
            store: &longctx_kvstore::KvStore,
            batch: &crate::batch::Batch,
            offs: &[usize],
            layer: usize,
            q: &Vec<f32>,
            heads: (usize, usize),
            mask: longctx_kernels::Mask,
            prefetch: usize,
            out: &mut Vec<f32>,
            lse: &mut Vec<f32>,
        ) -> crate::Result<()> {
            Cpu.attend(
                store, batch, offs, layer, q, heads, mask, prefetch, out, lse,
            )
        }
    };
}

fn run<B: Backend>(be: &B) {
    let seed: u64 = rand::random();
    let checks = check_ops(be, seed).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    let bad: Vec<_> = checks.iter().filter(|c| !c.pass()).collect();
    assert!(bad.is_empty(), "seed {seed}: {bad:#?}");
    assert!(checks.len() >= 25, "{} checks", checks.len());
}

#[test]
fn every_op_on_the_cpu_backend_matches_float64() {
    run(&Cpu);
}

#[test]
fn every_op_on_the_cuda_backend_matches_float64() {
    match Cuda::new(0, None) {
        Ok(be) => run(&be),
        Err(e) => longctx_kernels::testing::skipped("every_op_on_the_cuda_backend", &e.to_string()),
    }
}

#[test]
fn a_wrong_op_fails_its_check() {
    /// The CPU backend with `add` off by one part in 1e4.
    struct Off;
    impl Backend for Off {
        type Buf = Vec<f32>;
        fn tolerance(&self) -> f64 {
            1e-5
        }
        fn alloc(&self, len: usize) -> crate::Result<Vec<f32>> {
            Cpu.alloc(len)
        }
        fn upload(&self, h: &[f32], b: &mut Vec<f32>) -> crate::Result<()> {
            Cpu.upload(h, b)
        }
        fn download_rows(&self, b: &Vec<f32>, at: usize, h: &mut [f32]) -> crate::Result<()> {
            Cpu.download_rows(b, at, h)
        }
        fn add(&self, y: &mut Vec<f32>, x: &Vec<f32>, len: usize) -> crate::Result<()> {
            Cpu.add(y, x, len)?;
            for v in &mut y[..len] {
                *v *= 1.0001;
            }
            Ok(())
        }
        delegate_rest!();
    }
    let checks = check_ops(&Off, 1).unwrap();
    let bad: Vec<_> = checks
        .iter()
        .filter(|c| !c.pass())
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(bad, ["add"]);
}

#[test]
fn a_workspace_too_small_for_an_op_is_an_error_not_a_panic() {
    let be = Cpu;
    let x = be.alloc(10).unwrap();
    let mut y = be.alloc(4).unwrap();
    assert!(be.rms_norm(&x, None, 1e-5, (2, 5), &mut y).is_err());
    assert!(be.add(&mut y, &x, 10).is_err());
    let mut h = [0f32; 3];
    assert!(be.download_rows(&y, 2, &mut h).is_err());
    assert!(be.gather(&x, 5, &[(2, 1.0)], &mut y).is_err());
}
