"""Forward kernel against the float64 reference on the GPU (skipped without one).

Every check runs into a NaN-poisoned out= buffer (unwritten elements show) on fresh random data,
and holds the error to 1.5x torch varlen_attn's on the same inputs (see conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import cupy_varlen
from conftest import (DTYPES, check_forward, cu_seqlens, make_packed, rel_error, requires_gpu,
                      select_kernel_family)
from cupy_varlen.reference import varlen_attn_reference

pytestmark = requires_gpu



@pytest.fixture(autouse=True, params=["sm80", "sm90", "sm90-long"])
def fwd_kernel(request, monkeypatch):
    """Every test runs on both forward kernel families, and on the sm90 family's tiles for long
    sequences (three consumer warpgroups at head dim 64; the dispatch's mean-length threshold set
    to 0 so that every batch takes them)."""
    from cupy_varlen import _api, _spec

    family = select_kernel_family(request.param.split("-")[0], monkeypatch, "forward_kernel")
    if request.param == "sm90-long":
        # Launch plans remember the tiles: none made under the other threshold may serve.
        monkeypatch.setattr(_spec, "LONG_ROWS_MEAN", 0)
        _api.clear_caches()
        yield family
        _api.clear_caches()
    else:
        yield family

# Lengths that are not tile multiples, with empty and single-token sequences among them.
RAGGED = [37, 0, 1, 128, 200, 64, 513]
RAGGED_K = [50, 3, 0, 127, 190, 300, 513]


@pytest.mark.parametrize("head_dim", list(range(8, 257, 8)))
def test_every_head_dim(head_dim):
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=2, head_dim=head_dim, seed=head_dim)
    check_forward(q, k, v, cu_q, cu_k)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128, 160, 192, 224, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_tiles(dtype, head_dim, causal):
    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=3, head_dim=head_dim,
                                      dtype=DTYPES[dtype], seed=7 * head_dim + causal)
    check_forward(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("heads,heads_kv", [(8, 8), (8, 4), (8, 2), (8, 1), (32, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_mqa(heads, heads_kv, causal):
    q, k, v, cu_q, cu_k = make_packed([33, 257, 1, 130], [40, 250, 9, 130], heads=heads,
                                      heads_kv=heads_kv, head_dim=64, seed=heads_kv)
    check_forward(q, k, v, cu_q, cu_k, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(16, 0), (0, 0), (32, 8), (-1, 5), (7, -1), (200, 130),
                                    (10**6, 10**6), (0, -1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_windows(window, causal, head_dim):
    if causal and window[1] > 0:
        pytest.skip("causal fixes right = 0")
    q, k, v, cu_q, cu_k = make_packed([300, 129, 1, 64, 0], [300, 200, 70, 10, 5],
                                      head_dim=head_dim, seed=sum(window) % 1000)
    check_forward(q, k, v, cu_q, cu_k, causal=causal, window_size=window)


@pytest.mark.parametrize("q_lens,k_lens", [
    ([100, 300, 64], [30, 300, 1]),      # Lq > Lk: causal rows before the diagonal see nothing
    ([5, 17, 1], [400, 1000, 129]),      # Lq < Lk: decode-like
    ([50, 60], [0, 0]),                  # empty key sequences: out 0, lse -inf
    ([0, 0, 7], [9, 0, 7]),              # empty query sequences
])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_and_empty(q_lens, k_lens, causal):
    q, k, v, cu_q, cu_k = make_packed(q_lens, k_lens, head_dim=64, seed=len(q_lens) + causal)
    check_forward(q, k, v, cu_q, cu_k, causal=causal)


def test_fully_masked_rows_are_zero_with_neg_inf_lse():
    q, k, v, cu_q, cu_k = make_packed([200], [20], head_dim=64)
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 200, 20, causal=True, return_lse=True)
    # Rows i < Lq - Lk = 180 have no key at or before their diagonal.
    assert (out[:180] == 0).all()
    assert (lse[:, :180] == -math.inf).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[:, 180:]).all()


@pytest.mark.parametrize("scale", [0.01, 0.3, 2.0])
def test_custom_scale(scale):
    q, k, v, cu_q, cu_k = make_packed(RAGGED, head_dim=128, seed=3)
    check_forward(q, k, v, cu_q, cu_k, scale=scale)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_large_logits(dtype):
    # Scores in the hundreds: the online softmax must rescale without overflow.
    q, k, v, cu_q, cu_k = make_packed(RAGGED, head_dim=64, dtype=DTYPES[dtype], seed=4,
                                      logit_scale=30.0)
    check_forward(q, k, v, cu_q, cu_k, causal=True)


def test_packed_qkv_views():
    lens = [100, 33, 257]
    total, heads, head_dim = sum(lens), 4, 64
    qkv = torch.randn(total, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(1)  # strided views, no copy
    assert q.data_ptr() != q.contiguous().data_ptr()
    cu = cu_seqlens(lens)
    check_forward(q, k, v, cu, cu, causal=True)


def test_misaligned_views_fall_back_to_copies():
    lens = [70, 130]
    total = sum(lens)
    base = torch.randn(total * 4 * 64 + 8, device="cuda", dtype=torch.float16)
    q = base[3:3 + total * 4 * 64].view(total, 4, 64)  # 6-byte offset: not 16-byte aligned
    k = torch.randn(total, 4, 68, device="cuda", dtype=torch.float16)[..., :64]  # head stride 68
    v = torch.randn(total, 4, 64, device="cuda", dtype=torch.float16)
    cu = cu_seqlens(lens)
    # torch's own kernel faults on these views (misaligned address), so the reference alone judges.
    check_forward(q, k, v, cu, cu, compare_torch=False)
    # A misaligned out= is computed aside and copied in.
    out_base = torch.full((total * 4 * 64 + 8,), float("nan"), device="cuda", dtype=torch.float16)
    out = out_base[1:1 + total * 4 * 64].view(total, 4, 64)
    cupy_varlen.varlen_attn(q, k, v, cu, cu, 130, 130, out=out)
    ref = varlen_attn_reference(q, k, v, cu, cu)
    assert rel_error(out, ref) < 4e-3
    assert torch.isnan(out_base[0]) and torch.isnan(out_base[1 + total * 4 * 64:]).all()


def test_out_strided_view_touches_nothing_else():
    lens = [90, 1, 300]
    q, k, v, cu_q, cu_k = make_packed(lens, heads=4, head_dim=64)
    # out is every other head of a larger buffer; the rest is a guard region.
    buf = torch.full((q.shape[0], 8, 64), 7.0, device="cuda", dtype=q.dtype)
    out = buf[:, ::2]
    ret = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 300, 300, out=out)
    assert ret is out
    assert (buf[:, 1::2] == 7.0).all()
    assert rel_error(out, varlen_attn_reference(q, k, v, cu_q, cu_k)) < 2e-2


def test_max_seqlen_does_not_change_results():
    """The prefill grids come from the token totals: a loose max_seqlen changes no bit, nor does a
    too small one with num_splits=1. Without it, a max_seqlen_q of 1 selects the decode tiles,
    sized for one query row per sequence: their CTAs stride over the rest, so every row is still
    computed (NaN-poisoned output, against the reference)."""
    q, k, v, cu_q, cu_k = make_packed(RAGGED, head_dim=64, seed=9)

    def attn(max_seqlen, num_splits):
        return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_seqlen, max_seqlen,
                                       num_splits=num_splits)

    # (num_splits=1 also leaves out the tiles chosen from the batch's mean length: its own base.)
    for num_splits in (None, 1):
        assert torch.equal(attn(513, num_splits), attn(10**6, num_splits))
    assert torch.equal(attn(513, 1), attn(1, 1))
    check_forward(q, k, v, cu_q, cu_k, max_q=1, max_k=1, compare_torch=False)


def test_deterministic_bitwise():
    q, k, v, cu_q, cu_k = make_packed([1000, 37, 2048], heads=8, head_dim=128, seed=11)
    outs = [cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 2048, 2048, causal=True, return_lse=True)
            for _ in range(3)]
    for out, lse in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])


def test_cupy_arrays_in_cupy_arrays_out():
    import cupy

    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, head_dim=64, seed=12)
    cq, ck, cv, ccu_q, ccu_k = (cupy.from_dlpack(x) for x in (q, k, v, cu_q, cu_k))
    out, lse = cupy_varlen.varlen_attn(cq, ck, cv, ccu_q, ccu_k, 513, 513, causal=True,
                                       return_lse=True)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0])
    expect, expect_lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 513, 513, causal=True,
                                                 return_lse=True)
    assert torch.equal(torch.from_dlpack(out), expect)
    assert torch.equal(torch.from_dlpack(lse), expect_lse)


def test_runs_on_the_current_torch_stream():
    q, k, v, cu_q, cu_k = make_packed([2048, 1000], heads=8, head_dim=64, seed=13)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # Inputs written on the side stream just before the call: a launch on any other stream
        # would race with this write.
        q2 = q * 1.5
        out = cupy_varlen.varlen_attn(q2, k, v, cu_q, cu_k, 2048, 2048)
        out2 = out.clone()
    side.synchronize()
    assert rel_error(out2, varlen_attn_reference(q2, k, v, cu_q, cu_k)) < 2e-2


def test_cuda_graph_capture_and_replay_with_new_data():
    lens_a, lens_b = [300, 700, 24], [600, 400, 24]  # same batch and totals, new boundaries
    q, k, v, cu_q, cu_k = make_packed(lens_a, heads=4, head_dim=64, seed=14)
    static = [x.clone() for x in (q, k, v, cu_q, cu_k)]
    cupy_varlen.varlen_attn(*static, 1024, 1024, causal=True)  # compile and load outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cupy_varlen.varlen_attn(*static, 1024, 1024, causal=True)
    q2, k2, v2, cu_q2, cu_k2 = make_packed(lens_b, heads=4, head_dim=64, seed=15)
    for dst, src in zip(static, (q2, k2, v2, cu_q2, cu_k2)):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    ref = varlen_attn_reference(q2, k2, v2, cu_q2, cu_k2, causal=True)
    assert rel_error(out, ref) < 2e-2


def test_offsets_beyond_int32():
    # total_q * H * D > 2**31 elements: the last sequences sit past the 32-bit offset range.
    heads, head_dim, length = 32, 128, 1024
    n_seq = 2**31 // (heads * head_dim * length) + 2
    total = n_seq * length
    assert total * heads * head_dim > 2**31
    gen = torch.Generator(device="cuda").manual_seed(16)
    q = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(total, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    cu = cu_seqlens([length] * n_seq)
    out = torch.full_like(q, float("nan"))
    cupy_varlen.varlen_attn(q, k, v, cu, cu, length, length, causal=True, out=out)
    tail = slice(total - 2 * length, total)
    cu_tail = cu_seqlens([length, length])
    ref = varlen_attn_reference(q[tail], k[tail], v[tail], cu_tail, cu_tail, causal=True)
    assert rel_error(out[tail], ref) < 2e-2
    assert not torch.isnan(out).any()
    del q, k, v, out
    torch.cuda.empty_cache()


def test_large_batch_many_short_sequences():
    gen = torch.Generator().manual_seed(17)
    lens = torch.randint(0, 40, (3000,), generator=gen).tolist()
    q, k, v, cu_q, cu_k = make_packed(lens, heads=2, head_dim=32, seed=17)
    check_forward(q, k, v, cu_q, cu_k, causal=True)


@pytest.mark.parametrize("array_type", ["torch", "cupy"])
def test_check_inputs_on_the_device(array_type):
    import cupy

    q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, head_dim=64, seed=21)
    expect = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 513, 513, causal=True)
    wrap = (lambda x: cupy.from_dlpack(x)) if array_type == "cupy" else (lambda x: x)
    args = [wrap(x) for x in (q, k, v, cu_q, cu_k)]
    got = cupy_varlen.varlen_attn(*args, 513, 513, causal=True, check_inputs=True)
    assert torch.equal(torch.from_dlpack(got), expect)  # valid offsets: same bits, no error

    bad_end = cu_k.clone()
    bad_end[-1] -= 1
    with pytest.raises(ValueError, match=r"cu_seqlens_k must end at k's total tokens"):
        cupy_varlen.varlen_attn(*args[:4], wrap(bad_end), 513, 513, check_inputs=True)
    decreasing = cu_q.clone()
    decreasing[2] = decreasing[3] + 1
    with pytest.raises(ValueError, match=r"cu_seqlens_q must be non-decreasing"):
        cupy_varlen.varlen_attn(*args[:3], wrap(decreasing), args[4], 10**6, 10**6,
                                check_inputs=True)
    with pytest.raises(ValueError, match=r"max_seqlen_k is 512 but cu_seqlens_k"):
        cupy_varlen.varlen_attn(*args, 513, 512, check_inputs=True)


@pytest.mark.parametrize("poison", ["q", "k", "v"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_values_stay_in_their_sequence(poison, value):
    """NaN or Inf in one sequence's q, k or v changes no other sequence's output or lse (its
    neighbours in the packed tensors included), bit for bit."""
    lens_q, lens_k = [70, 129, 1, 200], [64, 130, 5, 190]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=128, seed=31)
    clean, clean_lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 200, 190, return_lse=True)
    bad = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
    cu = cu_q if poison == "q" else cu_k
    bad[poison][cu[1]:cu[2]] = value  # all of sequence 1
    out, lse = cupy_varlen.varlen_attn(bad["q"], bad["k"], bad["v"], cu_q, cu_k, 200, 190,
                                       return_lse=True)
    for b in (0, 2, 3):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        assert torch.equal(out[rows], clean[rows]), f"sequence {b} changed"
        assert torch.equal(lse[:, rows], clean_lse[:, rows]), f"sequence {b}'s lse changed"


def test_long_batches_take_the_long_tiles(fwd_kernel, monkeypatch):
    """Dispatch by mean length: at head dim 64 on Hopper a batch of long sequences runs the sm90
    tiles for long sequences (192 query rows), a batch of short ones the usual 128; both correct."""
    from cupy_varlen import _api, _build, _spec

    if fwd_kernel != "sm90":
        pytest.skip("the long-sequence tiles belong to the sm90 kernel")
    if _spec.LONG_ROWS_MEAN == 0:
        pytest.skip("this run forces the long-sequence tiles on every batch")
    loaded = []
    load_kernels = _build.load_kernels
    monkeypatch.setattr(_build, "load_kernels",
                        lambda spec, device: loaded.append(spec) or load_kernels(spec, device))
    _api.clear_caches()
    mean = _spec.LONG_ROWS_MEAN
    for lens, block_m in (([mean + 300, mean - 200, mean + 37], 192), ([mean - 1, 5], 128)):
        q, k, v, cu_q, cu_k = make_packed(lens, heads=2, head_dim=64, seed=len(lens))
        for causal in (False, True):
            loaded.clear()
            _api.clear_caches()
            check_forward(q, k, v, cu_q, cu_k, causal=causal)
            assert [s.tiles.block_m for s in loaded if s.persistent] == [block_m], loaded
    _api.clear_caches()


@pytest.mark.parametrize("across_heads", [False, True])
@pytest.mark.parametrize("sms", [1, 40, 10**6])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_item_orders(fwd_kernel, across_heads, sms, causal, monkeypatch):
    """The persistent forward takes its items in the schedule's head order: lead groups of one K/V
    head's query heads (or all heads where K and V fit in L2), then a last group the schedule
    widens by the batch's costs and the SM count (here: 1 keeps it one group, 10**6 makes it all
    heads, 40 something between on this batch). Every order covers each (tile, head) once, GQA
    groups whole."""
    from cupy_varlen import _api, _launch

    if fwd_kernel != "sm90":
        pytest.skip("the item order belongs to the persistent sm90 kernel")
    monkeypatch.setattr(_launch, "lpt_across_heads", lambda *args: across_heads)
    monkeypatch.setattr(_api, "_num_sms", lambda device: sms)
    _api.clear_caches()  # no plan made under another order
    try:
        q, k, v, cu_q, cu_k = make_packed(RAGGED, RAGGED_K, heads=6, heads_kv=3, head_dim=64,
                                          seed=3 + causal)
        check_forward(q, k, v, cu_q, cu_k, causal=causal)
    finally:
        _api.clear_caches()


@pytest.mark.parametrize("copies", ["tma", "cp.async only"])
@pytest.mark.parametrize("head_dim,heads_kv", [(64, 4), (128, 2), (256, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_sm90_key_tiles_by_tma_and_by_cp_async(fwd_kernel, copies, head_dim, heads_kv, causal,
                                               monkeypatch):
    """The sm90 forward loads whole K/V tiles by TMA and a sequence's partial last tile by
    cp.async; without a tensor map (no driver entry point, unaddressable tensor) every tile goes by
    cp.async. Both paths, with GQA and lengths that are and are not tile multiples."""
    from cupy_varlen import _tma

    if fwd_kernel != "sm90":
        pytest.skip("the copy paths belong to the sm90 kernel")
    lens_q, lens_k = [256, 300, 1, 129, 512], [256, 300, 7, 128, 700]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=4, heads_kv=heads_kv,
                                      head_dim=head_dim, seed=head_dim + heads_kv + causal)
    if copies == "tma":
        tile_map = _tma.tile_map(k.data_ptr(), "bf16", k.shape[0], heads_kv, head_dim,
                                 k.stride(0), k.stride(1), 128)
        assert tile_map is not None and len(tile_map) == _tma.MAP_BYTES  # the fast path is taken
    else:
        monkeypatch.setattr(_tma, "tile_map", lambda *args: None)
    check_forward(q, k, v, cu_q, cu_k, causal=causal)


# --------------------------------------------------------------------------------------------------
# seqused_k: a KV cache whose slots in cu_seqlens_k are longer than what is filled.


def _cache_with_poisoned_tails(lens_q, slots, used, heads_kv, head_dim, seed):
    """Packed q and a k/v cache whose rows past each slot's used count are NaN (a kernel that read
    one would put NaN in the output), and seqused_k."""
    q, k, v, cu_q, cu_k = make_packed(lens_q, slots, heads=4, heads_kv=heads_kv,
                                      head_dim=head_dim, seed=seed)
    for b, n in enumerate(used):
        start, end = cu_k[b].item(), cu_k[b + 1].item()
        k[start + n:end] = math.nan
        v[start + n:end] = math.nan
    return q, k, v, cu_q, cu_k, torch.tensor(used, dtype=torch.int32, device=q.device)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (40, 8)])
@pytest.mark.parametrize("heads_kv,head_dim", [(4, 64), (1, 128)])
def test_seqused_k_reads_only_the_used_keys(window, heads_kv, head_dim):
    """Decode rows (one query), chunked prefill (fewer queries than used keys), an empty used
    count, a full slot and a slot longer than many key tiles; masks align to the used count; the
    NaN past it is never read."""
    lens_q = [1, 1, 37, 0, 64, 130, 1, 5]
    slots = [300, 64, 200, 10, 64, 256, 1000, 7]
    used = [257, 0, 150, 3, 64, 200, 999, 7]
    q, k, v, cu_q, cu_k, seqused = _cache_with_poisoned_tails(lens_q, slots, used, heads_kv,
                                                              head_dim, seed=head_dim + heads_kv)
    check_forward(q, k, v, cu_q, cu_k, window_size=window, seqused_k=seqused)


def test_seqused_k_equals_the_trimmed_batch():
    """A cache used up to seqused_k gives the bits of the same batch packed without the unused
    rows (every tile is computed alone, whatever the slot lengths around it)."""
    lens_q, slots, used = [3, 130, 1], [500, 131, 64], [300, 130, 1]
    q, k, v, cu_q, cu_k, seqused = _cache_with_poisoned_tails(lens_q, slots, used, 2, 64, seed=5)
    keep = torch.cat([torch.arange(cu_k[b].item(), cu_k[b].item() + n, device=k.device)
                      for b, n in enumerate(used)])
    cu_used = cu_seqlens(used)
    for causal in (False, True):
        got = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 130, 500, causal=causal,
                                      seqused_k=seqused)
        trimmed = cupy_varlen.varlen_attn(q, k[keep], v[keep], cu_q, cu_used, 130, 300,
                                          causal=causal)
        assert torch.equal(got, trimmed)


def test_seqused_k_check_inputs_and_clamping():
    """check_inputs=True names seqused_k for a negative count or one past its slot; without it
    such counts read as the nearest bound (no key outside the slot is read)."""
    lens_q, slots = [2, 3], [10, 20]
    q, k, v, cu_q, cu_k = make_packed(lens_q, slots, heads=2, head_dim=64, seed=9)
    for bad, needle in (([-1, 5], "must not be negative"), ([11, 5], "exceeds a sequence's slot")):
        used = torch.tensor(bad, dtype=torch.int32, device=q.device)
        with pytest.raises(ValueError, match=f"varlen_attn: seqused_k {needle}"):
            cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 20, seqused_k=used,
                                    check_inputs=True)
    clamped = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 20,
                                      seqused_k=torch.tensor([-4, 99], dtype=torch.int32,
                                                             device=q.device))
    expected = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 20,
                                       seqused_k=torch.tensor([0, 20], dtype=torch.int32,
                                                              device=q.device))
    assert torch.equal(clamped, expected)


def test_seqused_k_strided_and_cupy():
    """A strided seqused_k view is copied first; CuPy arrays take it too; a CUDA graph replays a
    decode step after seqused_k grew in place."""
    import cupy

    lens_q, slots = [1, 1, 1], [64, 300, 129]
    q, k, v, cu_q, cu_k = make_packed(lens_q, slots, heads=4, heads_kv=2, head_dim=128, seed=4)
    wide = torch.tensor([[10, 0], [200, 0], [129, 0]], dtype=torch.int32, device=q.device)
    strided = wide[:, 0]
    assert strided.stride(0) == 2
    got = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 300, seqused_k=strided)
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, seqused_k=strided.contiguous())
    assert rel_error(got, ref) <= 1e-2
    as_cupy = [cupy.from_dlpack(x) for x in (q, k, v, cu_q, cu_k, strided.contiguous())]
    got_cupy = cupy_varlen.varlen_attn(*as_cupy[:5], 1, 300, seqused_k=as_cupy[5])
    assert torch.equal(torch.from_dlpack(got_cupy), got)

    used = strided.contiguous()
    out = torch.empty_like(q)
    cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 300, seqused_k=used, out=out)  # plan, compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 300, seqused_k=used, out=out)
    used.copy_(torch.tensor([64, 300, 5], dtype=torch.int32, device=q.device))
    graph.replay()
    torch.cuda.synchronize()
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, seqused_k=used)
    assert rel_error(out, ref) <= 1e-2


def test_seqused_k_is_inference_only():
    """As torch's varlen_attn: with inputs that require grad (grad mode on) seqused_k raises,
    naming it; under no_grad the same call runs."""
    q, k, v, cu_q, cu_k = make_packed([2, 3], [10, 20], heads=2, head_dim=64, seed=3)
    used = torch.tensor([4, 20], dtype=torch.int32, device=q.device)
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="varlen_attn: seqused_k is an inference-only"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 20, seqused_k=used)
    with torch.no_grad():
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 20, seqused_k=used)


# --------------------------------------------------------------------------------------------------
# Paged KV cache (block_table)


def _paged_cache(lens_q, used, page_size, *, heads=8, heads_kv=2, head_dim=128, seed=0,
                 dtype=torch.bfloat16, spare_pages=3, share_first_page=False):
    """q, page pools k and v whose unreached pages and page tails hold NaN, a shuffled block table
    (one row per sequence, enough pages for its count plus one), cu_seqlens_q and seqused_k.
    ``share_first_page``: sequence 1's first page is sequence 0's (a shared prefix)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    batch = len(lens_q)
    per_seq = max(-(-n // page_size) for n in used) + 1
    num_pages = batch * per_seq + spare_pages
    q = torch.randn(sum(lens_q), heads, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.full((num_pages, page_size, heads_kv, head_dim), float("nan"), device="cuda",
                   dtype=dtype)
    v = k.clone()
    table = torch.randperm(num_pages, device="cuda", generator=g)[:batch * per_seq].view(
        batch, per_seq).to(torch.int32).contiguous()
    if share_first_page:
        table[1, 0] = table[0, 0]
    for b, n in enumerate(used):
        for p in range(-(-n // page_size)):
            rows = min(page_size, n - p * page_size)
            page = table[b, p].item()
            if share_first_page and b == 1 and p == 0:
                continue  # sequence 0 filled it
            k[page, :rows] = torch.randn(rows, heads_kv, head_dim, device="cuda",
                                         generator=g).to(dtype)
            v[page, :rows] = torch.randn(rows, heads_kv, head_dim, device="cuda",
                                         generator=g).to(dtype)
    used_t = torch.tensor(used, dtype=torch.int32, device="cuda")
    return q, k, v, cu_seqlens(lens_q), table, used_t


def _check_paged(q, k, v, cu_q, table, used, **kwargs):
    max_q = int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.full_like(q, float("nan"))
    got, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, None, max_q, int(used.max()), out=out,
                                       return_lse=True, seqused_k=used, block_table=table,
                                       **kwargs)
    assert got is out and not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    kwargs.pop("num_splits", None)
    ref, ref_lse = varlen_attn_reference(q, k, v, cu_q, None, seqused_k=used, block_table=table,
                                         return_lse=True, **kwargs)
    assert rel_error(out, ref) <= 2e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 1e-3
    return out


@pytest.mark.parametrize("page_size", [1, 7, 16, 64, 256])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 0)])
def test_paged_kv_matches_the_reference(page_size, window):
    """Decode rows, chunked prefill, an empty count and counts across many pages, any page size;
    NaN in the pages and page tails no count reaches is never read."""
    lens_q, used = [1, 1, 37, 0, 5, 130], [257, 0, 150, 3, 700, 200]
    q, k, v, cu_q, table, seq_used = _paged_cache(lens_q, used, page_size, seed=page_size)
    _check_paged(q, k, v, cu_q, table, seq_used, window_size=window)


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (96, torch.bfloat16),
                                            (256, torch.bfloat16)])
