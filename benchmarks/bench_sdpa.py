"""Benchmark of dense SDPA ``(B, H, L, D)`` through torch with cupy_varlen as the flash-attention
implementation, against torch's own flash kernel (FlashAttention-2) and cuDNN's SDPA.

Every config holds B * L = ``--tokens`` tokens (16k by default) over L in 1k..16k, head dims 64 and
128 with H * D = ``--model-dim`` (2048: 32 heads of 64, 16 of 128), full and causal, forward and
backward, in one process:

cupy_varlen   F.scaled_dot_product_attention under SDPBackend.FLASH_ATTENTION with
              ``torch.nn.attention.activate_flash_attention_impl("cupy_varlen")`` in effect.
torch_flash   the same call with torch's default flash kernel (the provider restored).
cudnn         the same call under SDPBackend.CUDNN_ATTENTION.

q, k, v are laid out as models produce them (``--layout bshd``: a (B, L, H, D) tensor transposed,
the default) or as contiguous (B, H, L, D) tensors (``bhsd``); both reach our kernels without
copies. The backward pass times ``torch.autograd.grad`` of a saved output with one fixed dout.

A second table compares ``torch.nn.attention.varlen.varlen_attn`` with the provider active
(``varlen_torch``: torch's custom op, the dispatcher and the provider's argument mapping) against
``cupy_varlen.varlen_attn`` called directly (``varlen_direct``) on the same packed tensors
(B sequences of L tokens).

Useful FLOPs: 4 * B * H * D * (L * L full, L * (L + 1) / 2 causal), times 2.5 for the backward.
Time: triton ``do_bench``'s median with the L2 flushed before each call (``--timer do_bench``), or
per-call CUDA event pairs (``--timer events``); the helpers are bench_varlen's.

    python benchmarks/bench_sdpa.py                          # the whole grid, bf16
    python benchmarks/bench_sdpa.py --lengths 4096 --head-dims 128 --passes fwd
    python benchmarks/bench_sdpa.py --from-json benchmarks/results/X.json   # tables only

Results go to benchmarks/results/<device>_<date>_<HHMM>_sdpa.json (``--out``) and to
$OUT/bench_sdpa.json when $OUT is set, rewritten after every config.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import shlex
import sys
from pathlib import Path

# bench_varlen.py sits beside this file and puts the package (one level up) on the path.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_varlen as bv  # noqa: E402

METHODS = ("cupy_varlen", "torch_flash", "cudnn")
VARLEN_METHODS = ("varlen_torch", "varlen_direct")
BASELINE = "torch_flash"
PASSES = {"fwd": 1.0, "bwd": 2.5}
MASKS = ("full", "causal")
LAYOUTS = ("bshd", "bhsd")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
DEFAULT_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class SdpaConfig:
    batch: int
    heads: int
    length: int
    head_dim: int
    causal: bool

    @property
    def name(self):
        return (f"L{self.length}_B{self.batch}_H{self.heads}_D{self.head_dim}_"
                f"{'causal' if self.causal else 'full'}")

    def flops(self, pass_="fwd"):
        pairs = self.length * (self.length + 1) // 2 if self.causal else self.length ** 2
        return PASSES[pass_] * 4 * self.batch * self.heads * self.head_dim * pairs


def sdpa_configs(lengths, head_dims, masks, tokens, model_dim):
    """The grid: B = tokens // L sequences of L, H = model_dim // D heads."""
    configs = []
    for head_dim in head_dims:
        if model_dim % head_dim:
            raise ValueError(f"--model-dim {model_dim} is not a multiple of head dim {head_dim}")
        for length in lengths:
            if length > tokens or tokens % length:
                raise ValueError(f"--tokens {tokens} is not a multiple of length {length}")
            for mask in masks:
                configs.append(SdpaConfig(tokens // length, model_dim // head_dim, length,
                                          head_dim, mask == "causal"))
    return configs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Dense SDPA through torch on cupy_varlen (the flash-attention provider) vs "
                    "torch's flash kernel and cuDNN; useful TFLOP/s.")
    ap.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(DEFAULT_HEAD_DIMS))
    ap.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS))
    ap.add_argument("--passes", nargs="+", choices=tuple(PASSES), default=list(PASSES))
    ap.add_argument("--tokens", type=int, default=16384, help="B * L of every config")
    ap.add_argument("--model-dim", type=int, default=2048, help="H * D of every config")
    ap.add_argument("--layout", choices=LAYOUTS, default="bshd",
                    help="bshd: (B, L, H, D) transposed, as models call SDPA; bhsd: contiguous "
                         "(B, H, L, D)")
    ap.add_argument("--dtype", choices=bv.DTYPES, default="bf16")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--require", nargs="+", choices=METHODS + VARLEN_METHODS, default=[],
                    metavar="METHOD", help="methods that must run: stop with exit status 2 "
                                           "after the first config where one fails")
    ap.add_argument("--no-varlen", action="store_true",
                    help="skip the varlen_attn (through torch vs direct) table")
    ap.add_argument("--runs", type=int, default=100, help="timed calls per method (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timer", choices=("do_bench", "events"), default="do_bench")
    ap.add_argument("--seed", type=int, default=0)
    bv.add_output_args(ap, "<device>_<date>_<HHMM>_sdpa.json")
    args = ap.parse_args(argv)
    try:
        args.configs = sdpa_configs(args.lengths, args.head_dims, args.masks, args.tokens,
                                    args.model_dim)
    except ValueError as exc:
        ap.error(str(exc))
    args.methods = [m for m in METHODS if m in args.methods]
    chosen = args.methods + ([] if args.no_varlen else list(VARLEN_METHODS))
    missing = [m for m in args.require if m not in chosen]
    if missing:
        ap.error(f"--require {' '.join(missing)}: not among the methods run")
    return args


