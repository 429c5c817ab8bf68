//! End to end: the `longctx bench kernels` command runs and its JSON carries every case.

mod common;

use std::process::Command;

#[test]
fn bench_kernels_json_has_every_case() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "kernels", "--quick", "--json", "--threads", "2"])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["read_bandwidth_gbs"].as_f64().unwrap() > 0.0);
    // The units' peaks: a positive figure where the CPU has the unit, null where not.
    for peak in ["bf16_dot_peak_gflops", "f32_fma_peak_gflops"] {
        let p = v.get(peak).unwrap_or_else(|| panic!("no {peak}"));
        assert!(p.is_null() || p.as_f64().unwrap() > 0.0, "{peak}: {p}");
    }
    let rows = v["rows"].as_array().unwrap();
    for (case, dtype) in [
        ("causal", "f32"),
        ("causal", "bf16"),
        ("decode", "f32"),
        ("decode", "bf16"),
        ("rope", "bf16"),
        ("gemv-q4", "q4_1"),
        ("gemv-moe", "q8_0"),
    ] {
        let row = rows
            .iter()
            .find(|r| r["case"] == case && r["dtype"] == dtype)
            .unwrap_or_else(|| panic!("no {case} {dtype} row"));
        let rate = row["gflops"].as_f64().or(row["gbs"].as_f64()).unwrap();
        assert!(rate > 0.0 && row["median_ms"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "kernels", "--threads", "0", "--quick"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "error: --threads must be at least 1");
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "nothing"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
}

#[test]
fn bench_kvstore_json_has_both_measurements() {
    let dir = std::env::temp_dir().join(format!("longctx-cli-kv-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "bench",
            "kvstore",
            "--json",
            "--stream-tokens",
            "3000",
            "--attn-tokens",
            "2000",
            "--queries",
            "3",
            "--reps",
            "1",
            "--dir",
        ])
        .arg(&dir)
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["stream"]["tokens"], 3000);
    assert!(v["stream"]["store_stream_gbs"].as_f64().unwrap() > 0.0);
    let rows = v["attention"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["config"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["all resident", "keep-newest + prefetch", "LRU + prefetch"]
    );
    // 25% resident: keep-newest reads the spilled 75% and never writes; LRU writes back.
    assert_eq!(rows[0]["spill_reads"], 0);
    assert!(rows[1]["spill_reads"].as_u64().unwrap() > 0);
    assert_eq!(rows[1]["spill_writes"], 0);
    assert!(rows[2]["spill_writes"].as_u64().unwrap() > 0);
}

#[test]
fn bench_ring_json_reports_every_partition() {
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "bench",
            "ring",
            "--json",
            "--ranks",
            "4",
            "--seq",
            "1000",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let parts = v["partitions"].as_array().unwrap();
    let names: Vec<&str> = parts
        .iter()
        .map(|p| p["partition"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["contiguous", "zigzag", "striped"]);
    for p in parts {
        assert_eq!(p["steps"], 4);
        assert_eq!(p["per_step"].as_array().unwrap().len(), 4);
        assert!(p["efficiency"].as_f64().unwrap() > 0.0);
    }
    // Work balance is exact arithmetic: zigzag is balanced, contiguous is not.
    assert!(parts[1]["balance_work"].as_f64().unwrap() <= 1.01);
    assert!(parts[0]["balance_work"].as_f64().unwrap() > 1.5);
    let bad = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "ring", "--mask", "sliding"])
        .output()
        .expect("runs");
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected causal, none or chunked"));
}