def test_paged_kv_head_dims_and_shared_pages(head_dim, dtype):
    """Other head dims and fp16; two sequences sharing their first page (a common prefix)."""
    q, k, v, cu_q, table, used = _paged_cache([3, 2, 1], [40, 33, 90], 16, heads=4, heads_kv=4,
                                              head_dim=head_dim, dtype=dtype, seed=head_dim,
                                              share_first_page=True)
    _check_paged(q, k, v, cu_q, table, used, causal=True)


def test_paged_kv_equals_the_gathered_cache(monkeypatch):
    """Through the same kernel family (sm80), a paged cache gives the bits of its keys gathered
    into a contiguous batch: the gather changes addresses only."""
    select_kernel_family("sm80", monkeypatch, "forward_kernel")
    from cupy_varlen.reference import gather_paged_keys

    lens_q, used = [1, 64, 3], [300, 64, 1000]
    q, k, v, cu_q, table, seq_used = _paged_cache(lens_q, used, 16, seed=11)
    kg, cu_k = gather_paged_keys(k, table, seq_used)
    vg, _ = gather_paged_keys(v, table, seq_used)
    for causal in (False, True):
        paged = cupy_varlen.varlen_attn(q, k, v, cu_q, None, 64, 1000, causal=causal,
                                        seqused_k=seq_used, block_table=table)
        packed = cupy_varlen.varlen_attn(q, kg.contiguous(), vg.contiguous(), cu_q, cu_k, 64,
                                         1000, causal=causal)
        assert torch.equal(paged, packed)


