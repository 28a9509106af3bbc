"""Drop-in replacement for ``torch.nn.attention.varlen``: switching is one import line.

.. code-block:: python

    # from torch.nn.attention.varlen import varlen_attn, AuxRequest
    from cupy_varlen.compat import varlen_attn, AuxRequest

Same signature, argument meanings and results as torch's ``varlen_attn`` (and ``varlen_attn_out``),
autograd and torch.compile included. ``AuxRequest`` is torch's own class where torch has it, so
code that builds one for torch keeps working. What differs, all checked against torch's source
(``torch/nn/attention/varlen.py`` and the FlashAttention-2 kernels it calls):

- **lse of rows with no allowed key** (empty key sequence, or a window that excludes every key)
  is ``-inf`` here, the log of an empty sum; FlashAttention-2 writes ``+inf`` there. The output of
  such rows is 0 in both. lse has shape ``(H, T_q)`` in both (torch's docstring says ``(T_q, H)``,
  but its kernel and fake implementation return ``(H, T_q)``).
- **lse is not differentiable** here (``requires_grad`` False). torch returns an lse that requires
  grad but drops its gradient in the backward, so a loss using lse gets silently wrong gradients
  there; here lse is visibly outside the graph (a loss built only on lse raises).
- **scale** must be a finite positive number (torch passes any float to its kernel).
- **window_size** values below -1 mean "unbounded", as in FlashAttention-2; torch additionally
  treats a bound ``>= max_k`` as unbounded, which only differs from the true window when ``max_k``
  is smaller than a real sequence. ``max_q``/``max_k`` are checked for type only and never change
  the result (torch sizes its grid from them, so a too-small value gives wrong output there).
- **seqused_k** (a KV cache whose slots are longer than what is filled) is supported, inference
  only as in torch (an autograd call raises ``RuntimeError``).
- **block_table** (a paged KV cache, inference only as in torch): any page size; each sequence's
  key count comes from ``seqused_k`` or the steps of ``cu_seq_k`` (the smaller where both are
  given), and ``cu_seq_k=None`` is accepted with it. Served by the portable kernel family's
  row-at-a-time gather on every GPU.
- **num_splits** as in torch: ``1`` gives batch-invariant results; ``None`` lets the kernel split a
  row's keys across blocks where few query rows (decode) would leave SMs idle, ``N > 1`` at most N
  splits. The choice is made from shapes on the host, never from the offsets' values, so a decode
  step stays capturable in a CUDA graph.
- **Determinism**: the backward is bitwise deterministic when
  ``torch.use_deterministic_algorithms(True)`` is in effect at the forward call (torch reads the
  flag when the backward runs).
- Extras that torch lacks are available through :func:`cupy_varlen.varlen_attn` itself: CuPy
  arrays, strided ``out=`` views, ``check_inputs``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from . import _api, _checks, _registration
from ._checks import Names

__all__ = ["varlen_attn", "varlen_attn_out", "AuxRequest"]

try:
    from torch.nn.attention.varlen import AuxRequest
except ImportError:  # torch older than varlen_attn: same shape as torch's class

    class AuxRequest(NamedTuple):
        """Which auxiliary outputs :func:`varlen_attn` returns besides the attention output."""

        lse: bool = False


# The documented way for users who import cupy_varlen before torch to register the flash-attention
# implementation (see cupy_varlen._registration).
_registration.register_if_torch_loaded()

# Errors name torch's parameters, under the function the caller called.
_TORCH_SPELLING = dict(q="query", k="key", v="value", cu_seqlens_q="cu_seq_q",
                       cu_seqlens_k="cu_seq_k", max_seqlen_q="max_q", max_seqlen_k="max_k")
_VARLEN_ATTN = Names("varlen_attn", **_TORCH_SPELLING)
_VARLEN_ATTN_OUT = Names("varlen_attn_out", **_TORCH_SPELLING)


def _resolve(names, query, key, cu_seq_k, window_size, enable_gqa, seqused_k, block_table,
             num_splits):
    """torch's argument rules, mapped onto cupy_varlen.varlen_attn's keywords."""
    function = names.function
    if cu_seq_k is None and block_table is None:
        raise ValueError(f"{function}: cu_seq_k may be None only with block_table")
    _checks.check_num_splits(names, num_splits)
    # torch's own head-count check and messages: code that passes here passes there. Where query
    # or key is not a 3-D tensor, the validation that follows names it.
    key_dims = 4 if block_table is not None else 3
    if getattr(query, "ndim", None) == 3 and getattr(key, "ndim", None) == key_dims:
        num_heads_q, num_heads_k = query.shape[1], key.shape[-2]
        if not enable_gqa and num_heads_q != num_heads_k:
            raise ValueError(
                f"Expect query and key/value to have the same number of heads but got "
                f"Hq={num_heads_q} and Hkv={num_heads_k}. Try setting enable_gqa=True for GQA.")
        if enable_gqa and num_heads_q % num_heads_k != 0:
            raise ValueError(
                f"Expect number of query heads to be a multiple of kv heads for GQA but got "
                f"Hq={num_heads_q} and Hkv={num_heads_k}.")
    if window_size is None or len(window_size) != 2:
        raise ValueError(f"{function}: window_size must have length 2, got {window_size!r}")
    # FlashAttention-2 reads any negative bound as unbounded; (-1, 0) is torch's causal spelling
    # and is exactly the bottom-right causal mask here too.
    left, right = (-1 if isinstance(w, numbers.Integral) and not isinstance(w, bool) and w < -1
                   else w for w in window_size)
    deterministic = (torch.are_deterministic_algorithms_enabled()
                     and not torch.is_deterministic_algorithms_warn_only_enabled())
    return (left, right), deterministic


def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                block_table=None, num_splits=None):
    """``torch.nn.attention.varlen.varlen_attn`` on cupy_varlen's kernels (see the module docstring
    for the few differences).

    Returns the output ``(T_q, H, D)``, or ``(output, lse)`` with lse ``(H, T_q)`` float32 when
    ``return_aux`` is an :class:`AuxRequest` with ``lse=True``.
    """
    names = _VARLEN_ATTN
    window, deterministic = _resolve(names, query, key, cu_seq_k, window_size, enable_gqa,
                                     seqused_k, block_table, num_splits)
    want_lse = return_aux is not None and bool(return_aux.lse)
    return _api._varlen_attn(names, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False,
                             scale, window, want_lse, None, deterministic, False, seqused_k,
                             block_table, num_splits)


def varlen_attn_out(out, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                    scale=None, window_size=(-1, -1), enable_gqa=False, seqused_k=None,
                    block_table=None, num_splits=None):
    """``torch.nn.attention.varlen.varlen_attn_out``: :func:`varlen_attn` written into ``out``
    (which may be a strided view here) and returned, with ``(out, lse)`` as for varlen_attn."""
    names = _VARLEN_ATTN_OUT
    window, deterministic = _resolve(names, query, key, cu_seq_k, window_size, enable_gqa,
                                     seqused_k, block_table, num_splits)
    want_lse = return_aux is not None and bool(return_aux.lse)
    return _api._varlen_attn(names, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False,
                             scale, window, want_lse, out, deterministic, False, seqused_k,
                             block_table, num_splits)
