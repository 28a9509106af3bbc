"""Benchmark of cupy_varlen.varlen_attn's score modifiers (softcap, attention sinks, ALiBi): each
call beside the same call without the modifier and beside compiled FlexAttention with the
equivalent score_mod, forward and backward, in one process.

What is counted
---------------
Useful FLOPs as bench_varlen counts them: 4 * sum_b (allowed (query, key) pairs) * H * D for the
forward, 2.5x for ``--passes bwd`` (torch.autograd.grad of a saved output), 3.5x for ``fwdbwd``.
A modifier adds no FLOPs to the count: TFLOP/s of a call with and without it are comparable.

cost = t(with modifier) / t(same call without it) - 1, both cupy_varlen on the same inputs; the
call without it is timed again right before each modifier (drift between distant timings would
otherwise sit in a 3% bar), and ``baseline spread`` (the largest over the smallest of those
timings, - 1) says how much noise the costs carry. vs flex = t(flex, same modifier) / t(ours).
The bars (issue #18, at B32 x <= 8k D128 only, configs b32_8k_d128_*): softcap <= 10% forward and
<= 15% backward, sinks <= 3%, ALiBi <= 5% (any pass), and ours >= 3x FlexAttention.

Time = bench_varlen's timers: triton ``do_bench``'s median with the L2 flushed before every call
(``--timer do_bench``, the default) or the median of per-call CUDA event pairs (``--timer
events``). The forward pass runs under torch.no_grad (inference, as bench_varlen's forward); the
backward passes use one fixed random dout for every method, so their gradients can be checked.
A method's first call of each pass (kernel compiles: NVRTC for ours, inductor for flex) happens
before the timing and is kept as ``first_call_s``.

Modifiers (the inputs are bench_varlen's, with q multiplied by ``--logit-scale``, default 4, so
that s = scale * q.k has a standard deviation of about 4: the cap then moves the output by a few
percent, far more than bf16's rounding, and ``--check`` can tell a kernel that ignores it apart)
----------------------------------------------------------------------------------------------
softcap  s -> softcap * tanh(s / softcap), ``--softcap`` 50 (Gemma 2). flex: the same score_mod.
sinks    float32 (H,) = sink_mean + N(0, 1), requires grad (dsinks is timed and checked); one extra
         logit per head in every row's softmax denominator. sink_mean (``--sink-mean``) defaults
         to ln(mean sequence length) + logit_scale^2 / 2, about a row's lse, so the sink takes a
         real share of every row. flex has no sink column: its exact equivalent here is
         out * sigmoid(lse - sink) from flex's own differentiable lse, inside the same compiled
         function (an elementwise kernel more).
alibi    s -> s - slope_h * |i + Lk - Lq - j|, slopes 2^(-8 h / H) for h = 1..H (BLOOM,
         FlashAttention), shape (H,), no gradient. flex: score - slope[h] * |q_idx - kv_idx|,
         exact inside each document of self-attention (Lq == Lk), the only pairs the document
         block mask allows.

Methods: ``cupy_varlen`` (with the modifier, and the same call without it: both always run
together) and ``flex`` (torch.compile(flex_attention) on (1, H, T, D) with bench_varlen's document
block mask, compiled once per config and modifier and reused by every pass).

``--check`` compares every row with the float64 reference (cupy_varlen.reference, with the same
modifiers; computed in chunks of sequences and heads, so every config fits): the output for the
forward, dq, dk, dv (and dsinks) for the backward passes, as relative Frobenius errors. A row passes
under the dtype's floor (bf16 2e-2, fp16 4e-3, as the tests'), tightened for ours with a modifier
to twice the error of ours without it (not under a quarter of the floor); ``check_effect`` is how
far the reference with the modifier lies from the one without it, and a row whose tolerance is
not under half of it is marked not decisive. Any failed row makes the run exit with status 3 after
writing its results.

How to run
----------
    python benchmarks/bench_mods.py                  # seed_causal + b32_8k_d128_causal, fwd + bwd
    python benchmarks/bench_mods.py --configs b32_8k_d128 --passes fwd bwd fwdbwd --check
    python benchmarks/bench_mods.py --mods sinks --methods cupy_varlen --configs seed_full
    python benchmarks/bench_mods.py --from-json benchmarks/results/X_mods.json --plot   # no GPU

Flex's compiles (a training and an inference specialization per config and modifier) take most
of a run; ``--methods cupy_varlen`` skips them, ``--mods`` and ``--passes bwd`` cut them. Results go to
benchmarks/results/<device>_<date>_<HHMM>_mods.json (``--out``) and to $OUT/bench_mods.json when
$OUT is set, rewritten after every config; ``--plot`` adds a PNG beside them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# bench_varlen.py sits beside this file and puts the package (one level up) on the path.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import bench_varlen as bv  # noqa: E402

MODS = ("softcap", "sinks", "alibi")
METHODS = ("cupy_varlen", "flex")
DEFAULT_CONFIGS = ("seed_causal", "b32_8k_d128_causal")
DEFAULT_PASSES = ("fwd", "bwd")
BAR_CONFIGS = ("b32_8k_d128_full", "b32_8k_d128_causal")
# Largest cost allowed: per pass where the issue names passes, else for every pass.
COST_BARS = {"softcap": {"fwd": 0.10, "bwd": 0.15}, "sinks": 0.03, "alibi": 0.05}
FLEX_BAR = 3.0
CHECK_FLOOR = {"bf16": 2e-2, "fp16": 4e-3}
# float64 score elements per reference chunk: a few such tensors live at once (8 GiB or so).
REF_CHUNK_ELEMS = 1 << 27
GRAD_NAMES = ("dq", "dk", "dv", "dsinks")
RESULT_NAME = "bench_mods.json"


# --------------------------------------------------------------------------------------------
# Modifiers (no GPU)
# --------------------------------------------------------------------------------------------

def alibi_slopes_list(heads):
    """BLOOM's / FlashAttention's slopes 2^(-8 h / H), h = 1..H."""
    return [2.0 ** (-8.0 * h / heads) for h in range(1, heads + 1)]


def default_sink_mean(lengths, logit_scale):
    """About a full row's lse for scores of standard deviation ``logit_scale``: ln(mean length)
    for the keys plus logit_scale^2 / 2 (the log of E[exp(s)] for Gaussian s)."""
    mean = sum(lengths) / max(1, len(lengths))
    return math.log(max(mean, 1.0)) + logit_scale ** 2 / 2


def cost_bar(mod, pass_):
    """The issue's largest cost for ``mod`` in ``pass_`` (a fraction), or None where it names
    none."""
    bar = COST_BARS.get(mod)
    return bar.get(pass_) if isinstance(bar, dict) else bar


def bar_applies(config):
    return config in BAR_CONFIGS


def softcap_score_mod(cap):
    """flex score_mod of varlen_attn(softcap=cap): flex hands it the scaled score."""
    def softcap(score, b, h, q_idx, kv_idx):
        return cap * (score / cap).tanh()

    return softcap


def alibi_score_mod(slopes):
    """flex score_mod of varlen_attn(alibi_slopes=slopes) with slopes (H,), on packed
    self-attention: q_idx and kv_idx are positions in the packed batch, and within one document
    (the only pairs the document mask keeps) |q_idx - kv_idx| = |i + Lk - Lq - j| as Lq == Lk."""
    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return alibi


def sinks_attention(sinks, flex_attention=None):
    """A function of flex_attention's arguments that adds attention sinks (``sinks`` (H,)):
    flex has no sink column, but sum_j e^s_j / (sum_j e^s_j + e^sink) = sigmoid(lse - sink), so
    out_with_sink = out * sigmoid(lse - sink) exactly, from flex's own lse (differentiable, so
    dsinks, dq and dk flow through it). Rows with no key: lse = -inf, out stays 0."""
    if flex_attention is None:
        from torch.nn.attention.flex_attention import flex_attention
    params = inspect.signature(flex_attention).parameters
    if "return_aux" in params:
        from torch.nn.attention.flex_attention import AuxRequest

        def with_lse(q, k, v, **kwargs):
            out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
            return out, aux.lse
    elif "return_lse" in params:
        def with_lse(q, k, v, **kwargs):
            return flex_attention(q, k, v, return_lse=True, **kwargs)
    else:
        raise bv.Unavailable("this torch's flex_attention returns no lse: no exact sinks")

    def attention(q, k, v, score_mod=None, block_mask=None, enable_gqa=False):
        out, lse = with_lse(q, k, v, score_mod=score_mod, block_mask=block_mask,
                            enable_gqa=enable_gqa)
        keep = (lse - sinks.view(1, -1, 1)).sigmoid()
        return (out.to(keep.dtype) * keep.unsqueeze(-1)).to(out.dtype)

    return attention


FLEX_NOTES = {
    "softcap": "score_mod softcap * tanh(score / softcap)",
    "sinks": "flex has no sink column: out * sigmoid(lse - sink) from flex's lse, in the same "
             "compiled function (exact)",
    "alibi": "score_mod score - slope[h] * |q_idx - kv_idx| (exact within a document)",
}


def flex_modifier(mod, values, softcap):
    """(score_mod, attention) for bench_varlen.prepare_flex: one of them set."""
    if mod == "softcap":
        return softcap_score_mod(softcap), None
    if mod == "alibi":
        return alibi_score_mod(values["alibi_slopes"]), None
    if mod == "sinks":
        return None, sinks_attention(values["sinks"])
    raise ValueError(f"unknown modifier {mod!r}")


def make_modifiers(cfg, args, device="cuda"):
    """{mod: varlen_attn keyword arguments} of one config: the sinks (a leaf that requires grad)
    and slopes are float32 (H,) on ``device``, drawn from the seed."""
    import torch

    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    mean = args.sink_mean if args.sink_mean is not None else default_sink_mean(
        cfg.lengths_k, args.logit_scale)
    noise = torch.randn(cfg.heads, generator=gen, device=device, dtype=torch.float32)
    sinks = (mean + noise).requires_grad_()
    slopes = torch.tensor(alibi_slopes_list(cfg.heads), dtype=torch.float32, device=device)
    return {"softcap": {"softcap": float(args.softcap)}, "sinks": {"sinks": sinks},
            "alibi": {"alibi_slopes": slopes}}


# --------------------------------------------------------------------------------------------
# The float64 reference, in chunks (runs on the inputs' device, CPU included)
# --------------------------------------------------------------------------------------------

def reference_chunks(lengths_q, lengths_k, heads, heads_kv, max_elems=REF_CHUNK_ELEMS):
    """[(b0, b1, h0, h1)]: sequences b0..b1-1 and query heads h0..h1-1 of each chunk. Head chunks
    hold whole GQA groups, so a K/V head's gradient comes from one chunk; a chunk keeps
    heads * sum Lq * Lk <= max_elems where one sequence and one group allow it."""
    group = heads // heads_kv
    pairs = [int(lq) * int(lk) for lq, lk in zip(lengths_q, lengths_k)]
    widest = max(pairs + [1])
    per = max(group, min(heads, max_elems // widest // group * group))
    head_chunks = [(h, min(h + per, heads)) for h in range(0, heads, per)]
    seq_chunks, start, acc = [], 0, 0
    for b, p in enumerate(pairs):
        if b > start and (acc + p) * per > max_elems:
            seq_chunks.append((start, b))
            start, acc = b, 0
        acc += p
    if start < len(pairs):
        seq_chunks.append((start, len(pairs)))
    return [(b0, b1, h0, h1) for b0, b1 in seq_chunks for h0, h1 in head_chunks]


def reference_result(inp, modifiers, dout=None, max_elems=REF_CHUNK_ELEMS):
    """float64 {"out"} and, with ``dout`` (T_q, H, D), {"dq", "dk", "dv"} (+ "dsinks") of
    varlen_attn_reference on ``inp`` with ``modifiers`` (varlen_attn keyword arguments). Rows of a
    sequence depend on that sequence only and heads on their own K/V head, so the chunks'
    results are assembled, and dsinks summed over the sequence chunks."""
    import torch

    from cupy_varlen.reference import varlen_attn_reference

    cfg = inp.cfg
    f64 = torch.float64
    group = cfg.heads // cfg.heads_kv
    q, k, v = (x.detach() for x in (inp.q, inp.k, inp.v))
    device = q.device
    cu_q, cu_k = cfg.cu_q, cfg.cu_k
    want = dout is not None
    sinks, slopes = modifiers.get("sinks"), modifiers.get("alibi_slopes")
    result = {"out": torch.zeros(q.shape, dtype=f64, device=device)}
    if want:
        result.update(dq=torch.zeros(q.shape, dtype=f64, device=device),
                      dk=torch.zeros(k.shape, dtype=f64, device=device),
                      dv=torch.zeros(v.shape, dtype=f64, device=device))
        if sinks is not None:
            result["dsinks"] = torch.zeros(cfg.heads, dtype=f64, device=device)
    for b0, b1, h0, h1 in reference_chunks(cfg.lengths_q, cfg.lengths_k, cfg.heads,
                                           cfg.heads_kv, max_elems):
        rq, rk = slice(cu_q[b0], cu_q[b1]), slice(cu_k[b0], cu_k[b1])
        hq, hk = slice(h0, h1), slice(h0 // group, h1 // group)
        leaves = [x.to(dtype=f64, copy=True).requires_grad_(want)
                  for x in (q[rq, hq], k[rk, hk], v[rk, hk])]
        kwargs = {"softcap": float(modifiers.get("softcap", 0.0))}
        if sinks is not None:
            kwargs["sinks"] = sinks.detach()[hq].to(dtype=f64, copy=True).requires_grad_(want)
            leaves.append(kwargs["sinks"])
        if slopes is not None:
            s = slopes.detach()
            kwargs["alibi_slopes"] = s[b0:b1, hq] if s.dim() == 2 else s[hq]
        chunk_q = torch.tensor([c - cu_q[b0] for c in cu_q[b0:b1 + 1]], dtype=torch.int32,
                               device=device)
        chunk_k = torch.tensor([c - cu_k[b0] for c in cu_k[b0:b1 + 1]], dtype=torch.int32,
                               device=device)
        with torch.enable_grad() if want else torch.no_grad():
            out = varlen_attn_reference(*leaves[:3], chunk_q, chunk_k, causal=cfg.causal,
                                        window_size=cfg.window, **kwargs)
            result["out"][rq, hq] = out.detach()
            if want and out.requires_grad:  # a chunk of empty sequences has no graph
                grads = torch.autograd.grad(out, leaves, dout[rq, hq].to(f64), allow_unused=True)
                grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
                result["dq"][rq, hq] = grads[0]
                result["dk"][rk, hk] = grads[1]
                result["dv"][rk, hk] = grads[2]
                if sinks is not None:
                    result["dsinks"][hq] += grads[3]
        del out, leaves, kwargs
    return result


def modifier_effect(ref_mod, ref_none):
    """Per tensor, how far the reference with the modifier lies from the one without it: the
    error of a kernel that ignored the modifier."""
    return {name: bv.rel_error(ref_none[name], ref_mod[name]) for name in ref_none
            if name in ref_mod}


# --------------------------------------------------------------------------------------------
# Check verdicts and the summary arithmetic (no GPU)
# --------------------------------------------------------------------------------------------

def check_tolerance(dtype, method, mod, none_errors, name):
    """The largest relative error a row may show for tensor ``name``: the dtype's floor; for ours
    with a modifier, twice ours' error without it on the same inputs (where measured), kept
    between a quarter of the floor and the floor."""
    floor = CHECK_FLOOR[dtype]
    if method != "cupy_varlen" or mod == "none" or not none_errors or name not in none_errors:
        return floor
    return min(floor, max(2.0 * none_errors[name], floor / 4))


def check_verdict(errors, dtype, method, mod, none_errors=None, effect=None):
    """{"check_tol", "check_ok", "check_decisive"} of a row's per-tensor ``errors``. Decisive:
    every tensor's tolerance under half the modifier's effect on it (dsinks has no counterpart
    without sinks: ignoring them leaves no gradient at all)."""
    tol = {n: check_tolerance(dtype, method, mod, none_errors, n) for n in errors}
    ok = all(e is not None and math.isfinite(e) and e <= tol[n] for n, e in errors.items())
    decisive = None
    if mod != "none" and effect:
        decisive = all(effect[n] >= 2 * tol[n] for n in errors if n in effect)
    return {"check_tol": tol, "check_ok": ok, "check_decisive": decisive}


def time_ratio(with_ms, without_ms):
    return with_ms / without_ms if with_ms and without_ms else None


def cost_of(with_ms, without_ms):
    """The modifier's cost: with / without - 1 (a fraction; 0.05 = 5% slower)."""
    ratio = time_ratio(with_ms, without_ms)
    return None if ratio is None else ratio - 1.0


