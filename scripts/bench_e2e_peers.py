"""End-to-end speed of the default model in longctx and in transformers, side by side.

Usage (reference venv outside the repo):
    cargo build --release
    ~/venvs/ref/bin/python scripts/bench_e2e_peers.py [--threads 2] [--lengths 2048,8192]

Runs `target/release/longctx bench e2e --json`, then transformers (f32, its GGUF loader) on the
same GGUF file with the same token ids: prefill tokens/s for a prompt of each length, and
decode tokens/s for 32 greedy tokens after it. Prints a markdown table.
"""
import argparse
import json
import os
import subprocess
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--lengths", default="2048,8192")
ap.add_argument("--decode", type=int, default=32)
a = ap.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ours = json.loads(
    subprocess.check_output(
        [os.path.join(root, "target/release/longctx"), "bench", "e2e", "--json",
         "--threads", str(a.threads), "--lengths", a.lengths, "--decode-tokens", str(a.decode)]
    )
)
path = ours["model"]
torch.set_num_threads(a.threads)
d, f = os.path.split(path)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
vocab = model.config.vocab_size
rows = []
for r in ours["rows"]:
    n = r["context"]
    ids = torch.tensor([[(i * 2654435761) % (vocab - 100) + 100 for i in range(n)]])
    with torch.no_grad():
        t = time.perf_counter()
        out = model(ids, use_cache=True)
        prefill = time.perf_counter() - t
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(a.decode):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - t
    rows.append((n, r["prefill_tok_s"], n / prefill, r["decode_tok_s"], a.decode / decode))
print(f"machine: {ours['machine']}, {a.threads} threads; transformers {__import__('transformers').__version__}, torch {torch.__version__}")
print("| context | longctx prefill tok/s | transformers prefill tok/s | ratio | longctx decode tok/s | transformers decode tok/s | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for n, p, tp, dd, td in rows:
    print(f"| {n} | {p:.1f} | {tp:.1f} | {p / tp:.2f}x | {dd:.1f} | {td:.1f} | {dd / td:.2f}x |")
