"""Launch plans (cupy_varlen._api): a call whose signature was checked before skips the checks and
runs its cached plan. The plan must never change a result or let an invalid call through.

The key tests run on CPU; the rest on the GPU, each comparing against the float64 reference with
NaN-poisoned outputs, on calls that hit a plan made by an earlier call with other data.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (check_backward, check_forward, make_packed, max_len, random_like,
                      rel_error, requires_gpu)

import cupy_varlen
from cupy_varlen import _api
from cupy_varlen.reference import varlen_attn_reference


def _key(q, k, v, cu_q, cu_k, out=None, max_q=8, max_k=8, causal=False, scale=None,
         window_size=(-1, -1), return_lse=False, deterministic=False, check_inputs=False,
         num_splits=None):
    key = _api._forward_key(q, k, v, cu_q, cu_k, out, max_q, max_k, causal, scale, window_size,
                            return_lse, deterministic, check_inputs, None, None, num_splits)
    return None if key is None else key[0]


def test_forward_key_covers_layout_alignment_and_flags():
    q, k, v, cu_q, cu_k = make_packed([5, 3], heads=2, head_dim=16, device="cpu")
    base = _key(q, k, v, cu_q, cu_k)
    assert base is not None and base == _key(q.clone(), k.clone(), v.clone(), cu_q, cu_k)
    # Where max_seqlen_q rules out the decode tiles, any valid max_seqlen shares the plan.
    long = _key(q, k, v, cu_q, cu_k, max_q=200, max_k=300)
    assert long is not None and long == _key(q, k, v, cu_q, cu_k, max_q=5000, max_k=7)
    # Within reach of the decode tiles, the plan holds max_seqlen_q and max_seqlen_k's power of two
    # (the tiles' slots and splits), and num_splits.
    assert _key(q, k, v, cu_q, cu_k, max_q=8, max_k=15) == base
    assert _key(q, k, v, cu_q, cu_k, max_q=8, max_k=16) != base
    assert _key(q, k, v, cu_q, cu_k, max_q=3) != base
    assert len({base, _key(q, k, v, cu_q, cu_k, num_splits=1),
                _key(q, k, v, cu_q, cu_k, num_splits=4)}) == 3
    wide = torch.zeros(q.shape[0], 2, 24, dtype=q.dtype)
    different = [
        _key(q[:4], k, v, cu_q, cu_k),  # shape
        _key(wide[:, :, :16], k, v, cu_q, cu_k),  # strides
        _key(q.half(), k, v, cu_q, cu_k),  # dtype
        _key(wide.view(-1)[4:4 + q.numel()].view(q.shape), k, v, cu_q, cu_k),  # 8-byte offset
        _key(q, k, v, cu_q, cu_k, out=torch.empty_like(q)),
        _key(q, k, v, cu_q, cu_k, causal=True),
        _key(q, k, v, cu_q, cu_k, scale=0.5),
        _key(q, k, v, cu_q, cu_k, window_size=(2, 0)),
        _key(q, k, v, cu_q, cu_k, return_lse=True),
        _key(q, k, v, cu_q, cu_k, deterministic=True),
    ]
    assert base not in different and len(set(different)) == len(different)


@pytest.mark.parametrize("kw", [dict(check_inputs=True), dict(max_q=-1), dict(max_k=8.0),
                                dict(max_q=True), dict(window_size=[-1, -1]),
                                dict(num_splits=0), dict(num_splits=True), dict(num_splits=2.0)])
def test_calls_that_must_be_checked_have_no_key(kw):
    """check_inputs reads the offsets on every call; arguments whose check the key cannot stand
    for (a negative or non-int max_seqlen, a window list) go through the checks every time."""
    q, k, v, cu_q, cu_k = make_packed([5, 3], heads=2, head_dim=16, device="cpu")
    assert _key(q, k, v, cu_q, cu_k, **kw) is None


def test_mixed_array_types_have_no_key():
    import numpy as np

    q, k, v, cu_q, cu_k = make_packed([5, 3], heads=2, head_dim=16, device="cpu")
    assert _key(q, k, v, cu_q.numpy(), cu_k) is None
    assert _key(q, k, torch.nn.Parameter(v), cu_q, cu_k) is None
    assert _key(np.zeros(3), k, v, cu_q, cu_k) is None


def test_plans_are_bounded(monkeypatch):
    plans = {}
    monkeypatch.setattr(_api, "_PLAN_CAPACITY", 3)
    for i in range(5):
        _api._remember(plans, i, str(i))
    assert list(plans) == [2, 3, 4]


# --------------------------------------------------------------------------------------------------
# GPU: results through plans.


def _plan_counts():
    return len(_api._forward_plans), len(_api._backward_plans)


@requires_gpu
@pytest.mark.parametrize("causal", [False, True])
def test_repeated_forward_calls_run_the_plan(causal):
    """One plan per signature; every later call with new data and new pointers is correct."""
    _api.clear_caches()
    lens = [77, 300, 5, 128]
    for seed in range(3):
        q, k, v, cu_q, cu_k = make_packed(lens, heads=4, heads_kv=2, head_dim=64, seed=seed)
        check_forward(q, k, v, cu_q, cu_k, causal=causal)
        out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 300, 300, causal=causal)
        ref = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal)
        assert rel_error(out, ref) < 2e-2
        if seed == 0:
            counts = _plan_counts()
    assert _plan_counts() == counts  # later seeds hit the plans of the first


@requires_gpu
def test_misaligned_and_strided_arrays_get_plans_of_their_own():
    """A view at an odd element offset (copied before the kernels), a strided q and a misaligned,
    strided out, each right on its first call and on a repeat with new data."""
    lens = [40, 9, 100]
    for seed in range(2):
        q, k, v, cu_q, cu_k = make_packed(lens, heads=4, head_dim=64, seed=seed)
        total, heads, dim = q.shape
        ref = varlen_attn_reference(q, k, v, cu_q, cu_k)
        flat = torch.empty(q.numel() + 8, dtype=q.dtype, device="cuda")
        odd = flat[1:1 + q.numel()].view(q.shape)  # 2-byte offset: not 16-byte aligned
        odd.copy_(q)
        wide = torch.empty(total, heads + 2, dim, dtype=q.dtype, device="cuda")
        strided = wide[:, 1:1 + heads]
        strided.copy_(q)
        for query in (odd, strided):
            assert rel_error(cupy_varlen.varlen_attn(query, k, v, cu_q, cu_k, 100, 100), ref) \
                < 2e-2
        flat.fill_(math.nan)
        out = flat[1:1 + q.numel()].view(q.shape)
        got = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 100, 100, out=out)
        assert got is out and not torch.isnan(out).any()
        assert rel_error(out, ref) < 2e-2


@requires_gpu
def test_invalid_calls_fail_after_a_plan_exists():
    q, k, v, cu_q, cu_k = make_packed([30, 12], heads=2, head_dim=64)
    cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 30, 30)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, -1, 30)
    with pytest.raises(TypeError, match="causal"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 30, 30, causal="yes")
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        cupy_varlen.varlen_attn(q, k, v, cu_q.long(), cu_k, 30, 30)
    bad_end = torch.tensor([0, 20, 43], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        cupy_varlen.varlen_attn(q, k, v, bad_end, cu_k, 30, 30, check_inputs=True)


@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_repeated_backward_calls_run_the_plan(deterministic):
    """Autograd and the functional backward (into poisoned, strided gradients) on new data
    through the plans the first call made."""
    lens = [77, 300, 5, 128]
    for seed in range(3):
        q, k, v, cu_q, cu_k = make_packed(lens, heads=4, heads_kv=2, head_dim=64, seed=seed)
        check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=deterministic, seed=seed)
        dout = random_like(q, seed + 7)
        out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 300, 300, causal=True,
                                           return_lse=True)
        wide = torch.full((q.shape[0], q.shape[1] * 2, q.shape[2]), math.nan, dtype=q.dtype,
                          device="cuda")
        dq = wide[:, ::2]
        dk, dv = (torch.full_like(k, math.nan) for _ in range(2))
        got = cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_len(cu_q),
                                               max_len(cu_k), causal=True,
                                               deterministic=deterministic, dq=dq, dk=dk, dv=dv)
        assert got[0] is dq and got[1] is dk and got[2] is dv
        want = check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=deterministic,
                              dout=dout, compare_torch=False)
        for g, w in zip(got, want):
            assert not torch.isnan(g).any() and rel_error(g, w.double()) < 2e-2
        if seed == 0:
            counts = _plan_counts()
    assert _plan_counts() == counts  # later seeds hit the plans of the first


def test_paged_keys_cover_the_block_table_and_the_pool():
    """A paged call's key holds the block table's and the pools' layouts: another page size,
    table width or a call without the table gets a plan of its own; the table's contents do not
    count (a decode step after the table changed runs the same plan)."""
    q, _, _, cu_q, _ = make_packed([1, 1], heads=4, head_dim=64, device="cpu")
    pool = torch.zeros(6, 16, 2, 64, dtype=q.dtype)
    table = torch.zeros(2, 3, dtype=torch.int32)
    used = torch.tensor([5, 40], dtype=torch.int32)

    def key(pool=pool, table=table, used=used):
        found = _api._forward_key(q, pool, pool, cu_q, None, None, 1, 48, False, None, (-1, -1),
                                  False, False, False, used, table)
        return found[0]

    base = key()
    assert base == key(table=table + 1, used=used + 1)
    others = [key(pool=torch.zeros(12, 8, 2, 64, dtype=q.dtype)),
              key(table=torch.zeros(2, 4, dtype=torch.int32)),
              key(used=None)]
    assert len({base, *others}) == 4
    assert base != _key(q, pool.flatten(0, 1)[:2], pool.flatten(0, 1)[:2], cu_q, cu_q)


# --------------------------------------------------------------------------------------------------
# The decode tiles' choice and splits, from shapes alone (cupy_varlen._launch).


def test_decode_tiles_choice():
    from cupy_varlen._launch import takes_decode_tiles

    assert takes_decode_tiles(None, 1, 4, 256, 8)  # a GQA decode step
    assert takes_decode_tiles(3, 16, 8, 1, 8)  # 128 packed rows
    assert not takes_decode_tiles(None, 17, 8, 1, 8)  # 136 rows: the prefill kernels
    assert not takes_decode_tiles(1, 1, 4, 256, 8)  # num_splits=1: batch invariance
    assert not takes_decode_tiles(None, 1, 1, 70000, 1)  # beyond the grid's z


def test_decode_splits_from_shapes():
    from cupy_varlen._launch import MAX_SPLITS, decode_splits

    slots = 132 * 2  # SMs x CTAs per SM
    # One sequence, 8 K/V heads, 128k keys: one full wave.
    assert decode_splits(8, 131072, 64, slots, None) == 33
    # Many CTAs already, their last wave 97% full: no split.
    assert decode_splits(256 * 8, 8192, 64, slots, None) == 1
    # 64 CTAs: 5 splits would fill one wave and a fifth of the next; 8 fill two waves to 97%.
    assert decode_splits(64, 32768, 64, slots, None) == 8
    # Short keys: no share shorter than four key tiles.
    assert decode_splits(8, 512, 64, slots, None) == 2
    assert decode_splits(1, 10**7, 64, 2000, None) == MAX_SPLITS
    assert decode_splits(8, 131072, 64, slots, 5) == 5  # num_splits: at most


def test_decode_launch_grid_and_workspace():
    """A decode launch's grid (query-tile slots x splits, K/V heads, sequences), its fp32
    partials (split_combine.cuh's layout: the lse entries rounded up to 16 bytes, then the O rows)
    and the combine's grid, from shapes alone; one split needs no partials."""
    from cupy_varlen import _launch, _spec

    spec = _spec.choose_fwd_spec("bf16", 128, True, "sm_90a", decode=True)
    assert spec.decode and spec.kernel == "sm80" and "combine" in spec.entry_points
    assert "schedule" not in spec.entry_points

    def launch(batch, total_q, max_q, keys_bound, num_splits=None, heads=32, heads_kv=8):
        strides = (heads * 128, 128)
        return _launch.DecodeLaunch(
            None, spec, q_strides=strides, k_strides=(heads_kv * 128, 128),
            v_strides=(heads_kv * 128, 128), o_strides=strides, lse_head_stride=total_q,
            total_q=total_q, batch=batch, heads=heads, heads_per_kv=heads // heads_kv,
            head_dim=128, scale=0.1, scale_log2=0.14, window=(-1, 0), max_seqlen_q=max_q,
            keys_bound=keys_bound, num_sms=132, num_splits=num_splits)

    one = launch(1, 1, 1, 131072)
    splits = one.splits
    assert splits > 1 and one.grid == (splits, 8, 1)  # one 64-row slot: 4 query heads a K/V head
    rows = splits * 1 * 32
    assert one.workspace_entries == -(-rows // 4) * 4 + rows * 128
    assert one.combine_grid == (8, 1)  # 32 (token, head) rows, a warp each, four a block
    spec_rows = launch(3, 3 * 20, 20, 4096)  # 20 tokens x 4 heads: two 64-row slots
    assert spec_rows.grid[0] == 2 * spec_rows.splits and spec_rows.grid[1:] == (8, 3)
    single = launch(256, 256, 1, 8192)  # 2048 CTAs fill eight waves to 97%: no split
    assert single.splits == 1 and single.workspace_entries == 0
