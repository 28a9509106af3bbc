"""Benchmark of cupy_varlen.varlen_attn (forward, backward, or both) against PyTorch's attention
kernels.

What is counted
---------------
Useful FLOPs = 4 * sum_b (allowed (query, key) pairs of sequence b) * H * D: two matmuls
(Q K^T and P V) of 2 FLOPs per multiply-add, over the pairs the mask allows only. Non-causal
sequences contribute Lq * Lk pairs; causal (bottom-right aligned: query i sees key j iff
j <= i + Lk - Lq) and windowed sequences are counted exactly. Every method is scored with the same
useful FLOPs, so padded SDPA's number is its "useful TFLOP/s" (the padding it computes is waste).
``--pass bwd`` times the backward alone (torch.autograd.grad of a saved output with a fixed
random dout, for every method alike: ours through its autograd registration) and counts 2.5x the
forward's FLOPs (five GEMMs to the forward's two); ``--pass fwdbwd`` times forward + backward and
counts 3.5x.

Time = triton ``do_bench``'s median with the L2 flushed before every call (``--timer do_bench``,
the default, as the peers' own numbers are taken), or the median of ``--runs`` calls after
``--warmup`` calls, each bracketed by its own pair of CUDA events with inputs reused, so that small
configs may run partly out of L2 (``--timer events``; min and p90 kept in the JSON). Host overhead
(cupy_varlen, FA4 and torch varlen) = median wall time of the Python call itself (perf_counter)
over ``--host-calls`` calls, issued in rounds behind a sleep kernel so that no call waits for the
GPU. ``--graph`` also captures each of those calls in a CUDA graph and times the replay (host µs
and GPU time): what CUDA graphs and ``torch.compile(mode="reduce-overhead")`` leave of the host
cost. The first-call (compile) time of cupy_varlen is measured once per distinct (dtype, head dim,
mask kind) with empty in-memory caches, a fresh CUPY_VARLEN_CACHE_DIR and a unique comment appended
to the source (so no cache can answer).

Methods (same inputs, same process)
-----------------------------------
cupy_varlen   cupy_varlen.varlen_attn on the packed (T, H, D) tensors, kernel chosen as users get
              it (the sm90 wgmma kernel on Hopper where it covers the head dim).
cupy_varlen_sm80  the same call forced onto the portable mma.sync kernels (opt-in method).
cupy_varlen_det   the same call with deterministic=True (opt-in; only the backward differs).
torch_varlen  torch.nn.attention.varlen.varlen_attn (FlashAttention-2); the call is built from its
              signature (is_causal or window_size; enable_gqa, else k/v expanded before timing).
sdpa_flash    F.scaled_dot_product_attention on a zero-padded (B, H, max_len, D) batch under
              SDPBackend.FLASH_ATTENTION. It takes no mask: causal self-attention uses is_causal
              (exact, as padding sits after every real key); non-causal padded batches attend to
              the padding keys too: a "padded, unmasked upper bound", a speed reference only.
sdpa_cudnn    Same padded batch under SDPBackend.CUDNN_ATTENTION with a boolean (B, 1, Lq, Lk)
              key-padding (+ bottom-right causal) mask.
flex          torch.compile(flex_attention) on (1, H, T, D) with a document block mask (+ causal
              within each document); self-attention (Lq == Lk) configs only.

How to run
----------
    python benchmarks/bench_varlen.py                  # the seed config (B 8, <= 2048, H 16, D 64)
    python benchmarks/bench_varlen.py --grid           # every config of the grid
    python benchmarks/bench_varlen.py --grid --pass bwd   # the backward pass
    python benchmarks/bench_varlen.py --configs skewed_d128 seed_causal --check --plot
    python benchmarks/bench_varlen.py --from-json benchmarks/results/X.json --plot   # no GPU

Results go to benchmarks/results/<device>_<date>_<time>.json (``--out``), and to $OUT/bench.json
when $OUT is set; ``--plot`` adds a PNG beside them (matplotlib is imported only then). The JSON is
rewritten after every config, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import inspect
import json
import os
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run from a source checkout without installing: the package sits one level up.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "cupy_varlen").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

METHODS = ("cupy_varlen", "cupy_varlen_sm80", "cupy_varlen_det", "fa4", "torch_varlen",
           "sdpa_flash", "sdpa_cudnn", "flex")
OPT_IN_METHODS = ("cupy_varlen_sm80", "cupy_varlen_det")
PASSES = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}  # FLOPs relative to the forward's
HOST_METHODS = ("cupy_varlen", "fa4", "torch_varlen")
BASELINE = "torch_varlen"
CHECK_MAX_TOKENS = 40_000
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = ("bf16", "fp16")


# --------------------------------------------------------------------------------------------
# Sequence lengths and FLOP counting (pure Python, no GPU)
# --------------------------------------------------------------------------------------------

def make_packed_lengths(batch, max_len, *, min_len=1, multiple=1, odd=False, seed=0):
    """``batch`` random lengths in [min_len, max_len] (seeded), all multiples of ``multiple``
    (or all odd with ``odd=True``). Returns a list of Python ints."""
    rng = np.random.default_rng(seed)
    if odd:
        lo, hi = min_len // 2, (max_len - 1) // 2  # odd value 2k + 1 for k in [lo, hi]
        if lo > hi:
            raise ValueError(f"no odd number in [{min_len}, {max_len}]")
        values = 2 * rng.integers(lo, hi + 1, size=batch) + 1
    else:
        lo, hi = -(-min_len // multiple), max_len // multiple
        if lo > hi:
            raise ValueError(f"no multiple of {multiple} in [{min_len}, {max_len}]")
        values = multiple * rng.integers(lo, hi + 1, size=batch)
    return [int(x) for x in values]


def cu_seqlens_list(lengths):
    """Cumulative offsets [0, L0, L0+L1, ...] as a list of ints."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return offsets


def lengths_from_cu(cu):
    return [int(b) - int(a) for a, b in zip(cu[:-1], cu[1:])]


