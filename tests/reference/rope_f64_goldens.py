#!/usr/bin/env python3
"""Writes rope_f64_goldens.json: RoPE rotations in float64 at positions up to 10,485,759, for
the Rust test `rope_scaling/src/tests.rs::float64_goldens_to_ten_million_positions`.

Pure Python (no torch, runs anywhere): each schedule's inverse frequencies are derived here
from transformers' definitions (modeling_rope_utils: default, linear, llama3, yarn), written
out independently of longctx's code, and checked against transformers' own f32 values in
rope_goldens.json (1e-6 relative, its f32 rounding) before anything is written. Angles
`p * inv_freq`, their sine and cosine, and the rotation are all float64; the inputs are f32
values so the Rust side reads them exactly.

    python3 tests/reference/rope_f64_goldens.py
"""
import json
import math
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
POSITIONS = [0, 1, 17, 4095, 8191, 100000, 1048575, 4194303, 9999937, 10485759]


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def params(cfg):
    p = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    p.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    return p


def head_dim(cfg):
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def inv_freq(cfg):
    """(inverse frequencies, attention factor) in float64, as transformers defines them."""
    p, d = params(cfg), head_dim(cfg)
    d = int(d * cfg.get("partial_rotary_factor", 1.0))
    base = p["rope_theta"]
    plain = [1.0 / base ** (2 * i / d) for i in range(d // 2)]
    t = p["rope_type"]
    if t == "default":
        return plain, 1.0
    if t == "linear":
        return [f / p["factor"] for f in plain], 1.0
    if t == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        orig = p["original_max_position_embeddings"]
        low_wl, high_wl = orig / lo, orig / hi
        out = []
        for f in plain:
            wl = 2 * math.pi / f
            if wl < high_wl:
                out.append(f)
            elif wl > low_wl:
                out.append(f / factor)
            else:
                s = (orig / wl - lo) / (hi - lo)
                out.append((1 - s) * f / factor + s * f)
        return out, 1.0
    if t == "yarn":
        factor = p["factor"]
        orig = p.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
        beta_fast, beta_slow = p.get("beta_fast", 32), p.get("beta_slow", 1)

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        af = p.get("attention_factor")
        if af is None:
            if p.get("mscale") and p.get("mscale_all_dim"):
                af = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
            else:
                af = mscale(factor)

        def corr(rot):
            return d * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(beta_fast), corr(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001
        out = []
        for i, f in enumerate(plain):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)
            extra = 1 - ramp
            out.append(f / factor * (1 - extra) + f * extra)
        return out, af
    raise SystemExit(f"no float64 schedule written for rope_type {t}")


def rotate(x, p, inv, af, layout):
    d, half = len(x), len(inv)
    y = list(x)
    for j, f in enumerate(inv):
        a = p * f
        c, s = math.cos(a), math.sin(a)
        ia, ib = (2 * j, 2 * j + 1) if layout == "interleaved" else (j, j + half)
        xa, xb = x[ia], x[ib]
        y[ia] = (xa * c - xb * s) * af
        y[ib] = (xb * c + xa * s) * af
    return y


def main():
    tf = json.load(open(os.path.join(HERE, "rope_goldens.json")))
    by_name = {c["name"]: c for c in tf["schedules"]}
    rng = random.Random(20261201)
    cases = []
    for name, layout in [("scout", "interleaved"), ("smollm2", "rotate_half"),
                         ("yarn_16_mscale", "rotate_half"), ("llama3_1_8b", "rotate_half"),
                         ("linear_x4", "rotate_half")]:
        g = by_name[name]
        inv, af = inv_freq(g["config"])
        assert len(inv) == len(g["inv_freq"]), name
        for i, (a, b) in enumerate(zip(inv, g["inv_freq"])):
            assert abs(a - b) <= 1e-6 * abs(b), f"{name}[{i}]: {a} vs transformers {b}"
        assert abs(af - g["attention_factor"]) <= 1e-6 * g["attention_factor"], name
        d = head_dim(g["config"])
        rows = []
        for p in POSITIONS:
            x = [f32(rng.uniform(-1, 1)) for _ in range(d)]
            rows.append({"position": p, "x": x, "out": rotate(x, p, inv, af, layout)})
        cases.append({"name": name, "layout": layout, "config": g["config"], "d": d,
                      "inv_freq": inv, "attention_factor": af, "rows": rows})
    path = os.path.join(HERE, "rope_f64_goldens.json")
    with open(path, "w") as f:
        json.dump({"positions": POSITIONS, "cases": cases}, f, separators=(",", ":"))
    print(f"wrote {path}: {len(cases)} schedules x {len(POSITIONS)} positions")


main()
