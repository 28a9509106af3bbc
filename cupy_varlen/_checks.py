"""Argument validation for every entry point: the eager functions (_api), the torch integration
(_torch) and torch's signatures (compat).

A message reads ``"<function>: <argument> <what is wrong>"`` in the caller's own words: each check
takes a :class:`Names`, which maps the canonical argument names used here (``q``,
``cu_seqlens_q``, ``max_seqlen_q``, ...) to the names the called function shows, so that
``compat.varlen_attn`` speaks of ``query`` and ``cu_seq_q``. Messages are built right where they
are raised; nothing catches and rewrites them.

Checks that need no data and no device come first (the torch integration runs them on fake tensors
while tracing, through ``describe=fw.meta``); the device check comes last, so that every other check
also runs, and is tested, on CPU arrays.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _spec
from ._arrays import DTYPE_NAMES, framework_of

INT32_MAX = 2**31 - 1
MAX_GRID_Y = 65535


class Names:
    """How one function shows itself in error messages: its name (the prefix) and, for each
    canonical argument name that it spells differently, its own spelling."""

    __slots__ = ("function", "_shown")

    def __init__(self, function: str, **shown: str):
        self.function = function
        self._shown = shown

    def __call__(self, name: str) -> str:
        return self._shown.get(name, name)


VARLEN_ATTN = Names("varlen_attn")
VARLEN_ATTN_BACKWARD = Names("varlen_attn_backward")


def fail(exc, names: Names, name: str, msg: str):
    raise exc(f"{names.function}: {names(name)} {msg}")


def check_int(names, name, value, minimum=0):
    if type(value) is int:  # the common case, without the ABC check below (microseconds per call)
        if value < minimum:
            fail(ValueError, names, name, f"must be >= {minimum}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail(TypeError, names, name, f"must be a Python int, got {type(value).__name__}")
    if value < minimum:
        fail(ValueError, names, name, f"must be >= {minimum}, got {value}")
    return int(value)


def check_num_splits(names, value):
    """None, or an int >= 1 (varlen_attn's num_splits)."""
    return None if value is None else check_int(names, "num_splits", value, minimum=1)


def check_bool(names, name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        fail(TypeError, names, name, f"must be a bool, got {type(value).__name__}")
    return bool(value)


def check_scale(names, scale, head_dim):
    """The softmax scale as a float; None means 1/sqrt(head_dim)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        fail(TypeError, names, "scale", f"must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        fail(ValueError, names, "scale", f"must be a finite positive number, got {scale}")
    return scale


def check_window(names, window_size, causal):
    """(left, right) with causal folded in (right = 0)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        fail(TypeError, names, "window_size", f"must be a pair (left, right), got {window_size!r}")
    left = check_int(names, "window_size[0]", window_size[0], minimum=-1)
    right = check_int(names, "window_size[1]", window_size[1], minimum=-1)
    if causal:
        if right > 0:
            fail(ValueError, names, "window_size",
                 f"right = {right} contradicts causal=True (which means right = 0)")
        right = 0
    return left, right


def _check_array_type(fw, names, name, x):
    if framework_of(x) is not fw:
        fail(TypeError, names, name,
             f"must be a {fw.name} array like {names('q')}, got {type(x).__name__}")


def framework(names, q):
    """q's framework, which every other array argument must share."""
    fw = framework_of(q)
    if fw is None:
        fail(TypeError, names, "q", f"must be a torch tensor or CuPy array, got {type(q).__name__}")
    return fw


def check_qkv(fw, names, q, k, v, describe, paged=False):
    """Type, shape, dtype and layout of q, k, v; returns their infos. ``describe`` turns an array
    into an ArrayInfo: ``fw.info``, or ``fw.meta`` for fake tensors while tracing. ``paged``: k and
    v are page pools (num_pages, page_size, num_heads, head_dim)."""
    infos = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array_type(fw, names, name, x)
        info = describe(x)
        if paged and name != "q":
            if len(info.shape) != 4:
                fail(ValueError, names, name, "must be 4-D (num_pages, page_size, num_heads, "
                     f"head_dim) with block_table, got shape {info.shape}")
        elif len(info.shape) != 3:
            fail(ValueError, names, name,
                 f"must be 3-D (total_tokens, num_heads, head_dim), got shape {info.shape}")
        if info.dtype not in DTYPE_NAMES:
            fail(TypeError, names, name, f"must be float16 or bfloat16, got {info.dtype}")
        if info.shape[-1] > 1 and info.strides[-1] != 1:
            fail(ValueError, names, name,
                 f"must be contiguous in its last dimension (stride 1), got strides {info.strides}")
        infos.append(info)
    qi, ki, vi = infos
    q_name, k_name = names("q"), names("k")
    for name, info in (("k", ki), ("v", vi)):
        if info.dtype != qi.dtype:
            fail(TypeError, names, name, f"dtype {info.dtype} differs from {q_name}'s {qi.dtype}")
    total_q, heads, head_dim = qi.shape
    heads_kv, head_dim_k = ki.shape[-2:]
    total_k = ki.shape[0] * (ki.shape[1] if paged else 1)
    if vi.shape != ki.shape:
        fail(ValueError, names, "v", f"shape {vi.shape} must equal {k_name}'s shape {ki.shape}")
    if head_dim_k != head_dim:
        fail(ValueError, names, "k",
             f"head dim {head_dim_k} differs from {q_name}'s head dim {head_dim}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= _spec.MAX_HEAD_DIM:
        fail(ValueError, names, "q",
             f"head dim must be a multiple of 8 in [8, {_spec.MAX_HEAD_DIM}], got {head_dim}")
    if heads < 1 or heads_kv < 1:
        fail(ValueError, names, "q",
             f"needs at least one head ({q_name} has {heads}, {k_name} has {heads_kv})")
    if heads % heads_kv != 0:
        fail(ValueError, names, "k",
             f"num_heads {heads_kv} must divide {q_name}'s num_heads {heads} (GQA/MQA groups)")
    if heads > MAX_GRID_Y:
        fail(ValueError, names, "q", f"num_heads {heads} exceeds {MAX_GRID_Y}")
    if max(total_q, total_k) > INT32_MAX:
        fail(ValueError, names, "q", "total tokens must fit the int32 cu_seqlens (< 2**31)")
    return qi, ki, vi


def check_like(fw, names, name, x, like_name, like, describe):
    """An array that must match ``like`` (an input's info) in type, shape and dtype, with a
    contiguous last dimension: out, dout, and the gradients."""
    _check_array_type(fw, names, name, x)
    info = describe(x)
    like_name = names(like_name)
    if info.shape != like.shape:
        fail(ValueError, names, name,
             f"shape {info.shape} must equal {like_name}'s shape {like.shape}")
    if info.dtype != like.dtype:
        fail(TypeError, names, name,
             f"dtype {info.dtype} must equal {like_name}'s dtype {like.dtype}")
    if like.shape[2] > 1 and info.strides[2] != 1:
        fail(ValueError, names, name,
             f"must be contiguous in its last dimension, got strides {info.strides}")
    return info


def _check_offsets_array(fw, names, name, x, describe):
    """One offsets array's type, dtype and shape; returns its info."""
    _check_array_type(fw, names, name, x)
    info = describe(x)
    if info.dtype != "int32":
        fail(TypeError, names, name, f"must be int32, got {info.dtype}")
    if len(info.shape) != 1 or info.shape[0] < 1:
        fail(ValueError, names, name, f"must be 1-D of length batch + 1, got shape {info.shape}")
    return info


def check_cu_seqlens(fw, names, cu_q, cu_k, describe):
    """The two offsets arrays' type, dtype and shape; returns their infos."""
    cu_qi, cu_ki = (_check_offsets_array(fw, names, name, x, describe)
                    for name, x in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)))
    if cu_qi.shape != cu_ki.shape:
        fail(ValueError, names, "cu_seqlens_k",
             f"length {cu_ki.shape[0]} differs from {names('cu_seqlens_q')}'s {cu_qi.shape[0]}")
    return cu_qi, cu_ki


def check_seqused_k(fw, names, seqused_k, cu_qi, describe):
    """seqused_k: None, or int32 of shape (batch,) (one per sequence of cu_seqlens_q). Returns its
    info or None."""
    if seqused_k is None:
        return None
    _check_array_type(fw, names, "seqused_k", seqused_k)
    info = describe(seqused_k)
    if info.dtype != "int32":
        fail(TypeError, names, "seqused_k", f"must be int32, got {info.dtype}")
    batch = cu_qi.shape[0] - 1
    if info.shape != (batch,):
        fail(ValueError, names, "seqused_k",
             f"must be 1-D with one count per sequence ({batch}), got shape {info.shape}")
    return info


def check_softcap(names, softcap) -> float:
    """The softcap as a float: 0 (off) or finite and positive."""
    if type(softcap) is float and softcap == 0.0:  # the common case, without the ABC check
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        fail(TypeError, names, "softcap", f"must be a float (0 for none), got "
             f"{type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap >= 0.0):
        fail(ValueError, names, "softcap", f"must be finite and >= 0 (0 for none), got {softcap}")
    return softcap


def _check_float32_vector(fw, names, name, x, describe):
    _check_array_type(fw, names, name, x)
    info = describe(x)
    if info.dtype != "float32":
        fail(TypeError, names, name, f"must be float32, got {info.dtype}")
    return info


def check_score_mods(fw, names, softcap, sinks, alibi_slopes, qi, batch, describe):
    """The score modifiers (cuda_src/score_mod.cuh): softcap a float >= 0; sinks float32 (H,)
    contiguous; alibi_slopes float32 (H,) or (batch, H), contiguous along its rows. Returns
    (softcap, sinks' info or None, alibi_slopes' info or None); their devices are checked with
    the other arrays' (check_launch's ``extra``)."""
    softcap = check_softcap(names, softcap)
    heads = qi.shape[1]
    si = ai = None
    if sinks is not None:
        si = _check_float32_vector(fw, names, "sinks", sinks, describe)
        if si.shape != (heads,):
            fail(ValueError, names, "sinks",
                 f"must have shape ({heads},), one logit per query head, got {si.shape}")
        if heads > 1 and si.strides[0] != 1:
            fail(ValueError, names, "sinks", f"must be contiguous, got strides {si.strides}")
    if alibi_slopes is not None:
        ai = _check_float32_vector(fw, names, "alibi_slopes", alibi_slopes, describe)
        if ai.shape not in ((heads,), (batch, heads)):
            fail(ValueError, names, "alibi_slopes", f"must have shape ({heads},) or "
                 f"({batch}, {heads}) (per head, or per sequence and head), got {ai.shape}")
        if heads > 1 and ai.strides[-1] != 1:
            fail(ValueError, names, "alibi_slopes",
                 f"must be contiguous along its last dimension, got strides {ai.strides}")
    return softcap, si, ai


def check_dsinks(fw, names, dsinks, si, describe):
    """A preallocated dsinks: float32 of sinks' shape, contiguous. Returns its info or None."""
    if dsinks is None:
        return None
    if si is None:
        fail(ValueError, names, "dsinks", f"is given without {names('sinks')}")
    info = _check_float32_vector(fw, names, "dsinks", dsinks, describe)
    if info.shape != si.shape:
        fail(ValueError, names, "dsinks", f"shape {info.shape} must equal "
             f"{names('sinks')}'s shape {si.shape}")
    if info.shape[0] > 1 and info.strides[0] != 1:
        fail(ValueError, names, "dsinks", f"must be contiguous, got strides {info.strides}")
    return info


def check_paged(fw, names, block_table, seqused_k, cu_seqlens_k, cu_qi, ki, describe):
    """A paged cache's block table: int32 (batch, pages per sequence), contiguous along its rows,
    with the keys' counts per sequence from seqused_k or cu_seqlens_k's differences (or both: the
    smaller). Returns (its info, page size, cu_seqlens_k's info or None)."""
    if seqused_k is None and cu_seqlens_k is None:
        fail(ValueError, names, "block_table", f"needs {names('seqused_k')} or "
             f"{names('cu_seqlens_k')}: the paged cache's key counts per sequence")
    cu_ki = None
    if cu_seqlens_k is not None:
        cu_ki = _check_offsets_array(fw, names, "cu_seqlens_k", cu_seqlens_k, describe)
        if cu_ki.shape != cu_qi.shape:
            fail(ValueError, names, "cu_seqlens_k", f"length {cu_ki.shape[0]} differs from "
                 f"{names('cu_seqlens_q')}'s {cu_qi.shape[0]}")
    _check_array_type(fw, names, "block_table", block_table)
    info = describe(block_table)
    if info.dtype != "int32":
        fail(TypeError, names, "block_table", f"must be int32, got {info.dtype}")
    batch = cu_qi.shape[0] - 1
    if len(info.shape) != 2 or info.shape[0] != batch:
        fail(ValueError, names, "block_table", "must be 2-D (batch, max_pages_per_seq) with one "
             f"row per sequence ({batch}), got shape {info.shape}")
    if info.shape[1] > 1 and info.strides[1] != 1:
        fail(ValueError, names, "block_table",
             f"must be contiguous along its rows (stride 1), got strides {info.strides}")
    page_size = ki.shape[1]
    if page_size < 1:
        fail(ValueError, names, "k", f"page size (dim 1) must be >= 1, got shape {ki.shape}")
    if info.shape[1] * page_size > INT32_MAX:
        fail(ValueError, names, "block_table", "pages per sequence x page size must fit int32")
    return info, page_size, cu_ki


def check_attention_args(fw, names, describe, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, scale, window_size, deterministic,
                         check_max_seqlen=check_int, paged=False):
    """The arguments the forward and the backward share. Returns ``(qi, ki, vi, cu_qi, cu_ki,
    causal, scale, left, right, deterministic)``: the infos, causal and deterministic as bools,
    scale resolved, the window with causal folded in."""
    qi, ki, vi = check_qkv(fw, names, q, k, v, describe, paged)
    if paged:  # cu_seqlens_k: check_paged
        cu_qi, cu_ki = _check_offsets_array(fw, names, "cu_seqlens_q", cu_seqlens_q, describe), None
    else:
        cu_qi, cu_ki = check_cu_seqlens(fw, names, cu_seqlens_q, cu_seqlens_k, describe)
    check_max_seqlen(names, "max_seqlen_q", max_seqlen_q)
    check_max_seqlen(names, "max_seqlen_k", max_seqlen_k)
    causal = check_bool(names, "causal", causal)
    deterministic = check_bool(names, "deterministic", deterministic)
    scale = check_scale(names, scale, qi.shape[2])
    left, right = check_window(names, window_size, causal)
    return qi, ki, vi, cu_qi, cu_ki, causal, scale, left, right, deterministic


def check_forward_args(fw, names, describe, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, causal, scale, window_size, return_lse, out, deterministic,
                       check_inputs, check_max_seqlen=check_int, paged=False):
    """Every argument of varlen_attn, as far as it can be checked without data or a device (see
    :func:`check_launch` for the rest). ``check_max_seqlen`` lets the torch integration admit the
    SymInts of a trace.

    Returns ``(qi, ki, vi, cu_qi, cu_ki, oi, causal, scale, left, right, return_lse,
    deterministic, check_inputs)``: the infos (oi None without ``out``), the flags as bools, scale
    resolved, the window with causal folded in."""
    qi, ki, vi, cu_qi, cu_ki, causal, scale, left, right, deterministic = check_attention_args(
        fw, names, describe, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, scale, window_size, deterministic, check_max_seqlen, paged)
    return_lse = check_bool(names, "return_lse", return_lse)
    check_inputs = check_bool(names, "check_inputs", check_inputs)
    oi = None if out is None else check_like(fw, names, "out", out, "q", qi, describe)
    return (qi, ki, vi, cu_qi, cu_ki, oi, causal, scale, left, right, return_lse, deterministic,
            check_inputs)


def check_batch(names, cu_qi, total_q, total_k) -> int:
    """The number of sequences, which must hold the tokens."""
    batch = cu_qi.shape[0] - 1
    if batch == 0 and (total_q or total_k):
        fail(ValueError, names, "cu_seqlens_q",
             f"has no sequences (length 1) but {names('q')} or {names('k')} has tokens")
    return batch


def check_devices(names, named_infos):
    """All on the first one's CUDA device. Last of the checks, so that every other one also runs
    (and is tested) on CPU arrays."""
    (first_name, first), *rest = named_infos
    if first.device < 0:
        fail(ValueError, names, first_name, "must be on a CUDA device, got host memory")
    for name, info in rest:
        if info is not None and info.device != first.device:
            where = "host memory" if info.device < 0 else f"cuda:{info.device}"
            fail(ValueError, names, name,
                 f"is in {where} but {names(first_name)} is on cuda:{first.device}")


def check_offsets(fw, names, name, cu, total, tensor_name, max_name, max_seqlen):
    """check_inputs=True: the values of one cu_seqlens array (one device round trip)."""
    first, last, min_len, max_len = fw.offsets_summary(cu)
    if first != 0:
        fail(ValueError, names, name, f"must start at 0, got {first}")
    if min_len < 0:
        fail(ValueError, names, name, f"must be non-decreasing (a sequence has length {min_len})")
    if last != total:
        fail(ValueError, names, name,
             f"must end at {names(tensor_name)}'s total tokens {total}, got {last}")
    if max_len > max_seqlen:
        fail(ValueError, names, max_name,
             f"is {max_seqlen} but {names(name)} has a sequence of {max_len} tokens")


def check_launch(fw, names, cu_q, cu_k, qi, ki, vi, cu_qi, cu_ki, oi, max_seqlen_q, max_seqlen_k,
                 check_inputs, seqused_k=None, ui=None, block_table=None, bi=None,
                 extra=()) -> int:
    """The forward's checks that need real arrays (after :func:`check_forward_args`): tokens
    without sequences, device placement and, with ``check_inputs``, the offsets' values (and
    seqused_k's, ``ui`` its info; with a block table, ``bi`` its info, the counts against the
    table and max_seqlen_k, and the pages they reach against the pool). ``extra``: more (name,
    info or None) whose device is checked with the rest (the modifiers' arrays). Returns the
    number of sequences."""
    total_q = qi.shape[0]
    total_k = ki.shape[0] * ki.shape[1] if bi is not None else ki.shape[0]
    batch = check_batch(names, cu_qi, total_q, 0 if bi is not None else total_k)
    check_devices(names, (("q", qi), ("k", ki), ("v", vi), ("cu_seqlens_q", cu_qi),
                          ("cu_seqlens_k", cu_ki), ("out", oi), ("seqused_k", ui),
                          ("block_table", bi)) + tuple(extra))
    if check_inputs and bi is not None:
        check_offsets(fw, names, "cu_seqlens_q", cu_q, total_q, "q", "max_seqlen_q", max_seqlen_q)
        page_size, capacity = ki.shape[1], bi.shape[1] * ki.shape[1]
        first, min_len, smallest, largest, first_page, last_page = fw.paged_summary(
            seqused_k, cu_k, block_table, page_size)
        if first != 0:
            fail(ValueError, names, "cu_seqlens_k", f"must start at 0, got {first}")
        if min_len < 0:
            fail(ValueError, names, "cu_seqlens_k",
                 f"must be non-decreasing (a sequence has length {min_len})")
        counts = "seqused_k" if seqused_k is not None else "cu_seqlens_k"
        if smallest < 0:
            fail(ValueError, names, counts, f"must not be negative, got {smallest}")
        if largest > capacity:
            fail(ValueError, names, counts, f"has a count of {largest} keys, more than "
                 f"{names('block_table')}'s {bi.shape[1]} pages of {page_size} hold")
        if largest > max_seqlen_k:
            fail(ValueError, names, "max_seqlen_k",
                 f"is {max_seqlen_k} but {names(counts)} has a count of {largest}")
        if first_page < 0 or last_page >= ki.shape[0]:
            page = first_page if first_page < 0 else last_page
            fail(ValueError, names, "block_table",
                 f"names page {page}, outside {names('k')}'s {ki.shape[0]} pages")
    elif check_inputs:
        check_offsets(fw, names, "cu_seqlens_q", cu_q, total_q, "q", "max_seqlen_q", max_seqlen_q)
        check_offsets(fw, names, "cu_seqlens_k", cu_k, total_k, "k", "max_seqlen_k", max_seqlen_k)
        if seqused_k is not None:
            smallest, excess = fw.used_summary(seqused_k, cu_k)
            if smallest < 0:
                fail(ValueError, names, "seqused_k", f"must not be negative, got {smallest}")
            if excess > 0:
                fail(ValueError, names, "seqused_k",
                     f"exceeds a sequence's slot in {names('cu_seqlens_k')} by {excess} keys")
    return batch


def check_backward_args(fw, names, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, causal, scale, window_size, deterministic, dq,
                        dk, dv, softcap=0.0, sinks=None, alibi_slopes=None, dsinks=None):
    """Every argument of varlen_attn_backward, the device placement last.

    Returns ``(doi, qi, ki, vi, oi, li, cu_qi, cu_ki, scale, left, right, deterministic, batch,
    (softcap, si, ai, dsi))``: infos, scale resolved, the window with causal folded in, the number
    of sequences, the modifiers (check_score_mods) with dsinks' info."""
    describe = fw.info
    qi, ki, vi, cu_qi, cu_ki, causal, scale, left, right, deterministic = check_attention_args(
        fw, names, describe, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, scale, window_size, deterministic)
    total_q, heads, _ = qi.shape
    doi = check_like(fw, names, "dout", dout, "q", qi, describe)
    oi = check_like(fw, names, "out", out, "q", qi, describe)
    _check_array_type(fw, names, "lse", lse)
    li = describe(lse)
    if li.dtype != "float32":
        fail(TypeError, names, "lse",
             f"must be float32 (varlen_attn's return_lse output), got {li.dtype}")
    if li.shape != (heads, total_q):
        fail(ValueError, names, "lse",
             f"shape {li.shape} must be (num_heads, total_q) = {(heads, total_q)}")
    grads = [None if x is None else check_like(fw, names, name, x, like_name, like, describe)
             for name, x, like_name, like in (("dq", dq, "q", qi), ("dk", dk, "k", ki),
                                              ("dv", dv, "v", vi))]
    softcap, si, ai = check_score_mods(fw, names, softcap, sinks, alibi_slopes, qi,
                                       cu_qi.shape[0] - 1, describe)
    dsi = check_dsinks(fw, names, dsinks, si, describe)
    batch = check_batch(names, cu_qi, total_q, ki.shape[0])
    check_devices(names, (("q", qi), ("k", ki), ("v", vi), ("cu_seqlens_q", cu_qi),
                          ("cu_seqlens_k", cu_ki), ("dout", doi), ("out", oi), ("lse", li),
                          ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2]), ("sinks", si),
                          ("alibi_slopes", ai), ("dsinks", dsi)))
    return (doi, qi, ki, vi, oi, li, cu_qi, cu_ki, scale, left, right, deterministic, batch,
            (softcap, si, ai, dsi))