def speedup_vs_flex(ours_ms, flex_ms):
    return flex_ms / ours_ms if ours_ms and flex_ms else None


def _find(rows, method, mod, pass_, group):
    return next((r for r in rows if r["method"] == method and r["mod"] == mod
                 and r["pass"] == pass_ and r["group"] == group), None)


def summarize(rows, config):
    """One line per (pass, modifier) of a config's rows: ours with and without the modifier, the
    cost and its bar, flex and the speed ratio and its bar, the checks."""
    lines = []
    passes = [p for p in bv.PASSES if any(r["pass"] == p for r in rows)]
    mods = [m for m in MODS if any(r["group"] == m for r in rows)]
    applies = bar_applies(config)
    for pass_ in passes:
        for mod in mods:
            ours = _find(rows, "cupy_varlen", mod, pass_, mod) or {}
            none = _find(rows, "cupy_varlen", "none", pass_, mod) or {}
            flex = _find(rows, "flex", mod, pass_, mod) or {}
            cost = cost_of(ours.get("median_ms"), none.get("median_ms"))
            speedup = speedup_vs_flex(ours.get("median_ms"), flex.get("median_ms"))
            bar = cost_bar(mod, pass_)
            lines.append({
                "config": config, "pass": pass_, "mod": mod,
                "ms": ours.get("median_ms"), "tflops": ours.get("tflops"),
                "none_ms": none.get("median_ms"), "none_tflops": none.get("tflops"),
                "time_ratio": time_ratio(ours.get("median_ms"), none.get("median_ms")),
                "cost": cost, "cost_bar": bar, "bar_applies": applies,
                "cost_ok": (cost <= bar) if applies and bar is not None and cost is not None
                else None,
                "flex_ms": flex.get("median_ms"), "flex_tflops": flex.get("tflops"),
                "speedup_vs_flex": speedup, "flex_bar": FLEX_BAR,
                "flex_ok": (speedup >= FLEX_BAR) if applies and speedup is not None else None,
                "check_err": _max_err(ours), "none_check_err": _max_err(none),
                "flex_check_err": _max_err(flex),
                "check_ok": _all_ok(ours, none, flex),
                "errors": {m: r["error"] for m, r in (("cupy_varlen", ours), ("none", none),
                                                      ("flex", flex)) if r.get("error")},
            })
    return lines