def test_paged_kv_cupy_and_cuda_graph():
    """CuPy arrays take a block table too; a CUDA graph replays a decode step after the table and
    the counts changed in place."""
    import cupy

    q, k, v, cu_q, table, used = _paged_cache([1, 1, 1], [64, 300, 129], 16, seed=4)
    got = cupy_varlen.varlen_attn(q, k, v, cu_q, None, 1, 300, seqused_k=used, block_table=table)
    args = [cupy.from_dlpack(x) for x in (q, k, v, cu_q)]
    got_cupy = cupy_varlen.varlen_attn(*args, None, 1, 300, seqused_k=cupy.from_dlpack(used),
                                       block_table=cupy.from_dlpack(table))
    assert torch.equal(torch.from_dlpack(got_cupy), got)

    out = torch.empty_like(q)
    cupy_varlen.varlen_attn(q, k, v, cu_q, None, 1, 300, seqused_k=used, block_table=table,
                            out=out)  # the plan of this signature, outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cupy_varlen.varlen_attn(q, k, v, cu_q, None, 1, 300, seqused_k=used, block_table=table,
                                out=out)
    # The next step: sequence 0 grows by one key into its next page; sequence 2 reads its pages
    # in the reverse order (its last page's tail, now read, gets values first).
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    page = table[0, 64 // 16].item()
    k[page, 0] = torch.randn_like(k[page, 0])
    v[page, 0] = torch.randn_like(v[page, 0])
    used.copy_(torch.tensor([65, 300, 129], dtype=torch.int32, device="cuda"))
    pages_2 = -(-129 // 16)
    table[2, :pages_2] = table[2, :pages_2].flip(0)
    graph.replay()
    torch.cuda.synchronize()
    ref = varlen_attn_reference(q, k, v, cu_q, None, seqused_k=used, block_table=table)
    assert rel_error(out, ref) <= 2e-2


def test_paged_kv_check_inputs_and_clamping():
    """check_inputs=True names seqused_k for a negative count or one past the table's pages,
    max_seqlen_k for a count past it, and block_table for a page outside the pool; without it a
    count past the table's pages reads as that bound."""
    q, k, v, cu_q, table, used = _paged_cache([1, 2], [20, 30], 16, heads=2, heads_kv=2,
                                              head_dim=64, seed=9)
    capacity = table.shape[1] * 16
    cases = (([-1, 5], table, 64, "seqused_k must not be negative"),
             ([capacity + 1, 5], table, capacity + 1, "seqused_k has a count of"),
             ([20, 30], table, 25, "max_seqlen_k is 25"),
             ([20, 30], torch.full_like(table, k.shape[0]), 64, "block_table names page"))
    for counts, tab, max_k, needle in cases:
        bad = torch.tensor(counts, dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match=f"varlen_attn: {needle}"):
            cupy_varlen.varlen_attn(q, k, v, cu_q, None, 2, max_k, seqused_k=bad,
                                    block_table=tab, check_inputs=True)
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    over = torch.tensor([capacity + 50, 30], dtype=torch.int32, device="cuda")
    full = torch.tensor([capacity, 30], dtype=torch.int32, device="cuda")
    got = cupy_varlen.varlen_attn(q, k, v, cu_q, None, 2, capacity, seqused_k=over,
                                  block_table=table)
    expected = cupy_varlen.varlen_attn(q, k, v, cu_q, None, 2, capacity, seqused_k=full,
                                       block_table=table)
    assert torch.equal(got, expected)


def test_paged_kv_plan_serves_new_tables():
    """The second call runs the first call's launch plan (same layouts) with another table and
    other counts, and matches the reference; a call with a wrong table shape after it is still
    refused."""
    q, k, v, cu_q, table, used = _paged_cache([1, 2, 1], [100, 40, 7], 16, seed=21)
    _check_paged(q, k, v, cu_q, table, used)
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    _check_paged(q, k, v, cu_q, table.flip(1).contiguous(),
                 torch.tensor([3, 100, 60], dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="block_table must be 2-D"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, None, 2, 100, seqused_k=used,
                                block_table=table[:2])


# --------------------------------------------------------------------------------------------------
# Decode tiles: GQA-packed rows and split keys (cuda_src/fwd_sm80.cu, CV_DECODE).


@pytest.mark.parametrize("heads,heads_kv", [(32, 8), (8, 8), (64, 8), (4, 1)])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 0)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_decode_tiles_match_the_reference(heads, heads_kv, window, num_splits):
    """Decode steps (one query), speculative steps (a few), an empty query, an empty key
    sequence and long contexts, each query head of a K/V head packed into one tile; outputs
    NaN-poisoned, lse compared."""
    lens_q, lens_k = [1, 1, 4, 0, 2, 1], [1000, 0, 3000, 50, 129, 64]
    q, k, v, cu_q, cu_k = make_packed(lens_q, lens_k, heads=heads, heads_kv=heads_kv,
                                      head_dim=128, seed=heads + heads_kv)
    check_forward(q, k, v, cu_q, cu_k, window_size=window, num_splits=num_splits,
                  compare_torch=False)


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float16), (96, torch.bfloat16),
                                            (256, torch.bfloat16), (40, torch.bfloat16)])
