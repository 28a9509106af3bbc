"""cupy_varlen behind torch's aten flash-attention ops.

Once ``torch.nn.attention.activate_flash_attention_impl("cupy_varlen")`` has run, the CUDA kernels
of ``aten::_flash_attention_forward`` (varlen and dense), its ``_no_dropout_inplace`` (``out=``)
variant, ``aten::_flash_attention_backward``, ``aten::_scaled_dot_product_flash_attention`` and
its backward are this module's functions, so every torch caller of those ops (``varlen_attn``,
``F.scaled_dot_product_attention`` on the flash backend, compiled graphs, which keep the aten ops
as fallback kernels) runs on cupy_varlen's kernels. ``restore_flash_attention_impl()`` removes
them. Autograd is untouched: the ops' derivative formulas in torch call the backward ops.

Conventions that must match torch's own kernel exactly, because compiled code relies on the
strides of the fake implementations (``torch/_meta_registrations.py``):

- outputs are ``empty_like`` of the input in the layout the op receives it (the dense SDPA op
  receives ``(B, H, L, D)`` and the flash kernel sees its ``(B, L, H, D)`` transpose, as torch's
  CUDA kernel does), and gradients ``empty_like`` of their input;
- lse is ``(H, total_q)`` for varlen calls and ``(B, H, L)`` for dense ones, float32 contiguous;
- the rng outputs are uint64 tensors of shapes (2,) and () (unread: dropout is not served here).

Dense tensors become the packed form without copies where their strides allow, in one of two
foldings (see :func:`fold`), with offsets made on the device (no host synchronization).

``alibi_slopes`` (float32 ``(H,)`` or ``(B, H)``) is served on varlen calls that autograd does
not record: aten's backward op takes no slopes, so a recorded call would get gradients without
them; those go to torch's kernel, as do dense calls with slopes.

What the kernels do not serve (dropout, float32, head dims outside 8..256 in steps of 8,
``return_debug_mask``, alibi as above, a dense call with a paged or partly used cache, a
non-positive scale, a GPU older than sm80) goes to torch's own kernel for the op, captured before
the override was installed; where there is none, the call fails with a message that names the
feature.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import warnings

import torch

from . import _api, _spec
from ._checks import Names

__all__ = ["install", "Handle", "OVERRIDDEN_OPS"]

_RESTORE_HINT = "torch.nn.attention.restore_flash_attention_impl() restores torch's default"

_FORWARD_NAMES = Names("aten._flash_attention_forward", q="query", k="key", v="value",
                       cu_seqlens_q="cum_seq_q", cu_seqlens_k="cum_seq_k", max_seqlen_q="max_q",
                       max_seqlen_k="max_k")
_BACKWARD_NAMES = Names("aten._flash_attention_backward", q="query", k="key", v="value",
                        dout="grad_out", lse="logsumexp", cu_seqlens_q="cum_seq_q",
                        cu_seqlens_k="cum_seq_k", max_seqlen_q="max_q", max_seqlen_k="max_k")
# Dense calls reach the kernels as packed views of the caller's tensors (see fold).
_DENSE_NAMES = Names("aten._scaled_dot_product_flash_attention (packed view)", q="query",
                     k="key", v="value")


class Unsupported(Exception):
    """A call the kernels do not serve; the message names the feature. The override hands the
    call to torch's own kernel where it has one."""


# --------------------------------------------------------------------------------------------------
# Dense (B, L, H, D) tensors as the packed (rows, heads, D) form.

SEQ = "seq"    # row b*L + l, heads as they are: needs stride(b) == L * stride(l)
HEAD = "head"  # row (b*H + h)*L + l, one head: needs stride(b) == H*L*stride(l), stride(h) == L*stride(l)


def _merged_stride(dims):
    """The stride of one index running over ``dims`` ((size, stride) pairs, outermost first) in
    row-major order, or None where the memory does not allow it. Dims of size 1 place nothing."""
    dims = [(n, s) for n, s in dims if n != 1]
    if not dims:
        return None
    for (_, outer), (n, inner) in zip(dims, dims[1:]):
        if outer != n * inner:
            return None
    return dims[-1][1]