def baseline_spread(rows):
    """Per pass, the slowest over the fastest timing of ours without a modifier, - 1: the noise
    under every cost of that pass."""
    spread = {}
    for pass_ in bv.PASSES:
        ms = [r["median_ms"] for r in rows if r["method"] == "cupy_varlen" and r["mod"] == "none"
              and r["pass"] == pass_ and r.get("median_ms")]
        if len(ms) > 1:
            spread[pass_] = max(ms) / min(ms) - 1.0
    return spread


def _max_err(row):
    errors = [e for e in (row.get("check_errors") or {}).values() if e is not None]
    return max(errors) if errors else None


def _all_ok(*rows):
    verdicts = [r["check_ok"] for r in rows if r.get("check_ok") is not None]
    return all(verdicts) if verdicts else None


def failed_checks(payload):
    """(config, pass, mod, method) of every row whose check failed."""
    return [(rec["config"], r["pass"], r["mod"], r["method"]) for rec in payload["results"]
            for r in rec["rows"] if r.get("check_ok") is False]


# --------------------------------------------------------------------------------------------
# Running (GPU)
# --------------------------------------------------------------------------------------------

def make_bench_inputs(cfg, args, training):
    """bench_varlen's inputs with q scaled by --logit-scale; q, k, v require grad when a backward
    pass will run."""
    inp = bv.make_inputs(cfg, args.dtype, args.seed)
    inp.q = inp.q * args.logit_scale
    if training:
        for x in (inp.q, inp.k, inp.v):
            x.requires_grad_(True)
    return inp


