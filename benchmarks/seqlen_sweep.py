"""Forward throughput against sequence length, on uniform batches, beside dense attention kernels.

    python benchmarks/seqlen_sweep.py [--head-dims 64 128] [--lengths 1024 ... 16384]
                                      [--tokens 65536] [--heads 32] [--runs 12] [--out FILE]

Every batch holds --tokens tokens in sequences of one length L (B = tokens / L), so the varlen
methods and dense (B, H, L, D) SDPA compute the same attention with no padding. That makes the dense
backends usable as a yardstick for what a Hopper kernel reaches at each head dim and length:
  cupy_varlen   cupy_varlen.varlen_attn (the kernel users get);
  torch_varlen  torch.nn.attention.varlen.varlen_attn (FlashAttention-2);
  sdpa_cudnn    scaled_dot_product_attention under SDPBackend.CUDNN_ATTENTION on the dense batch;
  sdpa_flash    the same under SDPBackend.FLASH_ATTENTION (FlashAttention-2 again).

Timing by bench_varlen.time_rotated, as in ab_sources.py: the methods run interleaved, call r of
each back to back with the order rotated every round, one CUDA event pair per call after an untimed
call; medians of --runs calls.
TFLOP/s count only the pairs the mask allows (bench_varlen.useful_flops).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def methods_for(q, k, v, cu, length, batch, causal):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cupy_varlen
    from bench_varlen import _torch_varlen_fn

    torch_varlen = _torch_varlen_fn()
    kwargs = {}
    if causal:
        params = inspect.signature(torch_varlen).parameters
        kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    heads, dim = q.shape[1], q.shape[2]
    dense = [x.view(batch, length, heads, dim).transpose(1, 2) for x in (q, k, v)]

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*dense, is_causal=causal)
        return run

    return {
        "cupy_varlen": lambda: cupy_varlen.varlen_attn(q, k, v, cu, cu, length, length,
                                                      causal=causal),
        "torch_varlen": lambda: torch_varlen(q, k, v, cu, cu, length, length, **kwargs),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--out", help="JSON results file")
    args = ap.parse_args()

    import torch

    from bench_varlen import environment_info, time_rotated, useful_flops, write_json

    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, {args.tokens} "
          f"tokens, H{args.heads}, medians of {args.runs}; TF/s", flush=True)
    for dim in args.head_dims:
        for causal in (False, True):
            for length in args.lengths:
                if args.tokens % length:
                    raise SystemExit(f"--tokens {args.tokens} is not a multiple of {length}")
                batch = args.tokens // length
                gen = torch.Generator(device="cuda").manual_seed(length * 1000 + dim)
                q, k, v = (torch.randn(args.tokens, args.heads, dim, device="cuda",
                                       dtype=torch.bfloat16, generator=gen) for _ in range(3))
                cu_list = list(range(0, args.tokens + 1, length))
                cu = torch.tensor(cu_list, device="cuda", dtype=torch.int32)
                fns = methods_for(q, k, v, cu, length, batch, causal)
                notes = {}
                for name in list(fns):
                    try:
                        fns[name]()
                        torch.cuda.synchronize()
                    except Exception as exc:  # noqa: BLE001 - a backend this torch lacks
                        notes[name] = f"unavailable: {str(exc).splitlines()[0][:120]}"
                        del fns[name]
                medians = {name: statistics.median(t)
                           for name, t in time_rotated(fns, args.runs).items()}
                flops = useful_flops(cu_list, cu_list, args.heads, dim, causal)
                tflops = {name: flops / ms / 1e9 for name, ms in medians.items()}
                row = {"head_dim": dim, "causal": causal, "length": length, "batch": batch,
                       "useful_flops": flops, "median_ms": medians, "tflops": tflops,
                       "notes": notes}
                rows.append(row)
                ratio = ""
                if "torch_varlen" in tflops:
                    ratio += f"  vs torch_varlen {tflops['cupy_varlen'] / tflops['torch_varlen']:.2f}"
                if "sdpa_cudnn" in tflops:
                    ratio += f"  vs sdpa_cudnn {tflops['cupy_varlen'] / tflops['sdpa_cudnn']:.2f}"
                print(f"D{dim} {'causal' if causal else 'full  '} L{length:<6d} B{batch:<4d} "
                      + "  ".join(f"{n} {x:5.0f}" for n, x in tflops.items()) + ratio, flush=True)
                del q, k, v, fns
                torch.cuda.empty_cache()
    if args.out:
        write_json({"benchmark": "seqlen_sweep", "date": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
                    "environment": environment_info(), "dtype": "bf16", "args": vars(args),
                    "rows": rows}, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
