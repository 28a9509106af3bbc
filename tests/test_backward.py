"""Backward kernels against float64 autograd through the reference, on the GPU (skipped without one).

Each case takes dq, dk, dv through torch autograd of cupy_varlen.varlen_attn on random data (never
zeros) and holds each to 1.5x the error of torch varlen_attn's gradient on the same inputs and
dout, or to the dtype floor where torch cannot run the case (conftest.py). It also runs the
functional cupy_varlen.varlen_attn_backward into NaN-poisoned dq/dk/dv (unwritten elements show),
and checks that query rows with no allowed key get dq exactly 0 and keys that no query sees get
dk = dv = 0 exactly, never NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

import cupy_varlen
from conftest import (DTYPES, autograd_grads, check_backward, cu_seqlens, dead_rows,
                      functional_grads, make_packed, random_like, reference_grads, rel_error,
                      requires_gpu, select_kernel_family)

pytestmark = requires_gpu


@pytest.fixture(autouse=True, params=["sm80", "sm90"])
def bwd_kernel(request, monkeypatch):
    """Every test runs on both dK/dV kernel families (sm90: head-dim tiles 64 and 128)."""
    return select_kernel_family(request.param, monkeypatch, "backward_kernel")

# Lengths off the tile multiples, an empty query sequence (0 queries, 3 keys) and an empty key
# sequence (1 query, 0 keys) among them.
RAGGED = [37, 0, 1, 128, 200, 64, 129]
RAGGED_K = [50, 3, 0, 127, 190, 300, 129]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dtype, head_dim, causal):
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=2, head_dim=head_dim,
                                      dtype=DTYPES[dtype], seed=head_dim + causal)
    check_backward(q, k, v, cu_q, cu_k, causal=causal, seed=head_dim)


@pytest.mark.parametrize("head_dim", [8, 40, 72, 136, 160, 192, 224, 248])
def test_other_head_dims(head_dim):
    """Head dims inside a tile (padded columns) and the remaining head-dim tiles."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=2, head_dim=head_dim,
                                      seed=head_dim)
    check_backward(q, k, v, cu_q, cu_k, causal=head_dim % 16 == 8, seed=head_dim)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(16, 0), (0, 0), (32, 8), (-1, 5), (7, -1), (200, 130),
                                    (10**6, 10**6)])
def test_windows(window, causal):
    if causal and window[1] > 0:
        pytest.skip("causal fixes right = 0")
    q, k, v, cu_q, cu_k = make_packed([300, 129, 1, 64, 0], [300, 200, 70, 10, 5], head_dim=64,
                                      seed=sum(window) % 1000)
    check_backward(q, k, v, cu_q, cu_k, causal=causal, window_size=window)


