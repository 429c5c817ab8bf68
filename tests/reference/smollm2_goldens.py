"""Goldens for the SmolLM2-135M-Instruct GGUF, from Hugging Face transformers on CPU in f32.

Usage (reference venv outside the repo; CI never runs this):
    python tests/reference/smollm2_goldens.py ~/.cache/longctx/models/SmolLM2-135M-Instruct.Q4_1.gguf

transformers loads the GGUF itself (dequantising Q4_1/Q8_0 to f32 and rebuilding the
tokenizer), which is the reference `tests/smollm2_parity.rs` checks against. Writes
tests/reference/smollm2_goldens.json.
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

here = os.path.dirname(os.path.abspath(__file__))
path = sys.argv[1]
d, f = os.path.split(path)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
torch.manual_seed(0)

mixed = open(os.path.join(here, "mixed.txt"), encoding="utf-8").read()
text = open(os.path.join(here, "ppl.txt"), encoding="utf-8").read()
ids = tok(text)["input_ids"]
prompt = ids[:256]
rng = np.random.default_rng(0)
sample = sorted(rng.choice(model.config.vocab_size, 64, replace=False).tolist())
wide = sorted(rng.choice(model.config.vocab_size, 4096, replace=False).tolist())
with torch.no_grad():
    logits = model(torch.tensor([prompt])).logits[0].float().numpy()

    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about the sea."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    chat_ids = tok(chat)["input_ids"]
    out = model.generate(torch.tensor([chat_ids]), max_new_tokens=32, do_sample=False)
    new_ids = out[0, len(chat_ids):].tolist()

    ctx = 256
    total, n = 0.0, 0
    for s in range(0, len(ids), ctx):
        w = ids[s : s + ctx]
        if len(w) < 2:
            continue
        lg = model(torch.tensor([w])).logits[0].double()
        lp = torch.log_softmax(lg, dim=-1)
        tgt = torch.tensor(w[1:])
        total += float(-lp[:-1].gather(1, tgt[:, None]).sum())
        n += len(w) - 1

golden = {
    "transformers": __import__("transformers").__version__,
    "torch": torch.__version__,
    "mixed_ids": tok(mixed)["input_ids"],
    "prompt_ids": prompt,
    "vocab_sample": sample,
    "logits_sample": logits[:, sample].round(5).tolist(),
    "last_wide_ids": wide,
    "last_wide_logits": logits[-1, wide].round(5).tolist(),
    "chat_text": chat,
    "chat_ids": chat_ids,
    "greedy_new_ids": new_ids,
    "perplexity": {"ctx": ctx, "tokens": n, "mean_nll": total / n, "perplexity": float(np.exp(total / n))},
}
with open(os.path.join(here, "smollm2_goldens.json"), "w") as fh:
    json.dump(golden, fh)
print("tokens", len(ids), "ppl", golden["perplexity"], "greedy", tok.decode(new_ids))
