#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (small, committed): valid inputs each target's
parser accepts, so fuzzing starts past the magic numbers. Run from anywhere:
`python3 fuzz/seeds/make_seeds.py`. gguf_tokenizer's seeds are tests/reference/tiny_*.gguf
(scripts/fuzz.sh adds them)."""
import json, os, struct

here = os.path.dirname(os.path.abspath(__file__))


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def gguf(meta, tensors=()):
    """GGUF v3: meta [(key, type id, raw value)], tensors [(name, dims, type id, data)]."""
    b = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, t, v in meta:
        b += s(k) + struct.pack("<I", t) + v
    off, offs = 0, []
    for name, dims, ty, data in tensors:
        b += s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        b += struct.pack("<IQ", ty, off)
        offs.append(off)
        off += (len(data) + 31) // 32 * 32
    b += b"\0" * (-len(b) % 32)
    base = len(b)
    for (_, _, _, data), o in zip(tensors, offs):
        b += b"\0" * (base + o - len(b)) + data
    return b


u32 = lambda x: struct.pack("<I", x)
f32 = lambda x: struct.pack("<f", x)


def llama_meta(extra=()):
    m = [
        ("general.architecture", 8, s("llama")),
        ("llama.embedding_length", 4, u32(32)),
        ("llama.attention.head_count", 4, u32(4)),
        ("llama.attention.head_count_kv", 4, u32(2)),
        ("llama.block_count", 4, u32(2)),
        ("llama.feed_forward_length", 4, u32(48)),
        ("llama.vocab_size", 4, u32(64)),
        ("llama.context_length", 4, u32(128)),
        ("llama.rope.freq_base", 6, f32(10000.0)),
        ("llama.rope.dimension_count", 4, u32(8)),
        ("llama.attention.layer_norm_rms_epsilon", 6, f32(1e-5)),
        ("tokenizer.ggml.bos_token_id", 4, u32(1)),
    ]
    return m + list(extra)


llama_json = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 48, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "max_position_embeddings": 128, "tie_word_embeddings": True,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}
llama4_json = {
    "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": 64,
    "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 24,
    "intermediate_size_mlp": 48, "num_local_experts": 4, "num_experts_per_tok": 1,
    "interleave_moe_layer_step": 2, "attention_chunk_size": 4, "floor_scale": 8,
    "attn_scale": 0.1, "use_qk_norm": True, "rope_theta": 500000.0,
    "no_rope_layers": [1, 1, 1, 0], "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}

f32_tensor = ("w", [4, 2], 0, struct.pack("<8f", *[0.5 * i for i in range(8)]))
q8_tensor = ("q", [32], 8, struct.pack("<e", 0.25) + bytes(range(32)))
safetensors_header = json.dumps({
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
}).encode()

seeds = {
    "gguf": {
        "llama_meta.gguf": gguf(llama_meta(), [f32_tensor, q8_tensor]),
        "arrays.gguf": gguf([("tokenizer.ggml.tokens", 9, u32(8) + struct.pack("<Q", 2)
                              + s("a") + s("b")),
                             ("general.alignment", 4, u32(64))], [f32_tensor]),
    },
    "safetensors": {
        "two.safetensors": struct.pack("<Q", len(safetensors_header)) + safetensors_header
        + bytes(32),
    },
    "model": {
        # First byte: bit 0 clear = GGUF metadata (bit 1: the file has output.weight),
        # set = config.json text.
        "llama_gguf": b"\0" + gguf(llama_meta()),
        "llama_gguf_linear_rope": b"\2" + gguf(llama_meta([
            ("llama.rope.scaling.type", 8, s("linear")),
            ("llama.rope.scaling.factor", 6, f32(4.0))])),
        "llama_json": b"\1" + json.dumps(llama_json).encode(),
        "llama4_json": b"\1" + json.dumps(llama4_json).encode(),
    },
}

for target, files in seeds.items():
    d = os.path.join(here, target)
    os.makedirs(d, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
print("seeds written under", here)