def allowed_pairs(q_len, k_len, causal=False, window=(-1, -1)):
    """Number of (query, key) pairs of one sequence that the mask allows.

    Bottom-right aligned: query i sits at key position i + Lk - Lq; window (left, right) with -1
    for unbounded; causal means right = 0."""
    left, right = window
    if causal:
        right = 0
    if q_len <= 0 or k_len <= 0:
        return 0
    if left < 0 and right < 0:
        return int(q_len) * int(k_len)
    pos = np.arange(q_len, dtype=np.int64) + (k_len - q_len)
    lo = np.zeros_like(pos) if left < 0 else np.maximum(pos - left, 0)
    hi = np.full_like(pos, k_len - 1) if right < 0 else np.minimum(pos + right, k_len - 1)
    return int(np.clip(hi - lo + 1, 0, None).sum())


def useful_flops(cu_q_list, cu_k_list, heads, head_dim, causal=False, window=(-1, -1)):
    """4 * sum_b allowed_pairs(Lq_b, Lk_b) * heads * head_dim, from cumulative offset lists."""
    pairs = sum(allowed_pairs(lq, lk, causal, window)
                for lq, lk in zip(lengths_from_cu(cu_q_list), lengths_from_cu(cu_k_list)))
    return 4 * pairs * int(heads) * int(head_dim)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchConfig:
    name: str
    lengths_q: list
    lengths_k: list
    heads: int
    heads_kv: int
    head_dim: int
    causal: bool = False
    window: tuple = (-1, -1)

    @property
    def cu_q(self):
        return cu_seqlens_list(self.lengths_q)

    @property
    def cu_k(self):
        return cu_seqlens_list(self.lengths_k)

    @property
    def self_attention(self):
        return list(self.lengths_q) == list(self.lengths_k)

    @property
    def total_tokens(self):
        return max(sum(self.lengths_q), sum(self.lengths_k))

    def flops(self):
        return useful_flops(self.cu_q, self.cu_k, self.heads, self.head_dim, self.causal,
                            self.window)

    def params(self):
        lq = self.lengths_q
        return {
            "batch": len(lq), "total_q": sum(lq), "total_k": sum(self.lengths_k),
            "max_seqlen_q": max(lq), "max_seqlen_k": max(self.lengths_k),
            "min_seqlen_q": min(lq), "mean_seqlen_q": round(sum(lq) / len(lq), 1),
            "heads": self.heads, "heads_kv": self.heads_kv, "head_dim": self.head_dim,
            "causal": self.causal, "window": list(self.window),
            "self_attention": self.self_attention, "useful_flops": self.flops(),
            "lengths_q": list(lq),
            "lengths_k": None if self.self_attention else list(self.lengths_k),
        }


def _pair(name, lengths, heads, heads_kv, head_dim):
    """A base config in its full and causal (self-attention) flavours."""
    return [BenchConfig(f"{name}_{kind}", lengths, lengths, heads, heads_kv, head_dim,
                        causal=(kind == "causal")) for kind in ("full", "causal")]


def grid_configs(seed=0):
    """All named configs, in run order: {name: BenchConfig}."""
    b32 = make_packed_lengths(32, 8192, min_len=64, multiple=64, seed=seed)
    configs = (
        _pair("b32_8k_d128", b32, 16, 16, 128)
        + _pair("b32_8k_d64", b32, 32, 32, 64)
        + _pair("skewed_d128", [8192] + [128] * 63, 16, 16, 128)
        + _pair("gqa_32_8_odd", make_packed_lengths(16, 4095, odd=True, seed=seed), 32, 8, 128)
        + _pair("many_short_d64", make_packed_lengths(512, 256, min_len=16, seed=seed), 16, 16, 64)
        # The seed PR's setting: batch 8, max_seq_len 2048, embed 1024 / 16 heads, multiples of 64.
        + _pair("seed", make_packed_lengths(8, 2048, min_len=64, multiple=64, seed=seed),
                16, 16, 64)
    )
    return {c.name: c for c in configs}


def select_configs(names, grid):
    """Exact names, or a base name (``skewed_d128``) selecting its _full and _causal flavours."""
    chosen = []
    for name in names:
        hits = [name] if name in grid else [n for n in grid if n.startswith(name + "_")]
        if not hits:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(grid)}")
        chosen += [h for h in hits if h not in chosen]
    return [grid[n] for n in chosen]


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def summarize_ms(times_ms):
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(arr)), "min_ms": float(arr.min()),
            "p90_ms": float(np.percentile(arr, 90))}


def time_cuda(fn, runs, warmup):
    """Median/min/p90 of ``runs`` calls, each timed by its own CUDA event pair."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return summarize_ms([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_rotated(fns, runs, warmup=0, before=None):
    """Per name, the CUDA-event times (ms) of ``runs`` calls of ``fns[name]``, interleaved: round
    r calls every function once, starting at a rotating position, each timed call preceded by an
    untimed one and ``before(name)``. Clocks drift within seconds of load and the call timed first
    in a round reads a few percent faster, so neither may favour one function (ab_sources.py,
    seqlen_sweep.py). The first ``warmup`` rounds are not recorded."""
    import torch

    order = list(fns)
    times = {name: [] for name in order}
    for r in range(warmup + runs):
        for name in order[r % len(order):] + order[:r % len(order)]:
            if before is not None:
                before(name)
            fns[name]()
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            end.synchronize()
            if r >= warmup:
                times[name].append(start.elapsed_time(end))
    return times


def time_do_bench(fn, runs, warmup):
    """triton.testing.do_bench's median (the L2 flushed before every call), as the peers' own
    numbers are taken; each call is timed by its own event pair, so a host slower than the flush
    shows in the time (the eager table). Falls back to time_cuda without triton."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return dict(time_cuda(fn, runs, warmup), timer="events")
    # do_bench's warm-up and repeat arguments are milliseconds: estimate one call first.
    one = time_cuda(fn, 3, max(1, warmup))["median_ms"]
    ms = do_bench(fn, warmup=max(1.0, warmup * one), rep=max(5.0, runs * one),
                  return_mode="median")
    return {"median_ms": float(ms), "min_ms": None, "p90_ms": None, "timer": "do_bench"}


