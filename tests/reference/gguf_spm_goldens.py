"""Goldens for a SentencePiece-kind GGUF tokenizer (`tokenizer.ggml.model = llama`: Llama 1/2,
Mistral, TinyLlama), from transformers.

Such a file stores pieces with scores and byte-fallback tokens, and no merges; transformers
rebuilds merges from the scores (`generate_merges`) into a BPE with byte fallback, a Metaspace
pre-tokenizer (prefix space on the first word only) and adds BOS. This writes a tiny GGUF of
that kind (tokenizer only: control, unknown, byte, normal and user-defined pieces; scores that
make the merge order matter) and records transformers' ids and decoded texts, which
`tests/gguf_tokenizer.rs` checks ours against without torch.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/gguf_spm_goldens.py
Writes tests/reference/tiny_spm.gguf and tests/reference/gguf_spm_goldens.json.
"""
import json
import os

import gguf
import transformers
from transformers.integrations.gguf.gguf_tokenizer_mapping import (
    convert_gguf_tokenizer,
    get_gguf_tokenizer,
)

here = os.path.dirname(os.path.abspath(__file__))
tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
for b in range(256):
    tokens.append(f"<0x{b:02X}>")
    scores.append(0.0)
    types.append(6)
# Normal pieces, best (highest score) first; some overlap so the merge order decides.
pieces = [
    "\u2581", "e", "t", "a", "o", "n", "l", "h", "r", "s", "i", "d", "w", "c", "u", "m", "p",
    "\u2581t", "he", "\u2581the", "ll", "\u2581he", "\u2581hell", "\u2581hello", "lo", "\u2581w",
    "or", "\u2581wor", "\u2581world", "in", "\u2581in", "an", "\u2581an", "\u2581and", "er",
    "\u2581c", "\u2581ca", "\u2581cat", "at", "\u2581s", "es", "\u2581a", "\u2581\u2581",
    "\u2581\u2581\u2581\u2581", "\u00e9", "\u2581caf", "\u2581caf\u00e9", "\u6771", "\u4eac",
    "\u6771\u4eac", "1", "2", "12", "\u2581p", "\u2581pi", "pi", "\u2581pie", "ie", "\u2581m",
]
for i, p in enumerate(pieces):
    tokens.append(p)
    scores.append(-float(i))
    types.append(1)
tokens.append("<think>")
scores.append(0.0)
types.append(4)

path = os.path.join(here, "tiny_spm.gguf")
w = gguf.GGUFWriter(path, "llama")
w.add_tokenizer_model("llama")
w.add_token_list(tokens)
w.add_token_scores(scores)
w.add_token_types(types)
w.add_unk_token_id(0)
w.add_bos_token_id(1)
w.add_eos_token_id(2)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()

arch, tokenizer_dict, config = get_gguf_tokenizer(path)
backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
texts = [
    "hello world and the cat",
    " hello  world",
    "the café in 東京 12 pie",
    "newline\nand tab\t and \U0001F642 and zq",
    "hello<think>world</s> x",
    "   four  spaces",
]
out = []
for t in texts:
    ids = backend.encode(t, add_special_tokens=False).ids
    out.append({"text": t, "ids": ids, "decoded": backend.decode(ids, skip_special_tokens=True)})
json.dump(
    {
        "transformers": transformers.__version__,
        "add_bos_token": config.get("add_bos_token"),
        "bos": config.get("bos_token"),
        "cases": out,
    },
    open(os.path.join(here, "gguf_spm_goldens.json"), "w"),
    ensure_ascii=False,
    indent=1,
)
for c in out:
    print(c["ids"], repr(c["decoded"]))
print(config)
