"""A random Llama-4-shaped GGUF small enough to run at 128K tokens on two cores: 16 routed
experts top-1 and a shared expert in every layer (as Scout), chunked attention of 8192 on three
layers in four and NoPE with temperature tuning on the fourth (llama.cpp's llama4 defaults when
the file gives no sliding window), QK-norm, GQA 4. Written straight with llama.cpp's gguf-py
(no torch needed) as f32, then `llama-quantize` makes the bf16 and Q4_K_M files both runtimes
read. The tokenizer is SmolLM2's, copied from the default model's GGUF.

Usage (outside the repo; CI never runs this; numpy in the Python that runs it):
    python tests/reference/llama4_long_gguf.py LLAMA_CPP_DIR [OUT_DIR]
LLAMA_CPP_DIR is what ../shared/tools/build-llamacpp.sh prints. Prints the files it wrote.
L4_SHAPE=moe055 makes instead the ~0.55B-parameter shape of the throughput benchmarks
(`llama4_moe_bench.sh`'s: 8 layers, hidden 1024, 16 heads and 4 KV heads of 64, experts of
1024, shared FF 2048) as `llama4-moe055-*.gguf`, without torch; L4_SHAPE=scoutattn Scout's
attention (40 heads, 8 KV heads of 128) on 4 layers of hidden 512.
"""
import os
import subprocess
import sys

llama = sys.argv[1]
out = sys.argv[2] if len(sys.argv) > 2 else os.path.expanduser("~/.cache/longctx/llama4-long")
sys.path.insert(0, os.path.join(llama, "gguf-py"))
import numpy as np  # noqa: E402
import gguf  # noqa: E402

SHAPE = os.environ.get("L4_SHAPE", "long")
if SHAPE == "moe055":
    HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 1024, 8, 16, 4, 64
    EXPERTS, EXPERT_FF, DENSE_FF = 16, 1024, 2048
elif SHAPE == "scoutattn":
    # Scout's attention (40 heads, 8 KV heads of 128: 2 KiB of bf16 K a token and layer)
    # on a small body, for decode over a wide KV.
    HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 512, 4, 40, 8, 128
    EXPERTS, EXPERT_FF, DENSE_FF = 16, 512, 1024
else:
    HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 256, 4, 4, 1, 64
    EXPERTS, EXPERT_FF, DENSE_FF = 16, 256, 512
src = os.path.expanduser("~/.cache/longctx/models/SmolLM2-135M-Instruct.Q4_1.gguf")
os.makedirs(out, exist_ok=True)
f32 = os.path.join(out, f"llama4-{SHAPE}-f32.gguf")

reader = gguf.GGUFReader(src)
vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
w = gguf.GGUFWriter(f32, "llama4")
w.add_context_length(262144)
w.add_embedding_length(HIDDEN)
w.add_block_count(LAYERS)
w.add_feed_forward_length(DENSE_FF)
w.add_head_count(HEADS)
w.add_head_count_kv(KV_HEADS)
w.add_key_length(HEAD_DIM)
w.add_value_length(HEAD_DIM)
w.add_rope_dimension_count(HEAD_DIM)
w.add_rope_freq_base(500000.0)
w.add_layer_norm_rms_eps(1e-5)
w.add_expert_count(EXPERTS)
w.add_expert_used_count(1)
w.add_expert_feed_forward_length(EXPERT_FF)
w.add_interleave_moe_layer_step(1)
w.add_vocab_size(vocab)
w.add_file_type(gguf.LlamaFileType.ALL_F32)
for name, field in reader.fields.items():
    if not name.startswith("tokenizer."):
        continue
    vtype = field.types[0]
    sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
    w.add_key_value(name, field.contents(), vtype, sub)

rng = np.random.default_rng(0)


def rand(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731
q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
w.add_tensor("token_embd.weight", rand(vocab, HIDDEN))
w.add_tensor("output_norm.weight", ones(HIDDEN))
w.add_tensor("output.weight", rand(vocab, HIDDEN))
for i in range(LAYERS):
    b = f"blk.{i}."
    w.add_tensor(b + "attn_norm.weight", ones(HIDDEN))
    w.add_tensor(b + "attn_q.weight", rand(q_dim, HIDDEN))
    w.add_tensor(b + "attn_k.weight", rand(kv_dim, HIDDEN))
    w.add_tensor(b + "attn_v.weight", rand(kv_dim, HIDDEN))
    w.add_tensor(b + "attn_output.weight", rand(HIDDEN, q_dim))
    w.add_tensor(b + "ffn_norm.weight", ones(HIDDEN))
    w.add_tensor(b + "ffn_gate_inp.weight", rand(EXPERTS, HIDDEN))
    w.add_tensor(b + "ffn_gate_exps.weight", rand(EXPERTS, EXPERT_FF, HIDDEN))
    w.add_tensor(b + "ffn_up_exps.weight", rand(EXPERTS, EXPERT_FF, HIDDEN))
    w.add_tensor(b + "ffn_down_exps.weight", rand(EXPERTS, HIDDEN, EXPERT_FF))
    w.add_tensor(b + "ffn_gate_shexp.weight", rand(EXPERT_FF, HIDDEN))
    w.add_tensor(b + "ffn_up_shexp.weight", rand(EXPERT_FF, HIDDEN))
    w.add_tensor(b + "ffn_down_shexp.weight", rand(HIDDEN, EXPERT_FF))
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

quantize = os.path.join(llama, "build", "bin", "llama-quantize")
files = [f32]
for kind in ["BF16", "Q4_K_M"]:
    path = os.path.join(out, f"llama4-{SHAPE}-{kind}.gguf")
    if not os.path.exists(path):
        subprocess.run([quantize, f32, path, kind, "2"], check=True, capture_output=True)
    files.append(path)
for p in files:
    print(p, os.path.getsize(p), "bytes")