def gpu_time_ms(fn, calls, host_us):
    """GPU time per call with the host hidden: a sleep kernel queued first holds the stream while
    the host queues ``calls`` calls back to back, so no call waits for the host (what CUDA graphs or
    a busy training loop see). ``host_us`` sizes the sleep."""
    import torch

    torch.cuda.synchronize()
    cycles_per_us = 2000  # a Hopper SM clock of about 2 GHz; more sleep only costs wall time
    torch.cuda._sleep(int(cycles_per_us * (2 * calls * max(host_us, 20.0) + 1000)))
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


# Calls queued behind one sleep kernel while the host is timed: few enough that their launches never
# fill the launch queue (about a thousand pending launches; a full queue makes the next launch wait
# for the GPU, which would be timed as host time).
HOST_CALLS_PER_SLEEP = 40


def host_overhead_us(fn, calls):
    """Median wall time (µs) of the Python call alone, with the GPU kept busy: each round of calls
    is issued behind a sleep kernel, so no call waits for the device."""
    import torch

    samples = []
    for start in range(0, calls, HOST_CALLS_PER_SLEEP):
        torch.cuda.synchronize()
        # ~2 GHz: 2 ms per call outlasts any host path here.
        torch.cuda._sleep(int(2000 * (HOST_CALLS_PER_SLEEP * 2000 + 2000)))
        for _ in range(min(HOST_CALLS_PER_SLEEP, calls - start)):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(samples) * 1e6


def graph_replay(fn):
    """``fn`` captured once in a CUDA graph (warmed up on a side stream first, as torch requires):
    returns the graph's replay, which launches the captured kernels with no Python in between.
    What ``torch.compile(mode="reduce-overhead")`` and hand-made graphs give a training or decode
    loop."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


# --------------------------------------------------------------------------------------------
# Inputs and padding
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Inputs:
    cfg: BenchConfig
    q: object
    k: object
    v: object
    cu_q: object
    cu_k: object

    @property
    def max_q(self):
        return max(self.cfg.lengths_q)

    @property
    def max_k(self):
        return max(self.cfg.lengths_k)


def torch_dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def make_inputs(cfg, dtype, seed=0):
    import torch

    gen = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(cfg.lengths_q), sum(cfg.lengths_k)
    dt = torch_dtype(dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dt)

    q = randn(tq, cfg.heads, cfg.head_dim)
    k = randn(tk, cfg.heads_kv, cfg.head_dim)
    v = randn(tk, cfg.heads_kv, cfg.head_dim)
    cu_q = torch.tensor(cfg.cu_q, dtype=torch.int32, device="cuda")
    cu_k = torch.tensor(cfg.cu_k, dtype=torch.int32, device="cuda")
    return Inputs(cfg, q, k, v, cu_q, cu_k)


def pad_index(lengths, device="cuda"):
    """(batch index, position) of every packed row, as int64 tensors."""
    import torch

    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    batch = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)
    starts = torch.cumsum(lens, 0) - lens
    pos = torch.arange(int(lens.sum()), device=device) - starts[batch]
    return batch, pos


def pad_packed(x, index, batch, max_len):
    """Packed (T, H, D) -> zero-padded contiguous (B, H, max_len, D)."""
    out = x.new_zeros(batch, max_len, x.shape[1], x.shape[2])
    out[index[0], index[1]] = x
    return out.transpose(1, 2).contiguous()


def unpad(y, index):
    """(B, H, L, D) -> packed (T, H, D)."""
    return y.transpose(1, 2)[index[0], index[1]]


def _expand_kv(k, v, heads):
    group = heads // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


# --------------------------------------------------------------------------------------------
# Methods: each prepare_* does its setup outside timing and returns a Prepared
# --------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """The method cannot run this config (reason in the message)."""


@dataclasses.dataclass
class Prepared:
    fn: object                      # zero-argument callable, the timed call
    unpack: object = None           # output of fn -> packed (T, H, D), for --check
    note: str = ""
    exact: bool = True              # computes the same function as the reference
    context: object = contextlib.nullcontext
    first_call_s: float = None      # measured compile / first-call time, where meaningful


def _kernel_choice(choice):
    """Context manager running cupy_varlen calls under kernel-family choice ``choice``, forward
    and backward."""

    @contextlib.contextmanager
    def context():
        from cupy_varlen import _spec

        old = _spec.forward_kernel, _spec.backward_kernel
        _spec.forward_kernel = _spec.backward_kernel = choice
        try:
            yield
        finally:
            _spec.forward_kernel, _spec.backward_kernel = old

    return context


def prepare_cupy_varlen(inp, choice="auto", deterministic=False, **modifiers):
    """``modifiers`` (softcap=, sinks=, alibi_slopes=) go to varlen_attn as they are
    (bench_mods.py)."""
    import cupy_varlen
    from cupy_varlen import _api, _spec

    cfg = inp.cfg
    q, k, v, cu_q, cu_k, mq, mk = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k

    def fn():
        return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=cfg.causal,
                                       window_size=cfg.window, deterministic=deterministic,
                                       **modifiers)

    arch = _api._device_arch(q.device.index if q.device.index is not None else 0)
    kernel = _spec.kernel_for(arch, _spec.head_dim_tile(cfg.head_dim), choice)
    return Prepared(fn, unpack=lambda out: out, context=_kernel_choice(choice),
                    note=f"{kernel} kernel")


def measure_cupy_compile(fn):
    """First-call time of ``fn`` (a cupy_varlen call) with cold in-memory caches, a fresh, empty
    disk cache directory, and a unique comment appended to the kernel source, so that no cache at
    any level (ours, or one below NVRTC's API) can answer. The kernels stay loaded afterwards."""
    import uuid

    import torch
    from cupy_varlen import _api, _build

    old = os.environ.get("CUPY_VARLEN_CACHE_DIR")
    assemble = _build.assemble_source
    tmp = tempfile.mkdtemp(prefix="cupy_varlen_bench_cache_")
    try:
        _build.clear_memory_cache()
        _api.clear_caches()
        os.environ["CUPY_VARLEN_CACHE_DIR"] = tmp
        nonce = f"\n// compile-time measurement {uuid.uuid4()}\n"
        _build.assemble_source = lambda spec: assemble(spec) + nonce
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        _build.assemble_source = assemble
        if old is None:
            os.environ.pop("CUPY_VARLEN_CACHE_DIR", None)
        else:
            os.environ["CUPY_VARLEN_CACHE_DIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def _torch_varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        raise Unavailable(f"import torch.nn.attention.varlen failed: {exc!r}") from exc
    return varlen_attn


def prepare_torch_varlen(inp):
    cfg = inp.cfg
    varlen_attn = _torch_varlen_fn()
    params = inspect.signature(varlen_attn).parameters
    kwargs, notes = {}, []
    left, right = cfg.window
    if cfg.causal or cfg.window != (-1, -1):
        if "window_size" in params:
            kwargs["window_size"] = (left, 0 if cfg.causal else right)
        elif "is_causal" in params and cfg.window == (-1, -1):
            kwargs["is_causal"] = True
        else:
            raise Unavailable("this torch varlen_attn has no window_size parameter")
    k, v = inp.k, inp.v
    if cfg.heads_kv < cfg.heads:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, v, cfg.heads)
            notes.append(f"k/v expanded to {cfg.heads} heads before timing (no enable_gqa)")
    q, cu_q, cu_k, mq, mk = inp.q, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k

    def fn():
        return varlen_attn(q, k, v, cu_q, cu_k, mq, mk, **kwargs)

    notes.append("kwargs " + ", ".join(f"{a}={b}" for a, b in kwargs.items()) if kwargs else "")
    return Prepared(fn, unpack=lambda out: out, note="; ".join(n for n in notes if n))


def prepare_fa4(inp):
    """FlashAttention-4 (``flash_attn.cute``, CuTe DSL, compiled at run time) where installed."""
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        raise Unavailable(f"flash_attn.cute not importable: {exc!r}") from exc
    cfg = inp.cfg
    left, right = cfg.window
    window = (None if left < 0 else left, 0 if cfg.causal else (None if right < 0 else right))
    q, k, v, cu_q, cu_k, mq, mk = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k

    def fn():
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      max_seqlen_q=mq, max_seqlen_k=mk, causal=cfg.causal,
                                      window_size=window)

    # Returns (out, lse); the first call compiles (seconds), outside the timing.
    t0 = time.perf_counter()
    fn()
    import torch

    torch.cuda.synchronize()
    return Prepared(fn, unpack=lambda out: out[0], note="flash_attn.cute",
                    first_call_s=time.perf_counter() - t0)


