"""The float64 reference against torch SDPA, sequence by sequence (CPU)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cupy_varlen.reference import (allowed_keys_mask, varlen_attn_backward_reference,
                                   varlen_attn_reference)


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


# The inference forms: seqused_k and paged K/V (block_table), as torch 2.13's varlen_attn takes them.


def test_seqused_k_keeps_the_first_keys_of_each_slot():
    q, k, v, cu_q, cu_k = packed([3, 5, 1], [10, 6, 4])
    used = torch.tensor([7, 6, 0], dtype=torch.int32)
    got = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, seqused_k=used)
    # The same as a cache holding only the used keys (causal alignment with the used length).
    keep = torch.cat([torch.arange(0, 7), torch.arange(10, 16)])
    cu_used = torch.tensor([0, 7, 13, 13], dtype=torch.int32)
    expect = varlen_attn_reference(q, k[keep], v[keep], cu_q, cu_used, causal=True)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"seqused_k\[1\] = 7"):
        varlen_attn_reference(q, k, v, cu_q, cu_k, seqused_k=torch.tensor([7, 7, 0]))


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_keys_read_through_shuffled_shared_pages(page_size):
    """Pages in any order, one shared between two sequences (a common prefix), unused pages and
    page tails NaN: the paged reference equals the contiguous one on the gathered keys."""
    g = torch.Generator().manual_seed(page_size)
    heads_kv, head_dim, used = 2, 8, [9, 5, 0, 17]
    pages_per_seq = max(-(-n // page_size) for n in used) + 1
    num_pages = sum(-(-n // page_size) for n in used) + 3
    k_pool = torch.full((num_pages, page_size, heads_kv, head_dim), math.nan, dtype=torch.float64)
    v_pool = k_pool.clone()
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((len(used), pages_per_seq), 10**6, dtype=torch.int32)  # unread padding
    k_seqs, v_seqs = [], []
    for b, n in enumerate(used):
        k_seqs.append(torch.randn(n, heads_kv, head_dim, generator=g, dtype=torch.float64))
        v_seqs.append(torch.randn(n, heads_kv, head_dim, generator=g, dtype=torch.float64))
        for j in range(-(-n // page_size)):
            page = order.pop()
            table[b, j] = page
            rows = slice(j * page_size, min(n, (j + 1) * page_size))
            k_pool[page, :rows.stop - rows.start] = k_seqs[b][rows]
            v_pool[page, :rows.stop - rows.start] = v_seqs[b][rows]
    if used[1] >= page_size:  # sequence 1 shares sequence 0's first page (a common prefix)
        table[1, 0] = table[0, 0]
        k_seqs[1][:page_size] = k_seqs[0][:page_size]
        v_seqs[1][:page_size] = v_seqs[0][:page_size]
    q_lens = [3, 1, 2, 17]
    q = torch.randn(sum(q_lens), 4, head_dim, generator=g, dtype=torch.float64)
    cu_q = torch.tensor([0, 3, 4, 6, 23], dtype=torch.int32)
    seqused = torch.tensor(used, dtype=torch.int32)
    got, lse = varlen_attn_reference(q, k_pool, v_pool, cu_q, None, causal=True,
                                     seqused_k=seqused, block_table=table, return_lse=True)
    cu_k = torch.tensor([0, 9, 14, 14, 31], dtype=torch.int32)
    expect, expect_lse = varlen_attn_reference(q, torch.cat(k_seqs), torch.cat(v_seqs), cu_q, cu_k,
                                               causal=True, return_lse=True)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(lse, expect_lse, rtol=0, atol=0)


def test_paged_keys_reject_what_does_not_fit():
    pool = torch.zeros(4, 2, 1, 8, dtype=torch.float64)
    q = torch.zeros(2, 1, 8, dtype=torch.float64)
    cu_q = torch.tensor([0, 2], dtype=torch.int32)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match="needs 3 pages"):
        varlen_attn_reference(q, pool, pool, cu_q, None, seqused_k=torch.tensor([5]),
                              block_table=table)
    with pytest.raises(ValueError, match="outside the pool"):
        varlen_attn_reference(q, pool, pool, cu_q, None, seqused_k=torch.tensor([3]),
                              block_table=torch.tensor([[0, 4]], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs seqused_k"):
        varlen_attn_reference(q, pool, pool, cu_q, None, block_table=table)


# Score modifiers: logit softcap, attention sinks, ALiBi (issue "score modifiers"). The expected
# values are built per sequence another way: a dense bias matrix, the sink as an extra softmax
# column through F.softmax, and ALiBi through SDPA's float attn_mask where no other modifier is on.


def modified_per_sequence(q, k, v, cu_q, cu_k, *, causal=False, window=(-1, -1), scale=None,
                          softcap=0.0, sinks=None, slopes=None):
    """(out, lse) with every modifier, sequence by sequence: softmax over [scores, sink]."""
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs = q[cu_q[b]:cu_q[b + 1]]
        ks = k[cu_k[b]:cu_k[b + 1]].repeat_interleave(group, 1)
        vs = v[cu_k[b]:cu_k[b + 1]].repeat_interleave(group, 1)
        lq, lk = qs.shape[0], ks.shape[0]
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            pos = torch.arange(lq).view(-1, 1) + (lk - lq)
            dist = (torch.arange(lk).view(1, -1) - pos).abs().to(s.dtype)
            s = s - (slopes[b] if slopes.dim() == 2 else slopes).view(-1, 1, 1) * dist
        s = s.masked_fill(~allowed_keys_mask(lq, lk, causal, window), -math.inf)
        sink = (torch.full((heads,), -math.inf, dtype=s.dtype) if sinks is None else sinks)
        full = torch.cat([s, sink.view(-1, 1, 1).expand(heads, lq, 1)], dim=-1)
        lse = torch.logsumexp(full, -1)
        p = torch.nan_to_num(F.softmax(full, dim=-1), nan=0.0)[..., :lk]  # a row of -inf: 0
        outs.append(torch.einsum("hqk,khd->qhd", p, vs))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


MODIFIER_LENS = ([5, 17, 1, 0, 9], [9, 17, 4, 3, 0])  # Lq != Lk, a sequence without keys or rows


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 2))])
def test_softcap_caps_the_scaled_scores(causal, window):
    q, k, v, cu_q, cu_k = packed(*MODIFIER_LENS, heads_kv=2)
    q = q * 8  # logits in the tens, where the cap bends them
    got, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                                     softcap=5.0, return_lse=True)
    expect, expect_lse = modified_per_sequence(q, k, v, cu_q, cu_k, causal=causal, window=window,
                                               softcap=5.0)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(lse, expect_lse)
    plain = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window)
    assert (got - plain).abs().max() > 1e-2  # the cap changed something
    torch.testing.assert_close(  # and a cap far above every logit changes nothing
        varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                              softcap=1e6), plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_alibi_matches_sdpa_with_the_bias_as_mask(per_sequence, causal):
    lens_q, lens_k = [5, 17, 3], [9, 17, 3]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, heads_kv=2)
    g = torch.Generator().manual_seed(7)
    slopes = torch.rand((3, 4) if per_sequence else (4,), generator=g, dtype=torch.float64)
    got = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal, alibi_slopes=slopes)
    outs = []
    for b in range(3):
        qs = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)
        ks = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(2, 0)
        vs = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(2, 0)
        lq, lk = lens_q[b], lens_k[b]
        slope = (slopes[b] if per_sequence else slopes).view(4, 1, 1)
        dist = torch.tensor([[abs(i + lk - lq - j) for j in range(lk)] for i in range(lq)],
                            dtype=torch.float64)
        bias = (-slope * dist).masked_fill(~allowed_keys_mask(lq, lk, causal, (-1, -1)),
                                           -math.inf)
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bias).transpose(0, 1))
    torch.testing.assert_close(got, torch.cat(outs))


def test_alibi_distance_is_bottom_right_aligned():
    from cupy_varlen.reference import alibi_distance

    assert alibi_distance(2, 4).tolist() == [[2, 1, 0, 1], [3, 2, 1, 0]]
    assert alibi_distance(3, 3).diagonal().eq(0).all()


def test_sinks_join_the_denominator_only():
    q, k, v, cu_q, cu_k = packed(*MODIFIER_LENS, heads_kv=2)
    sinks = torch.tensor([0.5, -1.0, 3.0, -math.inf], dtype=torch.float64)
    got, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, sinks=sinks,
                                     return_lse=True)
    expect, expect_lse = modified_per_sequence(q, k, v, cu_q, cu_k, causal=True, sinks=sinks)
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(lse, expect_lse)
    # The output is the plain one scaled down by the weight the sink took from each row.
    plain, plain_lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    kept = torch.exp(plain_lse - lse).transpose(0, 1).unsqueeze(-1)  # (total_q, H, 1)
    torch.testing.assert_close(got, torch.nan_to_num(plain * kept, nan=0.0))
    # Rows with no allowed key: output 0, lse the sink itself (finite unless the sink is -inf).
    empty_rows = torch.arange(int(cu_q[-2]), int(cu_q[-1]))  # the last sequence has no keys
    assert (got[empty_rows] == 0).all()
    torch.testing.assert_close(lse[:3, empty_rows],
                               sinks[:3].view(3, 1).expand(3, len(empty_rows)))
    assert (lse[3, empty_rows] == -math.inf).all()


def test_sinks_gradient():
    """dsinks[h] = -sum over the head's rows of p_sink * (dout . out): checked against autograd,
    and autograd against finite differences."""
    q, k, v, cu_q, cu_k = packed([4, 7], [6, 7], heads=2, head_dim=8)
    sinks = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)
    out, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, sinks=sinks,
                                     return_lse=True)
    dout = torch.randn_like(out)
    (dsinks,) = torch.autograd.grad(out, sinks, dout)
    p_sink = torch.exp(sinks.detach().view(2, 1) - lse.detach())  # (H, total_q)
    delta = (dout * out.detach()).sum(-1).transpose(0, 1)  # (H, total_q)
    torch.testing.assert_close(dsinks, -(p_sink * delta).sum(1))
    torch.autograd.gradcheck(
        lambda s, qq: varlen_attn_reference(qq, k, v, cu_q, cu_k, causal=True, sinks=s),
        (sinks, q.clone().requires_grad_()))


def test_every_modifier_with_windows_gqa_and_paged_keys():
    q, k, v, cu_q, cu_k = packed(*MODIFIER_LENS, heads=4, heads_kv=1)
    g = torch.Generator().manual_seed(3)
    mods = dict(softcap=2.0, sinks=torch.randn(4, generator=g, dtype=torch.float64),
                alibi_slopes=torch.rand(5, 4, generator=g, dtype=torch.float64))
    got, lse = varlen_attn_reference(q * 4, k, v, cu_q, cu_k, window_size=(4, 1),
                                     return_lse=True, **mods)
    expect, expect_lse = modified_per_sequence(q * 4, k, v, cu_q, cu_k, window=(4, 1),
                                               softcap=2.0, sinks=mods["sinks"],
                                               slopes=mods["alibi_slopes"])
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(lse, expect_lse)
    # The same keys through a paged cache with pages of 2 (and seqused_k equal to the lengths).
    page, counts = 2, MODIFIER_LENS[1]
    pages = [-(-n // page) for n in counts]
    table = torch.zeros(len(counts), max(pages), dtype=torch.int32)
    k_pool = torch.zeros(sum(pages), page, 1, q.shape[-1], dtype=torch.float64)
    v_pool = torch.zeros_like(k_pool)
    next_page = 0
    for b, n in enumerate(counts):
        for j in range(pages[b]):
            rows = slice(cu_k[b] + j * page, cu_k[b] + min(n, (j + 1) * page))
            k_pool[next_page, :rows.stop - rows.start] = k[rows]
            v_pool[next_page, :rows.stop - rows.start] = v[rows]
            table[b, j] = next_page
            next_page += 1
    paged = varlen_attn_reference(q * 4, k_pool, v_pool, cu_q, None, window_size=(4, 1),
                                  seqused_k=torch.tensor(counts, dtype=torch.int32),
                                  block_table=table, **mods)
    torch.testing.assert_close(paged, got, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0"),
    (dict(softcap=math.nan), ValueError, "softcap must be finite"),
    (dict(softcap=True), TypeError, "softcap must be a float"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(4,\)"),
    (dict(alibi_slopes=torch.zeros(4, 4)), ValueError, r"alibi_slopes must have shape \(4,\) or \(2, 4\)"),
])
def test_modifier_arguments_are_checked(kwargs, error, match):
    q, k, v, cu_q, cu_k = packed([3, 2], [3, 2])
    with pytest.raises(error, match=match):
        varlen_attn_reference(q, k, v, cu_q, cu_k, **kwargs)


@pytest.mark.parametrize("causal,window,heads_kv", [(False, (-1, -1), 4), (True, (-1, -1), 2),
                                                    (False, (3, 5), 1), (True, (6, -1), 4)])
def test_backward_reference_is_autograd_of_the_reference(causal, window, heads_kv):
    """From the forward's own out and lse, the explicit backward is autograd's gradient of the
    reference, Lq != Lk, an empty query sequence and rows with no allowed key included; from a
    whole row's out and lse, the gradients of two halves of the keys sum to the whole's."""
    g = torch.Generator().manual_seed(5)
    cu_q = torch.tensor([0, 7, 7, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 12, 25], dtype=torch.int32)
    q = torch.randn(20, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(25, heads_kv, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(20, 4, 8, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attn_reference(*leaves, cu_q, cu_k, causal=causal, window_size=window,
                                     return_lse=True)
    expect = torch.autograd.grad(out, leaves, dout)
    got = varlen_attn_backward_reference(dout, q, k, v, out.detach(), lse.detach(), cu_q, cu_k,
                                         causal=causal, window_size=window)
    for name, a, b in zip("qkv", got, expect):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")
    if causal or window != (-1, -1):
        return
    # Unmasked: each sequence's keys split in two blocks, each run with the whole row's out/lse.
    cuts = ([(0, 4), (9, 10), (12, 18)], [(4, 9), (10, 12), (18, 25)])
    dq_sum, dk_sum, dv_sum = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for spans in cuts:
        rows = torch.cat([torch.arange(a, b) for a, b in spans])
        cu_part = torch.tensor([0, *itertools.accumulate(b - a for a, b in spans)],
                               dtype=torch.int32)
        dq, dk, dv = varlen_attn_backward_reference(dout, q, k[rows], v[rows], out.detach(),
                                                    lse.detach(), cu_q, cu_part)
        dq_sum += dq
        dk_sum.index_add_(0, rows, dk)
        dv_sum.index_add_(0, rows, dv)
    for name, a, b in zip("qkv", (dq_sum, dk_sum, dv_sum), expect):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name} by blocks: {m}")