def fixed_dout(inp, seed):
    import torch

    gen = torch.Generator(device=inp.q.device).manual_seed(seed + 2)
    return torch.randn(inp.q.shape, generator=gen, device=inp.q.device, dtype=inp.q.dtype)


def _inference(fn):
    import torch

    def call():
        with torch.no_grad():
            return fn()

    return call


def pass_callable(prepared, inp, pass_, method, dout, leaves):
    """(timed call, result -> tensors to check) of one pass, on a copy of ``prepared`` (the
    forward stays reusable by the next pass). Flex's output is (1, H, T, D): its dout is laid
    out so."""
    if pass_ == "fwd":
        unpack = prepared.unpack
        return _inference(prepared.fn), lambda out: {"out": unpack(out)}
    if method == "flex":
        dout = dout.transpose(0, 1).unsqueeze(0).contiguous()
    p = bv.with_backward(dataclasses.replace(prepared), inp, pass_, dout=dout, leaves=leaves)
    return p.fn, lambda grads: dict(zip(GRAD_NAMES, grads))


def _timer(args):
    if args.timer == "do_bench":
        return bv.time_do_bench
    return lambda fn, runs, warmup: dict(bv.time_cuda(fn, runs, warmup), timer="events")


def measure_row(row, prepared, inp, pass_, dout, leaves, flops, args, ref=None,
                none_errors=None, effect=None):
    """Times one (method, modifier, pass) into ``row`` and checks it against ``ref``; never
    raises (a failure becomes the row's error)."""
    import torch

    try:
        fn, tensors = pass_callable(prepared, inp, pass_, row["method"], dout, leaves)
        with prepared.context():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()  # compiles: ours' specializations, flex's backward or inference graph
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row.update(_timer(args)(fn, args.runs, args.warmup))
            row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
            if ref is not None:
                got = tensors(fn())
                row["check_errors"] = {n: bv.rel_error(t, ref[n]) for n, t in got.items()}
                row.update(check_verdict(row["check_errors"], args.dtype, row["method"],
                                         row["mod"], none_errors, effect))
                if effect:
                    row["check_effect"] = {n: effect[n] for n in got if n in effect}
        del fn, tensors
    except Exception as exc:  # noqa: BLE001 - record and go on
        row["error"] = bv._error_text(exc)
    finally:
        try:
            torch.cuda.synchronize()
            bv._free_cuda()
        except Exception as exc:  # noqa: BLE001 - a sticky CUDA error: keep the first message
            row["error"] = row["error"] or bv._error_text(exc)
    return row


