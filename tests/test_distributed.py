"""Context parallelism (cupy_varlen.distributed): the zigzag sharding, and varlen_attn_cp's
forward and backward against one-process attention on CPU processes (gloo collectives, the float64
reference in place of the kernel) and, with a GPU, in a one-rank NCCL group on the real kernels."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MIN_BOUND, make_packed, reference_grads, rel_error, requires_gpu
from cupy_varlen.distributed import SCHEMES, _key_span, _piece, shard_plan, varlen_attn_cp
from cupy_varlen.reference import (allowed_keys_mask, varlen_attn_backward_reference,
                                   varlen_attn_reference)


def offsets(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_zigzag_chunks_partition_every_document(world):
    lengths = [0, 1, 3, 7, 8, 64, 1000]
    cu = offsets(lengths)
    owner = {}
    for rank in range(world):
        plan = shard_plan(cu, world, rank)
        assert len(plan.chunks) == 2 * len(lengths)
        assert plan.local_tokens == len(plan.positions) == len(plan.global_rows())
        assert plan.max_local_tokens >= plan.local_tokens
        for row in plan.global_rows():
            assert row not in owner
            owner[row] = rank
        for doc, (first, second) in enumerate(zip(plan.chunks[::2], plan.chunks[1::2])):
            n = lengths[doc]
            assert (first.start, first.end) == (rank * n // (2 * world),
                                                (rank + 1) * n // (2 * world))
            c = 2 * world - 1 - rank
            assert (second.start, second.end) == (c * n // (2 * world), (c + 1) * n // (2 * world))
    assert sorted(owner) == list(range(cu[-1]))  # every token on exactly one rank
    assert max(shard_plan(cu, world, r).local_tokens for r in range(world)) == \
        shard_plan(cu, world, 0).max_local_tokens


def test_zigzag_balances_causal_work():
    cu = offsets([4096, 1024, 8192])
    work = []
    for rank in range(4):
        plan = shard_plan(cu, 4, rank)
        work.append(sum(p + 1 for p in plan.positions))  # keys a causal row sees
    assert max(work) / min(work) < 1.01


def test_plan_arguments_are_checked():
    with pytest.raises(ValueError, match="start at 0 and never decrease"):
        shard_plan([0, 5, 3], 2, 0)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_plan([0, 5], 2, 2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        shard_plan([0, 5], 2.0, 0)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        shard_plan(torch.tensor([0.0, 5.0]), 2, 0)
    assert shard_plan(torch.tensor([0, 5], dtype=torch.int32), 2, 1).cu_seqlens == (0, 5)


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (5, -1)),
                                           (False, (5, 3)), (False, (-1, 2)), (False, (4, -1))])
def test_key_span_allows_what_the_window_allows(causal, window):
    """A chunk run against keys [first, end) with the effective window allows every query exactly
    the keys one-GPU attention allows it at its document position (brute force)."""
    plan = shard_plan(offsets([23]), 3, 1)
    full = allowed_keys_mask(23, 23, causal, window)
    for chunk in plan.chunks:
        if chunk.end == chunk.start:
            continue
        first, end, eff = _key_span(chunk, causal, window)
        got = allowed_keys_mask(chunk.end - chunk.start, end - first, False, eff)
        expect = full[chunk.start:chunk.end, first:end]
        assert torch.equal(got, expect), (chunk, eff)
        assert not full[chunk.start:chunk.end, :first].any()
        assert not full[chunk.start:chunk.end, end:].any()


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=6), st.integers(1, 5),
       st.booleans(), st.integers(-1, 9), st.integers(-1, 9))
def test_any_batch_shards_and_windows_like_one_gpu(lengths, world, causal, left, right):
    """Every token on exactly one rank, and every chunk's key span and effective window allow each
    query exactly what one-GPU attention allows it (brute force over random batches)."""
    cu = offsets(lengths)
    seen = []
    for rank in range(world):
        plan = shard_plan(cu, world, rank)
        seen += plan.global_rows()
        for chunk in plan.chunks:
            if chunk.end == chunk.start:
                continue
            full = allowed_keys_mask(chunk.doc_len, chunk.doc_len, causal, (left, right))
            first, end, eff = _key_span(chunk, causal, (left, right))
            got = allowed_keys_mask(chunk.end - chunk.start, end - first, False, eff)
            assert torch.equal(got, full[chunk.start:chunk.end, first:end])
            assert not full[chunk.start:chunk.end, :first].any()
            assert not full[chunk.start:chunk.end, end:].any()
    assert sorted(seen) == list(range(cu[-1]))


@settings(max_examples=60, derandomize=True, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=4), st.integers(1, 4),
       st.booleans(), st.integers(-1, 9), st.integers(-1, 9))
def test_ring_pieces_allow_what_the_window_allows(lengths, world, causal, left, right):
    """The ring's calls: a chunk's queries against another rank's chunk of the same document,
    narrowed to [q0, q1) x [p0, p1) with the effective window, allow each query exactly what
    one-GPU attention allows it; what the narrowing leaves out is not allowed (brute force)."""
    cu = offsets(lengths)
    plans = [shard_plan(cu, world, r) for r in range(world)]
    for mine in plans:
        for chunk in mine.chunks:
            if chunk.end == chunk.start:
                continue
            full = allowed_keys_mask(chunk.doc_len, chunk.doc_len, causal, (left, right))
            for theirs in plans:
                for other in theirs.chunks[2 * chunk.doc:2 * chunk.doc + 2]:
                    block = full[chunk.start:chunk.end, other.start:other.end]
                    piece = _piece(chunk, other.start, other.end, causal, (left, right))
                    if piece is None:
                        assert not block.any()
                        continue
                    q0, q1, p0, p1, eff = piece
                    assert all(w == -1 or w >= 0 for w in eff)  # -1 is the only "unbounded"
                    got = allowed_keys_mask(q1 - q0, p1 - p0, False, eff)
                    assert torch.equal(got, full[q0:q1, p0:p1])
                    inside = torch.zeros_like(block)
                    rows, cols = q0 - chunk.start, p0 - other.start
                    inside[rows:rows + q1 - q0, cols:cols + p1 - p0] = True
                    assert not (block & ~inside).any()


# With processes: gloo on CPU, the float64 reference as the kernel.

SCENARIOS = [
    # (document lengths, heads, heads_kv, causal, window)
    ([37, 5, 0, 64, 3], 4, 2, True, (-1, -1)),    # documents shorter than 2 x world, an empty one
    ([37, 5, 0, 64, 3], 4, 4, False, (-1, -1)),
    ([50, 19], 2, 1, True, (7, -1)),
    ([50, 19], 2, 2, False, (6, 4)),
    ([2, 1], 2, 2, True, (-1, -1)),                # some ranks hold no token at all
]


def _gloo_group(init_file, rank, world):
    # Loopback: gloo otherwise binds to whatever the host name resolves to, which a sandboxed CI
    # machine need not route.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)


def _rank_main(rank, world, init_file, scenarios, scheme):
    _gloo_group(init_file, rank, world)
    try:
        for lengths, heads, heads_kv, causal, window in scenarios:
            _check_scenario(rank, world, lengths, heads, heads_kv, causal, window, scheme)
    finally:
        dist.destroy_process_group()


def _check_scenario(rank, world, lengths, heads, heads_kv, causal, window, scheme):
    g = torch.Generator().manual_seed(len(lengths) * 100 + heads)  # the same batch on every rank
    cu = offsets(lengths)
    total, dim = cu[-1], 8
    q, dout = (torch.randn(total, heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, heads_kv, dim, generator=g, dtype=torch.float64) for _ in range(2))
    cu_t = torch.tensor(cu, dtype=torch.int32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    expect, expect_lse = varlen_attn_reference(*leaves, cu_t, cu_t, causal=causal,
                                               window_size=window, return_lse=True)
    expect_grads = torch.autograd.grad(expect, leaves, dout)

    plan = shard_plan(cu, world, rank)
    local = [plan.shard(x).requires_grad_() for x in (q, k, v)]
    out, lse = varlen_attn_cp(*local, cu, max(lengths), causal=causal, window_size=window,
                              return_lse=True, scheme=scheme, attn_fn=varlen_attn_reference,
                              attn_backward_fn=varlen_attn_backward_reference)
    torch.testing.assert_close(out, plan.shard(expect.detach()))
    torch.testing.assert_close(lse, plan.shard(expect_lse.detach().t()).t().float())
    (out * plan.shard(dout)).sum().backward()
    for name, leaf, grad in zip("qkv", local, expect_grads):
        torch.testing.assert_close(leaf.grad, plan.shard(grad), msg=lambda m: f"d{name}: {m}")
    torch.testing.assert_close(plan.unshard(out.detach()), expect.detach())


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world", [2, 3])
def test_cp_forward_and_backward_equal_one_process(world, scheme):
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_rank_main, args=(world, init_file, SCENARIOS, scheme), nprocs=world, join=True)


def test_cp_checks_its_shards():
    with tempfile.TemporaryDirectory() as tmp:
        _gloo_group(os.path.join(tmp, "init"), 0, 1)
        try:
            q = torch.zeros(4, 2, 8, dtype=torch.float64)
            with pytest.raises(ValueError, match=r"q must be \(local tokens = 5"):
                varlen_attn_cp(q, q, q, [0, 5], attn_fn=varlen_attn_reference)
            with pytest.raises(ValueError, match="max_seqlen=3 is below the longest"):
                varlen_attn_cp(q, q, q, [0, 4], 3, attn_fn=varlen_attn_reference)
            with pytest.raises(ValueError, match="k and v must have one shape"):
                varlen_attn_cp(q, q, q[:, :1], [0, 4], attn_fn=varlen_attn_reference)
            with pytest.raises(ValueError, match="scheme must be one of"):
                varlen_attn_cp(q, q, q, [0, 4], scheme="p2p", attn_fn=varlen_attn_reference)
        finally:
            dist.destroy_process_group()


# On one GPU: a group of one rank (NCCL), the real kernels, each document's two chunks as two
# sequences of the calls, against varlen_attn on the whole batch and the float64 reference.


@requires_gpu
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (False, (-1, -1)), (False, (96, 40))])
def test_cp_of_one_rank_on_the_gpu(causal, window, scheme):
    import cupy_varlen

    lengths = [1000, 7, 0, 300, 2048]
    q, k, v, cu, _ = make_packed(lengths, heads=8, heads_kv=2, head_dim=128)
    dout = torch.randn_like(q)
    ref = varlen_attn_reference(q, k, v, cu, cu, causal=causal, window_size=window)
    ref_grads = reference_grads(q, k, v, cu, cu, dout, causal=causal, window_size=window)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'init')}",
                                rank=0, world_size=1)
        try:
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out, lse = varlen_attn_cp(*leaves, cu.cpu(), causal=causal, window_size=window,
                                      return_lse=True, scheme=scheme)
            grads = torch.autograd.grad(out, leaves, dout)
        finally:
            dist.destroy_process_group()
    direct = [x.clone().requires_grad_() for x in (q, k, v)]
    out_direct, lse_direct = cupy_varlen.varlen_attn(*direct, cu, cu, max(lengths), max(lengths),
                                                     causal=causal, window_size=window,
                                                     return_lse=True)
    grads_direct = torch.autograd.grad(out_direct, direct, dout)
    torch.testing.assert_close(lse, lse_direct, rtol=1e-4, atol=1e-4)
    assert rel_error(out, ref) <= max(1.5 * rel_error(out_direct, ref), MIN_BOUND[q.dtype])
    for got, theirs, expect in zip(grads, grads_direct, ref_grads):
        assert rel_error(got, expect) <= max(1.5 * rel_error(theirs, expect), MIN_BOUND[q.dtype])