def fold(x, mode):
    """The packed view of a (B, L, H, D) tensor under ``mode``, or None where its strides do not
    allow one. SEQ gives (B*L, H, D): the layout models produce (``x.view(B, L, H, D)``
    transposed for SDPA). HEAD gives (B*H*L, 1, D), each (batch, head) pair one sequence: the
    layout of a contiguous (B, H, L, D) tensor, which SEQ cannot express with one row stride.
    Views only: the kernels write through them into the caller's tensors."""
    layout = _fold_layout(x.shape, x.stride(), mode)
    return None if layout is None else x.as_strided(*layout)


def _foldable(x, mode) -> bool:
    return _fold_layout(x.shape, x.stride(), mode) is not None


@functools.lru_cache(maxsize=256)
def _fold_layout(shape, stride, mode):
    """(size, stride) of ``fold``'s view of a tensor with this shape and these strides, or None.
    Pure integer work, cached: a dense call folds four to eight tensors, and the host time of
    every call is latency (a few layouts recur for a whole training run)."""
    batch, length, heads, head_dim = shape
    sb, sl, sh, sd = stride
    if head_dim > 1 and sd != 1:
        return None
    dims = ((batch, sb), (length, sl)) if mode == SEQ else ((batch, sb), (heads, sh), (length, sl))
    row = _merged_stride(dims)
    if row is None and not all(n == 1 for n, _ in dims):
        return None
    # Strides of dims that are never stepped (size 1) are free: multiples of head_dim keep the
    # kernels' 16-byte access (a stride torch picked for a size-1 dim may not be).
    if mode == SEQ:
        return ((batch * length, heads, head_dim),
                (heads * head_dim if row is None else row, sh if heads > 1 else head_dim, 1))
    return (batch * heads * length, 1, head_dim), (head_dim if row is None else row, head_dim, 1)


def empty_folded(shape, like, mode):
    """A fresh (B, L, H, D) tensor whose memory ``mode`` folds."""
    batch, length, heads, head_dim = shape
    if mode == SEQ:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return torch.empty((batch, heads, length, head_dim), dtype=like.dtype,
                       device=like.device).transpose(1, 2)


def fold_or_copy(x, mode):
    """``fold(x, mode)``, or the fold of a copy in the mode's layout where x's strides do not
    allow it (an input only: a copy of an output would not reach the caller)."""
    if not _foldable(x, mode):
        copy = empty_folded(x.shape, x, mode)
        copy.copy_(x)
        x = copy
    return fold(x, mode)


def choose_mode(tensors, heads_match) -> str:
    """The folding that needs the fewest copies of ``tensors`` (B, L, H, D); HEAD only where q
    and k have the same number of heads (its sequences pair query and key heads one to one), and
    on a tie, since its lse needs no transpose."""
    return _fold_plan(tensors, heads_match)[0]


def _fold_plan(tensors, heads_match):
    """choose_mode's mode and each tensor's fold layout under it (None: its strides need a copy
    in the mode's layout first), from one look at each tensor's geometry."""
    geometry = [(x.shape, x.stride()) for x in tensors]
    seq = [_fold_layout(shape, stride, SEQ) for shape, stride in geometry]
    if heads_match:
        head = [_fold_layout(shape, stride, HEAD) for shape, stride in geometry]
        if sum(g is None for g in head) <= sum(g is None for g in seq):
            return HEAD, head
    return SEQ, seq


def _folded_inputs(tensors, layouts, mode):
    """The inputs' packed views, each copied into the mode's layout first where needed."""
    return [x.as_strided(*g) if g is not None else fold_or_copy(x, mode)
            for x, g in zip(tensors, layouts)]


def _fold_targets(outputs, layouts, mode):
    """Where the kernels write each output: (tensor, its packed view), the output itself where
    it folds, else a fresh tensor in the mode's layout (copied back after the call)."""
    targets = []
    for x, g in zip(outputs, layouts):
        if g is None:
            fresh = empty_folded(x.shape, x, mode)
            targets.append((fresh, fold(fresh, mode)))
        else:
            targets.append((x, x.as_strided(*g)))
    return targets


_offsets_cache: dict = {}


