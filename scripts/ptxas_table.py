#!/usr/bin/env python3
"""Assembles every PTX file of a directory with ptxas and checks the resources.

Usage: ptxas_table.py PTXAS DIR. Files are named VARIANT.sm_XX.ptx (written by the kernels'
NVRTC test). Fails (exit 1) on an assembler error, any local memory (spill stores or loads,
or a stack frame), or registers beyond what the kernel's launch bounds allow
(.maxntid x .minnctapersm x registers <= 64K registers per SM, and <= 255 per thread).
Prints one row per kernel and architecture: registers, shared memory, stack, spills.
"""
import pathlib
import re
import subprocess
import sys

REGS_PER_SM = 65536


def bounds(ptx: str) -> dict:
    """Launch bounds per entry: {name: (maxntid, minnctapersm)}."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\((.*?)\)\s*((?:\.\w+[^{]*)*)\{", ptx, re.S):
        name, directives = m.group(1), m.group(3)
        ntid = re.search(r"\.maxntid\s+(\d+)\s*,\s*(\d+)\s*,\s*(\d+)", directives)
        ctas = re.search(r"\.minnctapersm\s+(\d+)", directives)
        threads = int(ntid.group(1)) * int(ntid.group(2)) * int(ntid.group(3)) if ntid else None
        out[name] = (threads, int(ctas.group(1)) if ctas else 1)
    return out


def main() -> int:
    ptxas, d = sys.argv[1], pathlib.Path(sys.argv[2])
    files = sorted(d.glob("*.ptx"))
    if not files:
        print(f"no PTX files in {d}")
        return 1
    rows, failures = [], []
    for f in files:
        variant, arch = f.name[: -len(".ptx")].rsplit(".", 1)
        text = f.read_text()
        lb = bounds(text)
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", "--warn-on-spills", "-o", "/dev/null", str(f)],
                             capture_output=True, text=True)
        log = res.stdout + res.stderr
        if res.returncode != 0:
            failures.append(f"{f.name}: ptxas failed:\n{log}")
            continue
        current = None
        info = {}
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\w+)'", line)
            if m:
                current = m.group(1)
                info[current] = {}
                continue
            if current is None:
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and "stack" not in info[current]:
                info[current].update(stack=int(m.group(1)), st=int(m.group(2)), ld=int(m.group(3)))
            m = re.search(r"Used (\d+) registers", line)
            if m:
                info[current]["regs"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                info[current]["smem"] = int(s.group(1)) if s else 0
        for name, r in sorted(info.items()):
            threads, ctas = lb.get(name, (None, 1))
            problems = []
            if r.get("st", 0) or r.get("ld", 0):
                problems.append(f"spills {r['st']}B stores / {r['ld']}B loads")
            if r.get("stack", 0):
                problems.append(f"{r['stack']}B stack frame (local memory)")
            if r.get("regs", 0) > 255:
                problems.append(f"{r['regs']} registers > 255")
            if threads is None:
                problems.append("no __launch_bounds__")
            elif r.get("regs", 0) * threads * ctas > REGS_PER_SM:
                problems.append(f"{r['regs']} regs x {threads} threads x {ctas} blocks > {REGS_PER_SM}")
            rows.append((variant, name, arch, r.get("regs", 0), r.get("smem", 0), r.get("stack", 0),
                         r.get("st", 0) + r.get("ld", 0), f"{threads}x{ctas}" if threads else "-",
                         "; ".join(problems) or "ok"))
            if problems:
                failures.append(f"{variant} {name} {arch}: " + "; ".join(problems))
    head = ("variant", "kernel", "arch", "regs", "smem B", "stack B", "spill B", "bounds", "status")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    kernels = len(rows)
    print(f"cuda-check: {kernels} kernel builds ({len(files)} PTX modules), {len(failures)} failing")
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
