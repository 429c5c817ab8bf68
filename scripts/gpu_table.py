#!/usr/bin/env python3
"""Side-by-side table of `longctx bench gpu --json` and `scripts/bench_sdpa.py` output.

Usage: gpu_table.py OURS.json SDPA.json. Exit 1 when a GPU check failed or a file is missing.
"""
import json
import sys


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{path}: {e}"}


def main() -> int:
    ours, sdpa = load(sys.argv[1]), load(sys.argv[2])
    status = 0
    if "error" in ours:
        print(f"longctx: {ours['error']}")
        return 1
    checks = ours.get("checks", [])
    failed = [c for c in checks if not c["pass"]]
    print(f"device: {ours['device']}")
    if "error" in sdpa:
        print(f"SDPA: {sdpa['error']}")
    else:
        print(f"peer: torch {sdpa['torch']} scaled_dot_product_attention on {sdpa['device']}")
    num = lambda x: "-" if x is None else f"{x:.2e}"
    worst = max((c["rel_err"] for c in checks if c.get("rel_err") is not None), default=float("nan"))
    worst_row = max((c["row_err"] for c in checks if c.get("row_err") is not None), default=float("nan"))
    worst_lse = max((c["lse_abs"] for c in checks if c.get("lse_abs") is not None), default=float("nan"))
    print(f"seed: {ours.get('seed')} (longctx bench gpu --seed N reruns the same inputs)")
    print(f"GPU checks: {len(checks) - len(failed)} of {len(checks)} within bound "
          f"(worst: rel err {worst:.2e}, row {worst_row:.2e}, lse abs {worst_lse:.2e})")
    for c in failed:
        if c.get("error"):
            print(f"  ERROR {c['name']}: {c['error']}")
        else:
            print(f"  FAIL {c['name']}: rel err {num(c.get('rel_err'))}, row {num(c.get('row_err'))} "
                  f"(bound {c['tol']:.0e}), lse abs {num(c.get('lse_abs'))} (bound {c.get('lse_tol', 0):.0e})")
        status = 1
    peer = {(t["l"], t["d"], t["causal"]): t for t in sdpa.get("timings", [])}
    head = ("L", "batch", "heads", "D", "causal", "ours ms", "ours TFLOP/s", "SDPA ms", "SDPA TFLOP/s", "ours/SDPA")
    rows = []
    for t in ours.get("timings", []):
        p = peer.get((t["l"], t["d"], t["causal"]))
        rows.append((t["l"], t["batch"], t["heads"], t["d"], "yes" if t["causal"] else "no",
                     f"{t['ms']:.3f}", f"{t['tflops']:.1f}",
                     f"{p['ms']:.3f}" if p else "-", f"{p['tflops']:.1f}" if p else "-",
                     f"{p['ms'] / t['ms']:.2f}x" if p else "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    print()
    for row in [head] + rows:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))
    return status


if __name__ == "__main__":
    sys.exit(main())