def _new_row(cfg, method, mod, group, pass_, note=""):
    return {"config": cfg.name, "method": method, "mod": mod, "group": group, "pass": pass_,
            "median_ms": None, "min_ms": None, "p90_ms": None, "tflops": None, "note": note,
            "error": None}


def _prepare(make):
    try:
        return make(), None
    except Exception as exc:  # noqa: BLE001 - the method cannot run: every pass says why
        return None, bv._error_text(exc)


def run_group(cfg, mod, inp, values, dout, args, ref_none):
    """The rows of one modifier on one config: ours without it, ours with it and flex with it,
    each pass in turn (flex compiled once, reused by every pass)."""
    kwargs = values[mod]
    sinks = [values["sinks"]["sinks"]] if mod == "sinks" else []
    plans = []  # (method, mod, prepared or None, error, leaves)
    if "cupy_varlen" in args.methods:
        for m, extra in (("none", {}), (mod, kwargs)):
            p, err = _prepare(lambda: bv.prepare_cupy_varlen(inp, **extra))
            plans.append(("cupy_varlen", m, p, err, [inp.q, inp.k, inp.v] + (sinks if extra
                                                                              else [])))
    if "flex" in args.methods:
        def make_flex():
            import torch

            score_mod, attention = flex_modifier(mod, kwargs, args.softcap)
            # The first call compiles: the training graph when a backward pass follows (the
            # forward pass recompiles under no_grad), else only the inference graph.
            training = any(p != "fwd" for p in args.passes)
            with torch.enable_grad() if training else torch.no_grad():
                p = bv.prepare_flex(inp, args.flex_compile_limit, score_mod=score_mod,
                                    attention=attention)
            p.note = f"{FLEX_NOTES[mod]}; {p.note}"
            return p

        p, err = _prepare(make_flex)
        plans.append(("flex", mod, p, err, [inp.q, inp.k, inp.v] + sinks))
    ref, effect = None, None
    if ref_none is not None:
        ref = reference_result(inp, kwargs, dout if "dq" in ref_none else None)
        effect = modifier_effect(ref, ref_none)
    rows = []
    for pass_ in args.passes:
        flops = cfg.flops() * bv.PASSES[pass_]
        none_errors = None
        for method, m, prepared, err, leaves in plans:
            row = _new_row(cfg, method, m, mod, pass_, prepared.note if prepared else "")
            t0 = time.perf_counter()
            if prepared is None:
                row["error"] = err
            else:
                if prepared.first_call_s is not None:
                    row["compile_s"] = prepared.first_call_s
                refs = ref_none if m == "none" else ref
                measure_row(row, prepared, inp, pass_, dout, leaves, flops, args, refs,
                            none_errors, None if m == "none" else effect)
            if method == "cupy_varlen" and m == "none":
                none_errors = row.get("check_errors")
            _print_progress(row, time.perf_counter() - t0)
            rows.append(row)
    del plans, ref
    bv._free_cuda()
    return rows, effect


