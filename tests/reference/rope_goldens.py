#!/usr/bin/env python3
"""Writes rope_goldens.json: RoPE inverse frequencies, attention factors and rotated q/k, as
transformers computes them, for the Rust tests of longctx-rope. Needs torch and transformers
(a reference venv, never CI):

    ~/venvs/ref/bin/python tests/reference/rope_goldens.py
"""
import json
import os

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig
from transformers.models.llama4.modeling_llama4 import Llama4TextRotaryEmbedding, apply_rotary_emb

torch.manual_seed(0)

SCOUT = {
    "model_type": "llama4_text", "hidden_size": 5120, "num_attention_heads": 40,
    "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
    "max_position_embeddings": 10485760,
    "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 1.0, "original_max_position_embeddings": 8192},
}
SMOLLM2 = {"model_type": "llama", "hidden_size": 576, "num_attention_heads": 9,
           "num_key_value_heads": 3, "rope_theta": 100000.0, "max_position_embeddings": 8192}


def llama(**kw):
    base = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "rope_theta": 10000.0, "max_position_embeddings": 4096}
    base.update(kw)
    return base


CASES = [
    ("scout", SCOUT, None),
    ("smollm2", SMOLLM2, None),
    ("linear_x4", llama(rope_scaling={"rope_type": "linear", "factor": 4.0}), None),
    ("dynamic_1x", llama(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 4096),
    ("dynamic_2x", llama(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 8192),
    ("dynamic_8x", llama(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), 32768),
    ("yarn_4", llama(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                   "original_max_position_embeddings": 4096}), None),
    ("yarn_16", llama(rope_scaling={"rope_type": "yarn", "factor": 16.0,
                                    "original_max_position_embeddings": 4096}), None),
    ("yarn_16_mscale", llama(rope_scaling={"rope_type": "yarn", "factor": 16.0, "mscale": 1.0,
                                           "mscale_all_dim": 0.5,
                                           "original_max_position_embeddings": 4096}), None),
    ("yarn_4_mscale_no_truncate", llama(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        "beta_fast": 16, "beta_slow": 2, "truncate": False, "rope_theta": 50000.0,
        "original_max_position_embeddings": 2048})),
    ("llama3_1_8b", llama(rope_theta=500000.0, max_position_embeddings=131072,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}), None),
    ("partial_half", llama(partial_rotary_factor=0.5,
                           rope_scaling={"rope_type": "linear", "factor": 1.0}), None),
]
# The one case above given in the newer form has no seq_len entry.
CASES = [c if len(c) == 3 else (c[0], c[1], None) for c in CASES]


def make_config(cfg):
    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    if cfg["model_type"] == "llama4_text":
        return Llama4TextConfig(**kw)
    return LlamaConfig(**kw)


def rope_type(config):
    return config.rope_parameters.get("rope_type", "default")


def init(config, seq_len):
    t = rope_type(config)
    if t == "default":
        fn = LlamaRotaryEmbedding.compute_default_rope_parameters
        return fn(config)
    return ROPE_INIT_FUNCTIONS[t](config, None, seq_len=seq_len)


def rows(x):
    return [float(v) for v in x.flatten().tolist()]


out = {"transformers": transformers.__version__, "torch": torch.__version__,
       "schedules": [], "apply": []}
for name, cfg, seq_len in CASES:
    config = make_config(cfg)
    inv_freq, attn = init(config, seq_len)
    out["schedules"].append({"name": name, "config": cfg, "seq_len": seq_len,
                             "inv_freq": rows(inv_freq.double()), "attention_factor": float(attn)})

positions = [0, 1, 17, 4095, 100000, 1048575]
n, h_q, h_kv = len(positions), 3, 2

# Rotate-half (Hugging Face Llama, SmolLM2), with a YaRN case for the attention factor.
for name, cfg in [("smollm2", SMOLLM2), ("yarn_16", CASES[7][1])]:
    config = make_config(cfg)
    d = config.hidden_size // config.num_attention_heads
    emb = LlamaRotaryEmbedding(config)
    pos = torch.tensor([positions])
    q = torch.randn(1, h_q, n, d)
    k = torch.randn(1, h_kv, n, d)
    cos, sin = emb(q, pos)
    qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
    # Stored in longctx's [n, h, d] layout.
    perm = lambda x: x[0].permute(1, 0, 2).contiguous()
    out["apply"].append({"name": name, "layout": "rotate_half", "config": cfg,
                         "positions": positions, "h_q": h_q, "h_kv": h_kv, "d": d,
                         "q": rows(perm(q)), "k": rows(perm(k)),
                         "q_out": rows(perm(qo)), "k_out": rows(perm(ko))})

# Interleaved pairs by complex multiplication (Llama 4).
config = make_config(SCOUT)
emb = Llama4TextRotaryEmbedding(config)
pos = torch.tensor([positions])
d = 128
xq = torch.randn(1, n, h_q, d)
xk = torch.randn(1, n, h_kv, d)
freqs_cis = emb(xq, pos)
qo, ko = apply_rotary_emb(xq, xk, freqs_cis)
out["apply"].append({"name": "scout", "layout": "interleaved", "config": SCOUT,
                     "positions": positions, "h_q": h_q, "h_kv": h_kv, "d": d,
                     "q": rows(xq), "k": rows(xk), "q_out": rows(qo), "k_out": rows(ko)})

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rope_goldens.json")
with open(path, "w") as f:
    json.dump(out, f, separators=(",", ":"))
print(f"wrote {path}: {len(out['schedules'])} schedules, {len(out['apply'])} apply cases")
