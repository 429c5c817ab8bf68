"""Tiny random Llama 4 text models and their logits, from transformers on CPU in f32.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/llama4_goldens.py

Writes tests/reference/llama4_tiny_{a,b}/ (config.json + model.safetensors, saved with
save_pretrained) and llama4_goldens.json (input ids and full logits of a 100-token input).
Both configs have NoPE layers (every 4th), chunked attention with chunk 16 and floor_scale 16
so chunking and temperature tuning act at 100 tokens, GQA, and MoE with 4 experts (top-1 with
interleave step 1, top-2 with interleave step 2).
"""
import json
import os

import torch
from transformers import Llama4ForCausalLM, Llama4TextConfig

here = os.path.dirname(os.path.abspath(__file__))
common = dict(
    vocab_size=300,
    hidden_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    intermediate_size_mlp=64,
    num_local_experts=4,
    attention_chunk_size=16,
    floor_scale=16,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
configs = {
    "a": dict(
        num_hidden_layers=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        attn_scale=0.1,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "b": dict(
        num_hidden_layers=5,
        num_experts_per_tok=2,
        interleave_moe_layer_step=2,
        use_qk_norm=False,
        attn_temperature_tuning=True,
        attn_scale=0.25,
        rope_theta=10000.0,
    ),
}
out = {"transformers": __import__("transformers").__version__}
for name, extra in configs.items():
    torch.manual_seed({"a": 1, "b": 2}[name])
    cfg = Llama4TextConfig(**common, **extra)
    model = Llama4ForCausalLM(cfg).eval().float()
    # Random init leaves norms at 1 and some weights tiny: spread them so every part counts.
    with torch.no_grad():
        for n_, p in model.named_parameters():
            if "norm" in n_:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.3 if "router" in n_ else 0.1)
    d = os.path.join(here, f"llama4_tiny_{name}")
    model.save_pretrained(d, safe_serialization=True)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, cfg.vocab_size, (1, 100), generator=g)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0]
    out[name] = {"ids": ids[0].tolist(), "logits": logits.round(decimals=6).tolist()}
    print(name, sorted({k.split(".")[-2] + "." + k.split(".")[-1] for k in model.state_dict()}))
with open(os.path.join(here, "llama4_goldens.json"), "w") as fh:
    json.dump(out, fh)
