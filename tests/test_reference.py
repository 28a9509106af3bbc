"""The float64 reference against torch SDPA, sequence by sequence (CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cupy_varlen.reference import allowed_keys_mask, varlen_attn_reference


def packed(q_lens, k_lens, heads=4, heads_kv=None, head_dim=32, seed=0):
    heads_kv = heads if heads_kv is None else heads_kv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(sum(k_lens), heads_kv, head_dim, generator=g, dtype=torch.float64)
    v = torch.randn(sum(k_lens), heads_kv, head_dim, generator=g, dtype=torch.float64)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    return q, k, v, cu(q_lens), cu(k_lens)


def sdpa_per_sequence(q, k, v, cu_q, cu_k, mask_fn, scale=None):
    outs = []
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        mask = mask_fn(qs.shape[1], ks.shape[1])
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
                    .transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("heads_kv", [4, 2, 1])
def test_matches_sdpa_full(heads_kv):
    q, k, v, cu_q, cu_k = packed([5, 17, 33], [9, 17, 2], heads_kv=heads_kv)
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k)
    expect = sdpa_per_sequence(q, k, v, cu_q, cu_k, lambda lq, lk: None)
    torch.testing.assert_close(ref, expect, rtol=1e-10, atol=1e-10)


def test_matches_sdpa_causal_bottom_right_with_scale():
    q, k, v, cu_q, cu_k = packed([5, 17, 8], [9, 17, 30])
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, scale=0.3)
    bottom_right = lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    expect = sdpa_per_sequence(q, k, v, cu_q, cu_k, bottom_right, scale=0.3)
    torch.testing.assert_close(ref, expect, rtol=1e-10, atol=1e-10)


def test_window_mask_definition():
    m = allowed_keys_mask(4, 6, causal=False, window_size=(1, 0))
    # row i sits at key i + 2; allowed keys [i + 1, i + 2]
    expect = torch.zeros(4, 6, dtype=torch.bool)
    for i in range(4):
        expect[i, i + 1:i + 3] = True
    assert torch.equal(m, expect)
    assert torch.equal(allowed_keys_mask(3, 3, True, (-1, -1)),
                       torch.ones(3, 3, dtype=torch.bool).tril())


def test_rows_without_keys_give_zero_and_neg_inf():
    q, k, v, cu_q, cu_k = packed([6, 3], [2, 0])
    out, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    # Sequence 0: rows 0..3 precede the bottom-right diagonal; sequence 1 has no keys at all.
    assert (out[:4] == 0).all() and (out[6:] == 0).all()
    assert (lse[:, :4] == -math.inf).all() and (lse[:, 6:] == -math.inf).all()
    assert torch.isfinite(lse[:, 4:6]).all()


def test_lse_is_logsumexp_of_scaled_scores():
    q, k, v, cu_q, cu_k = packed([7], [11])
    _, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, scale=0.5, return_lse=True)
    scores = torch.einsum("qhd,khd->hqk", q, k) * 0.5
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