def uniform_offsets(count, step, device):
    """int32 [0, step, ..., count*step] on ``device``, made there: no host round trip. Cached
    (read-only inputs) per stream, so that a reader is always ordered after the kernel that wrote
    them, except while a CUDA graph is being captured, whose pool owns what it allocates."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device).cuda_stream if cuda else None
    key = (count, step, device, stream)
    cached = _offsets_cache.get(key)
    if cached is not None:
        return cached
    if step > 0:
        offsets = torch.arange(0, (count + 1) * step, step, dtype=torch.int32, device=device)
    else:
        offsets = torch.zeros(count + 1, dtype=torch.int32, device=device)
    if cuda and not torch.cuda.is_current_stream_capturing():
        if len(_offsets_cache) >= 64:
            _offsets_cache.clear()
        _offsets_cache[key] = offsets
    return offsets


def lse_to_dense(lse, mode, batch, heads, length):
    """The kernels' lse of a folded call as aten's dense (B, H, L) float32, contiguous."""
    if mode == HEAD:  # (1, B*H*L): already (B, H, L) in memory
        return lse.view(batch, heads, length)
    return lse.view(heads, batch, length).permute(1, 0, 2).contiguous()


def lse_from_dense(lse, mode):
    """aten's dense (B, H, L) lse as the kernels' (heads, rows) of a folded call."""
    batch, heads, length = lse.shape
    if mode == HEAD:
        return lse.reshape(1, batch * heads * length)
    return lse.permute(1, 0, 2).reshape(heads, batch * length)


# --------------------------------------------------------------------------------------------------
# What the kernels serve.


@functools.lru_cache(maxsize=None)
def _capability_ok(index: int) -> bool:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor >= 80


def _device_unsupported(query, tensors):
    """The reason the device placement cannot run here, or None. Separate from the argument
    checks so that tests can run the mapping on CPU with the kernels replaced."""
    if not all(t.is_cuda for t in tensors):
        return "tensors outside CUDA memory"
    device = query.device
    if any(t.device != device for t in tensors):
        return "tensors on different devices"
    if not _capability_ok(device.index if device.index is not None
                          else torch.cuda.current_device()):
        return "a GPU older than compute capability 8.0"
    return None


def _check_tensors(query, key, value, dense):
    if query.dim() != (4 if dense else 3):
        raise Unsupported(f"a {query.dim()}-D query ({'dense' if dense else 'varlen'} calls "
                          f"take {4 if dense else 3}-D)")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported(f"{query.dtype} inputs (float16 and bfloat16 only)")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise Unsupported("inputs of different dtypes")
    head_dim = query.shape[-1]
    if head_dim % 8 or not 8 <= head_dim <= _spec.MAX_HEAD_DIM:
        raise Unsupported(f"head dim {head_dim} (multiples of 8 up to {_spec.MAX_HEAD_DIM})")
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        raise Unsupported("key or value head dims that differ from the query's")


def _check_scale(scale):
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise Unsupported(f"scale={scale} (finite positive scales only)")


def _window(left, right, is_causal):
    """aten's window arguments as the kernels' (left, right): None or negative means unbounded,
    and causal sets right = 0 whatever was passed, as torch's kernel does."""
    left = -1 if left is None or left < 0 else int(left)
    right = -1 if right is None or right < 0 else int(right)
    if is_causal:
        right = 0
    return left, right


def _check_num_splits(num_splits):
    """aten's num_splits (None or 0: the kernel chooses) as varlen_attn's (None or >= 1)."""
    if num_splits is None:
        return None
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"aten._flash_attention_forward: num_splits must be None or an int, got "
                        f"{type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"aten._flash_attention_forward: num_splits must be None or >= 0, got "
                         f"{num_splits}")
    return int(num_splits) or None


def _require_device(query, *tensors):
    """Raises Unsupported where the tensors (None entries skipped) are not on a device the
    kernels serve."""
    reason = _device_unsupported(query, [t for t in tensors if t is not None])
    if reason is not None:
        raise Unsupported(reason)


def _deterministic() -> bool:
    return (torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled())


# --------------------------------------------------------------------------------------------------
# The kernels (tests replace these two with the float64 reference to run the mapping on CPU).


def run_forward(names, q, k, v, cu_q, cu_k, max_q, max_k, scale, window, out, seqused_k=None,
                block_table=None, num_splits=None, alibi_slopes=None):
    """(out, lse) of the packed forward; ``out`` is written in place."""
    if block_table is not None:
        return _api._varlen_attn_paged(names, q, k, v, cu_q, cu_k, max_q, max_k, False, scale,
                                       window, True, out, False, seqused_k, block_table,
                                       num_splits, alibi_slopes=alibi_slopes)
    return _api._varlen_attn_eager(names, q, k, v, cu_q, cu_k, max_q, max_k, False, scale, window,
                                   True, out, False, False, seqused_k, num_splits,
                                   alibi_slopes=alibi_slopes)


