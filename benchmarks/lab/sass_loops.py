"""Instruction counts of every loop in the SASS of kernel specs, compiled through NVRTC without a
GPU: the check that a source change left the steady-state loops alone.

    python benchmarks/lab/sass_loops.py [--root DIR] [--nvcc PATH] [--cuobjdump PATH] [--json OUT]

A loop is a backward branch (BRA to a lower address); its size is the instruction count from the
target to the branch, printed with its HGMMA count (the consumers' steady-state loop is the
innermost one with two GEMMs' worth of HGMMA; two-instruction loops are barrier spins). --root points at another checkout (its cupy_varlen and cuda_src are used),
so two trees can be compared: run once per tree and diff the JSON. With --nvcc the source is
compiled by that nvcc (whose ptxas matches the GPU machine's NVRTC 13.0) instead of the installed
NVRTC, whose cubins a newer cuobjdump may not read.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The sm90 specs whose loops bound the benchmark grid, and one sm80 spec per kernel.
SPECS = (
    ("fwd", "bf16", 64, False, False), ("fwd", "bf16", 64, True, False),
    ("fwd", "bf16", 64, False, True), ("fwd", "bf16", 128, False, False),
    ("fwd", "bf16", 128, True, False), ("fwd", "bf16", 256, False, False),
    ("bwd", "bf16", 64, False, False), ("bwd", "bf16", 128, False, False),
    ("bwd", "bf16", 128, True, False), ("bwd", "bf16", 128, False, "det"),
)


def loops(sass: str) -> dict:
    """{function: [(instructions, HGMMA instructions) per loop, in address order]}"""
    result, func, insns = {}, None, []

    def close():
        if func is None:
            return
        addr_index = {a: i for i, (a, _) in enumerate(insns)}
        sizes = []
        for i, (addr, text) in enumerate(insns):
            m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
            if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in addr_index:
                body = insns[addr_index[int(m.group(1), 16)]:i + 1]
                sizes.append((len(body), sum("HGMMA" in t for _, t in body)))
        result[func] = sizes

    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            close()
            func, insns = m.group(1), []
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and func:
            insns.append((int(m.group(1), 16), m.group(2)))
    close()
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    ap.add_argument("--cuobjdump", default=shutil.which("cuobjdump") or "cuobjdump")
    ap.add_argument("--nvcc", help="compile with this nvcc instead of NVRTC")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(args.root))
    from cupy_varlen import _build, _spec

    out = {}
    for kind, dtype, tile, windowed, extra in SPECS:
        if kind == "fwd":
            spec = _spec.choose_fwd_spec(dtype, tile, windowed, "sm_90a", "auto", bool(extra))
        else:
            spec = _spec.choose_bwd_spec(dtype, tile, windowed, "sm_90a", extra == "det")
        source = _build.assemble_source(spec)
        with tempfile.TemporaryDirectory() as tmp:
            cubin_path = os.path.join(tmp, "loops.cubin")
            if args.nvcc:
                src_path = os.path.join(tmp, "loops.cu")
                Path(src_path).write_text(source)
                arch = spec.arch.replace("sm_", "")
                subprocess.run([args.nvcc, "-cubin", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                *(o for o in spec.options if o.startswith(("-D", "-std"))),
                                "-o", cubin_path, src_path], check=True)
            else:
                cubin, _ = _build._nvrtc_compile(source, spec.options, "loops.cu")
                Path(cubin_path).write_bytes(cubin)
            sass = subprocess.run([args.cuobjdump, "-sass", cubin_path], check=True,
                                  capture_output=True, text=True).stdout
        total = {fn: sum(1 for l in sass.split(f"Function : {fn}")[1].split("Function :")[0]
                         .splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", l))
                 for fn in loops(sass)}
        out[str(spec)] = {fn: {"loops": sizes, "total": total[fn]}
                          for fn, sizes in loops(sass).items() if fn != "varlen_tile_schedule"}
        print(spec)
        for fn, info in out[str(spec)].items():
            shown = " ".join(f"{n}" + (f"/{h}" if h else "") for n, h in info["loops"] if n > 3)
            print(f"  {fn:24s} total {info['total']:5d}  loops {shown}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
