"""torch integration: autograd and torch.compile through two custom ops.

The kernels are opaque to torch (raw pointers, launched by CuPy), so torch sees them as the custom
ops ``cupy_varlen::varlen_attn`` and ``cupy_varlen::varlen_attn_backward``. That gives autograd
(``register_autograd``), tracing (``register_fake``: shapes only, no data read, so Dynamo, AOT
autograd and CUDA-graph trees treat a call as one node) and functionalization in one place.

:func:`cupy_varlen.varlen_attn` routes here only when it has to (see :func:`needs_autograd`): the
custom-op machinery costs host time, and inference calls do not need it. For the same reason plain
eager autograd (plain tensors, nothing tracing, intercepting or profiling) takes
:class:`_EagerVarlenAttn`, the same formula on the kernels directly: through the op, every forward
pays torch's custom-op dispatch plus the ``fill_defaults`` that ``register_autograd`` runs per call
(its schema walk alone is ~65 us on a slow host); directly, the autograd overhead is a few
microseconds. Everything else (torch.compile, export, fake tensors, functorch transforms, dispatch
modes such as FlopCounterMode, the profiler, tensor subclasses) goes through the op.

Two properties of the forward are deliberate:

- It always returns lse, since the backward needs it; the wrapper drops it unless asked.
- lse is marked non-differentiable. The backward kernel has no term for a gradient flowing into lse
  (it would shift the per-row ``rowsum(dout * out)`` term), so a loss built on lse would silently get
  wrong gradients; marked, ``lse.requires_grad`` is False and a loss built only on lse fails loudly.
"""

from __future__ import annotations

import torch

from . import _arrays
from . import _api  # circular (_api imports this module): only touched inside functions

__all__ = ["needs_autograd", "varlen_attn_autograd"]

_Tensor = torch.Tensor
_SymInt = torch.SymInt
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_profiling = torch._C._autograd._profiler_enabled


def needs_autograd(q, k, v) -> bool:
    """Whether a call must take :func:`varlen_attn_autograd` rather than the plain eager path.

    It must when autograd will record it (grad mode on and an input requires grad) and while torch
    compiles or exports (Dynamo cannot trace the eager path: it reads ``data_ptr()``). This runs on
    every call, the inference path included, so the common case is three identity checks and a
    flag or two.
    """
    if type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor:
        # Grad mode first: under no_grad / inference_mode that skips three requires_grad reads
        # (about 100 ns each on a slow host).
        if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return True
        return _is_compiling()
    # Tensor subclasses (nn.Parameter; fake or functional tensors while tracing) take the op, which
    # knows how to handle them. Anything else (CuPy arrays, mixed array types) takes the eager
    # path, whose validation names the offending argument.
    return isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)


# --------------------------------------------------------------------------------------------------
# The ops. Arguments are resolved before the call (scale a float, causal folded into the window),
# so that a traced graph holds plain constants.


@torch.library.custom_op("cupy_varlen::varlen_attn", mutates_args=())
def _varlen_attn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool = False,
    check_inputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    # deterministic is a forward argument only so that setup_context can hand it to the backward.
    return _api._varlen_attn_eager(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
        scale=scale, window_size=(window_left, window_right), return_lse=True,
        check_inputs=check_inputs)


@_varlen_attn_op.register_fake
def _varlen_attn_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      scale, window_left, window_right, deterministic=False, check_inputs=False):
    # Contiguous, like the eager path's allocation: compiled code trusts these strides.
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _run_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  causal, scale, window_left, window_right, deterministic):
    # Autograd hands over whatever layout the consumer produced: an expanded scalar gradient
    # (strides 0) from .sum(), a transposed one from a permute. The kernels read strided rows as
    # they are; only a non-unit last stride needs a copy.
    if dout.dim() == 3 and dout.shape[2] > 1 and dout.stride(2) != 1:
        dout = dout.contiguous()
    return _api.varlen_attn_backward(
        dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal=causal, scale=scale, window_size=(window_left, window_right),
        deterministic=deterministic)


@torch.library.custom_op("cupy_varlen::varlen_attn_backward", mutates_args=())
def _varlen_attn_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, scale, window_left, window_right, deterministic)