def test_decode_tiles_head_dims(head_dim, dtype):
    q, k, v, cu_q, cu_k = make_packed([1, 3, 1], [700, 2000, 5], heads=16, heads_kv=4,
                                      head_dim=head_dim, seed=head_dim, dtype=dtype)
    check_forward(q, k, v, cu_q, cu_k, causal=True, compare_torch=False)


def test_decode_tiles_are_taken_and_split():
    """A decode batch too small to fill the GPU runs on the decode tiles with several splits;
    num_splits caps them; num_splits=1 takes the other kernels."""
    from cupy_varlen import _api, _launch

    q, k, v, cu_q, cu_k = make_packed([1, 1], [4000, 3000], heads=32, heads_kv=8, head_dim=128,
                                      seed=2)

    def launch_of(**kwargs):
        _api.clear_caches()
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4000, **kwargs)
        (plan,) = _api._forward_plans.values()
        return plan.launch

    auto = launch_of()
    assert isinstance(auto, _launch.DecodeLaunch) and auto.splits > 1
    assert launch_of(num_splits=2).splits == 2
    assert not isinstance(launch_of(num_splits=1), _launch.DecodeLaunch)


def test_decode_split_counts_agree():
    """Every split count gives the reference's result (to rounding): the combine weighs each
    share by its lse, empty shares included (more splits than key tiles)."""
    q, k, v, cu_q, cu_k = make_packed([1, 2, 1], [2000, 300, 1], heads=8, heads_kv=2,
                                      head_dim=128, seed=12)
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True)
    for splits in (1, 2, 5, 16, 64):
        got = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 2, 2000, causal=True,
                                      num_splits=splits)
        assert rel_error(got, ref) <= 1e-2, splits


