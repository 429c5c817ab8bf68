#!/usr/bin/env bash
# Compile check of every CUDA kernel, no GPU needed (the test command runs it).
#
# Installs pinned NVRTC and ptxas from PyPI wheels into $LONGCTX_HOME/cuda-wheels, compiles
# every kernel variant through the runtime's own NVRTC path (the kernels crate's
# `nvrtc_compiles_every_variant` test, for compute_80 and compute_90), assembles each PTX with
# ptxas for sm_80 and sm_90, and fails on an error, a spill or any local memory, or registers
# beyond the launch bounds. Prints a table of registers and shared memory per kernel.
# The kernels include no headers (see kernels/src/cuda/kernels/prelude.cuh), so the
# cuda-runtime wheel's cuda_fp16.h / cuda_bf16.h are not needed at build or run time.
set -euo pipefail
cd "$(dirname "$0")/.."
pin=12.8.93
cache="${LONGCTX_HOME:-$HOME/.cache/longctx}/cuda-wheels/$pin"
ptxas="$cache/nvidia/cuda_nvcc/bin/ptxas"
nvrtc_lib="$cache/nvidia/cuda_nvrtc/lib"
if [ ! -x "$ptxas" ] || [ ! -e "$nvrtc_lib/libnvrtc.so.12" ]; then
    # On stderr, which scripts/test.sh does not cut to its last lines: the ~306 MB download
    # shows its wheels, their sizes and (on a terminal) pip's progress bar.
    echo "cuda-check: downloading nvidia-cuda-nvrtc-cu12==$pin and nvidia-cuda-nvcc-cu12==$pin (~306 MB, once) into $cache" >&2
    rm -rf "$cache.partial"
    python3 -m pip install --disable-pip-version-check --progress-bar on --no-deps \
        --target "$cache.partial" "nvidia-cuda-nvrtc-cu12==$pin" "nvidia-cuda-nvcc-cu12==$pin" >&2
    rm -rf "$cache"
    mv "$cache.partial" "$cache"
fi
ptx_dir=$(mktemp -d)
trap 'rm -rf "$ptx_dir"' EXIT
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    LONGCTX_PTX_DIR="$ptx_dir" LONGCTX_REQUIRE_NVRTC=1 \
    cargo test -p longctx-kernels --locked --lib --quiet cuda::tests::nvrtc_compiles_every_variant -- --exact
python3 scripts/ptxas_table.py "$ptxas" "$ptx_dir"
