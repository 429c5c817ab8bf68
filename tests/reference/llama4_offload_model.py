"""A random Llama-4-shaped MoE in bf16 safetensors, as transformers saves Llama4ForCausalLM
(fused `gate_up_proj` experts, router, shared expert, QK-norm, NoPE every 4th layer, chunked
attention), with a word-level tokenizer.json: the model the `--expert-budget` measurement
loads (BENCHMARKS.md, "Routed experts on disk"). Needs numpy only; no torch, no download.

    python3 tests/reference/llama4_offload_model.py OUT_DIR [--layers 8] [--hidden 1024]
        [--experts 16] [--inter 1024] [--vocab 8192] [--seed 0]
"""

import argparse
import json
import os
import struct

import numpy as np


def bf16(a):
    """float32 -> bf16 bits, rounded to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    h, hd, e, i = a.hidden, a.hidden // a.heads, a.experts, a.inter

    def w(*shape, fan_in):
        return bf16(rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in))

    tensors = {
        "model.embed_tokens.weight": w(a.vocab, h, fan_in=1),
        "model.norm.weight": bf16(np.ones(h)),
        "lm_head.weight": w(a.vocab, h, fan_in=h),
    }
    for l in range(a.layers):
        p = f"model.layers.{l}."
        f = p + "feed_forward."
        tensors.update({
            p + "input_layernorm.weight": bf16(np.ones(h)),
            p + "post_attention_layernorm.weight": bf16(np.ones(h)),
            p + "self_attn.q_proj.weight": w(a.heads * hd, h, fan_in=h),
            p + "self_attn.k_proj.weight": w(a.kv_heads * hd, h, fan_in=h),
            p + "self_attn.v_proj.weight": w(a.kv_heads * hd, h, fan_in=h),
            p + "self_attn.o_proj.weight": w(h, a.heads * hd, fan_in=a.heads * hd),
            f + "router.weight": w(e, h, fan_in=h),
            f + "experts.gate_up_proj": w(e, h, 2 * i, fan_in=h),
            f + "experts.down_proj": w(e, i, h, fan_in=i),
            f + "shared_expert.gate_proj.weight": w(i, h, fan_in=h),
            f + "shared_expert.up_proj.weight": w(i, h, fan_in=h),
            f + "shared_expert.down_proj.weight": w(h, i, fan_in=i),
        })
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.nbytes
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    with open(os.path.join(a.out, "model.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)))
        fh.write(hb)
        for t in tensors.values():
            fh.write(t.tobytes())
    cfg = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        "attention_bias": False,
        "attention_chunk_size": 8192,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "floor_scale": 8192,
        "head_dim": hd,
        "hidden_act": "silu",
        "hidden_size": h,
        "interleave_moe_layer_step": 1,
        "intermediate_size": i,
        "intermediate_size_mlp": 2 * i,
        "max_position_embeddings": 262144,
        "moe_layers": list(range(a.layers)),
        "no_rope_layer_interval": 4,
        "no_rope_layers": [0 if (l + 1) % 4 == 0 else 1 for l in range(a.layers)],
        "num_attention_heads": a.heads,
        "num_experts_per_tok": 1,
        "num_hidden_layers": a.layers,
        "num_key_value_heads": a.kv_heads,
        "num_local_experts": e,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_qk_norm": True,
        "vocab_size": a.vocab,
        "dtype": "bfloat16",
    }
    with open(os.path.join(a.out, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{k}": k for k in range(3, a.vocab)})
    tok = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    with open(os.path.join(a.out, "tokenizer.json"), "w") as fh:
        json.dump(tok, fh)
    with open(os.path.join(a.out, "tokenizer_config.json"), "w") as fh:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}, fh)
    print(f"{a.out}: {offset / 2**20:.0f} MiB, experts "
          f"{a.layers * e * 3 * h * i * 2 / 2**20:.0f} MiB ({3 * h * i * 2 / 2**20:.1f} MiB each)")


if __name__ == "__main__":
    main()