def test_decode_tiles_with_a_loose_max_seqlen_q():
    """A max_seqlen_q below a sequence's real query count sizes the grid for fewer query tiles;
    each CTA then strides over the rest, so no row is lost (the unsplit kernels' guarantee)."""
    q, k, v, cu_q, cu_k = make_packed([40, 1, 17], [500, 300, 900], heads=8, heads_kv=2,
                                      head_dim=64, seed=13)
    check_forward(q, k, v, cu_q, cu_k, causal=True, max_q=2, compare_torch=False)


def test_decode_seqused_k_and_cuda_graph():
    """Split decode over a cache with seqused_k: captured once, replayed after the counts grew in
    place (the splits were fixed on the host from shapes; the shares follow the counts)."""
    lens_q, slots = [1, 1, 1, 1], [4096, 300, 2048, 64]
    used = [3000, 1, 2048, 0]
    q, k, v, cu_q, cu_k, seqused = _cache_with_poisoned_tails(lens_q, slots, used, 2, 128, seed=14)
    check_forward(q, k, v, cu_q, cu_k, seqused_k=seqused, max_k=4096)
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0)
    out = torch.empty_like(q)
    cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4096, seqused_k=seqused, out=out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4096, seqused_k=seqused, out=out)
    seqused.copy_(torch.tensor([4096, 300, 17, 64], dtype=torch.int32, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, seqused_k=seqused)
    assert rel_error(out, ref) <= 1e-2


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_decode_tiles_paged(page_size):
    """The decode tiles over a paged cache, split: any page size, shared prefix pages."""
    q, k, v, cu_q, table, used = _paged_cache([1, 1, 2], [900, 1, 2500], page_size, heads=16,
                                              heads_kv=2, head_dim=128, seed=page_size,
                                              share_first_page=True)
    _check_paged(q, k, v, cu_q, table, used, causal=True, num_splits=8)