# --------------------------------------------------------------------------------------------
# Timing (GPU)
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def provider_state(active):
    """cupy_varlen active as torch's flash implementation (or torch's own restored) inside."""
    import torch.nn.attention as attention

    import cupy_varlen  # noqa: F401  (registers with the registry once torch is imported)

    if active:
        attention.activate_flash_attention_impl("cupy_varlen")
    try:
        yield
    finally:
        if attention.current_flash_attention_impl() is not None:
            attention.restore_flash_attention_impl()


def make_dense(cfg, dtype, layout, seed):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)

    def one():
        if layout == "bshd":
            x = torch.randn(cfg.batch, cfg.length, cfg.heads, cfg.head_dim, device="cuda",
                            dtype=dtype, generator=g).transpose(1, 2)
        else:
            x = torch.randn(cfg.batch, cfg.heads, cfg.length, cfg.head_dim, device="cuda",
                            dtype=dtype, generator=g)
        return x.requires_grad_()

    return one(), one(), one()


def _timer(args):
    if args.timer == "do_bench":
        return lambda fn: bv.time_do_bench(fn, args.runs, args.warmup)
    return lambda fn: bv.time_cuda(fn, args.runs, args.warmup)


def _pass_fn(forward, leaves, pass_, seed):
    """The timed call: the forward, or the backward of one saved output with a fixed dout: the
    same dout (drawn from ``seed``) for every method, so their gradients can be compared."""
    import torch

    if pass_ == "fwd":
        return forward
    saved = forward()
    g = torch.Generator(device=saved.device).manual_seed(seed)
    dout = torch.randn(saved.shape, device=saved.device, dtype=saved.dtype, generator=g)
    return lambda: torch.autograd.grad(saved, leaves, dout, retain_graph=True)


