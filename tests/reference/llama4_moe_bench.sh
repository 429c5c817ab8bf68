#!/usr/bin/env bash
# A random Llama-4-shaped MoE of ~0.55B parameters for the throughput benchmarks (16 routed
# experts top-1 and a shared expert in every layer as Scout, NoPE every 4th layer, QK-norm,
# chunked attention), made with transformers, converted by llama.cpp's convert_hf_to_gguf.py
# into bf16 and quantised by llama-quantize into Q4_K_M, outside the repo.
#   tests/reference/llama4_moe_bench.sh LLAMA_CPP_DIR [OUT_DIR]
# LLAMA_CPP_DIR is what ../shared/tools/build-llamacpp.sh prints; needs ~/venvs/ref (torch,
# transformers). The tokenizer is SmolLM2's (from the default model's GGUF). Prints the files.
set -euo pipefail
llama=$1
out=${2:-$HOME/.cache/longctx/llama4-moe}
py=${PY:-$HOME/venvs/ref/bin/python}
src=$HOME/.cache/longctx/models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$out"
if [ ! -f "$out/hf/config.json" ]; then
  "$py" - "$src" "$out/hf" <<'PY'
import os, sys, torch
from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig
d, f = os.path.split(sys.argv[1])
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
torch.manual_seed(0)
cfg = Llama4TextConfig(
    vocab_size=len(tok), hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, head_dim=64, intermediate_size=1024, intermediate_size_mlp=2048,
    num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1,
    attention_chunk_size=8192, floor_scale=8192, attn_scale=0.1, no_rope_layer_interval=4,
    use_qk_norm=True, max_position_embeddings=65536,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192},
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0,
    tie_word_embeddings=False)
model = Llama4ForCausalLM(cfg).to(torch.bfloat16).eval()
print(sum(p.numel() for p in model.parameters()) / 1e9, "B parameters", file=sys.stderr)
model.save_pretrained(sys.argv[2])
tok.save_pretrained(sys.argv[2])
PY
fi
[ -f "$out/moe-bf16.gguf" ] || PYTHONPATH="$llama/gguf-py" "$py" "$llama/convert_hf_to_gguf.py" \
  "$out/hf" --outtype bf16 --outfile "$out/moe-bf16.gguf" >/dev/null 2>&1
[ -f "$out/moe-Q4_K_M.gguf" ] || "$llama/build/bin/llama-quantize" "$out/moe-bf16.gguf" \
  "$out/moe-Q4_K_M.gguf" Q4_K_M 2 >/dev/null 2>&1
for f in "$out/moe-bf16.gguf" "$out/moe-Q4_K_M.gguf"; do echo "$f $(stat -c %s "$f") bytes"; done
