"""Context-parallel benchmark: one packed batch sharded across the ranks of a torchrun group,
attention forward + backward through cupy_varlen.distributed.varlen_attn_cp, against the same batch
on one GPU.

    torchrun --nproc-per-node 2 benchmarks/bench_cp.py            # the default batch, 2 GPUs
    torchrun --nproc-per-node 2 benchmarks/bench_cp.py --full      # no causal mask
    python benchmarks/bench_cp.py --smoke                           # 2 CPU processes, no GPU

The batch: ``--tokens`` (256k) tokens of documents with lengths drawn uniformly from
[``--min-doc``, ``--max-doc``] (1k-64k; the last one cut to fit), H ``--heads`` / ``--heads-kv``
(32/8), D ``--head-dim`` (128), bf16, causal unless ``--full``. Every rank holds its zigzag shards
(``shard_plan``) of q, k and v and a fixed dout.

Timed, CUDA events around each call, medians over ``--runs`` after ``--warmup`` (each timed call
preceded by a barrier, so a rank's time is the whole step's):
  step        varlen_attn_cp forward + backward on every rank (the slowest rank's median counts),
              once per ``--schemes`` entry (default both: "allgather" and "ring");
  comm        the all-gather scheme's collectives alone on the same sizes: the K/V all-gather
              and the gradient reduce-scatter (share = comm / step: what is not overlapped, as
              this scheme issues them before and after the attention);
  ring hops   the ring scheme's point-to-point hops alone on the same sizes (world - 1 K/V hops
              forward, as many again backward plus world hops of the dK/dV accumulator): what
              the ring has to hide behind its attention steps;
  one_gpu     rank 0 alone: cupy_varlen.varlen_attn forward + backward on the whole batch (the
              other ranks wait at a barrier); skipped with ``--no-baseline``.
Throughput ratio = one_gpu / step, per scheme (2 GPUs: the bar is 1.8).

``--smoke`` runs two CPU processes with gloo, a small batch in float64 and the float64 reference
as the kernel: the harness end to end without a GPU (the test suite runs it). Results go to
``--out`` (default benchmarks/results/<device>_<date>_<HHMM>_cp.json) and to $OUT/bench_cp.json
when $OUT is set, written by rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

SCHEMES = ("allgather", "ring")  # cupy_varlen.distributed.SCHEMES, without importing torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256 * 1024)
    ap.add_argument("--min-doc", type=int, default=1024)
    ap.add_argument("--max-doc", type=int, default=64 * 1024)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--full", action="store_true", help="no causal mask")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the one-GPU run")
    ap.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES),
                    help="varlen_attn_cp's K/V exchange schemes to time")
    ap.add_argument("--smoke", action="store_true",
                    help="2 CPU processes, gloo, a small float64 batch, the reference kernel")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.min_doc, args.max_doc = 96, 3, 40
        args.heads, args.heads_kv, args.head_dim = 4, 2, 8
        args.runs, args.warmup = min(args.runs, 2), min(args.warmup, 1)
    for name in ("tokens", "min_doc", "max_doc", "heads", "heads_kv", "head_dim", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_doc > args.max_doc:
        ap.error("--min-doc must not exceed --max-doc")
    if args.heads % args.heads_kv:
        ap.error("--heads must be a multiple of --heads-kv")
    return args


def document_lengths(tokens, low, high, seed):
    """Lengths drawn uniformly from [low, high] until ``tokens`` are filled, the last one cut."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(low, high), tokens - sum(lengths)))
    return lengths