def time_sdpa(method, cfg, qkv, pass_, args):
    """(timing dict, output) of one method on one config and pass, or raises."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if method == "cudnn" else SDPBackend.FLASH_ATTENTION

    def forward():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*qkv, is_causal=cfg.causal)

    with provider_state(method == "cupy_varlen"):
        fn = _pass_fn(forward, list(qkv), pass_, args.seed + 2)
        with torch.no_grad() if pass_ == "fwd" else contextlib.nullcontext():
            timing = _timer(args)(fn)
            out = fn()
    return timing, (out if pass_ == "fwd" else out[0])


def time_varlen(method, cfg, packed, pass_, args):
    import torch

    import cupy_varlen

    q, k, v, cu = packed
    length = cfg.length
    if method == "varlen_torch":
        varlen_attn = bv._torch_varlen_fn()
        params = inspect.signature(varlen_attn).parameters
        kwargs = {}
        if cfg.causal:  # torch 2.11's varlen_attn may spell causal is_causal
            kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

        def forward():
            return varlen_attn(q, k, v, cu, cu, length, length, **kwargs)
    else:
        def forward():
            return cupy_varlen.varlen_attn(q, k, v, cu, cu, length, length, causal=cfg.causal)

    with provider_state(method == "varlen_torch"):
        fn = _pass_fn(forward, [q, k, v], pass_, args.seed + 2)
        with torch.no_grad() if pass_ == "fwd" else contextlib.nullcontext():
            timing = _timer(args)(fn)
            out = fn()
    return timing, (out if pass_ == "fwd" else out[0])


def _row(method, cfg, pass_, timing=None, error=None, diff=None):
    row = {"method": method, "config": cfg.name, "pass": pass_, "error": error,
           "rel_diff_vs_baseline": diff}
    if timing is not None:
        row.update(timing)
        row["tflops"] = cfg.flops(pass_) / (timing["median_ms"] * 1e-3) / 1e12
    return row


def run_config(cfg, args, torch_dtype):
    """Rows of every method and pass of one config (the varlen pair too, unless --no-varlen)."""
    import torch

    rows = []
    qkv = make_dense(cfg, torch_dtype, args.layout, args.seed)
    for pass_ in args.passes:
        outputs = {}
        for method in args.methods:
            try:
                timing, outputs[method] = time_sdpa(method, cfg, qkv, pass_, args)
                rows.append(_row(method, cfg, pass_, timing))
            except Exception as exc:  # noqa: BLE001  (a method that cannot run is a row)
                rows.append(_row(method, cfg, pass_, error=bv._error_text(exc)))
        _add_speedups(rows, pass_, outputs, BASELINE)
    if not args.no_varlen:
        # B sequences of L tokens, packed: the rows of the bshd layout.
        g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
        tokens = cfg.batch * cfg.length
        packed = [torch.randn(tokens, cfg.heads, cfg.head_dim, device="cuda", dtype=torch_dtype,
                              generator=g).requires_grad_() for _ in range(3)]
        cu = torch.arange(0, tokens + 1, cfg.length, dtype=torch.int32, device="cuda")
        for pass_ in args.passes:
            outputs = {}
            for method in VARLEN_METHODS:
                try:
                    timing, outputs[method] = time_varlen(method, cfg, (*packed, cu), pass_, args)
                    rows.append(_row(method, cfg, pass_, timing))
                except Exception as exc:  # noqa: BLE001
                    rows.append(_row(method, cfg, pass_, error=bv._error_text(exc)))
            _add_speedups(rows, pass_, outputs, "varlen_direct")
    del qkv
    bv._free_cuda()
    return rows


def _add_speedups(rows, pass_, outputs, baseline):
    """Each row's speed relative to ``baseline`` of the same pass, and its output's relative
    difference from the baseline's (a sanity check: both are bf16 attention)."""
    base = next((r for r in rows if r["method"] == baseline and r["pass"] == pass_
                 and not r["error"]), None)
    for r in rows:
        if r["pass"] != pass_ or r["method"] not in outputs:
            continue
        if base is not None:
            r["speedup_vs_" + baseline] = base["median_ms"] / r["median_ms"]
            if baseline in outputs and r["method"] != baseline:
                r["rel_diff_vs_baseline"] = bv.rel_error(outputs[r["method"]],
                                                         outputs[baseline])


def rows_table(rows):
    headers = ["config", "pass", "method", "median ms", "TFLOP/s", "speedup", "rel diff",
               "error"]
    body = []
    for r in rows:
        speedup = next((v for k, v in r.items() if k.startswith("speedup_vs_")), None)
        body.append([r["config"], r["pass"], r["method"], bv._fmt(r.get("median_ms"), ".3f"),
                     bv._fmt(r.get("tflops"), ".1f"), bv._fmt(speedup, ".2f"),
                     bv._fmt(r.get("rel_diff_vs_baseline"), ".2e"), (r["error"] or "")[:60]])
    return bv.format_table(headers, body)


def main(argv=None):
    args = parse_args(argv)
    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        print(rows_table(payload["results"]))
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_sdpa: needs a CUDA GPU (torch.cuda.is_available() is False)")
    import torch.nn.attention as attention

    import cupy_varlen  # noqa: F401

    if "cupy_varlen" not in attention.list_flash_attention_impls():
        raise SystemExit("bench_sdpa: this torch has no flash-attention registry (2.11+ needed)")
    bv._warm_up_runtime()
    now = datetime.datetime.now().astimezone()
    env = bv.environment_info()
    out_path = args.out or bv.RESULTS_DIR / (f"{bv.slugify(env['device'])}_"
                                             f"{now:%Y-%m-%d_%H%M}_sdpa.json")
    payload = {
        "benchmark": "bench_sdpa", "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "environment": env, "dtype": args.dtype, "layout": args.layout,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "configs"},
        "flops_definition": "4 * B * H * D * (L^2 full, L(L+1)/2 causal); x2.5 backward",
        "timing": ("median of triton do_bench (L2 flushed before each call)"
                   if args.timer == "do_bench" else "median of per-call CUDA event pairs"),
        "results": [],
    }
    print(f"device: {env['device']}, torch {env['torch']}, cupy_varlen {env['cupy_varlen']}; "
          f"{args.dtype}, layout {args.layout}", flush=True)
    torch_dtype = bv.torch_dtype(args.dtype)
    for cfg in args.configs:
        rows = run_config(cfg, args, torch_dtype)
        payload["results"].extend(rows)
        print(rows_table(rows), flush=True)
        for path in bv.output_paths(out_path, "bench_sdpa.json"):
            bv.write_json(payload, path)
        failed = [(r["method"], r["error"]) for r in rows
                  if r["method"] in args.require and r["error"]]
        if failed:
            print(f"required methods failed on {cfg.name}: {failed}", file=sys.stderr)
            raise SystemExit(2)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
