"""Plain-PyTorch reference for varlen attention, in float64 by default.

Used by the tests and the benchmark to judge the kernels; it is exact up to float64 rounding, loops
over sequences on the host (it reads ``cu_seqlens``, which the kernels never do) and is slow.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["varlen_attn_reference", "varlen_attn_backward_reference", "allowed_keys_mask",
           "alibi_distance", "gather_paged_keys"]


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


def alibi_distance(q_len: int, k_len: int, device=None):
    """Integer (q_len, k_len) ``|i + k_len - q_len - j|``: how far key j lies from query row i's
    own position, bottom-right aligned like :func:`allowed_keys_mask`; ALiBi subtracts
    ``slope * alibi_distance`` from the scaled score."""
    rows = torch.arange(q_len, device=device).unsqueeze(1)
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return (rows + (k_len - q_len) - cols).abs()


def _score_modifiers(softcap, sinks, alibi_slopes, batch, heads, dtype, device):
    """The modifiers checked and in compute form: (softcap as float, sinks (H,) or None,
    alibi_slopes (B, H) or None)."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"varlen_attn_reference: softcap must be a float, got "
                        f"{type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"varlen_attn_reference: softcap must be finite and >= 0, got {softcap}")
    if sinks is not None:
        sinks = _as_torch(sinks)
        if tuple(sinks.shape) != (heads,):
            raise ValueError(f"varlen_attn_reference: sinks must have shape ({heads},) (one logit "
                             f"per query head), got {tuple(sinks.shape)}")
        sinks = sinks.to(device=device, dtype=dtype)
    if alibi_slopes is not None:
        alibi_slopes = _as_torch(alibi_slopes)
        if tuple(alibi_slopes.shape) == (heads,):
            alibi_slopes = alibi_slopes.unsqueeze(0).expand(batch, heads)
        elif tuple(alibi_slopes.shape) != (batch, heads):
            raise ValueError(f"varlen_attn_reference: alibi_slopes must have shape ({heads},) or "
                             f"({batch}, {heads}), got {tuple(alibi_slopes.shape)}")
        alibi_slopes = alibi_slopes.to(device=device, dtype=dtype)
    return float(softcap), sinks, alibi_slopes


