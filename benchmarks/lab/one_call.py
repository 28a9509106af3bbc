"""One forward or backward call of a named bench config, for a profiler to attach to (ncu,
compute-sanitizer, nsys): warms up (compiles), then makes ``--calls`` calls.

    ncu -k regex:varlen_bwd --launch-skip 2 -c 1 python benchmarks/lab/one_call.py b32_8k_d128_full bwd
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
    args = ap.parse_args()

    import torch

    import bench_varlen as bv
    import cupy_varlen

    cfg = bv.grid_configs()[args.config]
    inp = bv.make_inputs(cfg, "bf16")
    q, k, v, cu_q, cu_k, mq, mk = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k
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


if __name__ == "__main__":
    main()
