//! Tests that run everywhere (variants, sources), where NVRTC is present (every variant
//! compiles; `scripts/cuda-check.sh` provides it), and where a GPU is present (the self-test).

use super::nvrtc::{nvrtc_present, Compiler};
use super::source::{Family, Variant};
use super::*;
use std::collections::HashSet;

#[test]
fn variants_are_distinct_and_name_their_entries() {
    let all = Variant::all();
    assert_eq!(all.len(), 2 * (2 * 4 * 2) + 2);
    let names: HashSet<String> = all.iter().map(|v| v.name()).collect();
    assert_eq!(names.len(), all.len());
    for v in &all {
        let src = v.source();
        for e in v.entries() {
            assert!(src.contains(&format!("{e}(")), "{} lacks {e}", v.name());
        }
        assert!(
            !src.contains("#include"),
            "{}: kernels take no headers",
            v.name()
        );
        if v.family != Family::Ops {
            assert!(src.starts_with("#define DTYPE_BF16"));
            assert!(src.contains(&format!("#define HEAD_DIM {}\n", v.head_dim)));
        }
    }
}

#[test]
fn probe_without_a_gpu_says_why_and_does_not_panic() {
    match probe(0) {
        Ok(info) => eprintln!("GPU present: {info}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("no GPU: "), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
        }
    }
}

/// Every variant through the runtime's NVRTC path, for sm_80 and sm_90. With
/// `LONGCTX_PTX_DIR` set, the PTX is written there for ptxas (scripts/cuda-check.sh);
/// with `LONGCTX_REQUIRE_NVRTC=1` a missing libnvrtc fails instead of skipping.
#[test]
fn nvrtc_compiles_every_variant() {
    if !nvrtc_present() {
        assert!(
            std::env::var("LONGCTX_REQUIRE_NVRTC").as_deref() != Ok("1"),
            "LONGCTX_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded"
        );
        crate::testing::skipped(
            "nvrtc_compiles_every_variant",
            "libnvrtc not found (scripts/cuda-check.sh installs it)",
        );
        return;
    }
    let dir = std::env::var_os("LONGCTX_PTX_DIR").map(std::path::PathBuf::from);
    for arch in ["compute_80", "compute_90"] {
        let compiler = Compiler::new(arch, None, 0).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = Variant::all()
                .into_iter()
                .map(|v| {
                    let c = &compiler;
                    s.spawn(move || (v, c.ptx(v)))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (v, ptx) in results {
            let ptx = ptx.unwrap_or_else(|e| panic!("{e}"));
            for e in v.entries() {
                assert!(
                    ptx.contains(&format!(".entry {e}(")),
                    "{}: no entry {e}",
                    v.name()
                );
            }
            if let Some(dir) = &dir {
                std::fs::create_dir_all(dir).unwrap();
                let sm = arch.replace("compute_", "sm_");
                std::fs::write(dir.join(format!("{}.{sm}.ptx", v.name())), ptx.as_str()).unwrap();
            }
        }
    }
}

/// On a machine with a GPU: every kernel against the CPU kernel / float64 reference.
#[test]
fn gpu_self_test() {
    let gpu = match Gpu::new(0, None) {
        Ok(g) => g,
        Err(e) => {
            crate::testing::skipped("gpu_self_test", &e.to_string());
            return;
        }
    };
    // LONGCTX_GPU_SEED reruns a failing draw.
    let seed = std::env::var("LONGCTX_GPU_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let t = self_test(&gpu, seed, super::Scope::Full);
    eprintln!("seed {} (LONGCTX_GPU_SEED={} reruns it)", t.seed, t.seed);
    for r in &t.rows {
        eprintln!(
            "{:<90} {:.2e} {:.2e} {:?} {}",
            r.name,
            r.rel_err,
            r.row_err,
            r.lse_abs,
            r.error.as_deref().unwrap_or("")
        );
    }
    let bad: Vec<_> = t.rows.iter().filter(|r| !r.pass()).collect();
    assert!(bad.is_empty(), "seed {}: failed: {bad:#?}", t.seed);
}
