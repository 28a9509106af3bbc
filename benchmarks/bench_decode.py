"""Decode benchmark: one query token per sequence against a KV cache, contiguous or paged, for
cupy_varlen.varlen_attn beside FlashAttention-4 and PyTorch's varlen_attn.

What is counted
---------------
Decode reads the cache once and computes little, so the score is bandwidth, not FLOP/s.
Bytes = the K/V rows actually attended, sum_b seqused_k[b] * H_kv * D * 2 tensors * 2 bytes (bf16),
plus q and out (B * H * D * 2 bytes each). Slot tails past seqused_k, unused pages, cu_seqlens,
seqused_k and the page table are not counted: a kernel that reads them pays for them in time.
TB/s = bytes / median time (1 TB = 1e12 bytes). Beside it, every run measures the device's copy
bandwidth: a device-to-device ``Tensor.copy_`` of a 2 GiB buffer, read + write bytes counted, timed
the same way; "of copy" is a method's TB/s over that figure, a practical ceiling.

Time = triton ``do_bench``'s median with the L2 flushed before every call (``--timer do_bench``,
the default: a small cache would otherwise be read from L2, not HBM), or the median of per-call
CUDA event pairs with inputs reused (``--timer events``), both from bench_varlen. Host overhead
(``host us``) = median wall time of the Python call with the GPU kept busy; ``GPU-only TB/s`` uses
calls queued behind a sleep kernel, so no call waits for the host (what a decode loop under CUDA
graphs sees); ``--graph`` adds the replay of the call captured in a CUDA graph. FA4's first call
(it compiles) happens before the timing and is kept as ``first_call_s``.

Configs: bf16, D 128, causal (bottom-right: the one query sees every used key), GQA 32/8 and 64/8,
batch B in {1, 8, 64, 256} x context in {1k, 8k, 32k}, plus B 1 x 128k; every sequence of a config
has the same context. Names: ``b64_ctx8k_gqa32_8``; ``b64_ctx8k`` selects both GQA shapes. Chunked
prefill (``b8_ctx32k_chunk512_gqa32_8``): each sequence's last ``chunk`` tokens are the queries
(B 8 x 8k and 32k with chunks of 512, B 1 x 32k with 2048), against the same cache contiguous and
paged; their rows add TFLOP/s (useful FLOPs of the causal chunk) to the TB/s (q and out counted per
query row).

Layouts (same q, same logical K/V, same process)
------------------------------------------------
contiguous  packed (sum of slots, H_kv, D) K and V; sequence b's slot (cu_seqlens_k) is the
            smallest multiple of 256 above its context (room for the token being decoded, as a
            cache handed out in pages has), seqused_k[b] = the context.
paged P     pools (num_pages, P, H_kv, D); the int32 (B, max_pages) page table gives each
            sequence its pages from a random permutation of the pool, which also holds a few pages
            no sequence uses, so the kernels read scattered pages as in a serving engine's cache;
            cu_seqlens_k None, seqused_k set. One pool per ``--page-sizes`` entry (16 and 256).

Methods
-------
cupy_varlen         cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, q_len, max_k, causal=True,
                    seqused_k=...) on the contiguous cache.
cupy_varlen_paged   the same call with block_table= on the paged pools, where varlen_attn takes it
                    (read from its signature); until then a row "block_table not supported yet".
fa4 / fa4_paged     flash_attn.cute.flash_attn_varlen_func with cu_seqlens_k + seqused_k, and with
                    page_table + seqused_k (cu_seqlens_k None, as it requires). num_splits is left
                    at its default 1: on Hopper FA4 asserts that split-KV is not supported.
torch_varlen / torch_varlen_paged
                    torch.nn.attention.varlen.varlen_attn with seqused_k (and block_table), causal
                    and enable_gqa, where this torch's signature has them, else a row naming what
                    this torch lacks. The note names the torch version and the path that ran
                    (aten._flash_attention_forward with the active flash impl, or cuDNN). Its
                    paged form gets cu_seq_k = offsets of seqused_k. Upstream FlashAttention-2
                    takes only pages of a multiple of 256 rows; where torch's copy does too, the
                    P = 16 row carries its error.

``--check`` compares each output with the float64 reference (cupy_varlen.reference, seqused_k or
block_table) for configs whose cache holds at most 300,000 keys (CHECK_MAX_KEYS: every B 1 and B 8
decode config, and B 64 at 1k) and whose float64 score matrix per sequence stays under
CHECK_MAX_SCORES (the chunked prefill configs exceed it: the test suite checks that path), and
records how far the paged layouts' reference is from the contiguous one (0 up to rounding: the
layouts hold the same keys).

How to run
----------
    python benchmarks/bench_decode.py                               # the whole grid
    python benchmarks/bench_decode.py --configs b64_ctx8k b1_ctx128k_gqa32_8 --check
    python benchmarks/bench_decode.py --methods cupy_varlen fa4 fa4_paged --require fa4
    python benchmarks/bench_decode.py --list                        # configs and bytes, no GPU
    python benchmarks/bench_decode.py --device cpu --configs b1_ctx1k --check   # dry run, no GPU
    python benchmarks/bench_decode.py --from-json benchmarks/results/X_decode.json --plot

``--device cpu`` builds both layouts on the host, prepares every method (so unavailable ones say
why) and times nothing. Results go to benchmarks/results/<device>_<date>_<time>_decode.json
(``--out``), and to $OUT/bench_decode.json when $OUT is set, rewritten after every config;
``--plot`` adds a PNG beside them (matplotlib is imported only then).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

# Run from a source checkout: bench_varlen.py sits beside this file and puts the package (one level
# up) on the path.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_varlen as bv  # noqa: E402

METHODS = ("cupy_varlen", "cupy_varlen_paged", "fa4", "fa4_paged", "torch_varlen",
           "torch_varlen_paged")
PAGED_METHODS = tuple(m for m in METHODS if m.endswith("_paged"))
DTYPE = "bf16"
ELEM_BYTES = 2
HEAD_DIM = 128
BATCHES = (1, 8, 64, 256)
CONTEXTS = (1024, 8192, 32768)
LONG_CONTEXT = (1, 131072)  # (batch, context)
GQA = ((32, 8), (64, 8))
# Chunked prefill: (batch, context, chunk) where each sequence's last ``chunk`` tokens are the
# queries (a prompt fed in pieces against its cache so far), against the same cache contiguous
# and paged.
CHUNKED = ((8, 8192, 512), (8, 32768, 512), (1, 32768, 2048))
SLOT_MULTIPLE = 256  # the largest default page size
PAGE_SIZES = (16, 256)
MIN_SPARE_PAGES = 2
SPARE_PAGE_DIVISOR = 32  # spare pages: about 3 % of the used ones
COPY_BYTES = 1 << 31  # far past the L2, so the copy streams from and to HBM
CHECK_MAX_KEYS = 300_000  # the float64 reference holds K and V of the whole cache
CHECK_MAX_SCORES = 50_000_000  # ... and one sequence's (H, q_len, keys) scores, a few copies
JSON_NAME = "bench_decode.json"


# --------------------------------------------------------------------------------------------
# Configs, cache geometry and bytes (pure Python, no GPU)
# --------------------------------------------------------------------------------------------

def slot_length(used, multiple=SLOT_MULTIPLE):
    """The contiguous cache's slot for a sequence of ``used`` keys: the smallest multiple of
    ``multiple`` above it, so every slot has a tail past seqused_k."""
    return (int(used) // multiple + 1) * multiple


def attended_bytes(used, heads, heads_kv, head_dim, elem_bytes=ELEM_BYTES, q_len=1):
    """Bytes a step must move: the used K and V rows, and q and out (``q_len`` rows of H heads per
    sequence). Returns {"kv", "q_out", "total"}."""
    kv = sum(int(n) for n in used) * heads_kv * head_dim * 2 * elem_bytes
    q_out = 2 * len(used) * q_len * heads * head_dim * elem_bytes
    return {"kv": kv, "q_out": q_out, "total": kv + q_out}


def causal_flops(used, q_len, heads, head_dim):
    """Useful FLOPs of ``q_len`` queries at the end of each sequence, causal (bottom-right): row i
    sees used - q_len + i + 1 keys; 4 FLOPs per (query, key, head, dim) for the two GEMMs."""
    pairs = sum(q_len * int(n) - q_len * (q_len - 1) // 2 for n in used)
    return 4 * pairs * heads * head_dim


def tb_per_s(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e12 if ms else None


def _ctx_name(context):
    return f"{context // 1024}k"


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    name: str
    batch: int
    context: int
    heads: int
    heads_kv: int
    head_dim: int = HEAD_DIM
    q_len: int = 1  # queries per sequence: 1 decodes, more is a chunk of prefill

    @property
    def used(self):
        return [self.context] * self.batch

    @property
    def slots(self):
        return [slot_length(n) for n in self.used]

    @property
    def cache_keys(self):
        return sum(self.slots)

    def bytes(self):
        return attended_bytes(self.used, self.heads, self.heads_kv, self.head_dim,
                              q_len=self.q_len)

    def flops(self):
        return causal_flops(self.used, self.q_len, self.heads, self.head_dim)

    def params(self):
        return {"batch": self.batch, "context": self.context, "q_len": self.q_len,
                "heads": self.heads, "heads_kv": self.heads_kv, "head_dim": self.head_dim,
                "causal": True, "dtype": DTYPE, "slot": self.slots[0],
                "cache_keys": self.cache_keys, "bytes": self.bytes(), "flops": self.flops()}


def grid_configs():
    """All named configs, in run order: {name: DecodeConfig}."""
    shapes = [(b, c) for b in BATCHES for c in CONTEXTS] + [LONG_CONTEXT]
    configs = [DecodeConfig(f"b{b}_ctx{_ctx_name(c)}_gqa{h}_{hkv}", b, c, h, hkv)
               for b, c in shapes for h, hkv in GQA]
    configs += [DecodeConfig(f"b{b}_ctx{_ctx_name(c)}_chunk{n}_gqa{h}_{hkv}", b, c, h, hkv,
                             q_len=n) for b, c, n in CHUNKED for h, hkv in GQA]
    return {c.name: c for c in configs}


def page_table_layout(used, page_size, seed=0):
    """The paged cache's geometry: (table, num_pages). Sequence b needs ceil(used[b] / page_size)
    pages; they are drawn in order from a seeded random permutation of a pool that holds
    max(MIN_SPARE_PAGES, needed / SPARE_PAGE_DIVISOR) pages more than all sequences need, so pages
    are scattered and some are never used. ``table`` is int32 (B, max needed, at least 1); entries
    past a sequence's pages are 0, a valid page that is never read."""
    needed = [-(-int(n) // page_size) for n in used]
    total = sum(needed)
    num_pages = total + max(MIN_SPARE_PAGES, total // SPARE_PAGE_DIVISOR)
    perm = np.random.default_rng([seed, page_size]).permutation(num_pages).astype(np.int32)
    table = np.zeros((len(used), max(needed + [1])), dtype=np.int32)
    start = 0
    for b, n in enumerate(needed):
        table[b, :n] = perm[start:start + n]
        start += n
    return table, num_pages


# --------------------------------------------------------------------------------------------
# Inputs: the contiguous cache, and paged pools holding the same keys
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DecodeInputs:
    cfg: DecodeConfig
    q: object            # (B, H, D)
    k: object            # contiguous (sum of slots, H_kv, D), or a pool (num_pages, P, H_kv, D)
    v: object
    cu_q: object         # (B + 1,) int32: 0, q_len, ..., B * q_len
    cu_k: object         # (B + 1,) int32 slot offsets; None for the paged layout
    seqused_k: object    # (B,) int32
    block_table: object = None
    page_size: int = None

    @property
    def layout(self):
        return "contiguous" if self.block_table is None else f"paged {self.page_size}"

    @property
    def max_k(self):
        """max_seqlen_k: the longest slot of cu_seqlens_k, or the longest used length when the
        keys come through a page table."""
        return max(self.cfg.slots if self.block_table is None else self.cfg.used)


def make_contiguous_inputs(cfg, seed=0, device="cuda"):
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    dt = bv.torch_dtype(DTYPE)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)

    def int32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    total = cfg.cache_keys
    return DecodeInputs(cfg, q=randn(cfg.batch * cfg.q_len, cfg.heads, cfg.head_dim),
                        k=randn(total, cfg.heads_kv, cfg.head_dim),
                        v=randn(total, cfg.heads_kv, cfg.head_dim),
                        cu_q=int32(list(range(0, cfg.batch * cfg.q_len + 1, cfg.q_len))),
                        cu_k=int32(bv.cu_seqlens_list(cfg.slots)), seqused_k=int32(cfg.used))


def make_paged_inputs(contiguous, page_size, seed=0, chunk_rows=1 << 20):
    """Pools of ``page_size``-row pages holding the used keys and values of ``contiguous``, placed
    by page_table_layout; q, cu_q and seqused_k are shared. The rest of the pool is zeros (finite:
    FA4 loads whole pages by TMA and multiplies page tails by P = 0). Copied ``chunk_rows`` rows at
    a time, so no temporary as large as the cache is needed."""
    import torch

    cfg = contiguous.cfg
    device = contiguous.k.device
    table_np, num_pages = page_table_layout(cfg.used, page_size, seed)
    table = torch.from_numpy(table_np).to(device)
    batch, pos = bv.pad_index(cfg.used, device)
    slot_start = torch.tensor(bv.cu_seqlens_list(cfg.slots)[:-1], dtype=torch.int64,
                              device=device)
    src = slot_start[batch] + pos
    dst = table[batch, pos // page_size].to(torch.int64) * page_size + pos % page_size
    pools = []
    for x in (contiguous.k, contiguous.v):
        pool = x.new_zeros(num_pages, page_size, cfg.heads_kv, cfg.head_dim)
        rows = pool.view(-1, cfg.heads_kv, cfg.head_dim)
        for start in range(0, src.numel(), chunk_rows):
            stop = start + chunk_rows
            rows[dst[start:stop]] = x[src[start:stop]]
        pools.append(pool)
    return dataclasses.replace(contiguous, k=pools[0], v=pools[1], cu_k=None, block_table=table,
                               page_size=page_size)


# --------------------------------------------------------------------------------------------
# Methods: one prepare function per library serves both layouts
# --------------------------------------------------------------------------------------------

def _cupy_plan_note(q, k, v, cu_q, cu_k, max_q, max_k, used, block_table):
    """What the launch plan of the call below runs (after one call has made it)."""
    from cupy_varlen import _api, _launch

    key = _api._forward_key(q, k, v, cu_q, cu_k, None, max_q, max_k, True, None, (-1, -1), False,
                            False, False, used, block_table)
    plan = None if key is None else _api._forward_plans.get(key[0])
    if plan is None or plan.launch is None:
        return ""
    gather = ", paged gather" if block_table is not None else ""
    launch = plan.launch
    if isinstance(launch, _launch.DecodeLaunch):
        return f"decode tiles ({launch.spec.kernel} family{gather}), {launch.splits} split(s)"
    return f"{launch.spec.kernel} kernel{gather}"


def prepare_cupy_varlen(inp):
    import cupy_varlen

    kwargs = {}
    if inp.block_table is not None:
        if "block_table" not in inspect.signature(cupy_varlen.varlen_attn).parameters:
            raise bv.Unavailable("block_table not supported yet")
        kwargs["block_table"] = inp.block_table
    q, k, v, cu_q, cu_k, used, max_k = (inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, inp.seqused_k,
                                        inp.max_k)
    max_q = inp.cfg.q_len

    def fn():
        return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                       seqused_k=used, **kwargs)

    note = ""
    if q.is_cuda:
        fn()  # makes the launch plan the note describes
        note = _cupy_plan_note(q, k, v, cu_q, cu_k, max_q, max_k, used,
                               kwargs.get("block_table"))
    return bv.Prepared(fn, unpack=lambda out: out, note=note)


def _package_version(dist):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "version unknown"


def prepare_fa4(inp):
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        raise bv.Unavailable(f"flash_attn.cute not importable: {exc!r}") from exc
    kwargs = dict(cu_seqlens_q=inp.cu_q, max_seqlen_q=inp.cfg.q_len, max_seqlen_k=inp.max_k,
                  seqused_k=inp.seqused_k, causal=True)
    if inp.block_table is None:
        kwargs["cu_seqlens_k"] = inp.cu_k
    else:
        kwargs["page_table"] = inp.block_table  # with cu_seqlens_k None, as FA4 asserts
    q, k, v = inp.q, inp.k, inp.v

    def fn():
        return flash_attn_varlen_func(q, k, v, **kwargs)

    first_call_s = None
    if q.is_cuda:  # the first call compiles (seconds): outside the timing
        import torch

        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - t0
    return bv.Prepared(fn, unpack=lambda out: out[0], first_call_s=first_call_s,
                       note=f"flash_attn.cute (flash-attn-4 {_package_version('flash-attn-4')})")


def torch_varlen_path(q):
    """Which kernel torch's varlen_attn reaches: cuDNN where its private chooser says so, else
    aten._flash_attention_forward with the flash implementation activated in torch (None: the
    built-in FlashAttention-2)."""
    import torch.nn.attention as attention
    from torch.nn.attention import varlen

    use_cudnn = getattr(varlen, "_should_use_cudnn", None)
    if use_cudnn is not None and q.is_cuda and use_cudnn(q.device.index or 0):
        return "cuDNN attention"
    impl = getattr(attention, "current_flash_attention_impl", lambda: None)()
    return f"aten._flash_attention_forward ({impl or 'built-in FlashAttention-2'})"


def prepare_torch_varlen(inp):
    import torch

    varlen_attn = bv._torch_varlen_fn()
    params = inspect.signature(varlen_attn).parameters
    wanted = ["seqused_k", "enable_gqa"] + (["block_table"] if inp.block_table is not None else [])
    missing = [name for name in wanted if name not in params]
    if missing:
        raise bv.Unavailable(f"torch {torch.__version__}: varlen_attn has no "
                             f"{', '.join(missing)}")
    kwargs = {"seqused_k": inp.seqused_k, "enable_gqa": inp.cfg.heads_kv < inp.cfg.heads}
    kwargs.update({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})
    cu_k = inp.cu_k
    if inp.block_table is not None:
        kwargs["block_table"] = inp.block_table
        # Offsets of the used lengths rather than None: the varlen flash path is entered with
        # cu_seq_k set, and these give the same lengths as seqused_k, whichever one the kernel
        # reads beside the block table.
        cu_k = torch.tensor(bv.cu_seqlens_list(inp.cfg.used), dtype=torch.int32,
                            device=inp.q.device)
    q, k, v, cu_q, max_q, max_k = inp.q, inp.k, inp.v, inp.cu_q, inp.cfg.q_len, inp.max_k

    def fn():
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    shown = [name if name in ("seqused_k", "block_table") else f"{name}={value}"
             for name, value in kwargs.items()]
    note = f"torch {torch.__version__} varlen_attn({', '.join(shown)}) -> {torch_varlen_path(q)}"
    return bv.Prepared(fn, unpack=lambda out: out, note=note)


PREPARE = {
    "cupy_varlen": prepare_cupy_varlen,
    "cupy_varlen_paged": prepare_cupy_varlen,
    "fa4": prepare_fa4,
    "fa4_paged": prepare_fa4,
    "torch_varlen": prepare_torch_varlen,
    "torch_varlen_paged": prepare_torch_varlen,
}


# --------------------------------------------------------------------------------------------
# Timing and running one config
# --------------------------------------------------------------------------------------------

def timer(args):
    if args.timer == "do_bench":
        return bv.time_do_bench
    return lambda fn, runs, warmup: dict(bv.time_cuda(fn, runs, warmup), timer="events")


def measure(fn, args):
    """Median time (the chosen timer), host µs, host-hidden GPU ms and, with --graph, the CUDA
    graph replay's host µs and GPU ms of one prepared call."""
    out = dict(timer(args)(fn, args.runs, args.warmup))
    if args.host_calls > 0:
        out["host_us"] = bv.host_overhead_us(fn, args.host_calls)
    if args.gpu_calls > 0:
        out["gpu_ms"] = bv.gpu_time_ms(fn, args.gpu_calls, out.get("host_us") or 100.0)
    if args.graph:
        try:
            replay = bv.graph_replay(fn)
            out["graph_host_us"] = bv.host_overhead_us(replay, max(args.host_calls, 10))
            out["graph_ms"] = bv.gpu_time_ms(replay, max(args.gpu_calls, 10),
                                             out["graph_host_us"])
        except Exception as exc:  # noqa: BLE001 - not capturable: say so, keep the row
            out["graph_error"] = bv._error_text(exc)
    return out


def measure_copy_bandwidth(args, nbytes=COPY_BYTES):
    """The device's copy bandwidth in this run: dst.copy_(src) of ``nbytes``, read + write
    counted, timed like the methods."""
    import torch

    def timed():  # the buffers are freed on return
        src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return dict(timer(args)(lambda: dst.copy_(src), args.runs, args.warmup))

    result = timed()
    bv._free_cuda()
    result.update(buffer_bytes=nbytes, counted_bytes=2 * nbytes,
                  tb_s=tb_per_s(2 * nbytes, result["median_ms"]),
                  how="torch Tensor.copy_ device to device; read + write bytes counted")
    return result


def run_method(method, inp, args, ref=None):
    """One method on one layout; never raises (failures become the row's error). On a CPU dry
    run the method is prepared (so an unavailable one says why) and not called."""
    import torch

    row = {"method": method, "layout": inp.layout, "page_size": inp.page_size,
           "median_ms": None, "note": "", "error": None}
    prepared = None
    try:
        prepared = PREPARE[method](inp)
        row["note"] = prepared.note
        if prepared.first_call_s is not None:
            row["first_call_s"] = prepared.first_call_s
        if not inp.q.is_cuda:
            row["note"] = "; ".join(n for n in ("dry run: prepared, not timed", row["note"]) if n)
        else:
            row.update(measure(prepared.fn, args))
            if ref is not None:
                row["check_rel_err"] = bv.rel_error(prepared.unpack(prepared.fn()), ref)
    except Exception as exc:  # noqa: BLE001 - record and go on
        row["error"] = bv._error_text(exc)
    finally:
        del prepared
        if inp.q.is_cuda:
            try:
                torch.cuda.synchronize()
                bv._free_cuda()
            except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: keep the first message
                row["error"] = row["error"] or bv._error_text(exc)
    return row


def finalize_rows(rows, nbytes, copy_tb_s, flops=None):
    """TB/s from each time the row has, the median's fraction of the copy bandwidth, and (given
    the useful FLOPs, for chunked prefill) TFLOP/s of the median."""
    for r in rows:
        for ms_key, tb_key in (("median_ms", "tb_s"), ("gpu_ms", "gpu_tb_s"),
                               ("graph_ms", "graph_tb_s")):
            r[tb_key] = tb_per_s(nbytes, r.get(ms_key))
        r["copy_fraction"] = r["tb_s"] / copy_tb_s if r["tb_s"] and copy_tb_s else None
        if flops is not None:
            ms = r.get("median_ms")
            r["tflops"] = flops / (ms * 1e-3) / 1e12 if ms else None
    return rows


def reference_output(inp):
    from cupy_varlen.reference import varlen_attn_reference

    return varlen_attn_reference(inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k, causal=True,
                                 seqused_k=inp.seqused_k, block_table=inp.block_table)


def _print_row(row, seconds):
    status = row["error"] or (f"{row['median_ms']:.4f} ms" if row["median_ms"] else row["note"])
    print(f"  {row['method']:<19} {row['layout']:<10} {status[:140]}  ({seconds:.1f} s)",
          flush=True)


def run_config(cfg, args, copy):
    nbytes = cfg.bytes()
    print(f"\n=== {cfg.name}: B={cfg.batch} context={cfg.context} queries={cfg.q_len} "
          f"slot={cfg.slots[0]} "
          f"H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim} causal {DTYPE}; attended "
          f"{nbytes['total'] / 1e6:.1f} MB", flush=True)
    record = {"config": cfg.name, "params": cfg.params(), "rows": []}
    scores = cfg.q_len * cfg.heads * max(cfg.slots)  # one sequence's score matrix, float64
    check = args.check and cfg.cache_keys <= CHECK_MAX_KEYS and scores <= CHECK_MAX_SCORES
    if args.check and not check:
        record["check_skipped"] = (f"{cfg.cache_keys} cache keys (at most {CHECK_MAX_KEYS}), "
                                   f"{scores} scores a sequence (at most {CHECK_MAX_SCORES})")
    contiguous = make_contiguous_inputs(cfg, args.seed, args.device)
    base_ref = reference_output(contiguous) if check else None

    def run_methods(inp, methods, ref):
        for method in methods:
            t0 = time.perf_counter()
            row = run_method(method, inp, args, ref)
            _print_row(row, time.perf_counter() - t0)
            record["rows"].append(dict(row, config=cfg.name))

    run_methods(contiguous, [m for m in args.methods if m not in PAGED_METHODS], base_ref)
    paged_methods = [m for m in args.methods if m in PAGED_METHODS]
    for page_size in args.page_sizes if paged_methods else []:
        # One pool at a time beside the cache: K and V of the largest configs take 34 GB.
        paged = make_paged_inputs(contiguous, page_size, args.seed)
        ref = None
        if check:
            ref = reference_output(paged)
            record.setdefault("paged_reference_vs_contiguous", {})[paged.layout] = \
                bv.rel_error(ref, base_ref)
        run_methods(paged, paged_methods, ref)
        del paged, ref
        if args.device == "cuda":
            bv._free_cuda()
    del contiguous, base_ref
    finalize_rows(record["rows"], nbytes["total"], copy["tb_s"] if copy else None,
                  cfg.flops() if cfg.q_len > 1 else None)
    return record


# --------------------------------------------------------------------------------------------
# Output: tables, plot
# --------------------------------------------------------------------------------------------

def _label(row):
    return row["method"] if row["page_size"] is None else f"{row['method']}/{row['page_size']}"


def config_table(record, with_check=False):
    rows = record["rows"]
    graph = any(r.get("graph_tb_s") for r in rows)
    prefill = any("tflops" in r for r in rows)
    headers = (["method", "layout", "median ms", "TB/s", "of copy", "GPU-only TB/s", "host us"]
               + ["TFLOP/s"] * prefill + ["graph TB/s"] * graph + ["rel err"] * with_check
               + ["note / error"])
    table = []
    for r in rows:
        cells = [r["method"], r["layout"], bv._fmt(r["median_ms"], ".4f"),
                 bv._fmt(r.get("tb_s"), ".2f"), bv._fmt(r.get("copy_fraction"), ".0%"),
                 bv._fmt(r.get("gpu_tb_s"), ".2f"), bv._fmt(r.get("host_us"), ".1f")]
        cells += [bv._fmt(r.get("tflops"), ".1f")] * prefill
        cells += [bv._fmt(r.get("graph_tb_s"), ".2f")] * graph
        cells += [bv._fmt(r.get("check_rel_err"), ".2e")] * with_check
        text = f"UNAVAILABLE: {r['error']}" if r["error"] else r.get("note", "")
        table.append(cells + [text if len(text) <= 110 else text[:107] + "..."])
    return bv.format_table(headers, table)


def summary_table(records):
    """TB/s (and the fraction of the copy bandwidth) per config and method/layout."""
    labels = list(dict.fromkeys(_label(r) for rec in records for r in rec["rows"]))
    table = []
    for rec in records:
        by = {_label(r): r for r in rec["rows"]}
        cells = [rec["config"]]
        for label in labels:
            r = by.get(label, {})
            tb, frac = r.get("tb_s"), r.get("copy_fraction")
            cells.append("-" if tb is None else f"{tb:.2f}" + (f" ({frac:.0%})" if frac else ""))
        table.append(cells)
    return bv.format_table(["config"] + labels, table)


def copy_line(copy):
    if not copy:
        return "copy bandwidth: not measured"
    return (f"copy bandwidth: {copy['tb_s']:.2f} TB/s ({copy['buffer_bytes'] / 2**30:.0f} GiB "
            f"buffer, read + write counted, median {copy['median_ms']:.3f} ms)")


def record_report(record, with_check=False):
    """A config's table and what --check found about it."""
    lines = [config_table(record, with_check)]
    if record.get("check_skipped"):
        lines.append(f"(check skipped: {record['check_skipped']})")
    for layout, err in record.get("paged_reference_vs_contiguous", {}).items():
        lines.append(f"(reference, {layout} vs contiguous: rel diff {err:.1e})")
    return "\n".join(lines)


def summary_report(payload):
    return (f"\n{copy_line(payload.get('copy_bandwidth'))}\n"
            f"=== summary: TB/s (of copy bandwidth) ===\n{summary_table(payload['results'])}")


def print_report(payload):
    with_check = bool(payload.get("args", {}).get("check"))
    for rec in payload["results"]:
        print(f"\n--- {rec['config']} ({rec['params']['bytes']['total'] / 1e6:.1f} MB) ---")
        print(record_report(rec, with_check))
    print(summary_report(payload), flush=True)


def plot_results(payload, png_paths):
    """Horizontal bars: TB/s per method/layout (colour) per config (row); the copy bandwidth as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    records = payload["results"]
    labels = list(dict.fromkeys(_label(r) for rec in records for r in rec["rows"]))
    n_cfg, n_l = len(records), max(1, len(labels))
    bar_h = 0.8 / n_l
    fig, ax = plt.subplots(figsize=(12, 1.6 + n_cfg * (0.12 * n_l + 0.15)))
    colors = plt.get_cmap("tab10")
    copy = (payload.get("copy_bandwidth") or {}).get("tb_s")
    vmax = max([r.get("tb_s") or 0 for rec in records for r in rec["rows"]] + [copy or 0, 1e-9])
    for li, label in enumerate(labels):
        for ci, rec in enumerate(records):
            row = next((r for r in rec["rows"] if _label(r) == label), None)
            if row is None:
                continue
            y = ci + (li - (n_l - 1) / 2) * bar_h
            if row.get("tb_s"):
                ax.barh(y, row["tb_s"], height=bar_h * 0.9, color=colors(li % 10))
                ax.text(row["tb_s"] + vmax * 0.005, y, f"{row['tb_s']:.2f}", va="center",
                        fontsize=6)
            else:
                ax.text(vmax * 0.005, y, "n/a", va="center", fontsize=6, color="gray")
    if copy:
        ax.axvline(copy, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(n_cfg))
    ax.set_yticklabels([rec["config"] for rec in records])
    ax.set_ylim(n_cfg - 0.5, -0.5)
    ax.set_xlabel("TB/s = (used K/V + q + out bytes) / median time"
                  + (f"   (dashed: copy {copy:.2f} TB/s)" if copy else ""))
    ax.set_xlim(0, vmax * 1.08)
    ax.grid(axis="x", alpha=0.3)
    env = payload.get("environment", {})
    ax.set_title(f"decode attention ({DTYPE}, D{HEAD_DIM}, causal) on {env.get('device', '?')}, "
                 f"{payload.get('date', '')[:16].replace('T', ' ')}")
    handles = [Patch(color=colors(li % 10), label=label) for li, label in enumerate(labels)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              frameon=False)
    bv.save_figure(fig, png_paths)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Decode (one query per sequence) over a KV cache, contiguous and paged: "
                    "cupy_varlen against FA4 and torch varlen_attn in TB/s (used K/V + q + out "
                    "bytes / median time) beside the device's copy bandwidth.",
        epilog=f"Configs: {', '.join(grid_configs())}. A prefix (e.g. b64_ctx8k) selects both "
               f"GQA shapes.")
    ap.add_argument("--configs", nargs="+", metavar="NAME",
                    help="run these configs (default: all)")
    ap.add_argument("--list", action="store_true", help="list the configs and exit")
    ap.add_argument("--runs", type=int, default=100, help="timed calls per method (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first")
    ap.add_argument("--timer", choices=("do_bench", "events"), default="do_bench",
                    help="do_bench: triton's median with the L2 flushed before each call; "
                         "events: per-call event pairs, L2 warm")
    ap.add_argument("--host-calls", type=int, default=200,
                    help="calls for the host overhead median; 0: off")
    ap.add_argument("--gpu-calls", type=int, default=20,
                    help="calls queued behind a sleep kernel for the host-hidden GPU time; 0: off")
    ap.add_argument("--graph", action="store_true",
                    help="also time the replay of each call captured in a CUDA graph")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--require", nargs="+", choices=METHODS, default=[], metavar="METHOD",
                    help="methods that must run: stop with exit status 2 after the first config "
                         "where one is unavailable or fails (on any layout)")
    ap.add_argument("--page-sizes", nargs="+", type=int, default=list(PAGE_SIZES), metavar="P",
                    help="page sizes of the paged layouts (rows per page)")
    ap.add_argument("--check", action="store_true",
                    help=f"relative error vs the float64 reference (caches of <= "
                         f"{CHECK_MAX_KEYS} keys)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data and the page order")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: a dry run without a GPU: layouts built on the host, methods "
                         "prepared (unavailable ones say why), nothing timed")
    bv.add_output_args(ap, "<device>_<date>_<HHMM>_decode.json")
    args = ap.parse_args(argv)
    bv.order_methods(ap, args, METHODS)
    if any(p <= 0 for p in args.page_sizes):
        ap.error("--page-sizes: page sizes must be positive")
    return args


def list_configs():
    for cfg in grid_configs().values():
        b = cfg.bytes()
        print(f"{cfg.name:<30} B={cfg.batch:<4} context={cfg.context:<7} q={cfg.q_len:<5} "
              f"slot={cfg.slots[0]:<7} "
              f"H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim}  attended {b['total'] / 1e6:9.1f} MB "
              f"(K/V {b['kv'] / 1e6:.1f}, q+out {b['q_out'] / 1e6:.2f})")


def host_environment():
    """environment_info's fields that need no GPU, for the CPU dry run."""
    import torch

    import cupy_varlen

    info = {"device": "cpu (dry run)", "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cupy_varlen": cupy_varlen.__version__, "python": sys.version.split()[0]}
    try:
        import cupy

        info["cupy"] = cupy.__version__
    except Exception as exc:  # noqa: BLE001
        info["cupy"] = f"unavailable: {exc!r}"
    return info


def start_device(args):
    """(environment, copy bandwidth) of this run; the runtime is initialised first so that no
    measurement pays for it."""
    if args.device == "cpu":
        return host_environment(), None
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_decode: needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "--device cpu runs the harness without one")
    bv._warm_up_runtime()
    env = bv.environment_info()
    env["flash_attn_4"] = _package_version("flash-attn-4")
    copy = measure_copy_bandwidth(args)
    print(f"device: {env['device']} (sm {env['compute_capability']}), torch {env['torch']}, "
          f"cupy_varlen {env['cupy_varlen']}; {copy_line(copy)}", flush=True)
    return env, copy


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_configs()
        return
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        print_report(payload)
        if args.plot:
            plot_results(payload, [Path(args.from_json).with_suffix(".png")])
        return
    grid = grid_configs()
    configs = bv.select_configs(args.configs, grid) if args.configs else list(grid.values())
    env, copy = start_device(args)
    now = datetime.datetime.now().astimezone()
    default = bv.default_out_path(env["device"], now)
    out_path = args.out or default.with_name(default.stem + "_decode.json")
    payload = {
        "benchmark": "bench_decode", "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, sys.argv[0]]
                            + (sys.argv[1:] if argv is None else list(argv))),
        "environment": env, "dtype": DTYPE,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "bytes_definition": "sum_b seqused_k[b] * H_kv * D * 2 (K, V) * 2 B + q + out bytes; "
                            "TB/s = bytes / median time / 1e12",
        "timing": ("median of triton do_bench (L2 flushed before each call)"
                   if args.timer == "do_bench" else "median of per-call CUDA event pairs")
                  + "; host_us behind a sleep kernel; gpu_ms = calls queued behind a sleep "
                  "kernel (host hidden); graph_* = the call's CUDA graph replay (--graph)",
        "copy_bandwidth": copy,
        "results": [],
    }
    for cfg in configs:
        record = run_config(cfg, args, copy)
        payload["results"].append(record)
        print(record_report(record, args.check), flush=True)
        for path in bv.output_paths(out_path, JSON_NAME):
            bv.write_json(payload, path)
        failed = bv.required_failures(record, args.require)
        if failed:
            print(f"bench_decode: required method(s) did not run on {cfg.name}: "
                  + "; ".join(f"{m}: {e}" for m, e in failed), file=sys.stderr, flush=True)
            raise SystemExit(2)
    print(summary_report(payload), flush=True)
    for path in bv.output_paths(out_path, JSON_NAME):
        print(f"results written to {path}", flush=True)
    if args.plot:
        bv.plot_beside(plot_results, payload, out_path, "bench_decode.png")


if __name__ == "__main__":
    main()
