"""One forward or backward call of a named bench config, for a profiler to attach to (ncu,
compute-sanitizer, nsys): warms up (compiles), then makes ``--calls`` calls.

    ncu -k regex:varlen_bwd --launch-skip 2 -c 1 python benchmarks/lab/one_call.py b32_8k_d128_full bwd
    ncu -k regex:BackwardSm90 --launch-skip 2 -c 1 python benchmarks/lab/one_call.py \
        b32_8k_d128_causal bwd --method fa4

``--method fa4`` calls FlashAttention-4 (``flash_attn.cute``) on the same inputs instead, its
backward through autograd (the first call compiles).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("pass_", choices=("fwd", "bwd"), metavar="pass")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--method", choices=("cupy_varlen", "fa4"), default="cupy_varlen")
    args = ap.parse_args()

    import torch

    import bench_varlen as bv
    import cupy_varlen

    cfg = bv.grid_configs()[args.config]
    inp = bv.make_inputs(cfg, "bf16")
    q, k, v, cu_q, cu_k, mq, mk = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k
    if args.method == "fa4":
        run_fa4(args, cfg, q, k, v, cu_q, cu_k, mq, mk)
        return
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=cfg.causal,
                                       return_lse=True)
    dout = torch.randn_like(out)
    for _ in range(args.calls):
        if args.pass_ == "fwd":
            cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=cfg.causal)
        else:
            cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, mq, mk,
                                             causal=cfg.causal, deterministic=args.deterministic)
    torch.cuda.synchronize()


def run_fa4(args, cfg, q, k, v, cu_q, cu_k, mq, mk):
    import torch
    from flash_attn.cute import flash_attn_varlen_func

    left, right = cfg.window
    window = (None if left < 0 else left, 0 if cfg.causal else (None if right < 0 else right))
    q, k, v = (x.detach().requires_grad_(args.pass_ == "bwd") for x in (q, k, v))
    for _ in range(args.calls):
        out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                     max_seqlen_q=mq, max_seqlen_k=mk, causal=cfg.causal,
                                     window_size=window, deterministic=args.deterministic)[0]
        if args.pass_ == "bwd":
            out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
