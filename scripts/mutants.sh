#!/usr/bin/env bash
# Mutation testing of the numeric core: cargo-mutants changes one operator, constant or
# function body at a time in the files below and runs the owning crate's tests; a mutant
# the tests do not fail on ("missed") is a hole in the tests, or an equivalent change
# (explained in BENCHMARKS.md, "Mutation testing").
#
#   scripts/mutants.sh                  # every mutant of the files (about 1,000; hours on 2 cores)
#   scripts/mutants.sh --shard 0/8      # one eighth (cargo-mutants' sharding), for a session
#   scripts/mutants.sh --list           # only list them
#
# Extra arguments go to cargo-mutants. Results: target/mutants/mutants.out (outcomes.json,
# missed.txt, caught.txt, timeout.txt, unviable.txt); the last line is the score.
set -euo pipefail
cd "$(dirname "$0")/.."
version=27.1.0
if ! cargo mutants --version 2>/dev/null | grep -q "$version"; then
    cargo install cargo-mutants --locked --version "$version"
fi
files=(
    kernels/src/attention/cpu.rs     # the attention kernels (tiling, split-KV, segments)
    kernels/src/attention/mod.rs     # masks, key ranges, shape checks
    kernels/src/attention/merge.rs   # the LSE merge
    kernels/src/cpu/mod.rs           # vector-code dispatch
    kernels/src/cpu/portable.rs      # portable tile loops (online softmax)
    kernels/src/cpu/avx512.rs        # AVX-512 tile loops, the fused bf16 decode step
    kernels/src/quant.rs             # the quantised GEMV
    kvstore/src/attend.rs            # attention over the paged KV store
    rope_scaling/src/apply.rs        # RoPE application
)
args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
out=target/mutants
mkdir -p "$out"
# --workspace: mutants in every listed crate; each is tested by its own crate's tests.
status=0
cargo mutants --workspace "${args[@]}" --profile mutants --output "$out" \
    --minimum-test-timeout 60 "$@" || status=$?
# cargo-mutants exits 2 when mutants were missed, 3 on timeouts: the score decides.
res="$out/mutants.out"
if [ -f "$res/outcomes.json" ] && ! printf '%s\n' "$@" | grep -q -- '--list'; then
    python3 - "$res/outcomes.json" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))
n = {}
for x in o["outcomes"]:
    if x["scenario"] == "Baseline":
        continue
    s = x["summary"]
    n[s] = n.get(s, 0) + 1
caught, missed = n.get("CaughtMutant", 0), n.get("MissedMutant", 0)
timeout, unviable = n.get("Timeout", 0), n.get("Unviable", 0)
viable = caught + missed + timeout
print(f"mutants: {caught} caught, {timeout} timed out (caught), {missed} missed, "
      f"{unviable} unviable; score {(caught + timeout) / max(viable, 1):.1%} of {viable} viable")
PY
fi
exit $([ "$status" -le 3 ] && echo 0 || echo "$status")
