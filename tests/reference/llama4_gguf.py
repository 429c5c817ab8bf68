"""A random Llama 4 (MoE 16 experts top-1 as Scout, NoPE every 4th layer, QK-norm, llama3
RoPE scaling as Scout's, a dense layer between MoE ones) converted to GGUF by llama.cpp's
convert_hf_to_gguf.py (architecture `llama4`), and transformers' mean NLL on the safetensors
original. Writes tests/reference/llama4_gguf_goldens.json; the model and its GGUF files stay
outside the repo (tests/llama4_gguf_parity.rs finds them there).

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/llama4_gguf.py LLAMA_CPP_DIR [OUT_DIR]
LLAMA_CPP_DIR is what ../shared/tools/build-llamacpp.sh prints; the tokenizer is SmolLM2's,
from the directory tests/reference/make_quantised.sh writes.
"""
import json
import os
import subprocess
import sys

import torch
from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4TextConfig

here = os.path.dirname(os.path.abspath(__file__))
llama = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/longctx/llama4-random")
tok_dir = os.path.expanduser("~/.cache/longctx/quantised/hf")
hf = os.path.join(out, "hf")
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
cfg = Llama4TextConfig(
    vocab_size=len(tok),
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=64,
    intermediate_size_mlp=128,
    num_local_experts=16,
    num_experts_per_tok=1,
    interleave_moe_layer_step=2,
    attention_chunk_size=8192,
    floor_scale=8192,
    attn_scale=0.1,
    no_rope_layer_interval=4,
    use_qk_norm=True,
    max_position_embeddings=8192,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192},
    bos_token_id=tok.bos_token_id,
    eos_token_id=tok.eos_token_id,
    pad_token_id=0,
    tie_word_embeddings=False,
)
model = Llama4ForCausalLM(cfg).eval()
# Larger weights than the default init (std 0.02), so every layer moves the logits.
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" not in n:
            p.normal_(0.0, 0.08)
model.save_pretrained(hf)
tok.save_pretrained(hf)

text = open(os.path.join(here, "ppl.txt"), encoding="utf-8").read()
ids = tok(text)["input_ids"]
total, n = 0.0, 0
with torch.no_grad():
    for s in range(0, len(ids), 256):
        w = ids[s : s + 256]
        if len(w) < 2:
            continue
        lp = torch.log_softmax(model(torch.tensor([w])).logits[0].double(), dim=-1)
        total += float(-lp[:-1].gather(1, torch.tensor(w[1:])[:, None]).sum())
        n += len(w) - 1
env = dict(os.environ, PYTHONPATH=os.path.join(llama, "gguf-py"))
for t in ["f32", "bf16", "q8_0"]:
    f = os.path.join(out, f"llama4-{t}.gguf")
    subprocess.run([sys.executable, os.path.join(llama, "convert_hf_to_gguf.py"), hf,
                    "--outtype", t, "--outfile", f], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
golden = {"transformers": __import__("transformers").__version__, "ctx": 256, "tokens": n,
          "mean_nll": total / n}
with open(os.path.join(here, "llama4_gguf_goldens.json"), "w") as fh:
    json.dump(golden, fh, indent=1)
print(golden)
