"""Dequantisation goldens for every stored format longctx reads, from gguf-py (the reader
transformers uses to dequantise GGUF tensors): random blocks with finite scales, and the
values gguf-py computes for them. Writes kernels/src/formats/goldens.txt, which
`kernels/src/formats/tests.rs` checks without any Python.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/format_goldens.py

Each case is three lines: the format's ggml name, the blocks' bytes in hex, and the
expected f32 values as hex bit patterns.
"""
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "..", "kernels", "src", "formats", "goldens.txt")
rng = np.random.default_rng(20261201)

# (type, byte offsets of its f16 scales within a block)
CASES = [
    (T.F32, []), (T.F16, []), (T.BF16, []),
    (T.Q4_0, [0]), (T.Q4_1, [0, 2]), (T.Q5_0, [0]), (T.Q5_1, [0, 2]), (T.Q8_0, [0]),
    (T.Q2_K, [80, 82]), (T.Q3_K, [108]), (T.Q4_K, [0, 2]), (T.Q5_K, [0, 2]),
    (T.Q6_K, [208]), (T.IQ4_NL, [0]), (T.IQ4_XS, [0]),
]


def f16_bytes(n):
    return np.float16(rng.uniform(-0.05, 0.05, n)).view(np.uint8)


lines = []
for ty, scales in CASES:
    per, size = GGML_QUANT_SIZES[ty]
    blocks = 3 if per > 1 else 37  # awkward counts
    if ty == T.F32:
        raw = rng.standard_normal(blocks).astype(np.float32).view(np.uint8)
    elif ty == T.F16:
        raw = np.float16(rng.standard_normal(blocks)).view(np.uint8)
    elif ty == T.BF16:
        f = rng.standard_normal(blocks).astype(np.float32).view(np.uint32)
        raw = (f >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, blocks * size, dtype=np.uint8).reshape(blocks, size)
        for off in scales:
            raw[:, off:off + 2] = f16_bytes(blocks).reshape(blocks, 2)
        raw = raw.reshape(-1)
    vals = dequantize(raw, ty).astype(np.float32).reshape(-1)
    assert vals.size == blocks * per, (ty, vals.size)
    lines += [ty.name, raw.tobytes().hex(), " ".join(f"{v:08x}" for v in vals.view(np.uint32))]

with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
print(f"wrote {out}: {len(CASES)} formats")