def run_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window, deterministic,
                 dq, dk, dv):
    """The packed backward into dq, dk, dv (written in place)."""
    _api.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale=scale,
                              window_size=window, deterministic=deterministic, dq=dq, dk=dk,
                              dv=dv)


# --------------------------------------------------------------------------------------------------
# Forward and backward on aten's arguments.


def _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
             return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
             alibi_slopes, block_table, num_splits, out):
    """(out, lse) of ``_flash_attention_forward`` on aten's arguments: varlen (T, H, D) when
    cum_seq_q is given, else dense (B, L, H, D). Raises Unsupported before writing anything."""
    if dropout_p:
        raise Unsupported(f"dropout_p={dropout_p}")
    if return_debug_mask:
        raise Unsupported("return_debug_mask=True")
    dense = cum_seq_q is None
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, query, key, value, dense)
    _check_tensors(query, key, value, dense)
    _check_scale(scale)
    num_splits = _check_num_splits(num_splits)
    if dense and (seqused_k is not None or block_table is not None or cum_seq_k is not None):
        raise Unsupported("seqused_k, block_table or cum_seq_k with dense (4-D) inputs")
    _require_device(query, query, key, value, cum_seq_q, cum_seq_k, seqused_k, block_table, out,
                    alibi_slopes)
    window = _window(window_size_left, window_size_right, is_causal)
    if out is None:
        out = torch.empty_like(query)
    if not dense:
        return run_forward(_FORWARD_NAMES, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                           scale, window, out, seqused_k, block_table, num_splits, alibi_slopes)
    return _dense_forward(query, key, value, scale, window, out)


def _check_alibi(alibi_slopes, query, key, value, dense):
    """Raises Unsupported for slopes the kernels do not take here (see the module docstring)."""
    if dense:
        raise Unsupported("alibi_slopes with dense (4-D) inputs")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise Unsupported("alibi_slopes on inputs that require grad (aten's backward takes no "
                          "slopes)")
    if alibi_slopes.dtype != torch.float32:
        raise Unsupported(f"{alibi_slopes.dtype} alibi_slopes (float32 only)")


def _dense_forward(q, k, v, scale, window, out):
    batch, length, heads, _ = q.shape
    length_k, heads_k = k.shape[1], k.shape[2]
    mode, layouts = _fold_plan((q, k, v, out), heads == heads_k)
    qf, kf, vf = _folded_inputs((q, k, v), layouts, mode)
    ((target, target_view),) = _fold_targets((out,), layouts[3:], mode)
    count = batch if mode == SEQ else batch * heads
    cu_q = uniform_offsets(count, length, q.device)
    cu_k = uniform_offsets(count, length_k, q.device)
    _, lse = run_forward(_DENSE_NAMES, qf, kf, vf, cu_q, cu_k, length, length_k, scale, window,
                         target_view)
    if target is not out:
        out.copy_(target)
    return out, lse_to_dense(lse, mode, batch, heads, length)


def _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k,
              dropout_p, is_causal, scale, window_size_left, window_size_right):
    """(dq, dk, dv) of ``_flash_attention_backward`` on aten's arguments, each ``empty_like`` its
    input. Raises Unsupported before writing anything."""
    if dropout_p:
        raise Unsupported(f"dropout_p={dropout_p}")
    dense = cum_seq_q is None
    _check_tensors(query, key, value, dense)
    _check_scale(scale)
    if logsumexp.dtype != torch.float32:
        raise Unsupported(f"a {logsumexp.dtype} logsumexp (float32 only)")
    _require_device(query, grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k)
    window = _window(window_size_left, window_size_right, is_causal)
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    deterministic = _deterministic()
    if not dense:
        if grad_out.shape[-1] > 1 and grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        run_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                     max_k, scale, window, deterministic, dq, dk, dv)
        return dq, dk, dv
    batch, length, heads, _ = query.shape
    length_k, heads_k = key.shape[1], key.shape[2]
    grads = (dq, dk, dv)
    mode, layouts = _fold_plan((grad_out, query, key, value, out) + grads, heads == heads_k)
    inputs = _folded_inputs((grad_out, query, key, value, out), layouts, mode)
    targets = _fold_targets(grads, layouts[5:], mode)
    count = batch if mode == SEQ else batch * heads
    cu_q = uniform_offsets(count, length, query.device)
    cu_k = uniform_offsets(count, length_k, query.device)
    run_backward(*inputs, lse_from_dense(logsumexp, mode), cu_q, cu_k, length, length_k, scale,
                 window, deterministic, *(view for _, view in targets))
    for grad, (target, _) in zip(grads, targets):
        if target is not grad:
            grad.copy_(target)
    return grads