def _padded_sdpa(inp):
    """Zero-padded (B, H, L, D) copies of q, k, v and the row index to unpad the output."""
    cfg = inp.cfg
    b = len(cfg.lengths_q)
    iq, ik = pad_index(cfg.lengths_q), pad_index(cfg.lengths_k)
    qp = pad_packed(inp.q, iq, b, inp.max_q)
    kp = pad_packed(inp.k, ik, b, inp.max_k)
    vp = pad_packed(inp.v, ik, b, inp.max_k)
    return qp, kp, vp, iq


def _sdpa_prepared(inp, backend, qp, kp, vp, iq, mask, is_causal, note, exact):
    """Probe the call under ``backend`` (GQA natively, else with k/v expanded) and wrap it."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    cfg = inp.cfg
    gqa = cfg.heads_kv < cfg.heads

    def make(k, v, extra):
        return lambda: F.scaled_dot_product_attention(qp, k, v, attn_mask=mask,
                                                      is_causal=is_causal, **extra)

    fn = make(kp, vp, {"enable_gqa": True} if gqa else {})
    with sdpa_kernel(backend):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            if not gqa:
                raise
            ke, ve = _expand_kv(kp, vp, cfg.heads)
            fn = make(ke, ve, {})
            fn()  # raises (unavailable) if expanding does not help either
            note = f"k/v expanded to {cfg.heads} heads (enable_gqa refused: {exc!s:.80}); " + note
    return Prepared(fn, unpack=lambda out: unpad(out, iq), note=note.strip("; "), exact=exact,
                    context=lambda: sdpa_kernel(backend))


def prepare_sdpa_flash(inp):
    from torch.nn.attention import SDPBackend

    cfg = inp.cfg
    if cfg.window != (-1, -1):
        raise Unavailable("flash SDPA takes no mask: a sliding window cannot be expressed")
    padded = len(set(cfg.lengths_q)) > 1 or len(set(cfg.lengths_k)) > 1 or inp.max_q != inp.max_k
    if cfg.causal:
        if not cfg.self_attention:
            raise Unavailable("flash SDPA's is_causal is top-left; bottom-right needs Lq == Lk")
        # Padding sits after every real key, so top-left causal on the padded square is exact.
        note, exact = "padded; is_causal (exact for Lq == Lk)", True
    elif padded:
        note = "padded, unmasked upper bound: attends to padding keys (speed ref only)"
        exact = False
    else:
        note, exact = "no padding needed", True
    qp, kp, vp, iq = _padded_sdpa(inp)
    return _sdpa_prepared(inp, SDPBackend.FLASH_ATTENTION, qp, kp, vp, iq, None, cfg.causal,
                          note, exact)


def padded_attention_mask(lengths_q, lengths_k, causal, window, device="cuda"):
    """Boolean (B, 1, max_q, max_k) mask: real keys of the row's sequence, bottom-right causal /
    windowed. Padding query rows see every key (their output is discarded; avoids all-masked
    rows)."""
    import torch

    lq = torch.tensor(lengths_q, device=device).view(-1, 1, 1)
    lk = torch.tensor(lengths_k, device=device).view(-1, 1, 1)
    i = torch.arange(max(lengths_q), device=device).view(1, -1, 1)
    j = torch.arange(max(lengths_k), device=device).view(1, 1, -1)
    pos = i + lk - lq
    left, right = window
    if causal:
        right = 0
    allowed = j < lk
    if right >= 0:
        allowed = allowed & (j <= pos + right)
    if left >= 0:
        allowed = allowed & (j >= pos - left)
    allowed = allowed | (i >= lq)
    return allowed.unsqueeze(1)


def prepare_sdpa_cudnn(inp):
    from torch.nn.attention import SDPBackend

    cfg = inp.cfg
    qp, kp, vp, iq = _padded_sdpa(inp)
    mask = padded_attention_mask(cfg.lengths_q, cfg.lengths_k, cfg.causal, cfg.window)
    return _sdpa_prepared(inp, SDPBackend.CUDNN_ATTENTION, qp, kp, vp, iq, mask, False,
                          "padded; boolean (B,1,Lq,Lk) mask", True)


def document_ids(lengths, device="cuda"):
    import torch

    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), lens)


def document_mask_mod(doc, causal, window):
    """flex mask_mod: same document, plus causal / window within it (self-attention, so top-left
    and bottom-right alignment agree). ``doc`` may be longer than the sequence (padding)."""
    left, right = window
    if causal:
        right = 0

    def mask_mod(b, h, q_idx, kv_idx):
        keep = doc[q_idx] == doc[kv_idx]
        if right >= 0:
            keep = keep & (kv_idx - q_idx <= right)
        if left >= 0:
            keep = keep & (q_idx - kv_idx <= left)
        return keep

    return mask_mod


def document_block_mask(lengths, causal, window, block=128, device="cuda", max_elems=1 << 26):
    """flex BlockMask for packed documents, built without materializing the T x T mask at once:
    the dense mask is evaluated a few block rows at a time and reduced to partial / full blocks."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask

    total = sum(lengths)
    nb = -(-total // block)
    padded = nb * block
    doc = F.pad(document_ids(lengths, device), (0, padded - total), value=-1)
    mask_mod = document_mask_mod(doc, causal, window)
    cols = torch.arange(padded, device=device)
    valid = cols < total
    partial = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    full = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    step = max(1, max_elems // (block * padded))
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        rows = cols[b0 * block:b1 * block]
        dense = mask_mod(None, None, rows.view(-1, 1), cols.view(1, -1))
        dense = dense & valid[b0 * block:b1 * block].view(-1, 1) & valid.view(1, -1)
        count = dense.view(b1 - b0, block, nb, block).sum(dim=(1, 3))
        full[b0:b1] = count == block * block
        partial[b0:b1] = (count > 0) & (count < block * block)

    def ordered(m):
        num = m.sum(-1, dtype=torch.int32)
        idx = torch.argsort(m.to(torch.int32), dim=-1, descending=True, stable=True)
        return num[None, None].contiguous(), idx.to(torch.int32)[None, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(total, total))


def prepare_flex(inp, compile_limit_s=60.0, score_mod=None, attention=None):
    """``score_mod`` goes to flex_attention; ``attention`` (default flex_attention itself) is the
    function compiled, called as attention(q, k, v, score_mod=, block_mask=, enable_gqa=) on
    (1, H, T, D) tensors, for callers that add work around flex (bench_mods.py's sinks)."""
    import torch
    import torch._dynamo

    cfg = inp.cfg
    if not cfg.self_attention:
        raise Unavailable("flex benchmark covers self-attention (Lq == Lk) only")
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"import flex_attention failed: {exc!r}") from exc
    block_mask = document_block_mask(cfg.lengths_q, cfg.causal, cfg.window)
    q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (inp.q, inp.k, inp.v))
    gqa = cfg.heads_kv < cfg.heads
    torch._dynamo.reset()  # fresh compile per config, so the recompile limit never falls back
    compiled = torch.compile(attention or flex_attention, dynamic=False)

    def fn():
        return compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    if compile_limit_s and compile_s > compile_limit_s:
        raise Unavailable(f"torch.compile(flex_attention) took {compile_s:.1f} s "
                          f"(> {compile_limit_s:g} s limit)")
    return Prepared(fn, unpack=lambda out: out[0].transpose(0, 1),
                    note=f"document block mask; compile {compile_s:.1f} s", first_call_s=compile_s)


