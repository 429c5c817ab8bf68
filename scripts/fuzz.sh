#!/usr/bin/env bash
# Fuzzing of everything that reads untrusted bytes: the GGUF and safetensors headers, the
# tokenizer rebuilt from GGUF metadata, and config -> model -> one forward step (fuzz/).
#
#   scripts/fuzz.sh                 # every target 60 s
#   scripts/fuzz.sh 600             # every target 10 minutes
#   scripts/fuzz.sh 3600 model      # one target an hour
#
# Needs no nightly toolchain: RUSTC_BOOTSTRAP lets stable rustc take cargo-fuzz's sanitizer
# flags; cargo-fuzz itself is installed here when missing. Each target starts from its seeds
# (fuzz/seeds/<target>, written by fuzz/seeds/make_seeds.py) plus what earlier runs found
# (fuzz/corpus/<target>, not committed). A crash stops with the input saved under
# fuzz/artifacts/<target>/ and its reproducing command printed; the last lines give every
# target's executions.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}
shift || true
version=0.12.0
if ! cargo fuzz --version 2>/dev/null | grep -q "$version"; then
    cargo install cargo-fuzz --locked --version "$version"
fi
export RUSTC_BOOTSTRAP=1
if [ $# -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(cargo fuzz list); fi
# Short runs (CI's) build unoptimised: a quarter of the build time, and the seeds are what a
# short run checks; longer runs are worth an optimised build (fuzz/Cargo.toml).
if [ "$secs" -lt 120 ]; then mode=--dev; else mode=--release; fi
# One build of all targets first, so the seconds given are spent fuzzing.
if [ ${#targets[@]} -eq 1 ]; then cargo fuzz build $mode "${targets[0]}"; else cargo fuzz build $mode; fi
summary=()
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    seeds=()
    [ -d "seeds/$t" ] && seeds=("seeds/$t")
    [ "$t" = gguf_tokenizer ] && cp ../tests/reference/tiny_*.gguf "corpus/$t/"
    log="target/fuzz-$t.log"
    mkdir -p target
    # -rss_limit_mb: a crafted size that allocates gigabytes is a finding, not a slow run.
    if cargo fuzz run $mode "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=2048 -timeout=20 \
        -max_len=65536 >"$log" 2>&1; then
        result="no crash"
    else
        result="FAILED (see fuzz/$log and fuzz/artifacts/$t/)"
        status=1
        tail -40 "$log"
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    summary+=("fuzz: $t: ${runs:-?} executions in $secs s, corpus $corpus inputs, $result")
done
printf '%s\n' "${summary[@]}"
exit $status