def _rng_outputs(query):
    """aten's (rng_state, unused, debug_attn_mask) of a call without dropout: placeholders of the
    fake implementation's dtypes and shapes, never read (uninitialized: no fill kernels)."""
    device = query.device
    return (torch.empty((2,), dtype=torch.uint64, device=device),
            torch.empty((), dtype=torch.uint64, device=device),
            torch.empty((0,), dtype=query.dtype, device=device))


# --------------------------------------------------------------------------------------------------
# The overrides: parameter names are the aten schemas' (the union over torch 2.11 to 2.13); the
# dispatcher passes positional arguments by position and keyword-only ones by name, leaving out
# those at their default.


def flash_attention_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                            is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                            window_size_right=None, seqused_k=None, alibi_slopes=None,
                            block_table=None, num_splits=None):
    out, lse = _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, return_debug_mask, scale, window_size_left, window_size_right,
                        seqused_k, alibi_slopes, block_table, num_splits, None)
    return (out, lse) + _rng_outputs(query)


def flash_attention_forward_no_dropout_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q,
                                               max_k, dropout_p, is_causal, return_debug_mask, *,
                                               scale=None, window_size_left=None,
                                               window_size_right=None, seqused_k=None,
                                               alibi_slopes=None, block_table=None,
                                               num_splits=None):
    if out.shape != query.shape or out.dtype != query.dtype:
        raise Unsupported(f"an out of shape {tuple(out.shape)} and dtype {out.dtype} (the "
                          f"query's {tuple(query.shape)}, {query.dtype} expected)")
    _, lse = _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                      return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                      alibi_slopes, block_table, num_splits, out)
    return lse


def flash_attention_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                             max_q, max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                             window_size_left=None, window_size_right=None):
    return _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                     max_k, dropout_p, is_causal, scale, window_size_left, window_size_right)


def scaled_dot_product_flash_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                       return_debug_mask=False, *, scale=None):
    # (B, H, L, D) in, as the flash kernel's (B, L, H, D) transposes.
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out, lse = _forward(q, k, v, None, None, q.shape[1], k.shape[1], dropout_p, is_causal,
                        return_debug_mask, scale, None, None, None, None, None, None, None)
    rng_state, unused, debug_mask = _rng_outputs(query)
    return (out.transpose(1, 2), lse, None, None, query.shape[2], key.shape[2], rng_state,
            unused, debug_mask)


def scaled_dot_product_flash_attention_backward(grad_out, query, key, value, out, logsumexp,
                                                cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                                                is_causal, philox_seed, philox_offset, *,
                                                scale=None):
    dq, dk, dv = _backward(*(x.transpose(1, 2) for x in (grad_out, query, key, value, out)),
                           logsumexp, None, None, max_q, max_k, dropout_p, is_causal, scale, None,
                           None)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# aten op (default overload) -> its override. Ops the installed torch lacks are skipped.
OVERRIDDEN_OPS = {
    "_flash_attention_forward": flash_attention_forward,
    "_flash_attention_forward_no_dropout_inplace": flash_attention_forward_no_dropout_inplace,
    "_flash_attention_backward": flash_attention_backward,
    "_scaled_dot_product_flash_attention": scaled_dot_product_flash_attention,
    "_scaled_dot_product_flash_attention_backward": scaled_dot_product_flash_attention_backward,
}


def installed_schema(op_name):
    """The installed torch's schema of ``aten::<op_name>.default``, or None where it lacks it."""
    packet = getattr(torch.ops.aten, op_name, None)
    if packet is None:
        return None
    try:
        return packet.default._schema
    except AttributeError:
        return None


_NO_DEFAULT = object()


