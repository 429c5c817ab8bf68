#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (device tool): every CUDA kernel against the CPU
# kernel on fresh random inputs, then our flash-attention forward beside PyTorch's SDPA in
# the same run, as one table. Under 5 minutes.
#
#   scripts/gpu-check.sh --prepare   here: build the release binary into .gpu/ (carried)
#   scripts/gpu-check.sh             there: run (builds with cargo when it is there)
#
# Device tool call: run(command="scripts/gpu-check.sh", carry=[".gpu"], timeout_s=420).
# Results also land in $OUT (ours.json, sdpa.json, table.txt) when OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    cargo build --release --locked --bin longctx
    mkdir -p .gpu
    cp target/release/longctx .gpu/longctx
    strip .gpu/longctx 2>/dev/null || true
    ls -la .gpu/longctx
    exit 0
fi

out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
bin=.gpu/longctx
if command -v cargo >/dev/null 2>&1; then
    cargo build --release --locked --bin longctx && bin=target/release/longctx
fi
[ -x "$bin" ] || { echo "gpu-check: no binary: run scripts/gpu-check.sh --prepare and carry .gpu"; exit 2; }

# cudarc loads libnvrtc / libcublas / libnccl by name: point it at the toolkit's or PyTorch's copies,
# linking the unversioned names to whatever major version is there (CUDA 13 on these machines).
libs=$(mktemp -d)
for dir in /usr/local/cuda/lib64 $(python3 - <<'PY' 2>/dev/null
import glob, os, site
for base in site.getsitepackages():
    for d in glob.glob(os.path.join(base, "nvidia", "*", "lib")) + glob.glob(os.path.join(base, "nvidia", "cu*", "lib")):
        print(d)
PY
); do
    for lib in nvrtc nvrtc-builtins cublas cublasLt nccl; do
        f=$(ls "$dir"/lib$lib.so* 2>/dev/null | sort -V | tail -1)
        if [ -n "$f" ] && [ ! -e "$libs/lib$lib.so" ]; then ln -s "$f" "$libs/lib$lib.so"; fi
    done
    LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader 2>/dev/null

start=$SECONDS
timeout 240 "$bin" bench gpu --json >"$out/ours.json" 2>"$out/ours.err"
rc=$?
if [ $rc -ne 0 ]; then
    echo "gpu-check: longctx bench gpu exited $rc"; cat "$out/ours.err"
    # Failing checks still print their JSON and go in the table; no JSON means no GPU run.
    [ -s "$out/ours.json" ] || exit 2
fi
timeout 120 python3 scripts/bench_sdpa.py >"$out/sdpa.json" 2>"$out/sdpa.err" || cat "$out/sdpa.err"
echo "gpu-check: $((SECONDS - start)) s"
python3 scripts/gpu_table.py "$out/ours.json" "$out/sdpa.json" | tee "$out/table.txt"
exit $(( rc != 0 || ${PIPESTATUS[0]} != 0 ))