PREPARE = {
    "cupy_varlen": lambda inp, args: prepare_cupy_varlen(inp),
    "cupy_varlen_sm80": lambda inp, args: prepare_cupy_varlen(inp, "sm80"),
    "cupy_varlen_det": lambda inp, args: prepare_cupy_varlen(inp, deterministic=True),
    "fa4": lambda inp, args: prepare_fa4(inp),
    "torch_varlen": lambda inp, args: prepare_torch_varlen(inp),
    "sdpa_flash": lambda inp, args: prepare_sdpa_flash(inp),
    "sdpa_cudnn": lambda inp, args: prepare_sdpa_cudnn(inp),
    "flex": lambda inp, args: prepare_flex(inp, args.flex_compile_limit),
}


# --------------------------------------------------------------------------------------------
# Running one config
# --------------------------------------------------------------------------------------------

def rel_error(out, ref):
    import torch

    out = out.to(torch.float64)
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def reference_output(inp):
    from cupy_varlen.reference import varlen_attn_reference

    cfg = inp.cfg
    return varlen_attn_reference(inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.max_q, inp.max_k,
                                 causal=cfg.causal, window_size=cfg.window)


def _free_cuda():
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def _error_text(exc):
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, Unavailable) else str(exc)
    return " ".join(text.split())[:2000]


