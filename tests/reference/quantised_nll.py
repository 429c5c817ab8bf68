"""Mean NLL of transformers on each quantised SmolLM2 file that make_quantised.sh makes
(transformers dequantises GGUF tensors with gguf-py), on tests/reference/ppl.txt in windows
of 256 tokens, as `longctx perplexity --ctx 256` scores it. Writes
tests/reference/quantised_nll_goldens.json, which tests/quantised_parity.rs checks.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/quantised_nll.py [DIR]   (default ~/.cache/longctx/quantised)
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
d = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/longctx/quantised")
text = open(os.path.join(here, "ppl.txt"), encoding="utf-8").read()
out = {"transformers": __import__("transformers").__version__, "ctx": 256, "files": {}}
for q in ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "IQ4_XS", "Q8_0"]:
    f = f"smollm2-{q}.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
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
    out["files"][q] = {"tokens": n, "mean_nll": total / n, "bytes": os.path.getsize(os.path.join(d, f))}
    print(q, n, total / n, flush=True)
with open(os.path.join(here, "quantised_nll_goldens.json"), "w") as fh:
    json.dump(out, fh, indent=1)
