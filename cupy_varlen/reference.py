"""Plain-PyTorch reference for varlen attention, in float64 by default.

Used by the tests and the benchmark to judge the kernels; it is exact up to float64 rounding, loops
over sequences on the host (it reads ``cu_seqlens``, which the kernels never do) and is slow.
"""

from __future__ import annotations

import math

import torch

__all__ = ["varlen_attn_reference", "allowed_keys_mask"]


def _as_torch(x):
    if x is None or isinstance(x, torch.Tensor):
        return x
    return torch.from_dlpack(x)


def allowed_keys_mask(q_len: int, k_len: int, causal: bool, window_size, device=None):
    """Boolean (q_len, k_len) mask: True where query row i may attend to key j.

    Bottom-right aligned: row i sits at key position i + k_len - q_len; ``window_size=(left,
    right)`` bounds j to [pos - left, pos + right] (-1: unbounded); causal means right = 0.
    """
    left, right = window_size
    if causal:
        right = 0
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    pos = rows + (k_len - q_len)
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= cols >= pos - left
    if right >= 0:
        allowed &= cols <= pos + right
    return allowed


def varlen_attn_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    *,
    causal: bool = False,
    scale=None,
    window_size=(-1, -1),
    return_lse: bool = False,
    compute_dtype=torch.float64,
):
    """Reference attention with the same arguments as :func:`cupy_varlen.varlen_attn`.

    Accepts torch tensors or any DLPack array; computes on q's device in ``compute_dtype``
    (float64 by default) and returns torch tensors in that dtype: ``out`` of shape
    (total_q, H, D) and, with ``return_lse``, ``lse`` of shape (H, total_q). Rows with no allowed
    key give out 0 and lse -inf. ``max_seqlen_*`` are accepted for signature compatibility only.
    """
    q, k, v = (_as_torch(x).to(compute_dtype) for x in (q, k, v))
    cu_q = _as_torch(cu_seqlens_q).tolist()
    cu_k = _as_torch(cu_seqlens_k).tolist()
    total_q, heads, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(total_q, heads, v.shape[2], dtype=compute_dtype, device=q.device)
    lse = torch.full((heads, total_q), -math.inf, dtype=compute_dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        q_len, k_len = q1 - q0, k1 - k0
        if q_len <= 0:
            continue
        qs = q[q0:q1].transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)  # (H, Lk, D)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # (H, Lq, Lk)
        allowed = allowed_keys_mask(q_len, k_len, causal, window_size, q.device)
        scores = scores.masked_fill(~allowed, -math.inf)
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where a row has no allowed key
        safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        probs = torch.exp(scores - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked entries
        out[q0:q1] = torch.matmul(probs, vs).transpose(0, 1)
        lse[:, q0:q1] = row_lse
    return (out, lse) if return_lse else out