def with_backward(prepared, inp, mode, dout=None, leaves=None):
    """The backward (``bwd``) or forward + backward (``fwdbwd``) of a prepared forward: autograd
    into the packed q, k, v (which require grad; or into ``leaves``) with one fixed dout (random,
    or ``dout`` in the layout of the method's output, for callers that check the gradients)."""
    import torch

    fwd = prepared.fn
    leaves = [inp.q, inp.k, inp.v] if leaves is None else list(leaves)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    with prepared.context():
        saved = first(fwd())
    if dout is None:
        dout = torch.randn_like(saved)

    def bwd():
        return torch.autograd.grad(saved, leaves, dout, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(first(fwd()), leaves, dout)

    prepared.fn = bwd if mode == "bwd" else fwdbwd
    prepared.unpack = None
    return prepared


def run_method(method, inp, args, flops, ref, compile_cache):
    """Benchmark one method on one config; never raises (failures become an 'error' row)."""
    import torch

    row = {"method": method, "median_ms": None, "min_ms": None, "p90_ms": None, "tflops": None,
           "host_us": None, "note": "", "error": None}
    prepared = None
    try:
        prepared = PREPARE[method](inp, args)
        if args.pass_ != "fwd":
            prepared = with_backward(prepared, inp, args.pass_)
        row["note"] = prepared.note
        row["exact"] = prepared.exact
        if prepared.first_call_s is not None:
            row["first_call_s"] = prepared.first_call_s
        with prepared.context():
            if method == "cupy_varlen" and args.pass_ == "fwd":
                cfg = inp.cfg
                key = (args.dtype, cfg.head_dim, cfg.causal, tuple(cfg.window))
                if key not in compile_cache:
                    compile_cache[key] = (measure_cupy_compile(prepared.fn), cfg.name)
                row["compile_s"], row["compile_measured_in"] = compile_cache[key]
            timer = time_do_bench if args.timer == "do_bench" else time_cuda
            row.update(timer(prepared.fn, args.runs, args.warmup))
            row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            if method in HOST_METHODS and args.host_calls > 0:
                row["host_us"] = host_overhead_us(prepared.fn, args.host_calls)
            if args.gpu_calls > 0:
                row["gpu_ms"] = gpu_time_ms(prepared.fn, args.gpu_calls, row["host_us"] or 100.0)
                row["gpu_tflops"] = flops / (row["gpu_ms"] * 1e-3) / 1e12
            if args.graph and method in HOST_METHODS:
                try:
                    replay = graph_replay(prepared.fn)
                    row["graph_host_us"] = host_overhead_us(replay, max(args.host_calls, 10))
                    row["graph_ms"] = gpu_time_ms(replay, max(args.gpu_calls, 10),
                                                  row["graph_host_us"])
                except Exception as exc:  # noqa: BLE001 - not capturable: say so, keep the row
                    row["graph_error"] = _error_text(exc)
            if ref is not None and prepared.unpack is not None:
                if prepared.exact:
                    row["check_rel_err"] = rel_error(prepared.unpack(prepared.fn()), ref)
                else:
                    row["check_rel_err"] = None
                    row["check_note"] = "not comparable (different function)"
    except Exception as exc:  # noqa: BLE001 - record and go on
        row["error"] = _error_text(exc)
    finally:
        del prepared
        try:
            torch.cuda.synchronize()
            _free_cuda()
        except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: keep the first message
            row["error"] = row["error"] or _error_text(exc)
    return row


def run_config(cfg, args, compile_cache):
    import torch

    flops = cfg.flops() * PASSES[args.pass_]
    print(f"\n=== {cfg.name}: B={len(cfg.lengths_q)} T={sum(cfg.lengths_q)} "
          f"max_len={max(cfg.lengths_q)} H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim} "
          f"causal={cfg.causal} {args.dtype} {args.pass_} useful={flops / 1e9:.1f} GFLOP",
          flush=True)
    torch.manual_seed(args.seed)
    inp = make_inputs(cfg, args.dtype, args.seed)
    if args.pass_ != "fwd":
        for x in (inp.q, inp.k, inp.v):
            x.requires_grad_(True)
    ref, check_skipped = None, None
    if args.check and args.pass_ == "fwd":
        if cfg.total_tokens > CHECK_MAX_TOKENS:
            check_skipped = f"{cfg.total_tokens} tokens > {CHECK_MAX_TOKENS}"
            print(f"  --check skipped: {check_skipped}", flush=True)
        else:
            ref = reference_output(inp)
    rows = []
    for method in args.methods:
        t0 = time.perf_counter()
        row = run_method(method, inp, args, flops, ref, compile_cache)
        status = row["error"] or f"{row['median_ms']:.3f} ms"
        print(f"  {method:<13} {status[:150]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        rows.append(row)
    base = next((r["tflops"] for r in rows if r["method"] == BASELINE and r["tflops"]), None)
    fa4 = next((r["tflops"] for r in rows if r["method"] == "fa4" and r["tflops"]), None)
    for r in rows:
        r["ratio_vs_torch_varlen"] = r["tflops"] / base if base and r["tflops"] else None
        r["ratio_vs_fa4"] = r["tflops"] / fa4 if fa4 and r["tflops"] else None
        r["config"] = cfg.name
    del inp, ref
    _free_cuda()
    record = {"config": cfg.name, "params": cfg.params(), "rows": rows}
    if check_skipped:
        record["check_skipped"] = check_skipped
    return record


# --------------------------------------------------------------------------------------------
# Output: tables, JSON, plot
# --------------------------------------------------------------------------------------------

def format_table(headers, rows):
    """Plain-text table: first and last columns left-aligned, the numbers right-aligned."""
    cells = [[("" if c is None else str(c)) for c in row] for row in [headers] + list(rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    last = len(headers) - 1

    def line(vals):
        return "  ".join(v.ljust(w) if i in (0, last) else v.rjust(w)
                         for i, (v, w) in enumerate(zip(vals, widths))).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [line(r) for r in cells[1:]])


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def config_table(record, with_check=False):
    headers = ["method", "median ms", "TFLOP/s", "vs torch", "vs FA4", "host us", "GPU-only TF/s",
               "graph host us"]
    if with_check:
        headers.append("rel err")
    headers.append("note / error")
    rows = []
    for r in record["rows"]:
        row = [r["method"], _fmt(r["median_ms"], ".3f"), _fmt(r["tflops"], ".1f"),
               _fmt(r.get("ratio_vs_torch_varlen"), ".2f"), _fmt(r.get("ratio_vs_fa4"), ".2f"),
               _fmt(r.get("host_us"), ".1f"), _fmt(r.get("gpu_tflops"), ".1f"),
               _fmt(r.get("graph_host_us"), ".1f")]
        if with_check:
            row.append(_fmt(r.get("check_rel_err"), ".2e"))
        text = f"UNAVAILABLE: {r['error']}" if r["error"] else r.get("note", "")
        row.append(text if len(text) <= 90 else text[:87] + "...")
        rows.append(row)
    return format_table(headers, rows)


def summary_table(records, key="tflops"):
    """TFLOP/s per config of ours, FA4 and torch's varlen_attn, and their ratios. ``key``:
    "tflops" (as called eagerly, host included where it shows) or "gpu_tflops" (host hidden)."""
    headers = ["config", "cupy_varlen", "kernel", "FA4", "torch", "vs FA4", "vs torch",
               "det vs FA4", "sm80 vs torch", "compile s"]
    rows = []
    for rec in records:
        by = {r["method"]: r for r in rec["rows"]}
        cv = by.get("cupy_varlen", {})

        def tf(method):
            return by.get(method, {}).get(key)

        def ratio(method, other):
            return tf(method) / tf(other) if tf(method) and tf(other) else None

        compile_s = cv.get("compile_s")
        mark = "" if cv.get("compile_measured_in") in (None, rec["config"]) else "*"
        rows.append([rec["config"], _fmt(tf("cupy_varlen"), ".1f"),
                     cv.get("note", "").replace(" kernel", ""), _fmt(tf("fa4"), ".1f"),
                     _fmt(tf("torch_varlen"), ".1f"), _fmt(ratio("cupy_varlen", "fa4"), ".2f"),
                     _fmt(ratio("cupy_varlen", "torch_varlen"), ".2f"),
                     _fmt(ratio("cupy_varlen_det", "fa4"), ".2f"),
                     _fmt(ratio("cupy_varlen_sm80", "torch_varlen"), ".2f"),
                     _fmt(compile_s, ".2f") + mark])
    return format_table(headers, rows) + \
        "\n(* compile time measured in an earlier config with the same dtype/head dim/mask)"


def summary_report(records) -> str:
    """The two summary tables: as called eagerly, and with the host hidden."""
    return ("eager (each call timed as called; a host slower than the GPU shows):\n"
            + summary_table(records) + "\n\nhost hidden (calls queued behind a sleep kernel):\n"
            + summary_table(records, "gpu_tflops"))


def environment_info():
    import torch

    import cupy
    import cupy_varlen

    major, minor = torch.cuda.get_device_capability()
    info = {
        "device": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cupy": cupy.__version__,
        "cupy_varlen": cupy_varlen.__version__,
        "python": sys.version.split()[0],
    }
    for key, get in (("cuda_driver", cupy.cuda.runtime.driverGetVersion),
                     ("cupy_cuda_runtime", cupy.cuda.runtime.runtimeGetVersion),
                     ("nvrtc", cupy.cuda.nvrtc.getVersion)):
        try:
            info[key] = get()
        except Exception as exc:  # noqa: BLE001
            info[key] = f"unavailable: {exc!r}"
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        info["cudnn"] = None
    return info


def slugify(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_path(device_name, now):
    return RESULTS_DIR / f"{slugify(device_name)}_{now:%Y-%m-%d_%H%M}.json"


def write_json(payload, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def output_paths(main_path, name):
    """The main path plus $OUT/<name> when $OUT is set."""
    paths = [Path(main_path)]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / name)
    return paths


def plot_results(payload, png_paths):
    """Grouped horizontal bars: useful TFLOP/s per method (colour) per config (row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    records = payload["results"]
    methods = [m for m in METHODS if any(r["method"] == m for rec in records for r in rec["rows"])]
    n_cfg, n_m = len(records), max(1, len(methods))
    bar_h = 0.8 / n_m
    fig, ax = plt.subplots(figsize=(10, 1.6 + n_cfg * (0.12 * n_m + 0.15)))
    colors = plt.get_cmap("tab10")
    vmax = max([r["tflops"] or 0 for rec in records for r in rec["rows"]] + [1e-9])
    for mi, method in enumerate(methods):
        for ci, rec in enumerate(records):
            row = next((r for r in rec["rows"] if r["method"] == method), None)
            if row is None:
                continue
            y = ci + (mi - (n_m - 1) / 2) * bar_h
            if row.get("tflops"):
                ax.barh(y, row["tflops"], height=bar_h * 0.9, color=colors(mi),
                        hatch=None if row.get("exact", True) else "///", edgecolor="white")
                ax.text(row["tflops"] + vmax * 0.005, y, f"{row['tflops']:.0f}", va="center",
                        fontsize=6)
            else:
                ax.text(vmax * 0.005, y, "n/a", va="center", fontsize=6, color="gray")
    ax.set_yticks(range(n_cfg))
    ax.set_yticklabels([rec["config"] for rec in records])
    ax.set_ylim(n_cfg - 0.5, -0.5)
    ax.set_xlabel("useful TFLOP/s = 4 * allowed pairs * H * D / median time"
                  "   (hatched: padded, unmasked upper bound)")
    ax.set_xlim(0, vmax * 1.08)
    ax.grid(axis="x", alpha=0.3)
    env = payload.get("environment", {})
    date = payload.get("date", "")[:16].replace("T", " ")
    ax.set_title(f"varlen attention forward ({payload.get('dtype', '')}) on "
                 f"{env.get('device', '?')}, {date}", pad=24)
    handles = [Patch(color=colors(mi), label=m) for mi, m in enumerate(methods)]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=n_m,
              fontsize=8, frameon=False)
    save_figure(fig, png_paths)


def plot_beside(plot, payload, out_path, name) -> None:
    """``plot(payload, png_paths)`` into a PNG beside the JSON at ``out_path`` (and $OUT/name): a
    failed plot is reported, not raised, since the numbers are saved already."""
    try:
        plot(payload, output_paths(Path(out_path).with_suffix(".png"), name))
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc!r}", flush=True)


def save_figure(fig, png_paths) -> None:
    """Lays out, writes to every path (directories made) and closes a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    for p in png_paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=150)
        print(f"plot written to {p}", flush=True)
    plt.close(fig)


def print_report(payload):
    with_check = bool(payload.get("args", {}).get("check"))
    for rec in payload["results"]:
        print(f"\n--- {rec['config']} ---")
        print(config_table(rec, with_check))
        if rec.get("check_skipped"):
            print(f"(check skipped: {rec['check_skipped']})")
    print("\n=== summary ===")
    print(summary_report(payload["results"]), flush=True)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    names = ", ".join(grid_configs())
    ap = argparse.ArgumentParser(
        description="Benchmark cupy_varlen.varlen_attn against torch varlen / SDPA / flex "
                    "(forward, useful TFLOP/s = 4 * allowed pairs * H * D / median time).",
        epilog=f"Configs: {names}. A base name (e.g. skewed_d128) selects both flavours.")
    ap.add_argument("--grid", action="store_true", help="run every config of the grid")
    ap.add_argument("--configs", nargs="+", metavar="NAME", help="run these configs")
    ap.add_argument("--list", action="store_true", help="list the configs and exit")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--runs", type=int, default=100, help="timed calls per method (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (min 5 advised)")
    ap.add_argument("--host-calls", type=int, default=200,
                    help="calls for the host overhead median (cupy_varlen, fa4, torch_varlen); "
                         "0: off")
    ap.add_argument("--timer", choices=("do_bench", "events"), default="do_bench",
                    help="do_bench: triton's median with the L2 flushed before each call (how "
                         "the peers' numbers are taken); events: per-call event pairs, L2 warm")
    ap.add_argument("--gpu-calls", type=int, default=20,
                    help="calls queued behind a sleep kernel for the host-hidden GPU time; 0: off")
    ap.add_argument("--graph", action="store_true",
                    help="also capture each call (cupy_varlen, fa4, torch_varlen) in a CUDA graph "
                         "and time its replay: host us per replay and GPU ms")
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    default=[m for m in METHODS if m not in OPT_IN_METHODS])
    ap.add_argument("--require", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                    help="methods that must run: stop with exit status 2 after the first config "
                         "where one is unavailable or fails (a comparison run must not go on "
                         "without its peer)")
    ap.add_argument("--pass", dest="pass_", choices=tuple(PASSES), default="fwd",
                    help="time the forward, the backward, or both (FLOPs 1x, 2.5x, 3.5x)")
    ap.add_argument("--check", action="store_true",
                    help=f"relative error vs the float64 reference (configs <= "
                         f"{CHECK_MAX_TOKENS} tokens)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the lengths and the data")
    ap.add_argument("--flex-compile-limit", type=float, default=60.0, metavar="S",
                    help="mark flex unavailable when its first (compiling) call exceeds S "
                         "seconds; 0: no limit")
    add_output_args(ap, "<device>_<date>_<HHMM>.json")
    args = ap.parse_args(argv)
    # cupy_varlen first: compile timing.
    order_methods(ap, args, METHODS)
    return args


def add_output_args(ap, default_name: str) -> None:
    """--out, --plot and --from-json, as every benchmark here takes them."""
    ap.add_argument("--out", type=Path, help=f"JSON path (default benchmarks/results/"
                                             f"{default_name})")
    ap.add_argument("--plot", action="store_true", help="also save a PNG bar chart")
    ap.add_argument("--from-json", type=Path, metavar="PATH",
                    help="no benchmarking: print the tables of a saved JSON (and --plot it)")


def order_methods(ap, args, methods) -> None:
    """--methods in ``methods``' order; every --require among them."""
    args.methods = [m for m in methods if m in args.methods]
    missing = [m for m in args.require if m not in args.methods]
    if missing:
        ap.error(f"--require {' '.join(missing)}: not among --methods")


def required_failures(record, required) -> list:
    """(method, error) of each required method that did not run in a config's record."""
    return [(r["method"], r["error"]) for r in record["rows"]
            if r["method"] in required and r["error"]]


def _selected(args):
    grid = grid_configs(args.seed)
    if args.configs:
        return select_configs(args.configs, grid)
    if args.grid:
        return list(grid.values())
    return [grid["seed_full"]]


def _report_from_json(args):
    payload = json.loads(Path(args.from_json).read_text())
    print_report(payload)
    if args.plot:
        plot_results(payload, [Path(args.from_json).with_suffix(".png")])


def _warm_up_runtime():
    """One-time CUDA / CuPy / NVRTC initialization, kept out of the compile-time measurement."""
    import torch

    import cupy

    torch.zeros(1, device="cuda")
    cupy.zeros(1)
    cupy.cuda.nvrtc.getVersion()
    torch.cuda.synchronize()


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        for cfg in grid_configs(args.seed).values():
            p = cfg.params()
            print(f"{cfg.name:<22} B={p['batch']:<4} T={p['total_q']:<7} max={p['max_seqlen_q']:<5}"
                  f" H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim} "
                  f"GFLOP={p['useful_flops'] / 1e9:.1f}")
        return
    if args.from_json:
        _report_from_json(args)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_varlen: needs a CUDA GPU (torch.cuda.is_available() is False)")
    configs = _selected(args)
    _warm_up_runtime()
    now = datetime.datetime.now().astimezone()
    env = environment_info()
    out_path = args.out or default_out_path(env["device"], now)
    payload = {
        "benchmark": "bench_varlen", "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "environment": env, "dtype": args.dtype,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pass": args.pass_,
        "flops_definition": f"{PASSES[args.pass_]} x 4 * sum_b allowed(query, key) pairs * H * D",
        "timing": ("median of triton do_bench (L2 flushed before each call)" if args.timer ==
                   "do_bench" else "median of per-call CUDA event pairs after warm-up; inputs "
                   "reused (L2 not flushed)")
                  + "; host_us = median perf_counter around the call, issued behind a sleep "
                  "kernel so that no call waits for the GPU; gpu_ms = calls queued back to back "
                  "behind a sleep kernel (host hidden); graph_host_us / graph_ms = the same for "
                  "the replay of the call captured in a CUDA graph (--graph)",
        "results": [],
    }
    print(f"device: {env['device']} (sm {env['compute_capability']}), torch {env['torch']}, "
          f"cupy {env['cupy']}, cupy_varlen {env['cupy_varlen']}; dtype {args.dtype}; "
          f"methods {', '.join(args.methods)}", flush=True)
    compile_cache = {}
    for cfg in configs:
        record = run_config(cfg, args, compile_cache)
        payload["results"].append(record)
        print(config_table(record, args.check), flush=True)
        for path in output_paths(out_path, "bench.json"):
            write_json(payload, path)
        failed = required_failures(record, args.require)
        if failed:
            print(f"bench_varlen: required method(s) did not run on {cfg.name}: "
                  + "; ".join(f"{m}: {e}" for m, e in failed), file=sys.stderr, flush=True)
            raise SystemExit(2)
    print("\n=== summary ===")
    print(summary_report(payload["results"]), flush=True)
    for path in output_paths(out_path, "bench.json"):
        print(f"results written to {path}", flush=True)
    if args.plot:
        plot_beside(plot_results, payload, out_path, "bench.png")


if __name__ == "__main__":
    main()
