#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 (device tool): every CUDA kernel against the CPU
# kernel on fresh random inputs, then our flash-attention forward beside PyTorch's SDPA in
# the same run, as one table; then compute-sanitizer (memcheck, racecheck, synccheck) on a
# small case of every kernel. Under 8 minutes. LONGCTX_GPU_SEED=N reruns a draw.
#
#   scripts/gpu-check.sh --prepare   here: build the release binary into .gpu/ (carried)
#   scripts/gpu-check.sh             there: run the carried binary (builds with cargo only
#                                    when none was carried: minutes of device time)
#
# Device tool call: run(command="scripts/gpu-check.sh", carry=[".gpu"], timeout_s=560).
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
if [ ! -x "$bin" ] && command -v cargo >/dev/null 2>&1; then
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
timeout 240 "$bin" bench gpu --json ${LONGCTX_GPU_SEED:+--seed "$LONGCTX_GPU_SEED"} >"$out/ours.json" 2>"$out/ours.err"
rc=$?
if [ $rc -ne 0 ]; then
    echo "gpu-check: longctx bench gpu exited $rc"; cat "$out/ours.err"
    # Failing checks still print their JSON and go in the table; no JSON means no GPU run.
    [ -s "$out/ours.json" ] || exit 2
fi
timeout 100 python3 scripts/bench_sdpa.py >"$out/sdpa.json" 2>"$out/sdpa.err" || cat "$out/sdpa.err"
# The whole forward on the CUDA backend, timed: random Llama 4 (tiny-llama4), 1K and 4K
# tokens, beside the same on the CPU backend of this machine's 16 cores.
for dev in cuda cpu; do
    timeout 60 "$bin" --device $dev bench scaling --model tiny-llama4 --lengths 1k,4k \
        >"$out/scaling-$dev.txt" 2>"$out/scaling-$dev.err"
    echo "forward on $dev (bench scaling, tiny-llama4): exit $?" | tee -a "$out/scaling.txt"
    tail -4 "$out/scaling-$dev.txt" "$out/scaling-$dev.err" | tee -a "$out/scaling.txt"
done

# compute-sanitizer on the small case of every kernel (races, barriers, out-of-bounds
# accesses): it runs kernels hundreds of times slower, hence --small.
cs=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
san=0
if [ -n "$cs" ]; then
    for tool in memcheck racecheck synccheck; do
        timeout 50 "$cs" --tool "$tool" --error-exitcode 9 "$bin" bench gpu --small --json \
            >"$out/sanitize-$tool.json" 2>"$out/sanitize-$tool.err"
        r=$?
        summary=$(grep -h 'ERROR SUMMARY' "$out/sanitize-$tool.json" "$out/sanitize-$tool.err" | tail -1)
        echo "compute-sanitizer $tool: exit $r ${summary:-(no summary)}" | tee -a "$out/sanitize.txt"
        [ $r -eq 0 ] || san=1
    done
else
    echo "compute-sanitizer: not found" | tee -a "$out/sanitize.txt"
fi
echo "gpu-check: $((SECONDS - start)) s"
python3 scripts/gpu_table.py "$out/ours.json" "$out/sdpa.json" | tee "$out/table.txt"
table=${PIPESTATUS[0]}
exit $(( rc != 0 || table != 0 || san != 0 ))