def _print_progress(row, seconds):
    status = row["error"] or (f"{row['median_ms']:.3f} ms {row['tflops']:.1f} TF/s, first call "
                              f"{row.get('first_call_s', 0):.2f} s")
    err = _max_err(row)
    check = "" if err is None else f", err {err:.2e}{'' if row.get('check_ok') else ' FAIL'}"
    print(f"  {row['pass']:<6} {row['group']:<7} {row['method']:<11} {row['mod']:<7} "
          f"{status[:140]}{check}  ({seconds:.1f} s)", flush=True)


def run_config(cfg, args):
    import torch

    training = any(p != "fwd" for p in args.passes)
    print(f"\n=== {cfg.name}: B={len(cfg.lengths_q)} T={sum(cfg.lengths_q)} "
          f"max_len={max(cfg.lengths_q)} H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim} "
          f"causal={cfg.causal} {args.dtype} passes {' '.join(args.passes)} "
          f"fwd useful={cfg.flops() / 1e9:.1f} GFLOP", flush=True)
    torch.manual_seed(args.seed)
    inp = make_bench_inputs(cfg, args, training)
    values = make_modifiers(cfg, args)
    dout = fixed_dout(inp, args.seed)
    ref_none = None
    if args.check:
        t0 = time.perf_counter()
        ref_none = reference_result(inp, {}, dout if training else None)
        print(f"  reference without modifiers: {time.perf_counter() - t0:.1f} s", flush=True)
    rows, effects = [], {}
    for mod in args.mods:
        group_rows, effect = run_group(cfg, mod, inp, values, dout, args, ref_none)
        rows += group_rows
        if effect is not None:
            effects[mod] = effect
    record = {
        "config": cfg.name, "params": cfg.params(), "rows": rows,
        "summary": summarize(rows, cfg.name), "baseline_spread": baseline_spread(rows),
        "modifier_values": {
            "softcap": float(args.softcap),
            "sinks": [float(x) for x in values["sinks"]["sinks"].detach().cpu()],
            "alibi_slopes": [float(x) for x in values["alibi"]["alibi_slopes"].cpu()],
        },
    }
    if effects:
        record["check_effect"] = effects
    del inp, values, dout, ref_none
    bv._free_cuda()
    return record


# --------------------------------------------------------------------------------------------
# Output: tables, JSON, plot (no GPU)
# --------------------------------------------------------------------------------------------

def _pct(x):
    return "-" if x is None else f"{100 * x:+.1f}%"


def _verdict(ok):
    return "" if ok is None else (" ok" if ok else " MISS")


def _bar_cell(text, applies, ok):
    if text is None:
        return ""
    return text + _verdict(ok) if applies else f"({text})"


def _err_cell(err, ok):
    if err is None:
        return "-"
    return f"{err:.1e}" + ("" if ok is not False else " FAIL")


def summary_table(record):
    headers = ["pass", "mod", "ms", "TFLOP/s", "without ms", "cost", "bar", "flex ms",
               "flex TF/s", "vs flex", "bar", "err", "without err", "flex err", "note"]
    body = []
    for s in record["summary"]:
        bar = s["cost_bar"]
        notes = [f"{m}: {e}" for m, e in s["errors"].items()]
        decisive = [r.get("check_decisive") for r in record["rows"]
                    if r["group"] == s["mod"] and r["pass"] == s["pass"] and r["mod"] != "none"]
        if False in decisive:
            notes.append("check not decisive")
        body.append([
            s["pass"], s["mod"], bv._fmt(s["ms"], ".3f"), bv._fmt(s["tflops"], ".1f"),
            bv._fmt(s["none_ms"], ".3f"), _pct(s["cost"]),
            _bar_cell(None if bar is None else f"<={100 * bar:g}%", s["bar_applies"],
                      s["cost_ok"]),
            bv._fmt(s["flex_ms"], ".3f"), bv._fmt(s["flex_tflops"], ".1f"),
            bv._fmt(s["speedup_vs_flex"], ".2f"),
            _bar_cell(f">={s['flex_bar']:g}x", s["bar_applies"], s["flex_ok"]),
            _err_cell(s["check_err"], _row_ok(record, s, "cupy_varlen", s["mod"])),
            _err_cell(s["none_check_err"], _row_ok(record, s, "cupy_varlen", "none")),
            _err_cell(s["flex_check_err"], _row_ok(record, s, "flex", s["mod"])),
            "; ".join(notes)[:100]])
    return bv.format_table(headers, body)


def _row_ok(record, line, method, mod):
    row = _find(record["rows"], method, mod, line["pass"], line["mod"])
    return None if row is None else row.get("check_ok")


def rows_table(record):
    """Every timed row of a config: the raw numbers behind the summary."""
    headers = ["pass", "group", "method", "mod", "median ms", "TFLOP/s", "first call s",
               "note / error"]
    body = [[r["pass"], r["group"], r["method"], r["mod"], bv._fmt(r["median_ms"], ".3f"),
             bv._fmt(r["tflops"], ".1f"), bv._fmt(r.get("first_call_s"), ".2f"),
             (f"UNAVAILABLE: {r['error']}" if r["error"] else r.get("note", ""))[:90]]
            for r in record["rows"]]
    return bv.format_table(headers, body)


