"""Public forward entry point: argument validation, dispatch and the framework bridge."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers

import cupy
import numpy as np

from . import _arrays, _build, _launch, _spec

try:  # the autograd / torch.compile integration; absent without torch
    from . import _torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _torch = None

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_MAX_GRID_Y = 65535


def _fail(exc, name, msg):
    raise exc(f"varlen_attn: {name} {msg}")


def _check_int(name, value, minimum=0):
    if type(value) is int:  # the common case, without the ABC check below (microseconds per call)
        if value < minimum:
            _fail(ValueError, name, f"must be >= {minimum}, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(TypeError, name, f"must be a Python int, got {type(value).__name__}")
    if value < minimum:
        _fail(ValueError, name, f"must be >= {minimum}, got {value}")
    return int(value)


def _check_bool(name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        _fail(TypeError, name, f"must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_scale(scale, head_dim):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        _fail(TypeError, "scale", f"must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0.0):
        _fail(ValueError, "scale", f"must be a finite positive number, got {scale}")
    return scale


def _check_window(window_size, causal):
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        _fail(TypeError, "window_size", f"must be a pair (left, right), got {window_size!r}")
    left = _check_int("window_size[0]", window_size[0], minimum=-1)
    right = _check_int("window_size[1]", window_size[1], minimum=-1)
    if causal:
        if right > 0:
            _fail(ValueError, "window_size",
                  f"right = {right} contradicts causal=True (which means right = 0)")
        right = 0
    return left, right


def _effective_window(window_size, causal, reach):
    """(left, right) as the kernels take it. A window reaching past every token is no window: the
    unmasked kernel serves it, and the band arithmetic never sees values near the int32 limit."""
    left, right = _check_window(window_size, causal)
    return (-1 if left >= reach else left), (-1 if right >= reach else right)


@functools.lru_cache(maxsize=None)
def _device_arch(device: int) -> str:
    cc = cupy.cuda.Device(device).compute_capability  # e.g. "90"
    return _spec.arch_for_capability(int(cc[:-1]), int(cc[-1]))


@functools.lru_cache(maxsize=None)
def _num_sms(device: int) -> int:
    return cupy.cuda.Device(device).attributes["MultiProcessorCount"]


@functools.lru_cache(maxsize=None)
def _l2_bytes(device: int) -> int:
    return cupy.cuda.Device(device).attributes["L2CacheSize"]


@functools.lru_cache(maxsize=None)
def _dispatch(dtype: str, head_dim: int, windowed: bool, device: int, choice: str,
              long_rows: bool = False):
    spec = _spec.choose_fwd_spec(dtype, head_dim, windowed, _device_arch(device), choice,
                                 long_rows)
    return spec, _build.load_kernels(spec, device)


def _aligned(info) -> bool:
    """16-byte vector access needs a 16-byte aligned base and row/head strides of 8 elements."""
    s0, s1, _ = info.strides
    return info.ptr % 16 == 0 and isinstance(s0, int) and isinstance(s1, int) and s0 % 8 == 0 \
        and s1 % 8 == 0


def _aligned_input(fw, x, info):
    """x itself, or an aligned copy of it (slower, never wrong): (array, info)."""
    if _aligned(info):
        return x, info
    x = fw.copy(x)
    return x, fw.info(x)


def _dense_offsets(fw, cu, info):
    """The kernels index cu_seqlens[b] directly; a strided view takes a (tiny) copy."""
    if info.shape[0] > 1 and info.strides[0] != 1:
        cu = fw.copy(cu)
        info = fw.info(cu)
    return cu, info


def _check_qkv(fw, q, k, v, describe=None):
    """Type, shape, dtype and layout of q, k, v; returns their infos. ``describe`` (default
    ``fw.info``) turns an array into an ArrayInfo: ``fw.meta`` checks fake tensors while tracing."""
    describe = fw.info if describe is None else describe
    infos = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        if _arrays.framework_of(x) is not fw:
            _fail(TypeError, name, f"must be a {fw.name} array like q, got {type(x).__name__}")
        info = describe(x)
        if len(info.shape) != 3:
            _fail(ValueError, name,
                  f"must be 3-D (total_tokens, num_heads, head_dim), got shape {info.shape}")
        if info.dtype not in _arrays.DTYPE_NAMES:
            _fail(TypeError, name, f"must be float16 or bfloat16, got {info.dtype}")
        if info.shape[2] > 1 and info.strides[2] != 1:
            _fail(ValueError, name,
                  f"must be contiguous in its last dimension (stride 1), got strides {info.strides}")
        infos.append(info)
    qi, ki, vi = infos
    for name, info in (("k", ki), ("v", vi)):
        if info.dtype != qi.dtype:
            _fail(TypeError, name, f"dtype {info.dtype} differs from q's {qi.dtype}")
    total_q, heads, head_dim = qi.shape
    total_k, heads_kv, head_dim_k = ki.shape
    if vi.shape != ki.shape:
        _fail(ValueError, "v", f"shape {vi.shape} must equal k's shape {ki.shape}")
    if head_dim_k != head_dim:
        _fail(ValueError, "k", f"head dim {head_dim_k} differs from q's head dim {head_dim}")
    if head_dim % 8 != 0 or not 8 <= head_dim <= _spec.MAX_HEAD_DIM:
        _fail(ValueError, "q",
              f"head dim must be a multiple of 8 in [8, {_spec.MAX_HEAD_DIM}], got {head_dim}")
    if heads < 1 or heads_kv < 1:
        _fail(ValueError, "q", f"needs at least one head (q has {heads}, k has {heads_kv})")
    if heads % heads_kv != 0:
        _fail(ValueError, "k",
              f"num_heads {heads_kv} must divide q's num_heads {heads} (GQA/MQA groups)")
    if heads > _MAX_GRID_Y:
        _fail(ValueError, "q", f"num_heads {heads} exceeds {_MAX_GRID_Y}")
    if max(total_q, total_k) > _INT32_MAX:
        _fail(ValueError, "q", "total tokens must fit the int32 cu_seqlens (< 2**31)")
    return qi, ki, vi


def _check_like(fw, name, x, like_name, like, describe=None):
    """An array that must match ``like`` (an input's info) in type, shape and dtype, with a
    contiguous last dimension: out, dout, and the gradients."""
    if _arrays.framework_of(x) is not fw:
        _fail(TypeError, name, f"must be a {fw.name} array like q, got {type(x).__name__}")
    info = (fw.info if describe is None else describe)(x)
    if info.shape != like.shape:
        _fail(ValueError, name, f"shape {info.shape} must equal {like_name}'s shape {like.shape}")
    if info.dtype != like.dtype:
        _fail(TypeError, name, f"dtype {info.dtype} must equal {like_name}'s dtype {like.dtype}")
    if like.shape[2] > 1 and info.strides[2] != 1:
        _fail(ValueError, name,
              f"must be contiguous in its last dimension, got strides {info.strides}")
    return info


def _check_devices(named_infos):
    """Last of the checks, so that every other one also runs (and is tested) on CPU arrays."""
    (first_name, first), *rest = named_infos
    if first.device < 0:
        _fail(ValueError, first_name, "must be on a CUDA device, got host memory")
    for name, info in rest:
        if info is not None and info.device != first.device:
            where = "host memory" if info.device < 0 else f"cuda:{info.device}"
            _fail(ValueError, name, f"is in {where} but {first_name} is on cuda:{first.device}")


def _check_cu_seqlens(fw, cu_q, cu_k, describe=None):
    describe = fw.info if describe is None else describe
    results = []
    for name, x in (("cu_seqlens_q", cu_q), ("cu_seqlens_k", cu_k)):
        if _arrays.framework_of(x) is not fw:
            _fail(TypeError, name, f"must be a {fw.name} array like q, got {type(x).__name__}")
        info = describe(x)
        if info.dtype != "int32":
            _fail(TypeError, name, f"must be int32, got {info.dtype}")
        if len(info.shape) != 1 or info.shape[0] < 1:
            _fail(ValueError, name, f"must be 1-D of length batch + 1, got shape {info.shape}")
        results.append((x, info))
    if results[0][1].shape != results[1][1].shape:
        _fail(ValueError, "cu_seqlens_k",
              f"length {results[1][1].shape[0]} differs from cu_seqlens_q's "
              f"{results[0][1].shape[0]}")
    return results


def _check_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """The checks the forward and the backward share: (framework, (q, k, v) infos,
    (cu_q, info), (cu_k, info), causal)."""
    fw = _arrays.framework_of(q)
    if fw is None:
        _fail(TypeError, "q", f"must be a torch tensor or CuPy array, got {type(q).__name__}")
    infos = _check_qkv(fw, q, k, v)
    cu_q, cu_k = _check_cu_seqlens(fw, cu_seqlens_q, cu_seqlens_k)
    _check_int("max_seqlen_q", max_seqlen_q)
    _check_int("max_seqlen_k", max_seqlen_k)
    return fw, infos, cu_q, cu_k, _check_bool("causal", causal)


def _check_offsets(fw, name, cu, total, tensor_name, max_name, max_seqlen):
    """check_inputs=True: the values of one cu_seqlens array (one device round trip)."""
    first, last, min_len, max_len = fw.offsets_summary(cu)
    if first != 0:
        _fail(ValueError, name, f"must start at 0, got {first}")
    if min_len < 0:
        _fail(ValueError, name, f"must be non-decreasing (a sequence has length {min_len})")
    if last != total:
        _fail(ValueError, name,
              f"must end at {tensor_name}'s total tokens {total}, got {last}")
    if max_len > max_seqlen:
        _fail(ValueError, max_name,
              f"is {max_seqlen} but {name} has a sequence of {max_len} tokens")


def varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                causal=False, scale=None, window_size=(-1, -1), return_lse=False, out=None,
                deterministic=False, check_inputs=False):
    r"""Attention over a packed batch of variable-length sequences.

    Sequence ``b`` owns query rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and key/value rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``; no row attends across sequences.

    .. math::
        \mathrm{out}_i = \sum_{j \in A(i)} \mathrm{softmax}_j(\mathrm{scale}\; q_i \cdot k_j)\, v_j

    Shapes (B sequences, :math:`T_q = \sum L_q`, :math:`T_k = \sum L_k`, H query heads,
    :math:`H_{kv}` key/value heads, head dim D):

    ============== ========================== ==============================================
    argument        shape                      notes
    ============== ========================== ==============================================
    q               (T_q, H, D)                float16 or bfloat16; D a multiple of 8, <= 256
    k, v            (T_k, H_kv, D)             q's dtype and device; H % H_kv == 0 (GQA/MQA)
    cu_seqlens_q    (B + 1,) int32             cumulative offsets, starting at 0
    cu_seqlens_k    (B + 1,) int32             same length as cu_seqlens_q
    out (returned)  (T_q, H, D)                q's dtype and array type
    lse (returned)  (H, T_q) float32           with ``return_lse=True``
    ============== ========================== ==============================================

    Args:
        q, k, v: torch tensors or CuPy arrays on one CUDA device. Only the last dimension must be
            contiguous: views of a packed (T, 3, H, D) tensor work without a copy.
        cu_seqlens_q, cu_seqlens_k: int32 offsets on the same device; sequences may be empty.
            They are never read on the host.
        max_seqlen_q, max_seqlen_k: Python ints, at least the longest sequence. They are checked
            for type only (against cu_seqlens with ``check_inputs=True``); the grid is sized from
            the token totals, so a loose (or even too small) value never changes the result or
            costs much.
        causal: mask keys after the query's position, aligned bottom-right: query i of a
            sequence with lengths (Lq, Lk) sees key j iff j <= i + Lk - Lq.
        scale: softmax scale, a finite positive float; default ``1/sqrt(D)``.
        window_size: ``(left, right)`` sliding window, -1 for unbounded: key j is allowed iff
            ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``. ``causal=True`` means right = 0
            (a positive right with causal is an error).
        return_lse: also return the natural-log sum of exponentials of the scaled scores.
        check_inputs: also check the values of cu_seqlens on the device (start at 0,
            non-decreasing, end at the token totals, longest sequence <= max_seqlen) and raise
            ValueError naming the offending argument. Off by default: it waits for the device
            (one small transfer), so it is not capturable in a CUDA graph. Without it, invalid
            offsets give unspecified results, and offsets past the token totals make the kernels
            touch memory outside the tensors.
        out: optional preallocated (T_q, H, D) array of q's dtype and type (may be a strided
            view); written in place and returned. Must not overlap k or v.

    Returns:
        ``out``, or ``(out, lse)`` with ``return_lse=True``. A query row with no allowed key
        (empty key sequence, or everything masked) gets out 0 and lse -inf, never NaN.

    Runs on the caller's current stream (torch's for torch tensors, CuPy's for CuPy arrays) with
    no host synchronization, so a call can be captured in a CUDA graph and replayed with new data.
    Any other ``__dlpack__`` array is taken through ``cupy.from_dlpack`` and answered with CuPy
    arrays.

    Example::

        >>> import torch, cupy_varlen
        >>> lens = torch.tensor([0, 300, 1024, 1324 + 77], dtype=torch.int32, device="cuda")
        >>> q, k, v = (torch.randn(1401, 8, 64, device="cuda", dtype=torch.bfloat16)
        ...            for _ in range(3))
        >>> out = cupy_varlen.varlen_attn(q, k, v, lens, lens, 1024, 1024, causal=True)
    """
    if _torch is not None and _torch.needs_autograd(q, k, v):
        return _torch.varlen_attn_autograd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
            scale=scale, window_size=window_size, return_lse=return_lse, out=out,
            deterministic=deterministic, check_inputs=check_inputs)
    _check_bool("deterministic", deterministic)
    return _varlen_attn_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              causal=causal, scale=scale, window_size=window_size,
                              return_lse=return_lse, out=out, check_inputs=check_inputs)


def _varlen_attn_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                       causal=False, scale=None, window_size=(-1, -1), return_lse=False, out=None,
                       check_inputs=False):
    """varlen_attn without autograd: validates, allocates and launches."""
    adopt = _arrays.adopt
    q, k, v, cu_seqlens_q, cu_seqlens_k, out = (
        adopt(q), adopt(k), adopt(v), adopt(cu_seqlens_q), adopt(cu_seqlens_k), adopt(out))
    fw, (qi, ki, vi), (cu_q, cu_qi), (cu_k, cu_ki), causal = _check_attention_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    return_lse = _check_bool("return_lse", return_lse)
    check_inputs = _check_bool("check_inputs", check_inputs)
    total_q, heads, head_dim = qi.shape
    total_k, heads_kv, _ = ki.shape
    scale = _check_scale(scale, head_dim)
    left, right = _effective_window(window_size, causal, total_q + total_k)
    batch = cu_qi.shape[0] - 1

    oi = None if out is None else _check_like(fw, "out", out, "q", qi)
    if batch == 0 and (total_q or total_k):
        _fail(ValueError, "cu_seqlens_q", "has no sequences (length 1) but q or k has tokens")
    _check_devices([("q", qi), ("k", ki), ("v", vi), ("cu_seqlens_q", cu_qi),
                    ("cu_seqlens_k", cu_ki), ("out", None if out is None else oi)])
    device = qi.device
    if check_inputs:
        _check_offsets(fw, "cu_seqlens_q", cu_q, total_q, "q", "max_seqlen_q", max_seqlen_q)
        _check_offsets(fw, "cu_seqlens_k", cu_k, total_k, "k", "max_seqlen_k", max_seqlen_k)
    cu_q, cu_qi = _dense_offsets(fw, cu_q, cu_qi)
    cu_k, cu_ki = _dense_offsets(fw, cu_k, cu_ki)

    if out is None:
        result = fw.empty((total_q, heads, head_dim), q)
        # Contiguous by construction: its info without asking the framework again.
        oi = _arrays.ArrayInfo(qi.shape, (heads * head_dim, head_dim, 1), qi.dtype, device,
                               fw.ptr(result))
    else:
        result = out
    lse = fw.empty((heads, total_q), q, "float32") if return_lse else None
    if total_q > 0 and batch > 0:
        _run_forward(fw, q, k, v, qi, ki, vi, result, oi, cu_q, cu_k, cu_qi, cu_ki, lse,
                     batch=batch, device=device, scale=scale, window=(left, right))
    return (result, lse) if return_lse else result


def _run_forward(fw, q, k, v, qi, ki, vi, out, oi, cu_q, cu_k, cu_qi, cu_ki, lse, *, batch,
                 device, scale, window):
    # Misaligned inputs (an odd storage offset, strides that are not multiples of 8) take a copy:
    # slower, never wrong. A misaligned out is computed aside and copied in.
    q, qi = _aligned_input(fw, q, qi)
    k, ki = _aligned_input(fw, k, ki)
    v, vi = _aligned_input(fw, v, vi)
    target = out
    if not _aligned(oi):
        out = fw.empty(qi.shape, q)
        oi = fw.info(out)

    total_q, heads, head_dim = qi.shape
    windowed = window != (-1, -1)
    # Entering a Device context costs microseconds; the usual call is already on its device.
    on_device = cupy.cuda.runtime.getDevice() == device
    with contextlib.nullcontext() if on_device else cupy.cuda.Device(device):
        spec, kernels = _dispatch(_arrays.DTYPE_NAMES[qi.dtype], head_dim, windowed, device,
                                  _spec.forward_kernel, _spec.long_rows(total_q, batch))
        workspace = fw.empty((_launch.workspace_size(total_q, batch, spec),), cu_q, "int32")
        _launch.launch_forward(
            kernels, spec, fw.stream_ptr(device),
            q=qi.ptr, k=ki.ptr, v=vi.ptr, out=oi.ptr,
            lse=0 if lse is None else fw.ptr(lse),
            cu_q=cu_qi.ptr, cu_k=cu_ki.ptr, workspace=fw.ptr(workspace),
            q_strides=qi.strides, k_strides=ki.strides, v_strides=vi.strides,
            o_strides=oi.strides, lse_head_stride=total_q,
            total_q=total_q, total_k=ki.shape[0], batch=batch, heads=heads,
            heads_per_kv=heads // ki.shape[1],
            head_dim=head_dim, scale=scale, scale_log2=scale * _LOG2E, window=window,
            num_sms=_num_sms(device), l2_bytes=_l2_bytes(device),
        )
    if out is not target:
        fw.copy_into(target, out)


@functools.lru_cache(maxsize=None)
def _dispatch_backward(dtype: str, head_dim: int, windowed: bool, device: int,
                       deterministic: bool, choice: str):
    spec = _spec.choose_bwd_spec(dtype, head_dim, windowed, _device_arch(device), deterministic,
                                 choice)
    return spec, _build.load_kernels(spec, device)


def varlen_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, *, causal=False, scale=None, window_size=(-1, -1),
                         deterministic=False, dq=None, dk=None, dv=None):
    r"""Gradients of :func:`varlen_attn` with respect to q, k and v.

    Functional form for CuPy (and any DLPack) users; torch users get the same kernels through
    autograd (``out.backward()``) on tensors that require grad.

    ============== ========================== ==============================================
    argument        shape                      notes
    ============== ========================== ==============================================
    dout            (T_q, H, D)                gradient of ``out``; q's dtype and type
    q, k, v         as in varlen_attn          the forward's inputs
    out             (T_q, H, D)                the forward's output
    lse             (H, T_q) float32           the forward's ``return_lse=True`` output
    dq (returned)   (T_q, H, D)                q's dtype; optional preallocated array
    dk, dv          (T_k, H_kv, D)             GQA/MQA: summed over each group's query heads
    ============== ========================== ==============================================

    ``causal``, ``scale`` and ``window_size`` must be the forward's. Only the last dimension of
    each array must be contiguous; dq, dk and dv may be strided views, written in place.

    ``deterministic=True`` gives bitwise repeatable gradients: dQ is computed by its own kernel
    (one CTA per query tile, key tiles in a fixed order) instead of fp32 atomics from the dK/dV
    kernel, which recomputes two GEMMs per tile pair (about 1.4x the backward's tensor-core work).
    The default accumulates dQ with atomics, whose order (hence the last bits) varies run to run.

    A query row with no allowed key (lse -inf) gets dq 0, a key no query attends gets dk = dv = 0,
    never NaN. Runs on the caller's current stream without host synchronization.

    Returns:
        ``(dq, dk, dv)``, arrays of q's type.
    """
    dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv = (
        _arrays.adopt(x) for x in (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk,
                                   dv)
    )
    fw, (qi, ki, vi), (cu_q, cu_qi), (cu_k, cu_ki), causal = _check_attention_args(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)
    deterministic = _check_bool("deterministic", deterministic)
    total_q, heads, head_dim = qi.shape
    total_k, heads_kv, _ = ki.shape
    scale = _check_scale(scale, head_dim)
    window = _effective_window(window_size, causal, total_q + total_k)
    doi = _check_like(fw, "dout", dout, "q", qi)
    oi = _check_like(fw, "out", out, "q", qi)
    if _arrays.framework_of(lse) is not fw:
        _fail(TypeError, "lse", f"must be a {fw.name} array like q, got {type(lse).__name__}")
    li = fw.info(lse)
    if li.dtype != "float32":
        _fail(TypeError, "lse", f"must be float32 (varlen_attn's return_lse output), got {li.dtype}")
    if li.shape != (heads, total_q):
        _fail(ValueError, "lse", f"shape {li.shape} must be (num_heads, total_q) = "
              f"{(heads, total_q)}")
    grads = []
    for name, x, like_name, like in (("dq", dq, "q", qi), ("dk", dk, "k", ki),
                                     ("dv", dv, "v", vi)):
        grads.append(None if x is None else _check_like(fw, name, x, like_name, like))
    batch = cu_qi.shape[0] - 1
    if batch == 0 and (total_q or total_k):
        _fail(ValueError, "cu_seqlens_q", "has no sequences (length 1) but q or k has tokens")
    _check_devices([("q", qi), ("k", ki), ("v", vi), ("cu_seqlens_q", cu_qi),
                    ("cu_seqlens_k", cu_ki), ("dout", doi), ("out", oi), ("lse", li),
                    ("dq", grads[0]), ("dk", grads[1]), ("dv", grads[2])])
    cu_q, cu_qi = _dense_offsets(fw, cu_q, cu_qi)
    cu_k, cu_ki = _dense_offsets(fw, cu_k, cu_ki)
    results = [x if x is not None else fw.empty(info.shape, like_x)
               for x, info, like_x in ((dq, qi, q), (dk, ki, k), (dv, vi, v))]
    if batch > 0 and (total_q or total_k):
        _run_backward(fw, dout, q, k, v, out, lse, doi, qi, ki, vi, oi, li, results, cu_q, cu_k,
                      cu_qi, cu_ki, batch=batch, scale=scale, window=window,
                      deterministic=deterministic)
    return tuple(results)


def _run_backward(fw, dout, q, k, v, out, lse, doi, qi, ki, vi, oi, li, results, cu_q, cu_k,
                  cu_qi, cu_ki, *, batch, scale, window, deterministic):
    dout, doi = _aligned_input(fw, dout, doi)
    q, qi = _aligned_input(fw, q, qi)
    k, ki = _aligned_input(fw, k, ki)
    v, vi = _aligned_input(fw, v, vi)
    out, oi = _aligned_input(fw, out, oi)
    # Misaligned gradient outputs are computed aside and copied in; the caller returns its own.
    targets, results = results, []
    for x, like in zip(targets, (q, k, v)):
        info = fw.info(x)
        results.append(x if _aligned(info) else fw.empty(info.shape, like))
    dqi, dki, dvi = (fw.info(x) for x in results)

    total_q, heads, head_dim = qi.shape
    total_k, heads_kv, _ = ki.shape
    device = qi.device
    on_device = cupy.cuda.runtime.getDevice() == device
    with contextlib.nullcontext() if on_device else cupy.cuda.Device(device):
        spec, kernels = _dispatch_backward(_arrays.DTYPE_NAMES[qi.dtype], head_dim,
                                           window != (-1, -1), device, deterministic,
                                           _spec.backward_kernel)
        floats, ints = _launch.backward_workspace_sizes(total_q, total_k, heads, head_dim, batch,
                                                        spec)
        float_ws = fw.empty((max(floats, 1),), cu_q, "float32")
        int_ws = fw.empty((ints,), cu_q, "int32")
        _launch.launch_backward(
            kernels, spec, fw.stream_ptr(device),
            q=qi.ptr, k=ki.ptr, v=vi.ptr, out=oi.ptr, dout=doi.ptr, dq=dqi.ptr, dk=dki.ptr,
            dv=dvi.ptr, lse=li.ptr, float_ws=fw.ptr(float_ws), int_ws=fw.ptr(int_ws),
            cu_q=cu_qi.ptr, cu_k=cu_ki.ptr,
            strides={"q": qi.strides[:2], "k": ki.strides[:2], "v": vi.strides[:2],
                     "out": oi.strides[:2], "dout": doi.strides[:2], "dq": dqi.strides[:2],
                     "dk": dki.strides[:2], "dv": dvi.strides[:2]},
            lse_strides=li.strides, total_q=total_q, total_k=total_k, batch=batch, heads=heads,
            heads_kv=heads_kv, head_dim=head_dim, scale=scale, scale_log2=scale * _LOG2E,
            window=window,
        )
    for target, result in zip(targets, results):
        if result is not target:
            fw.copy_into(target, result)
