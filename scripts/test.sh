#!/usr/bin/env bash
# The test command: formatting, lints (warnings are errors), then every test of the workspace.
# CI (.ci/run) calls exactly this; so should you before a commit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Every CUDA kernel compiled with NVRTC and assembled with ptxas for sm_80 / sm_90 (no GPU).
# Only its table (stdout) is cut to the last lines; the one-time wheel download reports on
# stderr, in full.
scripts/cuda-check.sh | tail -n 3
log=$(mktemp)
# Tests that cannot run on this machine (GPU tests without a GPU) write a line here
# (longctx_kernels::testing::skipped): counted as skipped below, not as passed.
skips=$(mktemp)
trap 'rm -f "$log" "$skips"' EXIT
export LONGCTX_SKIPPED="$skips"
cargo test --workspace --locked 2>&1 | tee "$log"
# The attention kernels again without the bf16 dot product: the decode path of CPUs without
# AVX512_BF16 (this one has it, so the run above takes the fused step).
LONGCTX_NO_BF16_DOT=1 cargo test --locked -p longctx-kernels attention 2>&1 | tee -a "$log"
# One closing line for the whole workspace (cargo prints one per test binary).
sort -u "$skips"
n_skip=$(sort -u "$skips" | wc -l)
awk -v k="$n_skip" '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p - k, f, s + k }' "$log"