def _median_time(fn, runs, warmup, cuda, barrier):
    import torch

    times = []
    for i in range(warmup + runs):
        barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def run(args):
    """This rank's measurements; rank 0 returns the results dict, the others None."""
    import torch
    import torch.distributed as dist

    from cupy_varlen.distributed import _GatherTokens, _pass_on, shard_plan, varlen_attn_cp

    cuda = not args.smoke
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float64
    lengths = document_lengths(args.tokens, args.min_doc, args.max_doc, args.seed)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    plan = shard_plan(cu, world, rank)
    g = torch.Generator(device=device).manual_seed(args.seed + 1 + rank)

    def randn(rows, heads):
        return torch.randn(rows, heads, args.head_dim, generator=g, device=device, dtype=dtype)

    q, dout = randn(plan.local_tokens, args.heads), randn(plan.local_tokens, args.heads)
    k, v = randn(plan.local_tokens, args.heads_kv), randn(plan.local_tokens, args.heads_kv)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    kernels = {}
    if args.smoke:
        from cupy_varlen.reference import varlen_attn_backward_reference, varlen_attn_reference

        kernels = dict(attn_fn=varlen_attn_reference,
                       attn_backward_fn=varlen_attn_backward_reference)
    causal = not args.full

    def step(scheme):
        out = varlen_attn_cp(*leaves, cu, causal=causal, scheme=scheme, **kernels)
        torch.autograd.grad(out, leaves, dout)

    kv = torch.cat([k, v], dim=1).detach().requires_grad_()

    def comm():
        gathered = _GatherTokens.apply(kv, plan, None)
        torch.autograd.grad(gathered, kv, torch.ones_like(gathered))

    shard = torch.zeros((plan.max_local_tokens,) + tuple(kv.shape[1:]), device=device,
                        dtype=dtype)
    accumulator = shard.float()

    def hops():
        for tensor, count, tag in ((shard, 2 * (world - 1), 0), (accumulator, world, 1)):
            for _ in range(count):
                for request in _pass_on([tensor], plan, None, tag)[1]:
                    request.wait()

    barrier = dist.barrier
    times = [_median_time(lambda: step(s), args.runs, args.warmup, cuda, barrier)
             for s in args.schemes]
    times.append(_median_time(comm, args.runs, args.warmup, cuda, barrier))
    times.append(_median_time(hops, args.runs, args.warmup, cuda, barrier) if world > 1 else 0.0)
    mine = torch.tensor(times, dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    one_gpu_ms = None
    if not args.no_baseline and world > 1:
        if rank == 0:
            one_gpu_ms = _one_gpu(args, cu, lengths, device, dtype, causal,
                                  kernels.get("attn_fn"), cuda)
        dist.barrier()
    if rank != 0:
        return None
    per_rank = [[float(t[i]) for t in every] for i in range(len(times))]
    schemes = {}
    for scheme, steps in zip(args.schemes, per_rank):
        schemes[scheme] = {"step_ms_per_rank": steps, "step_ms": max(steps),
                           "throughput_ratio": None if one_gpu_ms is None
                           else one_gpu_ms / max(steps)}
    comms, ring_hops = per_rank[-2], per_rank[-1]
    gather_step = schemes.get("allgather", next(iter(schemes.values())))["step_ms"]
    return {
        "benchmark": "bench_cp",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "environment": _environment(cuda),
        "world": world,
        "batch": {"tokens": args.tokens, "documents": len(lengths), "lengths": lengths,
                  "heads": args.heads, "heads_kv": args.heads_kv, "head_dim": args.head_dim,
                  "causal": causal, "dtype": str(dtype).replace("torch.", "")},
        "local_tokens": [shard_plan(cu, world, r).local_tokens for r in range(world)],
        "schemes": schemes,
        "comm_ms_per_rank": comms,
        "comm_share": max(comms) / gather_step,
        "ring_hops_ms_per_rank": ring_hops,
        "one_gpu_ms": one_gpu_ms,
        "timing": "median of CUDA event pairs (CPU: perf_counter) per call, a barrier before each",
    }


def _one_gpu(args, cu, lengths, device, dtype, causal, attn_fn, cuda):
    import torch

    import cupy_varlen

    attn_fn = attn_fn or cupy_varlen.varlen_attn
    g = torch.Generator(device=device).manual_seed(args.seed)
    total = cu[-1]
    shapes = ((total, args.heads), (total, args.heads_kv), (total, args.heads_kv))
    leaves = [torch.randn(*s, args.head_dim, generator=g, device=device, dtype=dtype)
              .requires_grad_() for s in shapes]
    dout = torch.randn(total, args.heads, args.head_dim, generator=g, device=device, dtype=dtype)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    longest = max(lengths)

    def step():
        out = attn_fn(*leaves, cu_t, cu_t, longest, longest, causal=causal)
        torch.autograd.grad(out, leaves, dout)

    return _median_time(step, args.runs, args.warmup, cuda, lambda: None)


def _environment(cuda):
    import torch

    if cuda:
        import bench_varlen

        return bench_varlen.environment_info()
    return {"device": "cpu", "torch": torch.__version__, "python": sys.version.split()[0]}


def _write(result, args):
    out = args.out
    if out is None:
        now = datetime.datetime.now(datetime.timezone.utc)
        device = result["environment"]["device"].lower().replace(" ", "_")
        out = HERE / "results" / f"{device}_{now:%Y-%m-%d_%H%M}_cp.json"
    text = json.dumps(result, indent=1)
    Path(out).write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_cp.json").write_text(text)
    steps = ", ".join(f"{name} step {r['step_ms']:.3f} ms (throughput ratio "
                      f"{r['throughput_ratio']})" for name, r in result["schemes"].items())
    print(f"world {result['world']}: {steps}; all-gather comm share {result['comm_share']:.2f}, "
          f"ring hops {max(result['ring_hops_ms_per_rank']):.3f} ms, one GPU "
          f"{result['one_gpu_ms']}; wrote {out}")


def _worker(rank, world, init_file, argv):
    """One process of a --smoke run (torchrun is not needed on the CPU)."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback: the two processes share a host
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        result = run(parse_args(argv))
        if result is not None:
            _write(result, parse_args(argv))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.smoke:
        import torch.multiprocessing as mp

        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), argv), nprocs=2, join=True)
        return
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    try:
        result = run(args)
        if result is not None:
            _write(result, args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
