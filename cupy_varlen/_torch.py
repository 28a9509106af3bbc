"""torch integration: autograd and torch.compile through two custom ops.

The kernels are opaque to torch (raw pointers, launched by CuPy), so torch sees them as the custom
ops ``cupy_varlen::varlen_attn`` and ``cupy_varlen::varlen_attn_backward``. That gives autograd
(``register_autograd``), tracing (``register_fake``: shapes only, no data read, so Dynamo, AOT
autograd and CUDA-graph trees treat a call as one node) and functionalization in one place.

This module imports torch, so cupy_varlen imports it only when a torch tensor first reaches a call
(``_api._load_torch_integration``); the ops and their FlopCounterMode formulas are created then.

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

from typing import Optional

import torch

from . import _api, _arrays, _checks, _registration
from ._checks import VARLEN_ATTN

__all__ = ["needs_autograd", "varlen_attn_autograd"]

_Tensor = torch.Tensor
_SymInt = torch.SymInt
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_functorch_active = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_profiling = torch._C._autograd._profiler_enabled
_FW = _arrays.torch_framework()

# For users who imported cupy_varlen before torch: the first torch tensor registers the name with
# torch's flash-attention registry (see cupy_varlen._registration).
_registration.register_if_torch_loaded()


def needs_autograd(q, k, v) -> bool:
    """Whether a call must take :func:`varlen_attn_autograd` rather than the plain eager path.

    It must when autograd will record it (grad mode on and an input requires grad), while torch
    compiles or exports (Dynamo cannot trace the eager path: it reads ``data_ptr()``), and under a
    dispatch mode (FlopCounterMode, a user's TorchDispatchMode), which sees only what goes through
    the dispatcher: the op, even for an inference call. This runs on every call, the inference path
    included, so the common case is three identity checks and a few C flag reads.
    """
    if type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor:
        # Grad mode first: under no_grad / inference_mode that skips three requires_grad reads
        # (about 100 ns each on a slow host).
        if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return True
        return _is_compiling() or _dispatch_modes() != 0
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
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    deterministic: bool = False,
    check_inputs: bool = False,
    seqused_k: Optional[torch.Tensor] = None,
    block_table: Optional[torch.Tensor] = None,
    num_splits: Optional[int] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The op is callable directly (torch.ops.cupy_varlen.varlen_attn) and from compiled graphs,
    # whose arguments were checked on fake tensors at trace time at most: the eager
    # implementation checks them all again before any kernel reads memory. Its messages use
    # varlen_attn's argument names (the schema does not carry the caller); the autograd entry
    # point has run the checks with the caller's names wherever the tensors were real.
    # deterministic is a forward argument only so that setup_context can hand it to the backward.
    if block_table is not None:
        return _api._varlen_attn_paged(
            VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, (window_left, window_right), True, None, check_inputs, seqused_k, block_table,
            num_splits, softcap, sinks, alibi_slopes)
    return _api._varlen_attn_eager(
        VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
        scale, (window_left, window_right), True, None, deterministic, check_inputs, seqused_k,
        num_splits, softcap, sinks, alibi_slopes)


@_varlen_attn_op.register_fake
def _varlen_attn_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                      scale, window_left, window_right, deterministic=False, check_inputs=False,
                      seqused_k=None, block_table=None, num_splits=None, softcap=0.0, sinks=None,
                      alibi_slopes=None):
    # Contiguous, like the eager path's allocation: compiled code trusts these strides.
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


def _dout_for_kernels(dout):
    """Autograd hands over whatever layout the consumer produced: an expanded scalar gradient
    (strides 0) from .sum(), a transposed one from a permute. The kernels read strided rows as
    they are; only a non-unit last stride needs a copy."""
    if dout.dim() == 3 and dout.shape[2] > 1 and dout.stride(2) != 1:
        return dout.contiguous()
    return dout


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
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Checked in full, as the forward op is, by the public function. An op returns tensors only:
    # without sinks, dsinks is an empty placeholder.
    grads = _api.varlen_attn_backward(
        _dout_for_kernels(dout), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal=causal, scale=scale, window_size=(window_left, window_right),
        deterministic=deterministic, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    return grads if sinks is not None else (*grads, _no_dsinks(q))


def _no_dsinks(q):
    return q.new_empty((0,), dtype=torch.float32)


@_varlen_attn_backward_op.register_fake
def _varlen_attn_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal, scale, window_left, window_right,
                               deterministic, softcap=0.0, sinks=None, alibi_slopes=None):
    dsinks = _no_dsinks(q) if sinks is None else sinks.new_empty(sinks.shape)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _save_for_backward(ctx, q, k, v, cu_q, cu_k, out, lse, scalars, softcap=0.0, sinks=None,
                       alibi_slopes=None):
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks, alibi_slopes)
    ctx.mark_non_differentiable(lse)  # see the module docstring
    # The backward op's scalar arguments: max_seqlen_q/k, causal, scale, window_left/right,
    # deterministic; then the softcap.
    ctx.scalars = scalars
    ctx.softcap = softcap


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, left, right, deterministic,
     _check_inputs, seqused_k, block_table, _num_splits, softcap, sinks, alibi_slopes) = inputs
    # As torch's varlen_attn: no backward for a partially used or a paged cache.
    if block_table is not None:
        raise RuntimeError("varlen_attn: block_table is an inference-only parameter")
    if seqused_k is not None:
        raise RuntimeError("varlen_attn: seqused_k is an inference-only parameter")
    _save_for_backward(ctx, q, k, v, cu_q, cu_k, *output,
                       (max_q, max_k, causal, scale, left, right, deterministic), softcap, sinks,
                       alibi_slopes)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, sinks, alibi_slopes = ctx.saved_tensors
    dq, dk, dv, dsinks = _varlen_attn_backward_op(dout, q, k, v, out, lse, cu_q, cu_k,
                                                  *ctx.scalars, ctx.softcap, sinks, alibi_slopes)
    # cu_seqlens_q/k, max_seqlen_q/k, causal, scale, window_left/right, deterministic, check_inputs,
    # seqused_k, block_table, num_splits, softcap; sinks; alibi_slopes
    return (dq, dk, dv) + (None,) * 14 + (None if sinks is None else dsinks, None)


_varlen_attn_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerVarlenAttn(torch.autograd.Function):
    """The op's autograd formula (same inputs, same saved state, same gradients) with the kernels
    called directly: the eager fast path, see the module docstring. Old-style (``forward(ctx, ...)``)
    because the new style binds the arguments with ``inspect`` on every call.

    Its arguments were checked by :func:`varlen_attn_autograd` (or were when their signature's
    launch plan was made), so neither direction checks them again: ``prepared`` is the forward's
    plan and the pointers read while looking it up (None: read them)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, alibi_slopes, cu_q, cu_k, max_q, max_k, causal,
                deterministic, prepared):
        plan, ptrs = prepared
        out, lse = _api._run_on_device(plan, _FW, q, k, v, cu_q, cu_k, None, None, None, sinks,
                                       alibi_slopes, ptrs=ptrs)
        _save_for_backward(ctx, q, k, v, cu_q, cu_k, out, lse,
                           (max_q, max_k, causal, plan.scale, plan.left, plan.right,
                            deterministic), plan.softcap, sinks, alibi_slopes)
        ctx.batch = plan.batch
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_q, cu_k, sinks, alibi_slopes = ctx.saved_tensors
        if _dispatch_modes() or _profiling():
            # Something watching (FlopCounterMode, the profiler) must see the backward op, also
            # when the forward ran before it started to watch.
            dq, dk, dv, dsinks = _varlen_attn_backward_op(
                dout, q, k, v, out, lse, cu_q, cu_k, *ctx.scalars, ctx.softcap, sinks,
                alibi_slopes)
        else:
            max_q, max_k, _causal, scale, left, right, deterministic = ctx.scalars
            grads = _api._autograd_backward(
                _FW, _dout_for_kernels(dout), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale,
                left, right, deterministic, ctx.batch, ctx.softcap, sinks, alibi_slopes)
            dq, dk, dv = grads[:3]
            dsinks = grads[3] if sinks is not None else None
        return (dq, dk, dv, None if sinks is None else dsinks) + (None,) * 8