def schema_mismatches(schema, fn) -> list:
    """How ``fn``'s parameters disagree with ``schema``: positional arguments in another order or
    under other names, keyword-only ones it does not accept, defaults that differ. Empty where
    the dispatcher's calls bind to ``fn`` by name exactly."""
    params = inspect.signature(fn).parameters
    positional = [p.name for p in params.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    problems = []
    schema_positional = [a.name for a in schema.arguments if not a.kwarg_only]
    if positional != schema_positional:
        problems.append(f"positional arguments {schema_positional}, the override takes "
                        f"{positional}")
    for arg in schema.arguments:
        param = params.get(arg.name)
        if param is None:
            problems.append(f"argument {arg.name!r} is not accepted")
            continue
        default = arg.default_value if arg.has_default_value() else _NO_DEFAULT
        if default is not _NO_DEFAULT and param.default != default:
            problems.append(f"argument {arg.name!r} defaults to {param.default!r}, the schema to "
                            f"{default!r}")
    return problems


class _Override:
    """One op's CUDA kernel while the implementation is active (registered with the dispatch key
    set, which the kernel it replaced needs to be called with).

    Where the installed schema binds to the override by name (the normal case, checked once here)
    the dispatcher's arguments go straight through; otherwise each call is bound by the schema's
    names, and an argument the override does not know must be at its default. Calls the kernels do
    not serve (Unsupported) go to ``original``, the kernel the override replaced."""

    def __init__(self, op_name, fn, schema, original):
        self.op_name = op_name
        self.fn = fn
        self.original = original
        self.direct = not schema_mismatches(schema, fn)
        params = inspect.signature(fn).parameters
        self.names = tuple(a.name for a in schema.arguments if not a.kwarg_only)
        self.unknown = {a.name: (a.default_value if a.has_default_value() else _NO_DEFAULT)
                        for a in schema.arguments if a.name not in params}

    def _bind(self, args, kwargs):
        bound = dict(zip(self.names, args))
        bound.update(kwargs)
        for name, default in self.unknown.items():
            value = bound.pop(name, default)
            if value is _NO_DEFAULT or value != default:
                raise Unsupported(f"argument {name}={value!r}, which this torch added")
        return bound

    def __call__(self, keyset, *args, **kwargs):
        try:
            if self.direct:
                return self.fn(*args, **kwargs)
            return self.fn(**self._bind(args, kwargs))
        except Unsupported as exc:
            if self.original is None:
                raise RuntimeError(
                    f"aten.{self.op_name} on cupy_varlen: {exc} is not supported, and torch's "
                    f"own kernel is not reachable from Python to take the call; {_RESTORE_HINT}"
                ) from None
            return self.original.call_boxed(keyset, *args, **kwargs)


def _original_kernel(op_name, dispatch_key="CUDA"):
    """torch's kernel of ``aten::<op_name>`` for ``dispatch_key`` as it is now (before the
    override), or None where this torch cannot hand it out (``torch.library.get_kernel`` arrived
    in 2.9) or has none (a CPU-only build)."""
    get_kernel = getattr(torch.library, "get_kernel", None)
    if get_kernel is None:
        return None
    try:
        return get_kernel(f"aten::{op_name}", dispatch_key)
    except Exception:
        return None


class Handle:
    """What ``activate_flash_attention_impl`` keeps while the implementation is active;
    ``remove()`` (run by ``restore_flash_attention_impl``) deregisters the overrides at once."""

    def __init__(self, library, overrides):
        self.library = library
        self.overrides = overrides

    def remove(self) -> None:
        library, self.library = self.library, None
        if library is not None:
            library._destroy()


def install(dispatch_key="CUDA") -> Handle:
    """Registers the overrides on the installed torch's flash ops for ``dispatch_key`` (tests
    use CPU to run the dispatcher's path without a GPU). torch's registry restores any previously
    active implementation before calling this, so the kernels captured for fallbacks are torch's
    own."""
    overrides = {}
    for op_name, fn in OVERRIDDEN_OPS.items():
        schema = installed_schema(op_name)
        if schema is not None:
            overrides[op_name] = _Override(op_name, fn, schema,
                                           _original_kernel(op_name, dispatch_key))
    library = torch.library.Library("aten", "IMPL", dispatch_key)
    try:
        with warnings.catch_warnings():
            # Overriding torch's kernel is the point; its warning says so once per process.
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
            for op_name, override in overrides.items():
                library.impl(op_name, override, dispatch_key, with_keyset=True)
    except BaseException:
        library._destroy()
        raise
    return Handle(library, overrides)
