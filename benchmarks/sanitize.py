"""Runs every kernel path (both forward families; the backward's atomic and deterministic dQ
modes; the sm90 forward's long-sequence tiles too; the paged KV cache's gather; the decode tiles
with split keys) under compute-sanitizer (memcheck, racecheck, synccheck) on small ragged batches
and fails on any report.

    python benchmarks/sanitize.py                 # all tools, both kernel families where they run
    python benchmarks/sanitize.py --tools memcheck --head-dims 64 128
    python benchmarks/sanitize.py --paths bwd bwd-det      # the backward only
    python benchmarks/sanitize.py --mods                   # every path with all score modifiers

Each case is a child process (``--child``) that runs cupy_varlen on a ragged batch (empty
sequences, Lq != Lk, GQA 4/2, full and causal, one sliding window) and checks the result against
the float64 reference (the backward cases: dq, dk, dv against float64 autograd), so a clean
sanitizer report also means a correct result under it. The sm90 (wgmma) kernels are exercised on
Hopper GPUs only; there the backward runs on both dK/dV families where the head dim has both.
``--mods`` runs every call with the score modifiers on (softcap, sinks, per-sequence ALiBi slopes:
the kernels compiled with all three, and the dsinks kernel), against the reference with them.
Exit status: 0 when every case is clean.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("memcheck", "racecheck", "synccheck")
# Forward kernel families, then the backward with atomic and with deterministic dQ (each run under
# every dK/dV family that covers the head dim on this GPU).
# sm90-long: the sm90 forward on its tiles for long sequences (three consumer warpgroups at D64).
# paged: the forward over a paged KV cache (block_table; the sm80 family's gather, pages of 16 and
# of 7 rows, shuffled, NaN where no count reaches).
# decode: the decode tiles (GQA-packed rows, split keys and their combine), contiguous and paged,
# reached with a max_seqlen_q of 1, below the batch's real query counts, so that each CTA also
# strides over its sequence's further query tiles.
PATHS = ("sm80", "sm90", "sm90-long", "bwd", "bwd-det", "paged", "decode")
# Head dims that reach every head-dim class of both families (sm90: tiles 64/128/256).
HEAD_DIMS = (40, 64, 96, 128, 256)
_CLEAN = {
    "memcheck": re.compile(r"ERROR SUMMARY: 0 errors"),
    "synccheck": re.compile(r"ERROR SUMMARY: 0 errors"),
    "racecheck": re.compile(r"RACECHECK SUMMARY: 0 hazards displayed \(0 errors, 0 warnings\)"),
}


_MODS_ENV = "CUPY_VARLEN_SANITIZE_MODS"


def score_mods(heads: int, batch: int, g) -> dict:
    """The score modifiers of a --mods run (none without it): softcap, sinks, (B, H) ALiBi."""
    import torch

    if os.environ.get(_MODS_ENV) != "1":
        return {}
    return dict(softcap=4.0, sinks=(torch.randn(heads, generator=g) + 2).cuda(),
                alibi_slopes=(torch.rand(batch, heads, generator=g) * 0.3).cuda())


def run_child(kernel: str, head_dim: int) -> None:
    sys.path.insert(0, str(_REPO_ROOT))
    import torch

    import cupy_varlen
    from cupy_varlen import _spec
    from cupy_varlen.reference import varlen_attn_reference

    path, _, family = kernel.partition(":")  # "bwd:sm90": the backward on the sm90 dK/dV kernel
    backward = path.startswith("bwd")
    _spec.forward_kernel = ("auto" if backward or path in ("paged", "decode")
                            else path.partition("-")[0])
    if path == "sm90-long":
        _spec.LONG_ROWS_MEAN = 0  # every batch takes the long-sequence tiles
    _spec.backward_kernel = family or "auto"
    lens_q, lens_k = [37, 0, 1, 130, 200], [50, 3, 0, 127, 300]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32,
                        device="cuda")
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32,
                        device="cuda")
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(sum(lens_q), 4, head_dim, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(sum(lens_k), 2, head_dim, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(sum(lens_k), 2, head_dim, generator=g).to("cuda", torch.bfloat16)
    mods = score_mods(4, len(lens_q), g)
    if path == "paged":
        run_paged(q, k, v, cu_q, cu_k, lens_k, g, mods=mods)
        return
    if path == "decode":
        for num_splits in (None, 3):  # 4 and 3 splits of the 1024 keys max_seqlen_k allows
            run_paged(q, k, v, cu_q, cu_k, lens_k, g, max_q=1, max_k=1000, num_splits=num_splits,
                      mods=mods)
            for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (16, 8))):
                out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 1000, causal=causal,
                                              window_size=window, num_splits=num_splits, **mods)
                torch.cuda.synchronize()
                _check(out, varlen_attn_reference(q.double(), k.double(), v.double(), cu_q,
                                                  cu_k, causal=causal, window_size=window,
                                                  **mods))
        return
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (16, 8))):
        out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 200, 300, causal=causal,
                                           window_size=window, return_lse=True, **mods)
        leaves = [x.double().requires_grad_(backward) for x in (q, k, v)]
        ref_mods = dict(mods)
        if "sinks" in mods:
            ref_mods["sinks"] = mods["sinks"].double().requires_grad_(backward)
            leaves.append(ref_mods["sinks"])
        ref = varlen_attn_reference(*leaves[:3], cu_q, cu_k, causal=causal, window_size=window,
                                    **ref_mods)
        results, refs = [out], [ref.detach()]
        if backward:
            dout = torch.randn(out.shape, generator=g).to("cuda", torch.bfloat16)
            results += cupy_varlen.varlen_attn_backward(
                dout, q, k, v, out, lse, cu_q, cu_k, 200, 300, causal=causal,
                window_size=window, deterministic=path == "bwd-det", **mods)
            refs += torch.autograd.grad(ref, leaves, dout.double())
        torch.cuda.synchronize()
        for got, want in zip(results, refs):
            _check(got, want)


def _check(got, want):
    err = ((got.double() - want).norm() / want.norm()).item()
    if not err < 2e-2:
        sys.exit(f"wrong result under the sanitizer: relative error {err:.3g}")


def run_paged(q, k, v, cu_q, cu_k, lens_k, g, max_q=200, max_k=300, num_splits=None, mods=None):
    """The batch's keys moved into shuffled pages (NaN where no count reaches), read through a
    block table, against the reference on the contiguous keys."""
    import torch

    import cupy_varlen
    from cupy_varlen.reference import varlen_attn_reference

    for page_size in (16, 7):
        per_seq = max(-(-n // page_size) for n in lens_k) + 1
        num_pages = len(lens_k) * per_seq + 2
        table = torch.randperm(num_pages, generator=g)[:len(lens_k) * per_seq].view(
            len(lens_k), per_seq).to("cuda", torch.int32)
        pools = [torch.full((num_pages, page_size) + x.shape[1:], float("nan"), device="cuda",
                            dtype=x.dtype) for x in (k, v)]
        for b, n in enumerate(lens_k):
            start, keys = int(cu_k[b]), torch.arange(n, device="cuda")
            for pool, x in zip(pools, (k, v)):
                pool[table[b, keys // page_size].long(), keys % page_size] = x[start:start + n]
        used = torch.tensor(lens_k, dtype=torch.int32, device="cuda")
        for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (16, 8))):
            out = cupy_varlen.varlen_attn(q, *pools, cu_q, None, max_q, max_k, causal=causal,
                                          window_size=window, seqused_k=used, block_table=table,
                                          num_splits=num_splits, **(mods or {}))
            torch.cuda.synchronize()
            _check(out, varlen_attn_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                              causal=causal, window_size=window, **(mods or {})))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                    help="kernel paths to run (default: all that apply to this GPU)")
    ap.add_argument("--mods", action="store_true",
                    help="every call with softcap, sinks and ALiBi (the modifier kernels)")
    ap.add_argument("--child", nargs=2, metavar=("KERNEL", "HEAD_DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mods:
        os.environ[_MODS_ENV] = "1"  # the children inherit it
    if args.child:
        run_child(args.child[0], int(args.child[1]))
        return 0

    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        print("compute-sanitizer not found on PATH", file=sys.stderr)
        return 2
    import torch

    sys.path.insert(0, str(_REPO_ROOT))
    from cupy_varlen import _spec

    major, minor = torch.cuda.get_device_capability()
    arch = _spec.arch_for_capability(major, minor)
    failures = 0
    for head_dim in args.head_dims:
        tile = _spec.head_dim_tile(head_dim)
        kernels = {_spec.kernel_for(arch, tile, c) for c in ("sm80", "sm90")}
        if "sm90" in kernels and (_spec.choose_fwd_spec("bf16", tile, False, arch, "sm90", True)
                                  != _spec.choose_fwd_spec("bf16", tile, False, arch, "sm90")):
            kernels.add("sm90-long")
        kernels |= {"paged", "decode"}
        kernels &= set(args.paths)
        families = {_spec.backward_kernel_for(arch, tile, c) for c in ("sm80", "sm90")}
        kernels |= {f"{path}:{family}" for path in ("bwd", "bwd-det") if path in args.paths
                    for family in families}
        for kernel in sorted(kernels):
            for tool in args.tools:
                cmd = [sanitizer, "--tool", tool, "--error-exitcode", "9", sys.executable,
                       __file__, "--child", kernel, str(head_dim)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                text = proc.stdout + proc.stderr
                clean = proc.returncode == 0 and _CLEAN[tool].search(text) is not None
                failures += not clean
                summary = next((line.strip("= ") for line in text.splitlines()
                                if "SUMMARY" in line), "no summary")
                print(f"{'clean' if clean else 'FAIL ':5s} {kernel} D{head_dim:<3d} {tool:9s} "
                      f"rc={proc.returncode} {summary}", flush=True)
                if not clean:
                    print(text[-4000:], file=sys.stderr)
    print(f"{failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
