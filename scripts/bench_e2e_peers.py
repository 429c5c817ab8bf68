"""End-to-end speed of the default model beside both peers, like for like, in one run.

Usage (reference venv outside the repo; llama-bench built as BENCHMARKS.md says):
    cargo build --release
    ~/venvs/ref/bin/python scripts/bench_e2e_peers.py [--threads 2] [--lengths 2048,8192] \
        [--rounds 3] [--llama-bench PATH]

Each round runs, one after another on the same GGUF file:
- `target/release/longctx bench e2e --json` (exact f32 path) and `... --kv-dtype bf16
  --decode-weights quant` (the fast path), each with its own untimed warm-up;
- transformers (f32, its GGUF loader) on the same token ids: prefill with `logits_to_keep=1`
  (the last row's logits only, as we compute), then greedy decode steps; warmed up once
  before the first round;
- with --llama-bench, `llama-bench -t T -p L -n 0 -fa 1 -r 2` and `-p 0 -n D -d L -fa 1 -r 2`
  (its own warm-up run; its figures are the mean of its 2 repetitions).
Rounds alternate the programs so the guest's bandwidth swings fall on all of them; the table
gives the median of the rounds for each figure.
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lengths", default="2048,8192")
ap.add_argument("--decode", type=int, default=32)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--llama-bench", default=None)
a = ap.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
lengths = [int(x) for x in a.lengths.split(",")]
bin_ = os.path.join(root, "target/release/longctx")


def ours(*extra, lengths=a.lengths, decode=a.decode):
    out = json.loads(subprocess.check_output(
        [bin_, "bench", "e2e", "--json", "--threads", str(a.threads), "--lengths", lengths,
         "--decode-tokens", str(decode), *extra]))
    return out, {r["context"]: (r["prefill_tok_s"], r["decode_tok_s"]) for r in out["rows"]}


first, _ = ours(lengths=str(lengths[0]), decode=2)
path = first["model"]
torch.set_num_threads(a.threads)
d, f = os.path.split(path)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
vocab = model.config.vocab_size


def ids_of(n):
    # The same ids as `bench e2e`.
    return torch.tensor([[(i * 2654435761) % (vocab - 100) + 100 for i in range(n)]])


def transformers_run(n, decode):
    ids = ids_of(n)
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - t
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        dec = time.perf_counter() - t
    return n / prefill, decode / dec if decode else 0.0


transformers_run(256, 2)  # warm-up


def llama(n):
    common = [a.llama_bench, "-m", path, "-t", str(a.threads), "-fa", "1", "-r", "2", "-o", "json"]
    pre = json.loads(subprocess.check_output(common + ["-p", str(n), "-n", "0"],
                                             stderr=subprocess.DEVNULL))
    dec = json.loads(subprocess.check_output(
        common + ["-p", "0", "-n", str(a.decode), "-d", str(n)], stderr=subprocess.DEVNULL))
    return pre[0]["avg_ts"], dec[0]["avg_ts"]


cols = ["longctx f32", "longctx fast", "transformers"] + (["llama.cpp"] if a.llama_bench else [])
runs = {c: {n: [] for n in lengths} for c in cols}
for r in range(a.rounds):
    _, exact = ours()
    _, fast = ours("--kv-dtype", "bf16", "--decode-weights", "quant")
    for n in lengths:
        runs["longctx f32"][n].append(exact[n])
        runs["longctx fast"][n].append(fast[n])
        runs["transformers"][n].append(transformers_run(n, a.decode))
        if a.llama_bench:
            runs["llama.cpp"][n].append(llama(n))
    line = "; ".join(
        f"{c} " + " ".join(f"{runs[c][n][-1][0]:.1f}/{runs[c][n][-1][1]:.1f}" for n in lengths)
        for c in cols)
    print(f"round {r + 1} (prefill/decode tok/s at {a.lengths}): {line}", flush=True)


def med(c, n, i):
    return statistics.median(x[i] for x in runs[c][n])


print(f"\nmachine: {first['machine']}, {a.threads} threads; transformers "
      f"{__import__('transformers').__version__}, torch {torch.__version__}; "
      f"medians of {a.rounds} alternating rounds")
peers = [c for c in cols if not c.startswith("longctx")]
for i, what in [(0, "prefill"), (1, "decode")]:
    print(f"\n| context | {' | '.join(f'{c} {what} tok/s' for c in cols)} | ours / faster peer |")
    print("|---:|" + "---:|" * (len(cols) + 1))
    for n in lengths:
        best_peer = max(med(c, n, i) for c in peers)
        # Prefill: the exact f32 path (the fast path prefills the same way); decode: the fast
        # path, the default of generate / ask / batch.
        ours_ = med("longctx f32" if i == 0 else "longctx fast", n, i)
        vals = " | ".join(f"{med(c, n, i):.1f}" for c in cols)
        print(f"| {n} | {vals} | {ours_ / best_peer:.2f}x |")
