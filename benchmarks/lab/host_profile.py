"""Where does the host time of one call go? Host µs per call with the GPU kept busy (a sleep kernel
queued first, so no call ever waits for the device), for ours and torch's varlen_attn, and a
cProfile of ours.

    python benchmarks/lab/host_profile.py [--config seed_full] [--calls 300] [--profile-calls 2000]

Timed calls: the eager forward (inputs without grad), the functional backward, and the autograd
forward + backward as training calls it (``torch.autograd.grad`` of the forward's output). The
profile lists the functions with the most own time, per call; a second one profiles our backward
on the autograd engine's thread, where it runs during the autograd call.

``--sdpa`` adds dense ``F.scaled_dot_product_attention`` on the flash backend (B16 x L1024 x H16 x
D128, bshd views, causal: bench_sdpa's row where the provider's route trailed varlen_attn):
through the provider (``activate_flash_attention_impl("cupy_varlen")``), through torch's own flash
kernel, and our ``varlen_attn`` on the same tokens packed, with a cProfile of the provider's route.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))


def profile(fn, calls, torch, top):
    import bench_varlen as bv

    prof = cProfile.Profile()
    per_round = bv.HOST_CALLS_PER_SLEEP
    for start in range(0, calls, per_round):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(2000 * (per_round * 4000 + 2000)))
        prof.enable()
        for _ in range(min(per_round, calls - start)):
            fn()
        prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_engine_backward(fwdbwd, calls, torch, top):
    """cProfile of our backward as autograd's engine runs it, on the engine's own thread (a
    profiler enabled on the calling thread does not see it): enabled inside the backward."""
    from cupy_varlen import _torch

    prof = cProfile.Profile()
    original = _torch._EagerVarlenAttn.backward

    def profiled(ctx, *grads):
        prof.enable()
        try:
            return original(ctx, *grads)
        finally:
            prof.disable()

    import bench_varlen as bv

    per_round = bv.HOST_CALLS_PER_SLEEP
    _torch._EagerVarlenAttn.backward = staticmethod(profiled)
    try:
        for start in range(0, calls, per_round):  # behind a sleep kernel, as profile() runs
            torch.cuda.synchronize()
            torch.cuda._sleep(int(2000 * (per_round * 4000 + 2000)))
            for _ in range(min(per_round, calls - start)):
                fwdbwd()
        torch.cuda.synchronize()
    finally:
        _torch._EagerVarlenAttn.backward = original
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def autograd_parts(fwdbwd, qg, kg, vg, dout, calls, torch, bv):
    """Where an autograd forward + backward spends its host time: our backward's Python (timed
    inside it, on the autograd engine's thread), the whole call, and the engine's cost for a
    trivial graph on the same leaves (its floor)."""
    from cupy_varlen import _torch

    inner = []
    original = _torch._EagerVarlenAttn.backward

    def timed(ctx, *grads):
        t0 = time.perf_counter()
        result = original(ctx, *grads)
        inner.append(time.perf_counter() - t0)
        return result

    _torch._EagerVarlenAttn.backward = staticmethod(timed)
    try:
        whole = bv.host_overhead_us(fwdbwd, calls)
    finally:
        _torch._EagerVarlenAttn.backward = original

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return q.new_empty(q.shape)

        @staticmethod
        def backward(ctx, grad):
            return grad, None, None

    floor = bv.host_overhead_us(
        lambda: torch.autograd.grad(Noop.apply(qg, kg, vg), (qg, kg, vg), dout, allow_unused=True),
        calls)
    return {"fwd+bwd": round(whole, 1),
            "inside our backward": round(statistics.median(inner) * 1e6, 1),
            "engine floor (a Function whose forward allocates, backward passes grad on)":
                round(floor, 1)}


def sdpa_host_us(args, torch, bv):
    """Host µs of one dense SDPA forward through the provider, through torch's flash kernel and
    as our varlen_attn on the same packed tokens; and a cProfile of the provider's route."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import bench_sdpa
    import cupy_varlen

    batch, length, heads, dim = 16, 1024, 16, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = [torch.randn(batch * length, heads, dim, device="cuda", dtype=torch.bfloat16,
                          generator=g) for _ in range(3)]
    q, k, v = (x.view(batch, length, heads, dim).transpose(1, 2) for x in packed)
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device="cuda")

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def direct():
        return cupy_varlen.varlen_attn(*packed, cu, cu, length, length, causal=True)

    row, provider_profile = {}, ""
    for _ in range(3):  # alternated: this host's speed drifts within seconds
        for name, active in (("provider", True), ("torch_flash", False)):
            with bench_sdpa.provider_state(active):
                for _ in range(20):
                    sdpa()
                row.setdefault(name, []).append(bv.host_overhead_us(sdpa, args.calls))
        row.setdefault("varlen_attn", []).append(bv.host_overhead_us(direct, args.calls))
    with bench_sdpa.provider_state(True):
        if args.profile_calls > 0:
            provider_profile = (f"==== sdpa through the provider: {args.profile_calls} calls "
                                f"====\n" + profile(sdpa, args.profile_calls, torch, args.top))
    return {name: round(min(t), 1) for name, t in row.items()}, provider_profile


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="seed_full")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--profile-calls", type=int, default=2000)
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--out", type=Path, default=None, help="directory for the profiles and JSON")
    ap.add_argument("--sdpa", action="store_true",
                    help="also dense SDPA through the provider, torch's flash and varlen_attn")
    args = ap.parse_args()

    import torch

    import bench_varlen as bv
    import cupy_varlen

    cfg = bv.grid_configs()[args.config]
    inp = bv.make_inputs(cfg, "bf16")
    q, k, v, cu_q, cu_k, mq, mk = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k
    causal = cfg.causal
    torch_varlen = bv._torch_varlen_fn()
    tkw = {"is_causal": True} if causal else {}
    if causal and "window_size" in bv.inspect.signature(torch_varlen).parameters:
        tkw = {"window_size": (-1, 0)}

    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                       return_lse=True)

    calls = {
        "fwd eager": (lambda: cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=causal),
                      lambda: torch_varlen(q, k, v, cu_q, cu_k, mq, mk, **tkw)),
        "bwd functional": (lambda: cupy_varlen.varlen_attn_backward(
            dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal=causal), None),
        "fwd+bwd autograd": (
            lambda: torch.autograd.grad(cupy_varlen.varlen_attn(
                qg, kg, vg, cu_q, cu_k, mq, mk, causal=causal), (qg, kg, vg), dout),
            lambda: torch.autograd.grad(torch_varlen(qg, kg, vg, cu_q, cu_k, mq, mk, **tkw),
                                        (qg, kg, vg), dout)),
    }
    result = {"config": cfg.name, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
              "host_us": {}}
    for name, (ours, theirs) in calls.items():
        for fn in (ours, theirs):
            if fn is not None:
                for _ in range(20):
                    fn()
        # Alternated three times: this host's speed drifts by tens of percent within seconds.
        fns = {"cupy_varlen": ours, "torch_varlen": theirs}
        times = {m: [] for m, fn in fns.items() if fn is not None}
        for _ in range(3):
            for m in times:
                times[m].append(bv.host_overhead_us(fns[m], args.calls))
        row = {m: round(min(t), 1) for m, t in times.items()}
        result["host_us"][name] = row
        print(f"{name:>18}: " + ", ".join(f"{m} {u} us" for m, u in row.items()), flush=True)
    result["autograd_parts_us"] = autograd_parts(calls["fwd+bwd autograd"][0], qg, kg, vg, dout,
                                                 args.calls, torch, bv)
    print("autograd parts:", result["autograd_parts_us"], flush=True)
    if args.sdpa:
        result["host_us"]["sdpa fwd dense"], provider_profile = sdpa_host_us(args, torch, bv)
        print("sdpa fwd dense:", result["host_us"]["sdpa fwd dense"], flush=True)
        if args.out:
            (args.out / "profile_sdpa_provider.txt").write_text(provider_profile)
        else:
            print(provider_profile)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "host_profile.json").write_text(json.dumps(result, indent=1))
    if args.profile_calls <= 0:
        return
    for name, (ours, _) in calls.items():
        text = profile(ours, args.profile_calls, torch, args.top)
        header = f"==== {name}: {args.profile_calls} calls ====\n"
        if args.out:
            slug = name.replace(" ", "_").replace("+", "")
            (args.out / f"profile_{slug}.txt").write_text(header + text)
        else:
            print(header + text)
    text = profile_engine_backward(calls["fwd+bwd autograd"][0], args.profile_calls, torch,
                                   args.top)
    header = f"==== our backward on the autograd engine's thread: {args.profile_calls} calls ====\n"
    if args.out:
        (args.out / "profile_engine_backward.txt").write_text(header + text)
    else:
        print(header + text)


if __name__ == "__main__":
    main()
