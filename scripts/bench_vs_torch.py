#!/usr/bin/env python3
"""Side-by-side: longctx's CPU attention against PyTorch's scaled_dot_product_attention.

Runs `longctx bench kernels --json` and times the same cases with torch on the same thread
count, in one run, then prints the ratio table (and, with --markdown, the table for
BENCHMARKS.md). torch is for this comparison only, never a CI dependency:

    python3 -m venv ~/venvs/ref && ~/venvs/ref/bin/pip install torch
    ~/venvs/ref/bin/python scripts/bench_vs_torch.py --threads 2
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def time_torch(n_q, n_kv, h_q, h_kv, d, causal, dtype, reps):
    g = torch.Generator().manual_seed(0)
    q = torch.rand(1, h_q, n_q, d, generator=g, dtype=torch.float32).mul(2).sub(1).to(dtype)
    k = torch.rand(1, h_kv, n_kv, d, generator=g, dtype=torch.float32).mul(2).sub(1).to(dtype)
    v = torch.rand(1, h_kv, n_kv, d, generator=g, dtype=torch.float32).mul(2).sub(1).to(dtype)
    gqa = h_q != h_kv

    def run():
        with torch.no_grad():
            # A single decode query sees every key: no mask (torch's is_causal aligns the
            # mask top-left, which would hide all keys but the first).
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=causal and n_q > 1, enable_gqa=gqa
            )

    run()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def parse_shape(s):
    f = dict(kv.split("=") for kv in s.split())
    return int(f["n_q"]), int(f["n_kv"]), int(f["h_q"]), int(f["h_kv"]), int(f["d"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--longctx", default="target/release/longctx")
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    ours = json.loads(
        subprocess.run(
            [a.longctx, "bench", "kernels", "--json", "--threads", str(a.threads),
             "--reps", str(a.reps)],
            check=True, capture_output=True, text=True,
        ).stdout
    )
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    rows, rope_rows = [], []
    for r in ours["rows"]:
        if r["case"] == "rope":
            rope_rows.append(r)
            continue
        n_q, n_kv, h_q, h_kv, d = parse_shape(r["shape"])
        causal = r["case"] == "causal" or r["case"] == "decode"
        secs = time_torch(n_q, n_kv, h_q, h_kv, d, causal, dtypes[r["dtype"]], a.reps)
        ms = secs * 1e3
        if r["gflops"] is not None:
            flops = 4 * n_q * n_kv * d * h_q * (0.5 if causal else 1.0)
            theirs = flops / secs / 1e9
            ours_v, unit = r["gflops"], "GFLOP/s"
        else:
            theirs = 2 * n_kv * h_kv * d * (4 if r["dtype"] == "f32" else 2) / secs / 1e9
            ours_v, unit = r["gbs"], "GB/s"
        rows.append((r["case"], r["dtype"], r["shape"], r["median_ms"], ms, ours_v, theirs, unit))

    print(f"machine: {ours['machine']}, threads: {a.threads}, isa: {ours['isa']}, "
          f"torch {torch.__version__}, streaming read {ours['read_bandwidth_gbs']:.1f} GB/s")
    if a.markdown:
        print("| case | dtype | shape | longctx ms | torch ms | longctx | torch | unit | ratio |")
        print("|---|---|---|---:|---:|---:|---:|---|---:|")
        for c, dt, sh, om, tm, ov, tv, u in rows:
            print(f"| {c} | {dt} | {sh} | {om:.2f} | {tm:.2f} | {ov:.1f} | {tv:.1f} | {u} | {ov / tv:.2f}x |")
    else:
        print(f"{'case':<7} {'dtype':<5} {'shape':<40} {'ours ms':>9} {'torch ms':>9} "
              f"{'ours':>8} {'torch':>8} {'unit':<8} {'ratio':>6}")
        for c, dt, sh, om, tm, ov, tv, u in rows:
            print(f"{c:<7} {dt:<5} {sh:<40} {om:>9.2f} {tm:>9.2f} {ov:>8.1f} {tv:>8.1f} "
                  f"{u:<8} {ov / tv:>5.2f}x")
    for c, dt, sh, om, tm, ov, tv, u in rows:
        if u == "GB/s":
            print(f"decode {dt}: {ov:.1f} GB/s = {100 * ov / ours['read_bandwidth_gbs']:.0f}% "
                  f"of the streaming read bandwidth")
    for r in rope_rows:
        print(f"rope {r['dtype']} {r['shape']}: {r['median_ms']:.2f} ms, {r['gbs']:.1f} GB/s read+written "
              f"= {100 * r['gbs'] / ours['read_bandwidth_gbs']:.0f}% of the streaming read bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