@_varlen_attn_backward_op.register_fake
def _varlen_attn_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal, scale, window_left, window_right,
                               deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, deterministic,
     _check_inputs) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.mark_non_differentiable(lse)  # see the module docstring
    ctx.scalars = (max_q, max_k, causal, scale, left, right, deterministic)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_attn_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.scalars)
    # cu_seqlens_q/k, max_seqlen_q/k, causal, scale, window_left/right, deterministic, check_inputs
    return (dq, dk, dv) + (None,) * 10


_varlen_attn_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerVarlenAttn(torch.autograd.Function):
    """The op's autograd formula (same inputs, same saved state, same gradients) with the kernels
    called directly: the eager fast path, see the module docstring. Old-style (``forward(ctx, ...)``)
    because the new style binds the arguments with ``inspect`` on every call."""

    @staticmethod
    def forward(ctx, *inputs):
        (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, _deterministic,
         check_inputs) = inputs
        output = _api._varlen_attn_eager(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                         scale=scale, window_size=(left, right), return_lse=True,
                                         check_inputs=check_inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = _run_backward(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.scalars)
        return (dq, dk, dv) + (None,) * 10


# Tests set this to False to run eager calls through the op (both paths must agree).
_EAGER_FAST_PATH = True


def _direct(q, k, v) -> bool:
    """Whether nothing needs to see the op: plain tensors, no compile/export, no functorch
    transform, no dispatch mode (fake tensors, FlopCounterMode, ...), no profiler."""
    return (_EAGER_FAST_PATH and type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and not _is_compiling() and not _functorch_active() and not _dispatch_modes()
            and not _profiling())


# --------------------------------------------------------------------------------------------------
# The autograd entry point behind cupy_varlen.varlen_attn.


def _check_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, out):
    """The eager path's checks that need no data (``fw.meta`` instead of ``fw.info``), so that a
    traced call on fake tensors fails at the call site with the same messages. At run time the eager
    implementation repeats them and checks the rest (devices, alignment)."""
    fw = _arrays.framework_of(q)
    qi, _, _ = _api._check_qkv(fw, q, k, v, describe=fw.meta)
    _api._check_cu_seqlens(fw, cu_seqlens_q, cu_seqlens_k, describe=fw.meta)
    if out is not None:
        _api._check_like(fw, "out", out, "q", qi, describe=fw.meta)


def _check_max_seqlen(name, value):
    # Under torch.compile a Python int that varies between calls becomes a SymInt: let it through
    # (the op's schema takes SymInt) instead of failing the int check.
    if isinstance(value, _SymInt):
        return value
    return _api._check_int(name, value)


def varlen_attn_autograd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                         causal=False, scale=None, window_size=(-1, -1), return_lse=False,
                         out=None, deterministic=False, check_inputs=False):
    """:func:`cupy_varlen.varlen_attn` for torch tensors that autograd records or torch compiles.

    Same arguments and results. Arguments are resolved here (scale defaults to 1/sqrt(D), causal
    folds into the window) so the op sees constants; what needs no data is checked here too, with
    the eager path's messages, so a traced call fails at the call site. ``deterministic`` is kept
    for the backward (the forward is deterministic anyway).

    ``out=``: the op cannot write into a caller's tensor (it would be a mutating op, which autograd
    does not differentiate), so the result is computed aside and copied in with ``out.copy_``; the
    gradient flows through the copy, and ``out`` is returned. That costs one extra pass over the
    output; pass ``out`` only where its storage matters.
    """
    _check_meta(q, k, v, cu_seqlens_q, cu_seqlens_k, out)
    _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    causal = _api._check_bool("causal", causal)
    return_lse = _api._check_bool("return_lse", return_lse)
    deterministic = _api._check_bool("deterministic", deterministic)
    check_inputs = _api._check_bool("check_inputs", check_inputs)
    scale = _api._check_scale(scale, q.shape[2])
    left, right = _api._check_window(window_size, causal)
    fn = _EagerVarlenAttn.apply if _direct(q, k, v) else _varlen_attn_op
    result, lse = fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                     scale, left, right, deterministic, check_inputs)
    if out is not None:
        result = out.copy_(result)
    return (result, lse) if return_lse else result