def record_report(record):
    lines = [f"--- {record['config']} ---", summary_table(record)]
    spread = record.get("baseline_spread") or {}
    if spread:
        lines.append("baseline spread (ours without a modifier, slowest / fastest - 1): "
                     + ", ".join(f"{p} {_pct(v)}" for p, v in spread.items()))
    return "\n".join(lines)


def print_report(payload):
    for rec in payload["results"]:
        print("\n" + record_report(rec))
    failed = failed_checks(payload)
    if failed:
        print("\nCHECK FAILED: " + "; ".join("/".join(f) for f in failed))
    print(flush=True)


def plot_results(payload, png_paths):
    """Two panels per (config, pass, modifier): the cost (bars, the issue's bar as a tick) and
    ours' speed over flex's (the 3x bar dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [s for rec in payload["results"] for s in rec["summary"]]
    if not lines:
        return
    labels = [f"{s['config']} {s['pass']} {s['mod']}" for s in lines]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.3 * len(lines)), sharey=True)
    ys = list(range(len(lines)))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(MODS)}
    for y, s in zip(ys, lines):
        if s["cost"] is not None:
            left.barh(y, 100 * s["cost"], color=colors[s["mod"]], height=0.7)
        if s["cost_bar"] is not None:
            left.plot([100 * s["cost_bar"]] * 2, [y - 0.4, y + 0.4], color="black", lw=1.5)
        if s["speedup_vs_flex"] is not None:
            right.barh(y, s["speedup_vs_flex"], color=colors[s["mod"]], height=0.7)
    right.axvline(FLEX_BAR, color="black", ls="--", lw=1)
    left.axvline(0, color="gray", lw=0.8)
    left.set_yticks(ys)
    left.set_yticklabels(labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("cost: time with / without the modifier - 1 (%); tick: the issue's bar")
    right.set_xlabel("ours vs flex with the same score_mod (x faster); dashed: 3x")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    env = payload.get("environment", {})
    fig.suptitle(f"score modifiers ({payload.get('dtype', '')}) on {env.get('device', '?')}, "
                 f"{payload.get('date', '')[:16].replace('T', ' ')}")
    bv.save_figure(fig, png_paths)


def source_commit(repo=bv._REPO_ROOT):
    """The commit of the source tree that ran ("+dirty" when cupy_varlen/ or cuda_src/ differ from
    it); $CUPY_VARLEN_COMMIT where the tree is a copy without git's data."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=20)
        if head.returncode == 0:
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain",
                                     "--untracked-files=no", "--", "cupy_varlen", "cuda_src"],
                                    capture_output=True, text=True, timeout=20)
            dirty = status.returncode == 0 and status.stdout.strip()
            return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("CUPY_VARLEN_COMMIT") or "unknown"


NOTES = {
    "cost": "time with the modifier / the same cupy_varlen call without it (timed right before "
            "it, same inputs) - 1",
    "speedup_vs_flex": "flex time / ours, both with the modifier",
    "bars": "at b32_8k_d128 only: softcap <= 10% fwd, <= 15% bwd; sinks <= 3%, alibi <= 5% (any "
            "pass); ours >= 3x flex",
    "softcap": "s = softcap * tanh(s / softcap) of the scaled score; flex: "
               + FLEX_NOTES["softcap"],
    "sinks": "(H,) float32 = sink_mean + N(0, 1), requires grad; flex: " + FLEX_NOTES["sinks"],
    "alibi": "slopes 2^(-8 h / H), h = 1..H, shape (H,); s -= slope * |i + Lk - Lq - j|; flex: "
             + FLEX_NOTES["alibi"],
    "inputs": "bench_varlen.make_inputs with q multiplied by logit_scale (s = scale * q.k has a "
              "standard deviation of about logit_scale)",
    "check": "relative Frobenius error vs the float64 reference with the same modifiers (out for "
             "fwd; dq, dk, dv, dsinks for bwd / fwdbwd); tolerance: the dtype floor (bf16 2e-2, "
             "fp16 4e-3), for ours with a modifier 2x ours' error without it within "
             "[floor / 4, floor]; check_effect: reference with vs without the modifier",
}


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def parse_args(argv=None):
    grid = bv.grid_configs()
    ap = argparse.ArgumentParser(
        description="cupy_varlen's score modifiers (softcap, sinks, ALiBi): each call beside the "
                    "same call without it and beside compiled FlexAttention with the same "
                    "score_mod; useful TFLOP/s, cost, speed over flex.",
        epilog=f"Configs: {', '.join(grid)}. A base name (e.g. b32_8k_d128) selects its _full "
               f"and _causal flavours. The issue's rows: --configs seed b32_8k_d128.")
    ap.add_argument("--configs", nargs="+", metavar="NAME", default=list(DEFAULT_CONFIGS),
                    help=f"configs of bench_varlen's grid (default {' '.join(DEFAULT_CONFIGS)})")
    ap.add_argument("--list", action="store_true", help="list the configs and exit")
    ap.add_argument("--mods", nargs="+", choices=MODS, default=list(MODS),
                    help="modifiers to run (ours without a modifier runs beside each)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="cupy_varlen: with and without the modifier; flex: compiled "
                         "flex_attention with the equivalent score_mod")
    ap.add_argument("--passes", "--pass", dest="passes", nargs="+", choices=tuple(bv.PASSES),
                    default=list(DEFAULT_PASSES),
                    help="forward (no_grad), backward, forward + backward (FLOPs 1x, 2.5x, 3.5x)")
    ap.add_argument("--dtype", choices=bv.DTYPES, default="bf16")
    ap.add_argument("--softcap", type=float, default=50.0, help="the cap (Gemma 2: 50)")
    ap.add_argument("--logit-scale", type=float, default=4.0,
                    help="q is multiplied by this: scale * q.k has about this standard deviation")
    ap.add_argument("--sink-mean", type=float, default=None,
                    help="mean of the sinks (default ln(mean length) + logit_scale^2 / 2, about "
                         "a row's lse)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per row (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timer", choices=("do_bench", "events"), default="do_bench",
                    help="do_bench: triton's median with the L2 flushed before each call; "
                         "events: per-call event pairs, L2 warm")
    ap.add_argument("--check", action="store_true",
                    help="errors vs the float64 reference (outputs and gradients); exit status 3 "
                         "when a row fails")
    ap.add_argument("--seed", type=int, default=0, help="seed of the lengths and the data")
    ap.add_argument("--flex-compile-limit", type=float, default=120.0, metavar="S",
                    help="mark flex unavailable when its first (compiling) call exceeds S "
                         "seconds; 0: no limit")
    bv.add_output_args(ap, "<device>_<date>_<HHMM>_mods.json")
    args = ap.parse_args(argv)
    args.mods = [m for m in MODS if m in args.mods]
    args.methods = [m for m in METHODS if m in args.methods]
    args.passes = [p for p in bv.PASSES if p in args.passes]
    if not (args.softcap > 0 and math.isfinite(args.softcap)):
        ap.error(f"--softcap must be positive, got {args.softcap}")
    if not (args.logit_scale > 0 and math.isfinite(args.logit_scale)):
        ap.error(f"--logit-scale must be positive, got {args.logit_scale}")
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")
    try:
        args.selected = bv.select_configs(args.configs, grid)
    except SystemExit as exc:
        ap.error(str(exc))
    return args