# Tests set this to False to run eager calls through the op (both paths must agree).
_EAGER_FAST_PATH = True


# --------------------------------------------------------------------------------------------------
# FlopCounterMode: the op counted as torch counts its own flash attention.


def _sequence_lengths(offsets, max_len):
    """The lengths a cu_seqlens array describes, or ``max_len`` for every sequence where its
    values cannot be read (fake or meta tensors): torch's rule for its own varlen formulas
    (``_offsets_to_lengths`` in torch/utils/flop_counter.py)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(offsets, (FakeTensor, FunctionalTensor)) or offsets.device.type == "meta":
        return [max_len] * (offsets.shape[0] - 1)
    return offsets.diff().tolist()


def _attention_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                     matmuls):
    """Flops of ``matmuls`` (T_q x T_k x D)-sized GEMMs per sequence and query head, 2 flops per
    multiply-add, over the full Lq x Lk rectangle of each sequence.

    torch's convention for ``aten._flash_attention_forward`` / ``_backward`` (and its own
    varlen_attn), which this matches exactly: the mask is not accounted for, so causal and
    windowed calls count as full attention; GQA counts every query head (the kernel broadcasts
    the K/V heads); the forward is 2 GEMMs (QK^T, PV), the backward 5 (QK^T recomputed, dP, dV,
    dQ, dK). The softmax is not counted."""
    heads, head_dim, head_dim_v = q.shape[1], q.shape[2], v.shape[2]
    lengths_q = _sequence_lengths(cu_seqlens_q, max_seqlen_q)
    lengths_k = _sequence_lengths(cu_seqlens_k, max_seqlen_k)
    # Forward: QK^T (D) and PV (D_v); backward: QK^T (D), dP = dO V^T (D_v), dV = P^T dO (D_v),
    # dQ = dS K (D), dK = dS^T Q (D).
    depth = head_dim + head_dim_v if matmuls == 2 else 3 * head_dim + 2 * head_dim_v
    return sum(2 * heads * lq * lk * depth for lq, lk in zip(lengths_q, lengths_k))


def _forward_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args,
                   out_val=None, **kwargs) -> int:
    return _attention_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 2)


def _backward_flops(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, *args, out_val=None, **kwargs) -> int:
    return _attention_flops(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 5)


def _register_flop_formulas():
    from torch.utils import flop_counter

    formulas = {torch.ops.cupy_varlen.varlen_attn: _forward_flops,
                torch.ops.cupy_varlen.varlen_attn_backward: _backward_flops}
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)
    return formulas


_FLOP_FORMULAS = _register_flop_formulas()


def _teach_active_flop_counters():
    """Adds the formulas to every FlopCounterMode on the dispatch stack. A FlopCounterMode copies
    the registry when it is built, and the ops (with their formulas) are created on the first
    torch tensor, which may come after: ``with FlopCounterMode(): model(x)`` on a fresh process.
    Runs under dispatch modes only. It reads FlopCounterMode internals (a mode's ``counter``
    and its ``flop_registry``), and does nothing where they differ."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        registry = getattr(getattr(mode, "counter", None), "flop_registry", None)
        if isinstance(registry, dict):
            for op, formula in _FLOP_FORMULAS.items():
                registry.setdefault(op, formula)


