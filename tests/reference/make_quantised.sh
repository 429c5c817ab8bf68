#!/usr/bin/env bash
# Makes the quantised SmolLM2 files of the k-quant parity checks, outside the repo:
# the shipped Q4_1 GGUF -> a Hugging Face directory (transformers dequantises it) -> the f16
# GGUF that llama.cpp's convert_hf_to_gguf.py writes -> llama-quantize into each format.
#   tests/reference/make_quantised.sh LLAMA_CPP_DIR [OUT_DIR]
# LLAMA_CPP_DIR is what ../shared/tools/build-llamacpp.sh prints; needs ~/venvs/ref (torch,
# transformers, gguf, accelerate: transformers loads a GGUF only with accelerate). Prints one line per file.
set -euo pipefail
llama=$1
out=${2:-$HOME/.cache/longctx/quantised}
py=${PY:-$HOME/venvs/ref/bin/python}
src=$HOME/.cache/longctx/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$out"
if [ ! -f "$out/hf/model.safetensors" ]; then
  "$py" - "$src" "$out/hf" <<'PY'
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
d, f = os.path.split(sys.argv[1])
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
# A GGUF-loaded model refuses save_pretrained: copy its (dequantised) weights into a plain one.
cfg = model.config
if hasattr(cfg, "quantization_config"):
    del cfg.quantization_config
plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
plain.load_state_dict(model.state_dict())
plain.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
PY
fi
[ -f "$out/smollm2-f16.gguf" ] || PYTHONPATH="$llama/gguf-py" "$py" "$llama/convert_hf_to_gguf.py" \
  "$out/hf" --outtype f16 --outfile "$out/smollm2-f16.gguf" >/dev/null 2>&1
for q in Q4_K_M Q5_K_M Q6_K Q3_K_M Q2_K IQ4_XS Q8_0; do
  f="$out/smollm2-$q.gguf"
  [ -f "$f" ] || "$llama/build/bin/llama-quantize" "$out/smollm2-f16.gguf" "$f" "$q" 2 >/dev/null 2>&1
  echo "$f $(stat -c %s "$f") bytes"
done
