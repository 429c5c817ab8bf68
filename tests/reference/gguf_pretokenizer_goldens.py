"""Goldens for the split a GGUF's `tokenizer.ggml.pre` selects, from transformers.

A byte-level BPE vocabulary is tokenised after a split that depends on the family that learned
it (Llama 3's `llama-bpe`, Llama 4's `llama4`, Qwen's `qwen2`, ...), and nothing else in the
file says which; transformers keeps a table from `pre` to the regex. Real vocabularies rarely
show the difference on short texts, so this writes a tiny GGUF (tokenizer only) whose merges
build words across the places where the splits differ (digit runs, case changes, contractions,
combining marks), with a control token and a user-defined one, and records transformers' ids
for it under each `pre`. `tests/gguf_tokenizer.rs` checks ours against them without torch.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/gguf_pretokenizer_goldens.py
Writes tests/reference/tiny_bpe.gguf and tests/reference/gguf_pretokenizer_goldens.json.
"""
import json
import os

import gguf
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    convert_gguf_tokenizer,
    get_gguf_tokenizer,
)

here = os.path.dirname(os.path.abspath(__file__))
spell = bytes_to_unicode()
words = [
    "12345", "678", "2024", "camelCase", "Case", "XMLHttp", "Request", "we'll", "THEY'LL",
    "don't", "Cafe\u0301", "na\u00efve", " hello", " world", " the", "./", "a/b", "\n\n",
    "  ", " 123",
]
tokens = [spell[b] for b in range(256)]
merges = []
for w in words:
    s = "".join(spell[b] for b in w.encode("utf-8"))
    cur = s[0]
    for ch in s[1:]:
        if cur + ch not in tokens:
            merges.append(f"{cur} {ch}")
            tokens.append(cur + ch)
        cur = cur + ch
types = [1] * len(tokens)
tokens += ["<|endoftext|>", "<think>"]
types += [3, 4]
path = os.path.join(here, "tiny_bpe.gguf")
w = gguf.GGUFWriter(path, "llama")
w.add_tokenizer_model("gpt2")
w.add_tokenizer_pre("llama-bpe")
w.add_token_list(tokens)
w.add_token_types(types)
w.add_token_merges(merges)
w.add_bos_token_id(len(tokens) - 2)
w.add_eos_token_id(len(tokens) - 2)
w.add_add_bos_token(False)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

arch, tokenizer_dict, _ = get_gguf_tokenizer(path)
texts = [
    "In 2024, 12345678 and 678 cost 123; we'll see, THEY'LL don't",
    "camelCase XMLHttpRequest Case hello world the<think>x<|endoftext|>",
    "Cafe\u0301 na\u00efve ./run a/b//c\n\n  x   y \n",
]
cases = []
for pre in ["smollm", "llama-bpe", "llama4", "qwen2", "qwen35", "tekken", "no-such-pre"]:
    backend, _ = convert_gguf_tokenizer(arch, dict(tokenizer_dict, pre_tokenizer_type=pre))
    cases.append({"pre": pre, "ids": [backend.encode(t, add_special_tokens=False).ids for t in texts]})
json.dump(
    {"transformers": transformers.__version__, "texts": texts, "cases": cases},
    open(os.path.join(here, "gguf_pretokenizer_goldens.json"), "w"),
    ensure_ascii=False,
    indent=1,
)
seen = {}
for c in cases:
    seen.setdefault(json.dumps(c["ids"]), []).append(c["pre"])
print("distinct id lists:", list(seen.values()))
