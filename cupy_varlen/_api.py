"""The public entry points: routing, allocation and the kernel launches.

Arguments are checked by _checks; torch tensors that autograd records or torch compiles go to the
torch integration (_torch), which is imported the first time a torch tensor shows up, so that
``import cupy_varlen`` does not import torch.
"""

from __future__ import annotations

import contextlib
import functools

import cupy

from . import _arrays, _build, _checks, _launch, _spec
from ._checks import VARLEN_ATTN, VARLEN_ATTN_BACKWARD

_LOG2E = 1.4426950408889634

# cupy_varlen._torch, once a torch tensor has been seen (importing it imports torch and creates the
# custom ops).
_torch = None


def _load_torch_integration():
    global _torch, _needs_autograd
    from . import _torch as module

    _torch = module
    _needs_autograd = module.needs_autograd
    return module


def _needs_autograd_until_torch(q, k, v) -> bool:
    """What :func:`_needs_autograd` is until the first torch tensor: CuPy and DLPack arrays leave
    torch alone; a torch q brings in the torch integration, which answers from then on."""
    if not _arrays.is_torch(q):
        return False
    return _load_torch_integration().needs_autograd(q, k, v)


# Whether a call takes the torch integration (_torch.needs_autograd once it is loaded).
_needs_autograd = _needs_autograd_until_torch


def _kernel_window(left, right, reach):
    """(left, right) as the kernels take it. A window reaching past every token is no window: the
    unmasked kernel serves it, and the band arithmetic never sees values near the int32 limit."""
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
        >>> lens = [300, 1024, 77]
        >>> cu = torch.tensor([0, 300, 1324, 1401], dtype=torch.int32, device="cuda")
        >>> q = torch.randn(1401, 16, 128, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(1401, 4, 128, device="cuda", dtype=torch.bfloat16)   # GQA
        >>> v = torch.randn_like(k)
        >>> out = cupy_varlen.varlen_attn(q, k, v, cu, cu, 1024, 1024, causal=True)
    """
    # _varlen_attn's body, inlined: one Python call less on every call.
    if _needs_autograd(q, k, v):
        return _torch.varlen_attn_autograd(
            VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, window_size, return_lse, out, deterministic, check_inputs)
    return _varlen_attn_eager(VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, window_size, return_lse, out,
                              deterministic, check_inputs)


def _varlen_attn(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                 scale, window_size, return_lse, out, deterministic, check_inputs):
    """:func:`varlen_attn` for callers with other argument names (compat): errors speak
    ``names``."""
    if _needs_autograd(q, k, v):
        return _torch.varlen_attn_autograd(
            names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, window_size, return_lse, out, deterministic, check_inputs)
    return _varlen_attn_eager(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, window_size, return_lse, out,
                              deterministic, check_inputs)


def _varlen_attn_eager(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       causal, scale, window_size, return_lse, out, deterministic, check_inputs):
    """varlen_attn without autograd: checks every argument, allocates and launches. Also the
    custom op's implementation, where it is the check that guards the kernels against a direct
    ``torch.ops`` call."""
    adopt = _arrays.adopt
    q, k, v, cu_seqlens_q, cu_seqlens_k, out = (
        adopt(q), adopt(k), adopt(v), adopt(cu_seqlens_q), adopt(cu_seqlens_k), adopt(out))
    fw = _checks.framework(names, q)
    (qi, ki, vi, cu_qi, cu_ki, oi, _causal, scale, left, right, return_lse, _deterministic,
     check_inputs) = _checks.check_forward_args(
        fw, names, fw.info, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, scale, window_size, return_lse, out, deterministic, check_inputs)
    batch = _checks.check_launch(fw, names, cu_seqlens_q, cu_seqlens_k, qi, ki, vi, cu_qi, cu_ki,
                                 oi, max_seqlen_q, max_seqlen_k, check_inputs)
    return _attention_forward(fw, q, k, v, cu_seqlens_q, cu_seqlens_k, out, qi, ki, vi, cu_qi,
                              cu_ki, oi, batch, scale, left, right, return_lse)


def _attention_forward(fw, q, k, v, cu_q, cu_k, out, qi, ki, vi, cu_qi, cu_ki, oi, batch, scale,
                       left, right, return_lse):
    """The forward on checked arguments (their infos, scale resolved, causal folded into the
    window): allocates out (unless given) and lse (with ``return_lse``) and launches. Checks
    nothing: every caller has (eager: :func:`_varlen_attn_eager`; autograd:
    ``_torch.varlen_attn_autograd``)."""
    total_q, heads, head_dim = qi.shape
    device = qi.device
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
        _launch_forward_kernels(fw, q, k, v, qi, ki, vi, result, oi, cu_q, cu_k, cu_qi, cu_ki,
                                lse, batch=batch, device=device, scale=scale,
                                window=_kernel_window(left, right, total_q + ki.shape[0]))
    return (result, lse) if return_lse else result


def _launch_forward_kernels(fw, q, k, v, qi, ki, vi, out, oi, cu_q, cu_k, cu_qi, cu_ki, lse, *,
                            batch, device, scale, window):
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
    names = VARLEN_ATTN_BACKWARD
    fw = _checks.framework(names, q)
    (doi, qi, ki, vi, oi, li, cu_qi, cu_ki, scale, left, right, deterministic,
     batch) = _checks.check_backward_args(
        fw, names, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, scale, window_size, deterministic, dq, dk, dv)
    return _attention_backward(fw, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk,
                               dv, doi, qi, ki, vi, oi, li, cu_qi, cu_ki, batch, scale, left,
                               right, deterministic)


def _attention_backward(fw, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, doi, qi, ki, vi, oi,
                        li, cu_qi, cu_ki, batch, scale, left, right, deterministic):
    """The backward on checked arguments (see :func:`_attention_forward`): allocates the gradients
    not given and launches. Checks nothing: every caller has (:func:`varlen_attn_backward`, or
    the forward of the autograd call whose backward this is)."""
    total_q, total_k = qi.shape[0], ki.shape[0]
    cu_q, cu_qi = _dense_offsets(fw, cu_q, cu_qi)
    cu_k, cu_ki = _dense_offsets(fw, cu_k, cu_ki)
    results = [x if x is not None else fw.empty(info.shape, like_x)
               for x, info, like_x in ((dq, qi, q), (dk, ki, k), (dv, vi, v))]
    if batch > 0 and (total_q or total_k):
        _launch_backward_kernels(fw, dout, q, k, v, out, lse, doi, qi, ki, vi, oi, li, results,
                                 cu_q, cu_k, cu_qi, cu_ki, batch=batch, scale=scale,
                                 window=_kernel_window(left, right, total_q + total_k),
                                 deterministic=deterministic)
    return tuple(results)


def _launch_backward_kernels(fw, dout, q, k, v, out, lse, doi, qi, ki, vi, oi, li, results, cu_q,
                             cu_k, cu_qi, cu_ki, *, batch, scale, window, deterministic):
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