def list_configs(seed=0):
    """bench_varlen's grid, the default and bar configs marked."""
    for cfg in bv.grid_configs(seed).values():
        p = cfg.params()
        marks = [m for m, on in (("default", cfg.name in DEFAULT_CONFIGS),
                                 ("bar", bar_applies(cfg.name))) if on]
        print(f"{cfg.name:<22} B={p['batch']:<4} T={p['total_q']:<7} max={p['max_seqlen_q']:<5}"
              f" H={cfg.heads}/{cfg.heads_kv} D={cfg.head_dim} "
              f"GFLOP={p['useful_flops'] / 1e9:.1f}" + (f"  ({', '.join(marks)})" if marks else ""))


def _report_from_json(args):
    payload = json.loads(Path(args.from_json).read_text())
    print_report(payload)
    if args.plot:
        plot_results(payload, [Path(args.from_json).with_suffix(".png")])


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_configs(args.seed)
        return
    if args.from_json:
        _report_from_json(args)
        return
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_mods: needs a CUDA GPU (torch.cuda.is_available() is False)")
    started = time.perf_counter()
    # Lengths and data from --seed, as bench_varlen draws them.
    configs = bv.select_configs(args.configs, bv.grid_configs(args.seed))
    bv._warm_up_runtime()
    now = datetime.datetime.now().astimezone()
    env = dict(bv.environment_info(), cupy_varlen_commit=source_commit())
    out_path = args.out or bv.RESULTS_DIR / (f"{bv.slugify(env['device'])}_"
                                             f"{now:%Y-%m-%d_%H%M}_mods.json")
    payload = {
        "benchmark": "bench_mods", "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "environment": env, "dtype": args.dtype, "passes": args.passes,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                 if k != "selected"},
        "flops_definition": "4 * sum_b allowed(query, key) pairs * H * D, x2.5 bwd, x3.5 fwdbwd "
                            "(modifiers add none)",
        "timing": ("median of triton do_bench (L2 flushed before each call)"
                   if args.timer == "do_bench" else "median of per-call CUDA event pairs")
                  + "; fwd under torch.no_grad; bwd / fwdbwd: torch.autograd.grad with one fixed "
                  "dout; first_call_s: the call before the timing (compiles)",
        "notes": NOTES, "results": [],
    }
    print(f"device: {env['device']} (sm {env['compute_capability']}), torch {env['torch']}, "
          f"cupy {env['cupy']}, cupy_varlen {env['cupy_varlen']} ({env['cupy_varlen_commit']}); "
          f"{args.dtype}; mods {' '.join(args.mods)}; methods {' '.join(args.methods)}",
          flush=True)
    for cfg in configs:
        record = run_config(cfg, args)
        payload["results"].append(record)
        payload["wall_s"] = time.perf_counter() - started
        print(record_report(record), flush=True)
        for path in bv.output_paths(out_path, RESULT_NAME):
            bv.write_json(payload, path)
    print("\n=== summary ===")
    print_report(payload)
    print(f"run took {time.perf_counter() - started:.0f} s")
    for path in bv.output_paths(out_path, RESULT_NAME):
        print(f"results written to {path}", flush=True)
    if args.plot:
        bv.plot_beside(plot_results, payload, out_path, "bench_mods.png")
    if args.check and failed_checks(payload):
        raise SystemExit(3)


if __name__ == "__main__":
    main()