def gather_paged_keys(pool, block_table, seqused_k):
    """The keys (or values) of every sequence from a paged cache, packed: ``pool`` is ``(num_pages,
    page_size, H_kv, D)``, sequence b's keys are the first ``seqused_k[b]`` rows of its pages
    ``block_table[b, 0], block_table[b, 1], ...`` in that order. Returns ``(packed, cu_seqlens)``
    with ``packed`` of shape ``(sum seqused_k, H_kv, D)``. Pages and page tails past ``seqused_k``
    are never read, so poisoning them must not change a result."""
    pool, table, used = (_as_torch(x) for x in (pool, block_table, seqused_k))
    num_pages, page_size = pool.shape[:2]
    parts, offsets = [], [0]
    for b, n in enumerate(used.tolist()):
        needed = -(-n // page_size)
        if n < 0 or needed > table.shape[1]:
            raise ValueError(f"gather_paged_keys: seqused_k[{b}] = {n} needs {needed} pages, "
                             f"block_table has {table.shape[1]} per sequence")
        pages = table[b, :needed].tolist()
        if any(not 0 <= page < num_pages for page in pages):
            raise ValueError(f"gather_paged_keys: block_table[{b}] names a page outside the "
                             f"pool of {num_pages}: {pages}")
        rows = pool[pages].reshape(-1, *pool.shape[2:])[:n] if pages else pool[:0, 0]
        parts.append(rows)
        offsets.append(offsets[-1] + n)
    return torch.cat(parts), torch.tensor(offsets, dtype=torch.int32, device=pool.device)


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
    seqused_k=None,
    block_table=None,
    softcap: float = 0.0,
    sinks=None,
    alibi_slopes=None,
):
    """Reference attention with the same arguments as :func:`cupy_varlen.varlen_attn`.

    Accepts torch tensors or any DLPack array; computes on q's device in ``compute_dtype``
    (float64 by default) and returns torch tensors in that dtype: ``out`` of shape
    (total_q, H, D) and, with ``return_lse``, ``lse`` of shape (H, total_q). Rows with no allowed
    key give out 0 and lse -inf. ``max_seqlen_*`` are accepted for signature compatibility only.

    The inference forms of torch's ``varlen_attn``: ``seqused_k`` (int32 ``(B,)``) keeps only the
    first ``seqused_k[b]`` keys of sequence b (causal and window alignment then use that length);
    ``block_table`` (int32 ``(B, max_pages)``) makes k and v page pools
    ``(num_pages, page_size, H_kv, D)`` read through :func:`gather_paged_keys`, each sequence's
    count from ``seqused_k``, from the steps of ``cu_seqlens_k`` (which may then be None), or the
    smaller of the two.

    Score modifiers, in the order they apply to a scaled score ``s = scale * q.k``:

    - ``softcap`` (float >= 0; 0 = off): ``s = softcap * tanh(s / softcap)`` (Gemma 2's logit cap,
      FlashAttention's ``softcap``);
    - ``alibi_slopes`` (``(H,)`` or ``(B, H)``): ``s -= slope * |i + L_k - L_q - j|`` for query row i
      and key j of a sequence, bottom-right aligned like the causal mask (FlashAttention-2's
      definition; ``L_k`` is the used key count where ``seqused_k`` cuts it);
    - ``sinks`` (``(H,)``): one extra logit per query head in every row's softmax denominator that
      adds nothing to the output (gpt-oss's attention sinks): ``lse`` includes it, a row with no
      allowed key gets out 0 and ``lse = sinks[h]``, and gradients reach ``sinks`` through autograd.
    """
    if block_table is not None:
        if seqused_k is None and cu_seqlens_k is None:
            raise ValueError("varlen_attn_reference: block_table needs seqused_k or cu_seqlens_k")
        counts = None if seqused_k is None else _as_torch(seqused_k)
        if cu_seqlens_k is not None:  # FlashAttention-2's form: the steps are the counts
            cu = _as_torch(cu_seqlens_k)
            steps = cu[1:] - cu[:-1]
            counts = steps if counts is None else torch.minimum(counts, steps)
        k, cu_seqlens_k = gather_paged_keys(k, block_table, counts)
        v, _ = gather_paged_keys(v, block_table, counts)
        seqused_k = None
    q, k, v = (_as_torch(x).to(compute_dtype) for x in (q, k, v))
    cu_q = _as_torch(cu_seqlens_q).tolist()
    cu_k = _as_torch(cu_seqlens_k).tolist()
    used = None if seqused_k is None else _as_torch(seqused_k).tolist()
    total_q, heads, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    batch = len(cu_q) - 1
    softcap, sinks, alibi_slopes = _score_modifiers(softcap, sinks, alibi_slopes, batch, heads,
                                                    compute_dtype, q.device)
    out = torch.zeros(total_q, heads, v.shape[2], dtype=compute_dtype, device=q.device)
    lse = torch.full((heads, total_q), -math.inf, dtype=compute_dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        if used is not None:
            if not 0 <= used[b] <= k1 - k0:
                raise ValueError(f"varlen_attn_reference: seqused_k[{b}] = {used[b]} outside "
                                 f"[0, {k1 - k0}], the sequence's slot in cu_seqlens_k")
            k1 = k0 + used[b]
        q_len, k_len = q1 - q0, k1 - k0
        if q_len <= 0:
            continue
        qs = q[q0:q1].transpose(0, 1)  # (H, Lq, D)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)  # (H, Lk, D)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # (H, Lq, Lk)
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        if alibi_slopes is not None:
            scores = scores - alibi_slopes[b].view(heads, 1, 1) * alibi_distance(
                q_len, k_len, q.device).to(compute_dtype)
        allowed = allowed_keys_mask(q_len, k_len, causal, window_size, q.device)
        scores = scores.masked_fill(~allowed, -math.inf)
        if sinks is not None:
            # The sink is one more column of every row's softmax that no value row stands behind.
            sink_column = sinks.view(heads, 1, 1).expand(heads, q_len, 1)
            row_lse = torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
        else:
            row_lse = torch.logsumexp(scores, dim=-1)  # -inf where a row has no allowed key
        safe = torch.where(torch.isinf(row_lse), torch.zeros_like(row_lse), row_lse)
        probs = torch.exp(scores - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked entries
        out[q0:q1] = torch.matmul(probs, vs).transpose(0, 1)
        lse[:, q0:q1] = row_lse
    return (out, lse) if return_lse else out


def varlen_attn_backward_reference(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q=None, max_seqlen_k=None, *, causal: bool = False,
                                   scale=None, window_size=(-1, -1),
                                   compute_dtype=torch.float64):
    """Reference of :func:`cupy_varlen.varlen_attn_backward` (no score modifiers): (dq, dk, dv)
    in ``compute_dtype``, from the ``out`` and ``lse`` given, as the kernels take them, not from a
    softmax recomputed here. With a forward's own out and lse that is autograd's gradient of
    :func:`varlen_attn_reference`; with the out and lse of a whole row of which these keys are a
    part (ring attention's blocks), it is the block's share of that row's gradient:
    ``P = exp(scale q.k - lse)``, ``dS = P (dout V^T - rowsum(dout * out))``."""
    dout, q, k, v, out, lse = (_as_torch(x).to(compute_dtype) for x in (dout, q, k, v, out, lse))
    cu_q = _as_torch(cu_seqlens_q).tolist()
    cu_k = _as_torch(cu_seqlens_k).tolist()
    heads, heads_kv, head_dim = q.shape[1], k.shape[1], q.shape[2]
    group = heads // heads_kv
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        q_len, k_len = q1 - q0, k1 - k0
        if q_len <= 0 or k_len <= 0:
            continue
        qs, dos, os_ = (x[q0:q1].transpose(0, 1) for x in (q, dout, out))  # (H, Lq, D)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)  # (H, Lk, D)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(group, dim=0)
        row_lse = lse[:, q0:q1].unsqueeze(-1)  # (H, Lq, 1)
        allowed = allowed_keys_mask(q_len, k_len, causal, window_size, q.device)
        probs = torch.exp(torch.matmul(qs, ks.transpose(1, 2)) * scale - row_lse)
        # A row with lse -inf has no allowed key: P is 0 there, not exp(+inf).
        probs = probs.masked_fill(~allowed | torch.isinf(row_lse), 0.0)
        delta = (dos * os_).sum(-1, keepdim=True)
        ds = probs * (torch.matmul(dos, vs.transpose(1, 2)) - delta)
        dq[q0:q1] = (torch.matmul(ds, ks) * scale).transpose(0, 1)
        dk_h = torch.matmul(ds.transpose(1, 2), qs) * scale  # (H, Lk, D)
        dv_h = torch.matmul(probs.transpose(1, 2), dos)
        dk[k0:k1] = dk_h.view(heads_kv, group, k_len, head_dim).sum(1).transpose(0, 1)
        dv[k0:k1] = dv_h.view(heads_kv, group, k_len, v.shape[2]).sum(1).transpose(0, 1)
    return dq, dk, dv