# --------------------------------------------------------------------------------------------------
# The autograd entry point behind cupy_varlen.varlen_attn.


def _check_max_seqlen(names, name, value):
    # Under torch.compile a Python int that varies between calls becomes a SymInt: let it through
    # (the op's schema takes SymInt) instead of failing the int check.
    if isinstance(value, _SymInt):
        return value
    return _checks.check_int(names, name, value)


def varlen_attn_autograd(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, scale, window_size, return_lse, out, deterministic,
                         check_inputs, seqused_k=None, block_table=None, num_splits=None,
                         softcap=0.0, sinks=None, alibi_slopes=None):
    """:func:`cupy_varlen.varlen_attn` for torch tensors that autograd records, torch compiles or
    a dispatch mode watches. Same arguments (positional, with ``names`` for the messages) and
    results. ``sinks`` is differentiable like q, k and v (it may be the only input that requires
    grad).

    Every argument is checked here, once, and resolved (scale defaults to 1/sqrt(D), causal folds
    into the window) so the op sees constants. On plain tensors with nothing tracing, the checks
    read the real tensors, device placement included, and the direct path launches without
    checking again; under tracing they read shapes only (``fw.meta``: fake tensors have no data),
    so a traced call fails at the call site, and the rest is checked by the op at run time.
    ``deterministic`` is kept for the backward (the forward is deterministic anyway).

    ``out=``: the op cannot write into a caller's tensor (it would be a mutating op, which autograd
    does not differentiate), so the result is computed aside and copied in with ``out.copy_``; the
    gradient flows through the copy, and ``out`` is returned. That costs one extra pass over the
    output; pass ``out`` only where its storage matters.
    """
    fw = _FW
    # Real tensors, with data to read: not fake or functional, not functorch's wrappers.
    compiling = _is_compiling()
    real = (type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor and not compiling
            and not _functorch_active())
    # Nothing else needs to see the op: no dispatch mode (fake tensors, FlopCounterMode, ...), no
    # profiler.
    direct = real and _EAGER_FAST_PATH and not _dispatch_modes() and not _profiling()
    for name, given in (("block_table", block_table), ("seqused_k", seqused_k)):
        if given is None:
            continue
        if _grad_enabled() and any(isinstance(x, _Tensor) and x.requires_grad
                                   for x in (q, k, v, sinks)):
            raise RuntimeError(
                f"{names.function}: {names(name)} is an inference-only parameter (no "
                "backward): call under torch.no_grad() or with inputs that do not require grad")
        # Here only while tracing or watched: the op carries it.
        direct = False
    key = None
    if direct and out is None and (return_lse is True or return_lse is False):
        # The forward always returns lse (the backward needs it): the plan of return_lse=True.
        # A sinks Parameter keys the plan by its data (the key takes exact tensors only).
        key_sinks = sinks.detach() if isinstance(sinks, _Tensor) and type(sinks) is not _Tensor \
            else sinks
        key = _api._forward_key(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q,
                                max_seqlen_k, causal, scale, window_size, True, deterministic,
                                check_inputs, None, None, num_splits, softcap, key_sinks,
                                alibi_slopes)
        plan = _api._cached_plan(_api._forward_plans, key)
        if plan is not None:
            result, lse = _EagerVarlenAttn.apply(q, k, v, sinks, alibi_slopes, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 bool(causal), bool(deterministic),
                                                 (plan, key[2]))
            return (result, lse) if return_lse else result
    (qi, ki, vi, cu_qi, cu_ki, oi, causal, scale, left, right, return_lse, deterministic,
     check_inputs) = _checks.check_forward_args(
        fw, names, fw.info if real else fw.meta, q, k, v, cu_seqlens_q, cu_seqlens_k,
        max_seqlen_q, max_seqlen_k, causal, scale, window_size, return_lse, out, deterministic,
        check_inputs, _check_max_seqlen, paged=block_table is not None)
    bi = None
    if block_table is not None:
        bi, _page_size, cu_ki = _checks.check_paged(fw, names, block_table, seqused_k,
                                                    cu_seqlens_k, cu_qi, ki,
                                                    fw.info if real else fw.meta)
    describe = fw.info if real else fw.meta
    ui = _checks.check_seqused_k(fw, names, seqused_k, cu_qi, describe)
    mods = _checks.check_score_mods(fw, names, softcap, sinks, alibi_slopes, qi,
                                    cu_qi.shape[0] - 1, describe)
    softcap = mods[0]
    num_splits = _checks.check_num_splits(names, num_splits)
    if real:
        # The op checks these again (it must, see _varlen_attn_op), but with varlen_attn's names;
        # here they speak the caller's. The offsets' values (a device round trip) only once.
        batch = _checks.check_launch(fw, names, cu_seqlens_q, cu_seqlens_k, qi, ki, vi, cu_qi,
                                     cu_ki, oi, max_seqlen_q, max_seqlen_k,
                                     check_inputs and direct, seqused_k, ui, block_table, bi,
                                     extra=(("sinks", mods[1]), ("alibi_slopes", mods[2])))
    if direct:
        plan = _api._plan_forward(qi, ki, vi, cu_qi, cu_ki, None, batch, scale, left, right, True,
                                  None, None, (max_seqlen_q, max_seqlen_k, num_splits), mods)
        if key is not None:
            _api._remember(_api._forward_plans, key[0], plan)
        result, lse = _EagerVarlenAttn.apply(q, k, v, sinks, alibi_slopes, cu_seqlens_q,
                                             cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                                             deterministic, (plan, None))
    else:
        if not compiling and _dispatch_modes():  # (Dynamo cannot trace the stack's length)
            _teach_active_flop_counters()
        result, lse = _varlen_attn_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, causal, scale, left, right, deterministic,
                                      check_inputs, seqused_k, block_table, num_splits, softcap,
                                      sinks, alibi_slopes)
    if out is not None:
        result = out.copy_(result)
    return (result, lse) if return_lse else result
