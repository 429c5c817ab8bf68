#!/usr/bin/env bash
# `longctx serve` against the official openai Python client (tests/openai/client_check.py):
# chat and completions, streaming and not, 32 concurrent clients, error statuses, a client
# leaving mid-stream. The client goes in a virtual environment outside the repository.
#   scripts/openai-check.sh [LONGCTX_BINARY]   (default: target/debug/longctx, built if absent)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug/longctx}
[ -x "$bin" ] || cargo build --locked --bin longctx
venv=${LONGCTX_OPENAI_VENV:-$HOME/.cache/longctx/venv-openai}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import openai" 2>/dev/null || "$venv/bin/pip" install -q "openai>=1.50,<4"
"$venv/bin/python" tests/openai/client_check.py "$bin"