#[test]
fn plan_reproduces_scout_on_h100_and_h200() {
    let run = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(["plan", "--json"])
            .args(args)
            .output()
            .expect("runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let h200 = run(&["--context", "10m", "--gpu-mem", "141GB"]);
    assert_eq!(h200["fits"], true);
    let h100 = run(&["--context", "10m", "--gpu-mem", "80GB"]);
    assert_eq!(h100["fits"], false);
    assert!(h100["advice"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().contains("fp8")));
    assert_eq!(
        run(&["--context", "10m", "--gpu-mem", "80GB", "--kv-dtype", "fp8"])["fits"],
        true
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["plan", "--model", "nonesuch"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(String::from_utf8_lossy(&bad.stderr).lines().count(), 1);
}

/// `plan`'s inputs and advice: a size without a unit is refused (`--gpu-mem 80` was once 80
/// bytes, "8 x 0.0 GB GPUs"); the suggested `--host-mem` fits when rerun with it; where the
/// weights alone exceed a GPU, host memory is not suggested (it once was, and did not fit).
#[test]
fn plan_needs_units_and_its_host_memory_advice_fits() {
    let plan = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(["plan", "--json"])
            .args(args)
            .output()
            .expect("runs")
    };
    let bare = plan(&["--gpu-mem", "80"]);
    let err = String::from_utf8_lossy(&bare.stderr);
    assert!(!bare.status.success(), "{err}");
    assert!(
        err.contains("needs a unit") && err.contains("80GB"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let advice = |args: &[&str]| -> Vec<String> {
        let out = plan(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["advice"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let a = advice(&["--context", "10m", "--gpu-mem", "80GB"]);
    let host = a
        .iter()
        .find_map(|a| a.split("--host-mem ").nth(1))
        .unwrap_or_else(|| panic!("no --host-mem advice in {a:?}"));
    let host = host.split_whitespace().next().unwrap();
    let out = plan(&["--context", "10m", "--gpu-mem", "80GB", "--host-mem", host]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["fits"], true, "--host-mem {host} was advised: {v}");
    // Maverick's ~800 GB of bf16 weights on one 80 GB GPU: no host memory helps.
    let a = advice(&["--model", "maverick", "--gpus", "1", "--gpu-mem", "80GB"]);
    assert!(!a.iter().any(|a| a.contains("--host-mem ")), "{a:?}");
    assert!(a.iter().any(|a| a.contains("weights alone")), "{a:?}");
}

#[test]
fn no_gpu_is_one_clear_line() {
    if longctx_kernels::cuda::probe(0).is_ok() {
        longctx_kernels::testing::skipped(
            "no_gpu_is_one_clear_line",
            "a GPU is present (scripts/gpu-check.sh covers this machine)",
        );
        return;
    }
    for args in [
        &["bench", "gpu", "--quick"][..],
        &["--device", "cuda", "bench", "kernels", "--quick"][..],
        &["--device", "cuda", "plan", "--context", "1m"][..],
        &[
            "--device",
            "cuda",
            "generate",
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.contains("no GPU: libcuda"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn bench_ring_over_threads_matches_one_device() {
    // A real ring (ranks as threads exchanging KV shards), every rank checked in-process.
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args([
            "bench",
            "ring",
            "--transport",
            "threads",
            "--ranks",
            "3",
            "--seq",
            "301",
            "--heads",
            "8",
            "--kv-heads",
            "2",
            "--head-dim",
            "64",
            "--json",
        ])
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let total: u64 = rows.iter().map(|r| r["tokens"].as_u64().unwrap()).sum();
    assert_eq!(total, 301);
    // f32's bound, or the P rounding's where this CPU runs bf16 tiles on its dot product.
    let shape = longctx_kernels::AttnShape {
        n_q: 301,
        n_kv: 301,
        h_q: 8,
        h_kv: 2,
        d: 64,
    };
    let bound = if longctx_kernels::attention::rounds_p_to_bf16(&shape) {
        5e-3
    } else {
        1e-5
    };
    for r in rows {
        assert!(r["max_rel_err"].as_f64().unwrap() <= bound, "{r}");
        assert_eq!(r["steps"], 3);
    }
    // NCCL outside a torchrun group: one clear line.
    let out = Command::new(env!("CARGO_BIN_EXE_longctx"))
        .args(["bench", "ring", "--transport", "nccl", "--seq", "64"])
        .env_remove("RANK")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("RANK is not set"), "{err}");
}

/// `bench scaling --peer llama.cpp=PATH`: the peer's `llama-bench` runs at each length (a
/// stand-in script here, which answers the test its arguments ask for), both sides land in
/// the JSON and in the side-by-side plot; a peer that fails or answers another test is an
/// error, not a silent zero.
#[test]
fn bench_scaling_runs_the_peer_beside_us() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("longctx-scaling-peer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    };
    // Echoes the asked test with avg_ts 100 + depth (+ 1000 when both caches are q8_0), so
    // each row's figure is checkable.
    let good = script(
        "llama-bench",
        r#"p=0; n=0; d=0; q=0
while [ $# -gt 0 ]; do case "$1" in -p) p=$2; shift;; -n) n=$2; shift;; -d) d=$2; shift;;
-ctk|-ctv) [ "$2" = q8_0 ] && q=$((q + 500)); shift;; esac; shift; done
echo "{\"n_prompt\": $p, \"n_gen\": $n, \"n_depth\": $d, \"avg_ts\": $((100 + d + q)), \"samples_ts\": []}""#,
    );
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let model = model.to_str().unwrap();
    let svg = dir.join("scaling.svg");
    let run_kv = |peer: &std::path::Path, kv: &str| {
        Command::new(env!("CARGO_BIN_EXE_longctx"))
            .args(["bench", "scaling", "--model", model, "--lengths", "32,64"])
            .args(["--kv-dtype", kv])
            .args(["--decode-tokens", "2", "--json", "--plot"])
            .arg(&svg)
            .arg("--peer")
            .arg(format!("llama.cpp={}", peer.display()))
            .output()
            .unwrap()
    };
    let run = |peer: &std::path::Path| run_kv(peer, "f32");
    // A q8 KV of ours runs the peer with its q8_0 caches, like for like.
    let out = run_kv(&good, "q8");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["rows"][0]["peer"]["prefill_tok_s"].as_f64(), Some(1100.0));
    let out = run(&good);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, n) in rows.iter().zip([32.0, 64.0]) {
        assert_eq!(row["tokens"].as_f64(), Some(n));
        assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0);
        assert_eq!(row["peer"]["prefill_tok_s"].as_f64(), Some(100.0));
        assert_eq!(row["peer"]["decode_tok_s"].as_f64(), Some(100.0 + n));
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    for label in [
        "prefill tok/s",
        "decode tok/s",
        "peak RSS MiB",
        "longctx",
        "llama.cpp",
    ] {
        assert!(plot.contains(label), "the plot has no {label:?}");
    }
    for (name, body, says) in [
        (
            "failing",
            "echo 'model not found' >&2; exit 3",
            "model not found",
        ),
        (
            "other-test",
            r#"echo '{"n_prompt": 7, "n_gen": 0, "n_depth": 0, "avg_ts": 1}'"#,
            "no result",
        ),
    ] {
        let out = run(&script(name, body));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{name}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `bench serving` end to end on the default model, small: the prefix-reuse case reports
/// the document's tokens from the cache, and the latency case runs in a prompt lane and in
/// shared steps (a path no run covers would be found broken by a user first).
#[test]
fn bench_serving_reports_reuse_and_latency_in_both_modes() {
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    for lane in [true, false] {
        let mut c = Command::new(env!("CARGO_BIN_EXE_longctx"));
        c.args(["--threads", "2", "bench", "serving", "--model"])
            .arg(&model)
            .args(["--document", "60", "--long-prompt", "300", "--streams", "3"])
            .args(["--step-tokens", "64"]);
        if !lane {
            c.arg("--no-prompt-lane");
        }
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("prompt lane {}", if lane { "on" } else { "off" })),
            "{text}"
        );
        assert!(
            text.contains("60 of its 80 prompt tokens from the cache"),
            "{text}"
        );
        assert!(
            text.contains("latency under load, 3 streams decoding, a 300-token prompt"),
            "{text}"
        );
    }
}

#[test]
fn bench_e2e_reports_what_a_decode_step_reads_beside_the_streaming_read() {
    let model = longctx_engine::fetch::smollm2(&mut |m| eprintln!("{m}")).unwrap();
    let run = |kv: &str| {
        let out = common::run_ok(
            Command::new(env!("CARGO_BIN_EXE_longctx"))
                .args(["--threads", "2", "bench", "e2e", "--model"])
                .arg(&model)
                .args(["--lengths", "16,300", "--decode-tokens", "3", "--json"])
                .args(["--decode-weights", "quant", "--kv-dtype", kv]),
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v["rows"].as_array().unwrap().clone()
    };
    let (bf16, q8) = (run("bf16"), run("q8"));
    // SmolLM2: 30 layers of 3 KV heads of 64, K and V; bf16 2 bytes a value, q8 36 per 32.
    let kv_per_key = |bytes: f64| 30.0 * 2.0 * 3.0 * 64.0 * bytes;
    for (rows, bytes) in [(&bf16, 2.0), (&q8, 36.0 / 32.0)] {
        for (row, len) in rows.iter().zip([16.0, 300.0]) {
            let f = |k: &str| row[k].as_f64().unwrap_or_else(|| panic!("{k} in {row}"));
            // Decode steps at positions len..len + 3 attend to len + 1 ..= len + 3 keys.
            let kv = kv_per_key(bytes) * (len + 2.0) / 1e6;
            assert!((f("decode_kv_mb") - kv).abs() < 1e-6 * kv, "{row}");
            // The weights: the fast path's copies, ~96 MB for the shipped Q4_1 file.
            let weights = f("decode_read_mb") - f("decode_kv_mb");
            assert!((80.0..110.0).contains(&weights), "{row}");
            let gbs = f("decode_read_mb") * f("decode_tok_s") / 1e3;
            assert!((f("decode_read_gbs") - gbs).abs() < 1e-9 * gbs, "{row}");
            assert!(f("stream_read_gbs") > 0.0, "{row}");
        }
    }
}