@pytest.mark.parametrize("q_lens,k_lens", [
    ([100, 300, 64], [30, 300, 1]),      # Lq > Lk: causal rows before the diagonal see nothing
    ([5, 17, 1], [400, 1000, 129]),      # Lq < Lk: decode-like, most keys unseen under causal
    ([50, 60], [0, 0]),                  # empty key sequences: dq 0
    ([0, 0, 7], [9, 0, 7]),              # empty query sequences: dk, dv 0
    ([0, 0], [5, 9]),                    # no queries at all: dk, dv 0 everywhere
])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_and_empty(q_lens, k_lens, causal):
    q, k, v, cu_q, cu_k = make_packed(q_lens, k_lens, head_dim=64, seed=len(q_lens) + causal)
    check_backward(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("heads,heads_kv", [(8, 2), (8, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gqa_mqa(heads, heads_kv, causal, dtype):
    q, k, v, cu_q, cu_k = make_packed([33, 257, 1, 130], [40, 250, 9, 130], heads=heads,
                                      heads_kv=heads_kv, head_dim=64, dtype=DTYPES[dtype],
                                      seed=heads_kv)
    check_backward(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_custom_scale(scale):
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, head_dim=128, seed=3)
    check_backward(q, k, v, cu_q, cu_k, scale=scale, causal=scale > 1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_large_logits(dtype):
    # Scores in the hundreds: P nearly one-hot, dS = P (dP - D) cancels hard.
    q, k, v, cu_q, cu_k = make_packed(RAGGED, head_dim=64, dtype=DTYPES[dtype], seed=4,
                                      logit_scale=30.0)
    check_backward(q, k, v, cu_q, cu_k, causal=True)


def test_fully_masked_rows_get_zero_gradients():
    # Causal with Lq > Lk: rows i < Lq - Lk = 180 have no key; window (2, 0) with Lq < Lk: keys
    # before the first query's window are seen by no row.
    q, k, v, cu_q, cu_k = make_packed([200, 5], [20, 100], heads=2, head_dim=64, seed=5)
    for causal, window in ((True, (-1, -1)), (False, (2, 0))):
        dq, dk, dv = check_backward(q, k, v, cu_q, cu_k, causal=causal, window_size=window)
        dead_q, dead_k = dead_rows(cu_q, cu_k, causal, window)
        assert dead_q.sum() >= 180 or dead_k.sum() >= 90  # the case really has such rows
        for g in (dq, dk, dv):
            assert torch.isfinite(g).all()
        assert (dq[dead_q] == 0).all() and (dk[dead_k] == 0).all() and (dv[dead_k] == 0).all()


@pytest.mark.parametrize("layout", ["qkv_packed", "gqa_fused_heads"])
def test_strided_input_views(layout):
    """q, k, v as views of one packed projection output (no copies); the gradient lands in the
    packed leaf exactly as autograd through the views says."""
    lens = [100, 33, 257]
    total, head_dim = sum(lens), 64
    g = torch.Generator(device="cpu").manual_seed(6)
    if layout == "qkv_packed":
        heads = heads_kv = 4
        leaf = torch.randn(total, 3, heads, head_dim, generator=g)
        leaf = leaf.to(device="cuda", dtype=torch.bfloat16).requires_grad_()
        q, k, v = leaf.unbind(1)
    else:  # one (T, H + 2 H_kv, D) tensor, heads split along dim 1
        heads, heads_kv = 8, 2
        leaf = torch.randn(total, heads + 2 * heads_kv, head_dim, generator=g)
        leaf = leaf.to(device="cuda", dtype=torch.bfloat16).requires_grad_()
        q, k, v = leaf.split([heads, heads_kv, heads_kv], dim=1)
    assert not q.is_contiguous() and not k.is_contiguous()
    cu = cu_seqlens(lens)
    grads = check_backward(q, k, v, cu, cu, causal=True, deterministic=True)
    out = cupy_varlen.varlen_attn(q, k, v, cu, cu, 257, 257, causal=True, deterministic=True)
    out.backward(random_like(out, 1000))  # check_backward's dout (seed 0)
    parts = leaf.grad.unbind(1) if layout == "qkv_packed" else leaf.grad.split(
        [heads, heads_kv, heads_kv], dim=1)
    for part, expected in zip(parts, grads):
        assert torch.equal(part, expected)


@pytest.mark.parametrize("layout", ["row_strided", "last_dim_strided", "broadcast_rows",
                                    "broadcast_all"])
def test_non_contiguous_dout(layout):
    """dout as autograd hands it over: views with odd strides, expanded (stride 0) gradients."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, head_dim=64, seed=7)
    total, heads, head_dim = q.shape
    g = torch.Generator(device="cpu").manual_seed(8)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device="cuda", dtype=q.dtype)

    if layout == "row_strided":  # every other head of a wider tensor
        dout = rand(total, 2 * heads, head_dim)[:, ::2]
    elif layout == "last_dim_strided":  # needs a copy: the kernels want stride 1 there
        dout = rand(total, heads, 2 * head_dim)[..., ::2]
    elif layout == "broadcast_rows":  # strides (0, 0, 1): the gradient of out.sum((0, 1)) @ w
        dout = rand(head_dim).expand(total, heads, head_dim)
    else:  # strides (0, 0, 0): the gradient of out.sum() * c
        dout = rand(1).reshape(1, 1, 1).expand(total, heads, head_dim)
    check_backward(q, k, v, cu_q, cu_k, causal=True, dout=dout)


def test_return_lse_and_backward():
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, heads_kv=2, head_dim=64, seed=9)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out, lse = cupy_varlen.varlen_attn(*leaves, cu_q, cu_k, 300, 300, causal=True,
                                       return_lse=True, deterministic=True)
    assert out.requires_grad and not lse.requires_grad  # lse has no gradient formula
    dout = random_like(q, 1000)
    grads = torch.autograd.grad(out, leaves, dout)
    expected = check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=True)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)
    # A loss on lse alone has nothing to differentiate: loud, not a silent zero.
    with pytest.raises(RuntimeError):
        torch.autograd.grad(lse.sum(), leaves)


def test_out_argument_with_autograd():
    """out= under autograd: the result is copied into out and the gradient flows through it."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, head_dim=64, seed=10)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    buf = torch.full((q.shape[0], 8, 64), math.nan, device="cuda", dtype=q.dtype)
    out = buf[:, ::2]
    ret = cupy_varlen.varlen_attn(*leaves, cu_q, cu_k, 300, 300, out=out, deterministic=True)
    assert ret is out and torch.isnan(buf[:, 1::2]).all()
    dout = random_like(q, 1000)
    grads = torch.autograd.grad(ret, leaves, dout)
    expected = check_backward(q, k, v, cu_q, cu_k, deterministic=True)
    for g, e in zip(grads, expected):
        assert torch.equal(g, e)


def test_max_seqlen_does_not_change_gradients():
    """The backward's grids come from the token totals: max_seqlen, loose or too small, changes no
    bit of the gradients. (The forward's out and lse too, with num_splits=1 keeping a too small
    max_seqlen_q from choosing the decode tiles; test_forward.py checks those.)"""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, head_dim=64, seed=11)
    dout = random_like(q, 12)
    runs = [functional_grads(q, k, v, cu_q, cu_k, dout, max_q=m, max_k=m, causal=True,
                             deterministic=True, num_splits=1) for m in (300, 10**6, 1)]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("heads_kv", [8, 2])
def test_deterministic_bitwise(heads_kv):
    """deterministic=True: the same bits on every run, a long sequence and GQA (dK/dV summed over
    the group) included; and still as accurate as the default mode."""
    q, k, v, cu_q, cu_k = make_packed([2048, 37, 1000], heads=8, heads_kv=heads_kv, head_dim=128,
                                      seed=13)
    dout = random_like(q, 14)
    first = check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=True, dout=dout)
    for _ in range(2):
        again = autograd_grads(q, k, v, cu_q, cu_k, dout, max_q=2048, max_k=2048, causal=True,
                               deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), again, first):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"
    check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=False, dout=dout)


def test_functional_backward_cupy_and_torch():
    """varlen_attn_backward answers in the input's array type, with autograd's numbers."""
    import cupy

    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, heads_kv=2, head_dim=64, seed=15)
    dout = random_like(q, 16)
    expected = autograd_grads(q, k, v, cu_q, cu_k, dout, max_q=300, max_k=300, causal=True,
                              deterministic=True)
    got = functional_grads(q, k, v, cu_q, cu_k, dout, max_q=300, max_k=300, causal=True,
                           deterministic=True)
    assert all(type(x) is torch.Tensor for x in got)
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 300, 300, causal=True,
                                       return_lse=True)
    c = [cupy.from_dlpack(x) for x in (dout, q, k, v, out, lse, cu_q, cu_k)]
    cgot = cupy_varlen.varlen_attn_backward(*c, 300, 300, causal=True, deterministic=True)
    assert all(isinstance(x, cupy.ndarray) for x in cgot)
    for name, t, cg, e in zip(("dq", "dk", "dv"), got, cgot, expected):
        assert torch.equal(t, e), f"{name}: functional (torch) differs from autograd"
        assert torch.equal(torch.from_dlpack(cg), e), f"{name}: functional (CuPy) differs"
    # Preallocated CuPy outputs are written in place and returned.
    pre = [cupy.from_dlpack(torch.full_like(x, math.nan)) for x in (q, k, v)]
    ret = cupy_varlen.varlen_attn_backward(*c, 300, 300, causal=True, deterministic=True,
                                           dq=pre[0], dk=pre[1], dv=pre[2])
    for r, p, e in zip(ret, pre, expected):
        assert r is p and torch.equal(torch.from_dlpack(r), e)


