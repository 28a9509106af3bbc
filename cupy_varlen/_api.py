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
              long_rows: bool = False, paged: bool = False, decode: bool = False,
              softcap: bool = False, alibi: bool = False, sinks: bool = False):
    spec = _spec.choose_fwd_spec(dtype, head_dim, windowed, _device_arch(device), choice,
                                 long_rows, paged, decode, softcap, alibi, sinks)
    return spec, _build.load_kernels(spec, device)


def _aligned(info) -> bool:
    """16-byte vector access needs a 16-byte aligned base and strides of 8 elements but the last
    (row and head; a page pool's page stride too)."""
    return info.ptr % 16 == 0 and all(isinstance(s, int) and s % 8 == 0
                                      for s in info.strides[:-1])


def _strided_offsets(info) -> bool:
    """The kernels index cu_seqlens[b] directly; a strided view takes a (tiny) copy."""
    return info.shape[0] > 1 and info.strides[0] != 1


def varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                causal=False, scale=None, window_size=(-1, -1), return_lse=False, out=None,
                deterministic=False, check_inputs=False, seqused_k=None, block_table=None,
                num_splits=None, softcap=0.0, sinks=None, alibi_slopes=None):
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
            for type only (against cu_seqlens with ``check_inputs=True``). The prefill grids are
            sized from the token totals; decode-shaped calls (see ``num_splits``) take their grid
            and split count from them, and their CTAs stride over query tiles the grid missed, so
            a loose (or even too small) value never loses a row: it moves speed and the last bits
            at most.
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
        seqused_k: optional int32 array of shape (B,) (a KV cache whose slots in
            ``cu_seqlens_k`` are longer than what is filled): only the first ``seqused_k[b]``
            keys of sequence b's slot take part, and causal and window alignment use that
            length. Keys past it are never read. Inference only, as in torch: an autograd call
            (inputs that require grad, grad mode on) raises. ``check_inputs=True`` also checks
            ``0 <= seqused_k[b] <= cu_seqlens_k[b+1] - cu_seqlens_k[b]``; without it a count
            outside that range is read as the nearest bound.
        block_table: optional int32 array (B, max_pages_per_seq), contiguous along its rows: a
            paged KV cache. k and v are then page pools (num_pages, page_size, H_kv, D), any page
            size >= 1; sequence b's key j is row ``j % page_size`` of page
            ``block_table[b, j // page_size]``. Each sequence's key count comes from
            ``seqused_k`` or, as in FlashAttention-2, from the steps of ``cu_seqlens_k`` (which
            then index no rows; None allowed), the smaller where both are given. Pages may come
            in any order and be shared between sequences; pages and rows past a sequence's
            count are never read. Inference only. A count beyond the table's pages x page_size
            is read as that bound; ``check_inputs=True`` reports it, a count beyond
            ``max_seqlen_k`` and a page outside the pool instead.
        num_splits: how the keys of a row may be split across CTAs (split-KV), for calls with
            few query rows per K/V head (decode: ``max_seqlen_q`` x query heads per K/V head at
            most 128), whose K/V heads and sequences alone would leave SMs idle. None: the
            kernel chooses from the shapes (the batch, ``max_seqlen_q`` and ``max_seqlen_k``),
            so the last bits of a row can change with the batch it is in. 1: no split and no
            shape-dependent kernel choice, so each sequence's output bits do not depend on the
            rest of the batch (batch invariance). N > 1: at most N splits.
        softcap: a float >= 0 (0: none): the scaled score s becomes ``softcap * tanh(s /
            softcap)`` (Gemma 2's logit cap, FlashAttention's ``softcap``); backward through the
            tanh.
        sinks: optional float32 array (H,), contiguous, of q's type and device: one logit per
            query head that joins every row's softmax denominator and adds nothing to the
            output (gpt-oss's attention sinks). lse includes it, and a row with no allowed key
            gets out 0 and lse ``sinks[h]``. Differentiable: torch autograd fills ``sinks.grad``;
            :func:`varlen_attn_backward` returns dsinks.
        alibi_slopes: optional float32 array (H,) or (B, H), contiguous along its last dimension:
            ``slope * |i + Lk - Lq - j|`` is subtracted from the scaled score of query row i and
            key j (FlashAttention-2's ALiBi, bottom-right aligned like the causal mask; Lk is the
            used count with seqused_k). No gradient reaches the slopes.

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
    if block_table is not None:
        return _varlen_attn(VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, causal, scale, window_size, return_lse, out,
                            deterministic, check_inputs, seqused_k, block_table, num_splits,
                            softcap, sinks, alibi_slopes)
    # _varlen_attn's body for a contiguous cache, inlined: one Python call less on every call.
    if _needs_autograd(q, k, v) or (sinks is not None and _needs_autograd(sinks, sinks, sinks)):
        return _torch.varlen_attn_autograd(
            VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, window_size, return_lse, out, deterministic, check_inputs, seqused_k, None,
            num_splits, softcap, sinks, alibi_slopes)
    return _varlen_attn_eager(VARLEN_ATTN, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, window_size, return_lse, out,
                              deterministic, check_inputs, seqused_k, num_splits, softcap, sinks,
                              alibi_slopes)


def _varlen_attn(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                 scale, window_size, return_lse, out, deterministic, check_inputs,
                 seqused_k=None, block_table=None, num_splits=None, softcap=0.0, sinks=None,
                 alibi_slopes=None):
    """:func:`varlen_attn` for callers with other argument names (compat): errors speak
    ``names``."""
    if _needs_autograd(q, k, v) or (sinks is not None and _needs_autograd(sinks, sinks, sinks)):
        return _torch.varlen_attn_autograd(
            names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, window_size, return_lse, out, deterministic, check_inputs, seqused_k,
            block_table, num_splits, softcap, sinks, alibi_slopes)
    if block_table is not None:
        return _varlen_attn_paged(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal, scale, window_size, return_lse, out,
                                  check_inputs, seqused_k, block_table, num_splits, softcap,
                                  sinks, alibi_slopes)
    return _varlen_attn_eager(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, causal, scale, window_size, return_lse, out,
                              deterministic, check_inputs, seqused_k, num_splits, softcap, sinks,
                              alibi_slopes)


def _varlen_attn_eager(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       causal, scale, window_size, return_lse, out, deterministic, check_inputs,
                       seqused_k=None, num_splits=None, softcap=0.0, sinks=None,
                       alibi_slopes=None):
    """varlen_attn without autograd: checks every argument, allocates and launches. Also the
    custom op's implementation, where it is the check that guards the kernels against a direct
    ``torch.ops`` call.

    A call whose signature (see :func:`_forward_key`) was checked and planned before skips the
    checks and runs its plan."""
    key = _forward_key(q, k, v, cu_seqlens_q, cu_seqlens_k, out, max_seqlen_q, max_seqlen_k,
                       causal, scale, window_size, return_lse, deterministic, check_inputs,
                       seqused_k, None, num_splits, softcap, sinks, alibi_slopes)
    plan = _cached_plan(_forward_plans, key)
    if plan is not None:
        return plan.run(key[1], q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k, None, sinks,
                        alibi_slopes, key[2])
    adopt = _arrays.adopt
    q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k, sinks, alibi_slopes = (
        adopt(q), adopt(k), adopt(v), adopt(cu_seqlens_q), adopt(cu_seqlens_k), adopt(out),
        adopt(seqused_k), adopt(sinks), adopt(alibi_slopes))
    fw = _checks.framework(names, q)
    (qi, ki, vi, cu_qi, cu_ki, oi, _causal, scale, left, right, return_lse, _deterministic,
     check_inputs) = _checks.check_forward_args(
        fw, names, fw.info, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, scale, window_size, return_lse, out, deterministic, check_inputs)
    ui = _checks.check_seqused_k(fw, names, seqused_k, cu_qi, fw.info)
    mods = _checks.check_score_mods(fw, names, softcap, sinks, alibi_slopes, qi,
                                    cu_qi.shape[0] - 1, fw.info)
    num_splits = _checks.check_num_splits(names, num_splits)
    batch = _checks.check_launch(fw, names, cu_seqlens_q, cu_seqlens_k, qi, ki, vi, cu_qi, cu_ki,
                                 oi, max_seqlen_q, max_seqlen_k, check_inputs, seqused_k, ui,
                                 extra=(("sinks", mods[1]), ("alibi_slopes", mods[2])))
    plan = _plan_forward(qi, ki, vi, cu_qi, cu_ki, oi, batch, scale, left, right, return_lse, ui,
                         None, (max_seqlen_q, max_seqlen_k, num_splits), mods)
    if key is not None:
        _remember(_forward_plans, key[0], plan)
    return _run_on_device(plan, fw, q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k, None,
                          sinks, alibi_slopes)


def _varlen_attn_paged(names, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       causal, scale, window_size, return_lse, out, check_inputs, seqused_k,
                       block_table, num_splits=None, softcap=0.0, sinks=None,
                       alibi_slopes=None):
    """varlen_attn over a paged KV cache (block_table) without autograd, with launch plans as
    :func:`_varlen_attn_eager`'s; also the custom op's implementation for it."""
    key = _forward_key(q, k, v, cu_seqlens_q, cu_seqlens_k, out, max_seqlen_q, max_seqlen_k,
                       causal, scale, window_size, return_lse, False, check_inputs, seqused_k,
                       block_table, num_splits, softcap, sinks, alibi_slopes)
    plan = _cached_plan(_forward_plans, key)
    if plan is not None:
        return plan.run(key[1], q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k,
                        block_table, sinks, alibi_slopes, key[2])
    adopt = _arrays.adopt
    q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k, block_table, sinks, alibi_slopes = (
        adopt(q), adopt(k), adopt(v), adopt(cu_seqlens_q), adopt(cu_seqlens_k), adopt(out),
        adopt(seqused_k), adopt(block_table), adopt(sinks), adopt(alibi_slopes))
    fw = _checks.framework(names, q)
    (qi, ki, vi, cu_qi, _cu_ki, oi, _causal, scale, left, right, return_lse, _deterministic,
     check_inputs) = _checks.check_forward_args(
        fw, names, fw.info, q, k, v, cu_seqlens_q, None, max_seqlen_q, max_seqlen_k, causal,
        scale, window_size, return_lse, out, False, check_inputs, paged=True)
    bi, _page_size, cu_ki = _checks.check_paged(fw, names, block_table, seqused_k, cu_seqlens_k,
                                                cu_qi, ki, fw.info)
    ui = _checks.check_seqused_k(fw, names, seqused_k, cu_qi, fw.info)
    mods = _checks.check_score_mods(fw, names, softcap, sinks, alibi_slopes, qi,
                                    cu_qi.shape[0] - 1, fw.info)
    num_splits = _checks.check_num_splits(names, num_splits)
    batch = _checks.check_launch(fw, names, cu_seqlens_q, cu_seqlens_k, qi, ki, vi, cu_qi, cu_ki,
                                 oi, max_seqlen_q, max_seqlen_k, check_inputs, seqused_k, ui,
                                 block_table, bi,
                                 extra=(("sinks", mods[1]), ("alibi_slopes", mods[2])))
    plan = _plan_forward(qi, ki, vi, cu_qi, cu_ki, oi, batch, scale, left, right, return_lse, ui,
                         bi, (max_seqlen_q, max_seqlen_k, num_splits), mods)
    if key is not None:
        _remember(_forward_plans, key[0], plan)
    return _run_on_device(plan, fw, q, k, v, cu_seqlens_q, cu_seqlens_k, out, seqused_k,
                          block_table, sinks, alibi_slopes)


# --------------------------------------------------------------------------------------------------
# Launch plans. Checking a call's arguments, choosing and loading its kernels and working out its
# launches costs tens of microseconds of Python; all of it depends only on the arrays' shapes,
# strides, dtypes and devices, the pointers' alignment and the flags, never on the data. A plan
# holds the outcome, cached per signature: a repeated call (a training step, a decode step) reads
# its arrays' layouts and pointers, finds its plan, allocates and launches. The key never holds
# the arrays (nothing is kept alive) and never reads the device (no synchronization).

_PLAN_CAPACITY = 1024  # signatures per direction; the oldest goes first
_forward_plans: dict = {}
_backward_plans: dict = {}


def clear_caches() -> None:
    """Forgets every kernel choice and launch plan: after changing ``_spec``'s kernel choice, tile
    tables or overrides, so that the next calls dispatch (and compile) again."""
    _dispatch.cache_clear()
    _dispatch_backward.cache_clear()
    _forward_plans.clear()
    _backward_plans.clear()


def _remember(plans: dict, key, plan) -> None:
    if len(plans) >= _PLAN_CAPACITY:
        try:
            del plans[next(iter(plans))]
        except (KeyError, RuntimeError, StopIteration):  # another thread evicted or cleared first
            pass
    plans[key] = plan


_current_device = cupy.cuda.runtime.getDevice


def _cached_plan(plans: dict, key):
    """The plan remembered for ``key`` (a _forward_key / _backward_key result), or None: no key,
    no plan yet, or the plan's device is not the current one (the checked path switches to it)."""
    if key is None:
        return None
    plan = plans.get(key[0])
    return plan if plan is not None and plan.device == _current_device() else None


def _signature(arrays):
    """(framework, layouts, pointers) of arrays that are all exactly of one framework's array type
    (None entries allowed after the first), or None: others (subclasses such as Parameter or fake
    tensors, foreign DLPack arrays, mixed types) take the checked path."""
    fw = _arrays.framework_of(arrays[0])
    if fw is None:
        return None
    signature = fw.signature(arrays)
    return None if signature is None else (fw, *signature)


def _is_index(x) -> bool:
    return type(x) is int and x >= 0


def _decode_shape(max_q: int, max_k: int):
    """What of max_seqlen_q/k a plan depends on: nothing where max_seqlen_q rules out the decode
    tiles, else max_seqlen_q and the power of two above max_seqlen_k (which sizes the splits, see
    _plan_forward), so that every max_seqlen_k of one bucket shares one plan and its bits."""
    if max_q > _launch.DECODE_MAX_ROWS:
        return None
    return max_q, max_k.bit_length()


def _forward_key(q, k, v, cu_q, cu_k, out, max_q, max_k, causal, scale, window_size, return_lse,
                 deterministic, check_inputs, seqused_k=None, block_table=None, num_splits=None,
                 softcap=0.0, sinks=None, alibi_slopes=None):
    """(key, framework, pointers) of a forward call that may run a cached plan, or None.

    Beyond the checks, max_seqlen_q/k take part only where the decode tiles may serve the call
    (_decode_shape). check_inputs=True reads the offsets on the device on every call, so it always
    takes the checked path."""
    if check_inputs is not False or not (_is_index(max_q) and _is_index(max_k)) \
            or type(window_size) is not tuple \
            or (type(softcap) is not float and type(softcap) is not int) \
            or not (num_splits is None or (type(num_splits) is int and num_splits >= 1)):
        return None
    signature = _signature((q, k, v, cu_q, cu_k, out, seqused_k, block_table, sinks,
                            alibi_slopes))
    if signature is None:
        return None
    fw, layouts, ptrs = signature
    aligned = (ptrs[0] & 15, ptrs[1] & 15, ptrs[2] & 15, ptrs[5] & 15)
    return ((layouts, aligned, causal, scale, window_size, return_lse, deterministic,
             _spec.forward_kernel, num_splits, _decode_shape(max_q, max_k), softcap), fw, ptrs)


def _run_on_device(plan, fw, *arrays, ptrs=None):
    """plan.run on the plan's device, made current for the launches where it is not."""
    if ptrs is None:
        ptrs = [0 if x is None else fw.ptr(x) for x in arrays]
    if plan.device == _current_device():
        return plan.run(fw, *arrays, ptrs)
    with cupy.cuda.Device(plan.device):
        return plan.run(fw, *arrays, ptrs)


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _needs_copy(info) -> bool:
    """Whether an input must be copied before the kernels read it (see :func:`_aligned`)."""
    return not _aligned(info)


def _copy_marked(fw, arrays, ptrs, marks):
    """Replaces the marked arrays (and their pointers) by fresh contiguous copies."""
    arrays, ptrs = list(arrays), list(ptrs)
    for i, mark in enumerate(marks):
        if mark:
            arrays[i] = fw.copy(arrays[i])
            ptrs[i] = fw.ptr(arrays[i])
    return arrays, ptrs


class _ForwardPlan:
    """A checked forward signature's work: what to allocate, which inputs to copy first
    (misaligned ones: slower, never wrong), and the launches (None: nothing to compute)."""

    __slots__ = ("device", "out_shape", "lse_shape", "copies", "out_aside", "launch", "scale",
                 "left", "right", "batch", "softcap")

    def run(self, fw, q, k, v, cu_q, cu_k, out, seqused_k, block_table, sinks, alibi, ptrs):
        if self.copies is not None:
            (q, k, v, cu_q, cu_k, _out, seqused_k), ptrs = _copy_marked(
                fw, (q, k, v, cu_q, cu_k, out, seqused_k), ptrs, self.copies)
        result = fw.empty(self.out_shape, q) if out is None else out
        lse = None if self.lse_shape is None else fw.empty(self.lse_shape, q, "float32")
        launch = self.launch
        if launch is not None:
            # A misaligned out is computed aside and copied in.
            target = fw.empty(self.out_shape, q) if self.out_aside else result
            # (None where the launch needs none: an unsplit decode call skips the allocation.)
            workspace = (fw.empty((launch.workspace_entries,), cu_q, "int32")
                         if launch.workspace_entries else None)
            launch.launch(fw.stream_ptr(self.device), ptrs[0], ptrs[1], ptrs[2],
                          ptrs[5] if target is out else fw.ptr(target),
                          0 if lse is None else fw.ptr(lse), ptrs[3], ptrs[4],
                          0 if workspace is None else fw.ptr(workspace),
                          ptrs[6], 0 if block_table is None else fw.ptr(block_table),
                          ptrs[9], ptrs[8])
            if target is not result:
                fw.copy_into(result, target)
        return result if lse is None else (result, lse)


def _mod_flags(mods) -> dict:
    """The spec flags of check_score_mods' (softcap, sinks info, alibi info)."""
    softcap, si, ai = mods
    return dict(softcap=softcap > 0, alibi=ai is not None, sinks=si is not None)


def _launch_mods(scale, mods) -> _launch.ScoreMods:
    softcap, si, ai = mods
    stride = ai.strides[0] if ai is not None and len(ai.shape) == 2 else 0
    return _launch.ScoreMods(scale, softcap, stride, si is not None)


_NO_MODS = (0.0, None, None)


def _plan_forward(qi, ki, vi, cu_qi, cu_ki, oi, batch, scale, left, right, return_lse, ui=None,
                  bi=None, sizes=(None, None, None), mods=_NO_MODS):
    """The plan of a forward whose arguments have been checked (their infos, scale resolved,
    causal folded into the window; ``ui`` seqused_k's info or None; ``bi`` a paged cache's block
    table's, k and v then page pools, cu_ki None; ``sizes`` (max_seqlen_q, max_seqlen_k,
    num_splits), which choose the decode tiles and their splits, max_seqlen_q None for never;
    ``mods`` check_score_mods' result)."""
    total_q, heads, head_dim = qi.shape
    plan = _ForwardPlan()
    plan.device, plan.batch = qi.device, batch
    plan.scale, plan.left, plan.right = scale, left, right
    plan.softcap = mods[0]
    plan.out_shape = qi.shape
    plan.lse_shape = (heads, total_q) if return_lse else None
    copies = (_needs_copy(qi), _needs_copy(ki), _needs_copy(vi), _strided_offsets(cu_qi),
              cu_ki is not None and _strided_offsets(cu_ki), False,
              ui is not None and _strided_offsets(ui))
    plan.copies = copies if any(copies) else None
    plan.out_aside = oi is not None and not _aligned(oi)
    plan.launch = None
    if total_q == 0 or batch == 0:
        return plan
    # The kernels read the copies' strides where they copy.
    q_strides, k_strides, v_strides = (
        _contiguous_strides(info.shape) if copy else info.strides
        for info, copy in zip((qi, ki, vi), copies))
    o_strides = oi.strides if oi is not None and not plan.out_aside else \
        _contiguous_strides(qi.shape)
    device = qi.device
    paged = None
    if bi is None:
        total_k = ki.shape[0]
    else:  # k_strides, v_strides: (page, row in the page, head) of the pools
        total_k = bi.shape[1] * ki.shape[1]  # keys a sequence can hold
        paged = (ki.shape[1], bi.shape[1], k_strides[0], v_strides[0], bi.strides[0])
        k_strides, v_strides = k_strides[1:], v_strides[1:]
    window = _kernel_window(left, right, total_q + total_k)
    dtype, windowed = _arrays.DTYPE_NAMES[qi.dtype], window != (-1, -1)
    heads_per_kv = heads // ki.shape[-2]
    max_q, max_k, num_splits = sizes
    if max_q is not None and _launch.takes_decode_tiles(num_splits, max_q, heads_per_kv, batch,
                                                        heads // heads_per_kv):
        with _on(device):
            spec, kernels = _dispatch(dtype, head_dim, windowed, device, "sm80", False,
                                      bi is not None, True, **_mod_flags(mods))
        plan.launch = _launch.DecodeLaunch(
            kernels, spec, q_strides=q_strides, k_strides=k_strides, v_strides=v_strides,
            o_strides=o_strides, lse_head_stride=total_q, total_q=total_q, batch=batch,
            heads=heads, heads_per_kv=heads_per_kv, head_dim=head_dim, scale=scale,
            scale_log2=scale * _LOG2E, window=window, max_seqlen_q=max_q,
            keys_bound=1 << max_k.bit_length(), num_sms=_num_sms(device), num_splits=num_splits,
            paged=paged, mods=_launch_mods(scale, mods))
        return plan
    # num_splits=1: no choice from the batch's shape (long_rows reads its mean length).
    long_rows = num_splits != 1 and _spec.long_rows(total_q, batch)
    with _on(device):
        spec, kernels = _dispatch(dtype, head_dim, windowed, device, _spec.forward_kernel,
                                  long_rows, bi is not None, **_mod_flags(mods))
    plan.launch = _launch.ForwardLaunch(
        kernels, spec, q_strides=q_strides, k_strides=k_strides, v_strides=v_strides,
        o_strides=o_strides, lse_head_stride=total_q, total_q=total_q, total_k=total_k,
        batch=batch, heads=heads, heads_per_kv=heads_per_kv, head_dim=head_dim,
        scale=scale, scale_log2=scale * _LOG2E, window=window, num_sms=_num_sms(device),
        l2_bytes=_l2_bytes(device), paged=paged, mods=_launch_mods(scale, mods))
    return plan


def _on(device):
    """The device made current, unless it is (entering a Device context costs microseconds)."""
    return contextlib.nullcontext() if _current_device() == device else cupy.cuda.Device(device)


@functools.lru_cache(maxsize=None)
def _dispatch_backward(dtype: str, head_dim: int, windowed: bool, device: int,
                       deterministic: bool, choice: str, softcap: bool = False,
                       alibi: bool = False):
    spec = _spec.choose_bwd_spec(dtype, head_dim, windowed, _device_arch(device), deterministic,
                                 choice, softcap, alibi)
    return spec, _build.load_kernels(spec, device)


def varlen_attn_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, *, causal=False, scale=None, window_size=(-1, -1),
                         deterministic=False, dq=None, dk=None, dv=None, softcap=0.0, sinks=None,
                         alibi_slopes=None, dsinks=None):
    r"""Gradients of :func:`varlen_attn` with respect to q, k and v (and sinks).

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

    ``causal``, ``scale``, ``window_size`` and the score modifiers (``softcap``, ``sinks``,
    ``alibi_slopes``) must be the forward's; with sinks, ``lse`` holds them (the forward's). Only
    the last dimension of each array must be contiguous; dq, dk and dv may be strided views,
    written in place. With sinks the gradient of the sinks comes too: float32 (H,), ``dsinks`` if
    given (contiguous, written in place), always bitwise repeatable.

    ``deterministic=True`` gives bitwise repeatable gradients: dQ is computed by its own kernel
    (one CTA per query tile, key tiles in a fixed order) instead of fp32 atomics from the dK/dV
    kernel, which recomputes two GEMMs per tile pair (about 1.4x the backward's tensor-core work).
    The default accumulates dQ with atomics, whose order (hence the last bits) varies run to run.

    A query row with no allowed key (lse -inf) gets dq 0, a key no query attends gets dk = dv = 0,
    never NaN. Runs on the caller's current stream without host synchronization.

    Returns:
        ``(dq, dk, dv)``, arrays of q's type; ``(dq, dk, dv, dsinks)`` with sinks.
    """
    key = _backward_key(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv,
                        max_seqlen_q, max_seqlen_k, causal, scale, window_size, deterministic,
                        softcap, sinks, alibi_slopes, dsinks)
    plan = _cached_plan(_backward_plans, key)
    if plan is not None:
        return plan.run(key[1], dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv,
                        sinks, alibi_slopes, dsinks, key[2])
    (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk, dv, sinks, alibi_slopes,
     dsinks) = (_arrays.adopt(x) for x in (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                            dq, dk, dv, sinks, alibi_slopes, dsinks))
    names = VARLEN_ATTN_BACKWARD
    fw = _checks.framework(names, q)
    (doi, qi, ki, vi, oi, li, cu_qi, cu_ki, scale, left, right, deterministic, batch,
     (softcap, si, ai, _dsi)) = _checks.check_backward_args(
        fw, names, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        max_seqlen_k, causal, scale, window_size, deterministic, dq, dk, dv, softcap, sinks,
        alibi_slopes, dsinks)
    grads = [None if x is None else fw.info(x) for x in (dq, dk, dv)]
    plan = _plan_backward(doi, qi, ki, vi, oi, li, cu_qi, cu_ki, grads, batch, scale, left, right,
                          deterministic, (softcap, si, ai))
    if key is not None:
        _remember(_backward_plans, key[0], plan)
    return _run_on_device(plan, fw, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, dq, dk,
                          dv, sinks, alibi_slopes, dsinks)


def _autograd_backward(fw, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, left, right,
                       deterministic, batch, softcap=0.0, sinks=None, alibi_slopes=None):
    """The backward of an autograd call whose forward checked every argument: dout has out's
    shape, dtype and device (autograd's engine sees to that) and a unit last stride
    (``_torch._dout_for_kernels``), so nothing is checked again. Shares its plans with
    :func:`varlen_attn_backward` (causal is in the window)."""
    key = _backward_key(dout, q, k, v, out, lse, cu_q, cu_k, None, None, None, max_q, max_k,
                        False, scale, (left, right), deterministic, softcap, sinks, alibi_slopes)
    plan = _cached_plan(_backward_plans, key)
    if plan is not None:
        return plan.run(fw, dout, q, k, v, out, lse, cu_q, cu_k, None, None, None, sinks,
                        alibi_slopes, None, key[2])
    info = fw.info
    mods = (softcap, None if sinks is None else info(sinks),
            None if alibi_slopes is None else info(alibi_slopes))
    plan = _plan_backward(info(dout), info(q), info(k), info(v), info(out), info(lse), info(cu_q),
                          info(cu_k), (None, None, None), batch, scale, left, right,
                          deterministic, mods)
    if key is not None:
        _remember(_backward_plans, key[0], plan)
    return _run_on_device(plan, fw, dout, q, k, v, out, lse, cu_q, cu_k, None, None, None, sinks,
                          alibi_slopes, None)


def _backward_key(dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, max_q, max_k, causal, scale,
                  window_size, deterministic, softcap=0.0, sinks=None, alibi_slopes=None,
                  dsinks=None):
    """(key, framework, pointers) of a backward call that may run a cached plan, or None (see
    :func:`_forward_key`)."""
    if not (_is_index(max_q) and _is_index(max_k)) or type(window_size) is not tuple \
            or (type(softcap) is not float and type(softcap) is not int):
        return None
    signature = _signature((dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, sinks, alibi_slopes,
                            dsinks))
    if signature is None:
        return None
    fw, layouts, ptrs = signature
    # dout, q, k, v, out and the given gradients (lse and the offsets need no 16 bytes).
    aligned = (ptrs[0] & 15, ptrs[1] & 15, ptrs[2] & 15, ptrs[3] & 15, ptrs[4] & 15,
               ptrs[8] & 15, ptrs[9] & 15, ptrs[10] & 15)
    return ((layouts, aligned, causal, scale, window_size, deterministic,
             _spec.backward_kernel, softcap), fw, ptrs)


class _BackwardPlan:
    """A checked backward signature's work, as :class:`_ForwardPlan`: the gradients to allocate,
    the inputs to copy first, the gradients to compute aside, and the launches. With sinks, dsinks
    comes too (``sinks_shape``)."""

    __slots__ = ("device", "shapes", "copies", "aside", "launch", "sinks_shape")

    def run(self, fw, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, sinks, alibi, dsinks,
            ptrs):
        inputs = (dout, q, k, v, out, lse, cu_q, cu_k)
        if self.copies is not None:
            inputs, ptrs = _copy_marked(fw, inputs, ptrs, self.copies)
        dout, q, k, v, out, lse, cu_q, cu_k = inputs
        grads = [x if x is not None else fw.empty(shape, like)
                 for x, shape, like in zip((dq, dk, dv), self.shapes, (q, k, v))]
        launch = self.launch
        if self.sinks_shape is not None:
            if dsinks is None:
                dsinks = fw.empty(self.sinks_shape, sinks, "float32")
            if launch is None:  # no query rows: no sink probability anywhere
                fw.zero_(dsinks)
        if launch is None:
            return tuple(grads) if dsinks is None else (*grads, dsinks)
        # Misaligned gradients are computed aside and copied in; the caller gets its own.
        targets = [fw.empty(shape, like) if aside else x
                   for x, shape, like, aside in zip(grads, self.shapes, (q, k, v), self.aside)]
        given = (dq, dk, dv)
        gp = [ptrs[8 + i] if t is given[i] else fw.ptr(t) for i, t in enumerate(targets)]
        workspace = fw.empty((launch.workspace_entries,), cu_q, "int32")
        launch.launch(fw.stream_ptr(self.device), dout=ptrs[0], q=ptrs[1], k=ptrs[2], v=ptrs[3],
                      out=ptrs[4], lse=ptrs[5], cu_q=ptrs[6], cu_k=ptrs[7], dq=gp[0], dk=gp[1],
                      dv=gp[2], workspace=fw.ptr(workspace), alibi=ptrs[12], sinks=ptrs[11],
                      dsinks=0 if dsinks is None else fw.ptr(dsinks))
        for grad, target in zip(grads, targets):
            if target is not grad:
                fw.copy_into(grad, target)
        return tuple(grads) if dsinks is None else (*grads, dsinks)


def _plan_backward(doi, qi, ki, vi, oi, li, cu_qi, cu_ki, grads, batch, scale, left, right,
                   deterministic, mods=_NO_MODS):
    """The plan of a backward whose arguments have been checked (see :func:`_plan_forward`);
    ``grads``: the infos of the given dq, dk, dv (None where not given); ``mods``: (softcap,
    sinks' info, alibi_slopes' info)."""
    total_q, heads, head_dim = qi.shape
    total_k, heads_kv, _ = ki.shape
    plan = _BackwardPlan()
    plan.device = qi.device
    plan.shapes = (qi.shape, ki.shape, vi.shape)
    plan.sinks_shape = None if mods[1] is None else mods[1].shape
    copies = (_needs_copy(doi), _needs_copy(qi), _needs_copy(ki), _needs_copy(vi),
              _needs_copy(oi), False, _strided_offsets(cu_qi), _strided_offsets(cu_ki))
    plan.copies = copies if any(copies) else None
    plan.aside = tuple(g is not None and not _aligned(g) for g in grads)
    plan.launch = None
    if batch == 0 or not (total_q or total_k):
        return plan
    strides = {name: _contiguous_strides(info.shape)[:2] if copy else info.strides[:2]
               for name, info, copy in (("dout", doi, copies[0]), ("q", qi, copies[1]),
                                        ("k", ki, copies[2]), ("v", vi, copies[3]),
                                        ("out", oi, copies[4]))}
    for name, info, aside, shape in zip(("dq", "dk", "dv"), grads, plan.aside, plan.shapes):
        strides[name] = (_contiguous_strides(shape) if info is None or aside
                         else info.strides)[:2]
    device = qi.device
    window = _kernel_window(left, right, total_q + total_k)
    with _on(device):
        flags = _mod_flags(mods)
        spec, kernels = _dispatch_backward(_arrays.DTYPE_NAMES[qi.dtype], head_dim,
                                           window != (-1, -1), device, deterministic,
                                           _spec.backward_kernel, flags["softcap"],
                                           flags["alibi"])
    plan.launch = _launch.BackwardLaunch(
        kernels, spec, strides=strides, lse_strides=li.strides, total_q=total_q, total_k=total_k,
        batch=batch, heads=heads, heads_kv=heads_kv, head_dim=head_dim, scale=scale,
        scale_log2=scale * _LOG2E, window=window, num_sms=_num_sms(device),
        mods=_launch_mods(scale, mods))
    return plan
