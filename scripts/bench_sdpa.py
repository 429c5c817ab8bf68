#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention (FlashAttention-2 underneath) at the shapes of
`longctx bench gpu`, timed the same way (CUDA events, 3 warm-ups, median of --reps).

Prints one JSON object: {"torch": version, "device": name, "timings": [{l, batch, heads, d,
causal, ms, tflops, backend}]}.
"""
import argparse
import json
import statistics
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print(json.dumps({"error": "torch is not installed"}))
        return 1
    if not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no GPU"}))
        return 1
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        flash = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # noqa: E731
    except ImportError:
        flash = None
    cases = []
    for l in (4096, 16384):
        for d in (64, 128):
            for causal in (False, True):
                cases.append((l, 16384 // l, 2048 // d, d, causal))
    if args.quick:
        cases = [c for c in cases if c[0] == 4096 and c[3] == 128 and c[4]]
    rows = []
    for l, b, h, d, causal in cases:
        q, k, v = (torch.randn(b, h, l, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))

        def run():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        backend = "default"
        if flash is not None:
            try:
                with flash():
                    run()
                backend = "flash"
            except RuntimeError:
                pass

        def timed():
            for _ in range(3):
                run()
            times = []
            for _ in range(args.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e))
            return statistics.median(times)

        if backend == "flash":
            with flash():
                ms = timed()
        else:
            ms = timed()
        flops = 4.0 * l * l * d * h * b / (2 if causal else 1)
        rows.append(dict(l=l, batch=b, heads=h, d=d, causal=causal, ms=ms,
                         tflops=flops / (ms * 1e-3) / 1e12, backend=backend))
        del q, k, v
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "timings": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