def test_preallocated_strided_outputs_touch_nothing_else():
    """dq/dk/dv as strided views into NaN-poisoned buffers: written in place, guards untouched."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, heads_kv=2, head_dim=64, seed=17)
    dout = random_like(q, 18)
    expected = functional_grads(q, k, v, cu_q, cu_k, dout, max_q=300, max_k=300, causal=True,
                                deterministic=True)
    total_q, total_k = q.shape[0], k.shape[0]
    dq_buf = torch.full((total_q + 2, 8, 64), math.nan, device="cuda", dtype=q.dtype)
    kv_buf = torch.full((total_k, 3, 2, 64), math.nan, device="cuda", dtype=q.dtype)
    dq, dk, dv = dq_buf[1:total_q + 1, ::2], kv_buf[:, 0], kv_buf[:, 2]
    ret = functional_grads(q, k, v, cu_q, cu_k, dout, max_q=300, max_k=300, causal=True,
                           deterministic=True, dq=dq, dk=dk, dv=dv)
    assert ret[0] is dq and ret[1] is dk and ret[2] is dv
    for got, e in zip(ret, expected):
        assert torch.equal(got, e)
    assert torch.isnan(dq_buf[0]).all() and torch.isnan(dq_buf[-1]).all()
    assert torch.isnan(dq_buf[:, 1::2]).all()
    assert torch.isnan(kv_buf[:, 1]).all()


@pytest.mark.parametrize("poison", ["q", "k", "v", "dout"])
def test_nan_stays_in_its_sequence(poison):
    """NaN in one sequence's q, k, v or dout changes no other sequence's dq, dk or dv, bit for bit
    (deterministic mode: a fixed summation order, so the clean run is a bitwise baseline)."""
    lens_q, lens_k = [70, 129, 1, 200], [64, 130, 5, 190]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=128, seed=19)
    dout = random_like(q, 20)
    clean = autograd_grads(q, k, v, cu_q, cu_k, dout, max_q=200, max_k=190, deterministic=True)
    bad = {"q": q.clone(), "k": k.clone(), "v": v.clone(), "dout": dout.clone()}
    cu = cu_k if poison in ("k", "v") else cu_q
    bad[poison][cu[1]:cu[2]] = math.nan  # all of sequence 1
    got = autograd_grads(bad["q"], bad["k"], bad["v"], cu_q, cu_k, bad["dout"], max_q=200,
                         max_k=190, deterministic=True)
    for b in (0, 2, 3):
        q_rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        k_rows = slice(int(cu_k[b]), int(cu_k[b + 1]))
        for name, g, c, rows in zip(("dq", "dk", "dv"), got, clean, (q_rows, k_rows, k_rows)):
            assert torch.isfinite(g[rows]).all(), f"sequence {b}'s {name} is not finite"
            assert torch.equal(g[rows], c[rows]), f"sequence {b}'s {name} changed"


@pytest.mark.parametrize("poison", ["k", "dout"])
def test_nan_stays_in_its_sequence_with_atomic_dq(poison):
    """The default (atomic) dQ: the sm90 kernel adds whole 64-row dQ tiles by TMA reductions, whose
    rows past a sequence's end overlap the next sequence's. A NaN key makes those rows 0 * NaN, so
    they must go out as zeros: the other sequences' dq stays finite and equal to the clean run's up
    to the atomics' summation order."""
    lens_q, lens_k = [70, 129, 1, 200], [64, 130, 5, 190]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=128, seed=21)
    dout = random_like(q, 22)
    clean = autograd_grads(q, k, v, cu_q, cu_k, dout, max_q=200, max_k=190)
    bad = {"k": k.clone(), "dout": dout.clone()}
    cu = cu_k if poison == "k" else cu_q
    bad[poison][cu[1]:cu[2]] = math.nan  # all of sequence 1
    got = autograd_grads(q, bad.get("k", k), v, cu_q, cu_k, bad.get("dout", dout), max_q=200,
                         max_k=190)
    for b in (0, 2, 3):
        q_rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        k_rows = slice(int(cu_k[b]), int(cu_k[b + 1]))
        for name, g, c, rows in zip(("dq", "dk", "dv"), got, clean, (q_rows, k_rows, k_rows)):
            assert torch.isfinite(g[rows]).all(), f"sequence {b}'s {name} is not finite"
            assert rel_error(g[rows], c[rows].double()) < 1e-2, f"sequence {b}'s {name} changed"


