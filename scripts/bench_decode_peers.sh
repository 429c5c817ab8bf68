#!/usr/bin/env bash
# Decode speed beside llama.cpp, alternating the two in rounds (this guest's memory bandwidth
# swings from run to run; alternation keeps each pair of figures in the same conditions).
#
#   scripts/bench_decode_peers.sh LLAMA_BENCH [ROUNDS]
#
# LLAMA_BENCH: llama.cpp's llama-bench built as BENCHMARKS.md says. Each round runs
# `llama-bench -t 2 -p 0 -n 32 -d 2048,8192 -fa 1 -r 2` on the default model's GGUF, then
# `longctx bench e2e --threads 2 --kv-dtype bf16 --decode-weights quant` (and the exact f32
# path), and prints one line of tokens/s per program; the medians close the output.
set -euo pipefail
cd "$(dirname "$0")/.."
lb="$1"
rounds="${2:-3}"
cargo build --release --locked --quiet --bin longctx
bin=target/release/longctx
model=$($bin fetch-model smollm2 2>/dev/null)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for r in $(seq "$rounds"); do
    lc=$("$lb" -m "$model" -t 2 -p 0 -n 32 -d 2048,8192 -fa 1 -r 2 -o json 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join("%.1f" % x["avg_ts"] for x in json.load(sys.stdin)))')
    q=$($bin bench e2e --threads 2 --kv-dtype bf16 --decode-weights quant --json 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join("%.1f" % x["decode_tok_s"] for x in json.load(sys.stdin)["rows"]))')
    f=$($bin bench e2e --threads 2 --json 2>/dev/null |
        python3 -c 'import json,sys; print(" ".join("%.1f" % x["decode_tok_s"] for x in json.load(sys.stdin)["rows"]))')
    echo "round $r: llama.cpp $lc | longctx quant+bf16 KV $q | longctx f32 $f" | tee -a "$tmp"
done
python3 - "$tmp" <<'PY'
import re, statistics, sys
rows = [list(map(float, re.findall(r"\d+\.\d+", l.split(":", 1)[1]))) for l in open(sys.argv[1])]
cols = list(zip(*rows))
med = [statistics.median(c) for c in cols]
print("\n| context | llama.cpp decode tok/s | longctx quant + bf16 KV | ratio | longctx f32 (exact) |")
print("|---:|---:|---:|---:|---:|")
for i, ctx in enumerate((2048, 8192)):
    print(f"| {ctx} | {med[i]:.1f} | {med[2 + i]:.1f} | {med[2 + i] / med[i]:.2f}x | {med[4 + i]:.1f} |")
print(f"(medians of {len(rows)} alternating rounds)")
PY