@pytest.mark.parametrize("dq_path", ["tma reductions", "atomics"])
@pytest.mark.parametrize("head_dim,heads_kv", [(64, 2), (128, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_dq_by_tma_reductions_and_by_atomics(bwd_kernel, dq_path, head_dim, heads_kv, causal,
                                                   monkeypatch):
    """The sm90 dK/dV kernel adds dQ partials by TMA reductions through a tensor map of the fp32
    accumulator; without one (no driver entry point) it falls back to vector atomics. Both paths,
    with GQA and lengths off the 64-row tile."""
    from cupy_varlen import _tma

    if bwd_kernel != "sm90":
        pytest.skip("the dQ paths belong to the sm90 kernel")
    if dq_path == "atomics":
        real = _tma.tile_map
        monkeypatch.setattr(_tma, "tile_map",
                            lambda ptr, dtype, *rest: None if dtype == "fp32" else real(
                                ptr, dtype, *rest))
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, heads_kv=heads_kv,
                                      head_dim=head_dim, seed=head_dim + causal)
    check_backward(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("load_path", ["tma", "cp.async"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True])
def test_sm90_query_tiles_by_tma_and_by_cp_async(bwd_kernel, load_path, head_dim, deterministic,
                                                 monkeypatch):
    """The sm90 dK/dV kernel loads whole query tiles of q and dout by TMA through their tensor
    maps, and the tiles that cross a sequence's end by cp.async; without maps (no driver entry
    point, or a layout TMA cannot address) every tile goes by cp.async. Both, with lengths that
    give whole and partial tiles of both tile heights (64 and 128 rows)."""
    from cupy_varlen import _tma

    if bwd_kernel != "sm90":
        pytest.skip("the query-tile loads belong to the sm90 kernel")
    if load_path == "cp.async":
        real = _tma.tile_map
        monkeypatch.setattr(_tma, "tile_map",
                            lambda ptr, dtype, *rest: None if dtype != "fp32" else real(
                                ptr, dtype, *rest))
    lens_q, lens_k = [256, 130, 64, 1, 383], [200, 128, 64, 9, 400]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=head_dim,
                                      seed=head_dim + deterministic)
    check_backward(q, k, v, cu_q, cu_k, causal=True, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("load_path", ["tma", "cp.async"])
@pytest.mark.parametrize("dq_path", ["tma reductions", "atomics"])
def test_sm90_80_query_tiles(bwd_kernel, load_path, dq_path, deterministic, monkeypatch):
    """Without a mask at head dim 128 (bf16) the sm90 dK/dV kernel steps 80 queries at a time and
    computes dQ transposed (dS stored queries x keys by stmatrix, dQ^T staged transposed), in both
    dQ modes (deterministic: ordered additions, and then the functional and autograd results are
    the same bits). Lengths that give whole and partial 80-row tiles, GQA, both query-tile load
    paths and both dQ paths."""
    from cupy_varlen import _spec, _tma

    if bwd_kernel != "sm90":
        pytest.skip("the 80-query tiles belong to the sm90 kernel")
    assert _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", deterministic).tiles.block_m == 80
    real = _tma.tile_map

    def tile_map(ptr, dtype, *rest):
        off = dq_path == "atomics" if dtype == "fp32" else load_path == "cp.async"
        return None if off else real(ptr, dtype, *rest)

    monkeypatch.setattr(_tma, "tile_map", tile_map)
    lens_q, lens_k = [240, 161, 80, 1, 79, 0, 400], [200, 128, 80, 9, 81, 5, 400]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=128, seed=80)
    check_backward(q, k, v, cu_q, cu_k, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("sms", [1, 40, 10**6])
@pytest.mark.parametrize("head_dim,causal", [(64, False), (128, True)])
def test_sm90_key_tile_head_order(bwd_kernel, sms, head_dim, causal, deterministic,
                                  monkeypatch):
    """The sm90 dK/dV grid takes its key tiles in the schedule's head order: lead groups of one K/V
    head (ordered mode: two, the first of five heads' groups then whole), then a last group the
    schedule widens by the batch's costs and the SM count (1: one group; 10**6: all heads; 40:
    between). Every (key tile, head) once, and in ordered mode the dQ turns still wait only on
    CTAs launched earlier (a wrong order would hang or double-count)."""
    from cupy_varlen import _api

    if bwd_kernel != "sm90":
        pytest.skip("the head order belongs to the sm90 kernel's grid")
    monkeypatch.setattr(_api, "_num_sms", lambda device: sms)
    _api.clear_caches()  # no plan made under another order
    try:
        q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=10, heads_kv=5,
                                          head_dim=head_dim, seed=sms % 97 + head_dim)
        check_backward(q, k, v, cu_q, cu_k, causal=causal, deterministic=deterministic)
    finally:
        _api.clear_caches()


def test_misaligned_inputs_and_outputs():
    """Inputs and preallocated gradients whose base is not 16-byte aligned (an odd storage offset)
    take the copy path: same gradients, and the caller's own dq/dk/dv are written and returned."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=4, heads_kv=2, head_dim=64, seed=23)
    dout = random_like(q, 24)
    expected = functional_grads(q, k, v, cu_q, cu_k, dout, max_q=300, max_k=300, causal=True,
                                deterministic=True)

    def shifted(x, fill=None):
        buf = torch.empty(x.numel() + 1, device=x.device, dtype=x.dtype)
        view = buf[1:].view(x.shape)
        if fill is None:
            view.copy_(x)
        else:
            view.fill_(fill)
        assert view.data_ptr() % 16 != 0
        return view

    q2, k2, v2, dout2 = (shifted(x) for x in (q, k, v, dout))
    dq, dk, dv = (shifted(x, math.nan) for x in (q, k, v))
    ret = functional_grads(q2, k2, v2, cu_q, cu_k, dout2, max_q=300, max_k=300, causal=True,
                           deterministic=True, dq=dq, dk=dk, dv=dv)
    assert ret[0] is dq and ret[1] is dk and ret[2] is dv
    for name, got, e in zip(("dq", "dk", "dv"), ret, expected):
        assert torch.equal(got, e), f"{name} differs on the copy path"


@pytest.mark.parametrize("deterministic", [False, True])
def test_offsets_beyond_int32(deterministic):
    """total_q * H * D > 2**31 elements (and the fp32 dQ accumulator past 2**32 bytes): the last
    sequences' q, dout and gradients sit past the 32-bit offset range. Checked there against the
    float64 reference; nothing anywhere is left unwritten (NaN-poisoned dq, dk, dv)."""
    heads, head_dim, length = 32, 128, 1024
    n_seq = 2**31 // (heads * head_dim * length) + 2
    total = n_seq * length
    assert total * heads * head_dim > 2**31
    gen = torch.Generator(device="cuda").manual_seed(29)
    q, k, v, dout = (torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                                 generator=gen) for _ in range(4))
    cu = cu_seqlens([length] * n_seq)
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu, cu, length, length, causal=True,
                                       return_lse=True)
    grads = [torch.full_like(q, math.nan) for _ in range(3)]
    cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu, cu, length, length, causal=True,
                                     deterministic=deterministic, dq=grads[0], dk=grads[1],
                                     dv=grads[2])
    del out, lse
    for g in grads:
        assert not torch.isnan(g).any()
    tail = slice(total - 2 * length, total)
    cu_tail = cu_seqlens([length, length])
    ref = reference_grads(q[tail], k[tail], v[tail], cu_tail, cu_tail, dout[tail], causal=True)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref):
        err = rel_error(g[tail], r)
        assert err < 2e-2, f"{name}: relative error {err:.3g} past 2**31 elements"
    del q, k, v, dout, grads
    torch.cuda.empty_cache()
