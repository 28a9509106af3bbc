"""cupy_varlen as torch's flash-attention implementation, on the GPU (skipped without one).

With ``activate_flash_attention_impl("cupy_varlen")`` in effect: torch's callers reach our kernels
(a spy on the provider's kernel entry points counts the calls), results hold against float64
math and against torch's own flash kernel under the tolerance rule of tests/conftest.py, and
restore hands the ops back. Also a selection of the cases of PyTorch's
``test/test_varlen_attention.py``, rewritten for pytest, run with the provider active.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cupy_varlen  # noqa: F401  (registers with torch's registry)
from conftest import ERROR_FLOOR, MIN_BOUND, capture_graph, rel_error, requires_gpu
from cupy_varlen import _provider
from cupy_varlen.reference import varlen_attn_reference

attention = pytest.importorskip("torch.nn.attention")
if not hasattr(attention, "register_flash_attention_impl"):
    pytest.skip("this torch has no flash-attention registry", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

pytestmark = requires_gpu

FLASH = SDPBackend.FLASH_ATTENTION


class Spy:
    """Counts the provider's kernel calls (the real kernels still run)."""

    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        run_forward, run_backward = _provider.run_forward, _provider.run_backward

        def forward(*args, **kwargs):
            self.forward += 1
            return run_forward(*args, **kwargs)

        def backward(*args, **kwargs):
            self.backward += 1
            return run_backward(*args, **kwargs)

        monkeypatch.setattr(_provider, "run_forward", forward)
        monkeypatch.setattr(_provider, "run_backward", backward)


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


@pytest.fixture
def provider(spy):
    """The provider active for one test, restored however it ends."""
    attention.activate_flash_attention_impl("cupy_varlen")
    try:
        yield spy
    finally:
        attention.restore_flash_attention_impl()


def _dense(batch, heads, heads_kv, length, length_k, dim, layout="bhsd", dtype=torch.bfloat16,
           seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def make(h, n):
        shape = (batch, h, n, dim) if layout == "bhsd" else (batch, n, h, dim)
        x = torch.randn(shape, generator=g).to(device="cuda", dtype=dtype)
        x = x if layout == "bhsd" else x.transpose(1, 2)
        return x.requires_grad_(requires_grad)

    return make(heads, length), make(heads_kv, length_k), make(heads_kv, length_k)


def _sdpa(q, k, v, causal=False, scale=None, backend=FLASH, gqa=False):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                              enable_gqa=gqa)


def _math64(q, k, v, causal=False, scale=None, gqa=False):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = _sdpa(*leaves, causal=causal, scale=scale, backend=SDPBackend.MATH, gqa=gqa)
    return out, leaves


def _bound(dtype, theirs_err):
    return max(1.5 * theirs_err, MIN_BOUND[dtype]) if theirs_err is not None else \
        ERROR_FLOOR[dtype]


def _flash_and_grads(q, k, v, dout, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = _sdpa(*leaves, **kw)
    return (out, *torch.autograd.grad(out, leaves, dout))


# --------------------------------------------------------------------------------------------------
# Routing, activation and restore.


def test_activation_routes_sdpa_flash_and_restore_returns_it(spy):
    q, k, v = _dense(2, 4, 4, 256, 256, 64)
    torchs = _sdpa(q, k, v, causal=True)
    assert spy.forward == 0
    attention.activate_flash_attention_impl("cupy_varlen")
    try:
        assert attention.current_flash_attention_impl() == "cupy_varlen"
        ours = _sdpa(q, k, v, causal=True)
        assert spy.forward == 1
    finally:
        attention.restore_flash_attention_impl()
    _sdpa(q, k, v, causal=True)
    assert spy.forward == 1, "restore must hand the op back to torch's kernel"
    assert rel_error(ours, torchs) < 2e-2


def test_dropout_falls_back_to_torchs_kernel(provider):
    q, k, v = _dense(2, 4, 4, 128, 128, 64)
    with sdpa_kernel(FLASH):
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert provider.forward == 0 and out.shape == q.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------
# Dense SDPA on the flash backend vs math (float64), bounded by torch's own flash kernel's error.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [
    (2, 8, 8, 512, 512, 128), (1, 4, 4, 1000, 1000, 64), (3, 6, 2, 333, 333, 128),
    (2, 4, 1, 257, 513, 64), (4, 2, 2, 64, 64, 256), (2, 3, 3, 17, 17, 96), (1, 2, 2, 1, 300, 72),
], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_sdpa_flash_forward_backward_vs_math(provider, dtype, shape, causal, layout):
    batch, heads, heads_kv, length, length_k, dim = shape
    if causal and length != length_k:
        pytest.skip("torch's flash backend takes causal only with equal lengths")
    gqa = heads != heads_kv
    q, k, v = _dense(*shape, layout=layout, dtype=dtype, seed=sum(shape))
    torch.manual_seed(1)
    dout = torch.randn_like(q)
    attention.restore_flash_attention_impl()  # torch's kernel first, for the bound
    try:
        theirs = _flash_and_grads(q, k, v, dout, causal=causal, gqa=gqa)
    except RuntimeError:
        theirs = None
    finally:
        attention.activate_flash_attention_impl("cupy_varlen")
    ours = _flash_and_grads(q, k, v, dout, causal=causal, gqa=gqa)
    assert provider.forward == 1 and provider.backward == 1
    ref, leaves = _math64(q, k, v, causal=causal, gqa=gqa)
    expected = (ref, *torch.autograd.grad(ref, leaves, dout.double()))
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        got = ours[i]
        assert got.shape == expected[i].shape and got.dtype == dtype, name
        their_err = None if theirs is None else rel_error(theirs[i], expected[i])
        err = rel_error(got, expected[i])
        assert err <= _bound(dtype, their_err), f"{name}: {err:.3g} vs torch {their_err}"


def test_sdpa_outputs_have_torchs_strides(provider):
    """Compiled code trusts the fake implementation's strides: out like the query, lse
    contiguous (B, H, L), gradients like their inputs."""
    for layout in ("bhsd", "bshd"):
        q, k, v = _dense(2, 4, 4, 128, 128, 64, layout=layout, requires_grad=True)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
        assert out.stride() == torch.empty_like(q).stride()
        assert lse.shape == (2, 4, 128) and lse.is_contiguous() and lse.dtype == torch.float32
        out.backward(torch.randn_like(out))
        for x in (q, k, v):
            assert x.grad.stride() == torch.empty_like(x).stride()


def test_sdpa_lse_matches_math(provider):
    q, k, v = _dense(2, 4, 4, 300, 300, 64)
    lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=True)[1]
    scores = (q.double() @ k.double().transpose(-1, -2)) / 8.0
    scores = scores.masked_fill(~torch.ones(300, 300, dtype=torch.bool, device="cuda").tril(),
                                -math.inf)
    assert (lse.double() - torch.logsumexp(scores, -1)).abs().max() < 2e-3


# --------------------------------------------------------------------------------------------------
# varlen_attn through torch vs the float64 reference.


def _varlen_inputs(lengths, heads=8, heads_kv=8, dim=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=g).to(device="cuda", dtype=dtype)
               for h in (heads, heads_kv, heads_kv))
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return q, k, v, torch.tensor(offsets, dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (64, 0), (32, 16)])
@pytest.mark.parametrize("heads_kv", [8, 2])
def test_varlen_attn_vs_reference(provider, window, heads_kv):
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    import inspect

    if heads_kv != 8 and "enable_gqa" not in inspect.signature(varlen.varlen_attn).parameters:
        pytest.skip("this torch's varlen_attn has no enable_gqa")
    lengths = [300, 1, 0, 777, 128]
    q, k, v, cu = _varlen_inputs(lengths, heads_kv=heads_kv, seed=7)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kwargs = {"window_size": window}
    if heads_kv != 8:
        kwargs["enable_gqa"] = True
    out, lse = varlen.varlen_attn(*leaves, cu, cu, max(lengths), max(lengths),
                                  return_aux=varlen.AuxRequest(lse=True), **kwargs)
    assert provider.forward == 1
    ref, ref_lse = varlen_attn_reference(q, k, v, cu, cu, window_size=window, return_lse=True)
    assert rel_error(out, ref) <= ERROR_FLOOR[q.dtype]
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 2e-3
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    assert provider.backward == 1
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out = varlen_attn_reference(*ref_leaves, cu, cu, window_size=window)
    for got, want in zip(grads, torch.autograd.grad(ref_out, ref_leaves, dout.double())):
        assert rel_error(got, want) <= ERROR_FLOOR[q.dtype]


def test_varlen_attn_inference_forms(provider):
    """seqused_k, a paged cache (block_table), num_splits and varlen_attn_out (the out= op)."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    import inspect

    params = inspect.signature(varlen.varlen_attn).parameters
    lengths = [100, 37, 256]
    q, k, v, cu = _varlen_inputs(lengths, heads=4, heads_kv=4, dim=64, seed=11)
    with torch.no_grad():
        if "num_splits" in params:
            out = varlen.varlen_attn(q, k, v, cu, cu, 256, 256, num_splits=1)
            assert rel_error(out, varlen_attn_reference(q, k, v, cu, cu)) <= 2e-2
        if "seqused_k" in params:
            used = torch.tensor([50, 37, 3], dtype=torch.int32, device="cuda")
            out = varlen.varlen_attn(q, k, v, cu, cu, 256, 256, seqused_k=used)
            ref = varlen_attn_reference(q, k, v, cu, cu, seqused_k=used)
            assert rel_error(out, ref) <= 2e-2
        if "block_table" in params:
            page, pages = 16, 40
            g = torch.Generator(device="cpu").manual_seed(3)
            k_pool, v_pool = (torch.randn(pages, page, 4, 64, generator=g).to("cuda", q.dtype)
                              for _ in range(2))
            table = torch.randperm(pages, generator=g)[:3 * 8].view(3, 8).to("cuda", torch.int32)
            used = torch.tensor([100, 1, 128], dtype=torch.int32, device="cuda")
            out = varlen.varlen_attn(q, k_pool, v_pool, cu, None, 256, 128, seqused_k=used,
                                     block_table=table)
            ref = varlen_attn_reference(q, k_pool, v_pool, cu, None, seqused_k=used,
                                        block_table=table)
            assert rel_error(out, ref) <= 2e-2
        if hasattr(varlen, "varlen_attn_out"):
            out = torch.full_like(q, math.nan)
            got = varlen.varlen_attn_out(out, q, k, v, cu, cu, 256, 256, window_size=(-1, 0))
            got = got[0] if isinstance(got, tuple) else got
            assert got.data_ptr() == out.data_ptr()
            assert rel_error(out, varlen_attn_reference(q, k, v, cu, cu, causal=True)) <= 2e-2
    if provider.forward == 0:
        pytest.skip("this torch's varlen_attn has none of the inference forms (torch 2.13 has)")
    assert provider.backward == 0


# --------------------------------------------------------------------------------------------------
# torch.compile and CUDA graphs.


class _Block(nn.Module):
    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, -1).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


def test_torch_compile_fullgraph(provider):
    torch.manual_seed(0)
    block = _Block().to("cuda", torch.bfloat16)
    x = torch.randn(2, 384, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(FLASH):
        eager = block(x)
        (eager_grad,) = torch.autograd.grad(eager.float().square().sum(), x)
        calls = provider.forward
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)
        (grad,) = torch.autograd.grad(out.float().square().sum(), x)
    assert provider.forward > calls and provider.backward >= 2
    assert rel_error(out, eager) < 1e-2 and rel_error(grad, eager_grad) < 2e-2


def test_cuda_graph_capture(provider):
    q, k, v = _dense(2, 4, 4, 512, 512, 128, seed=1)
    static = [x.clone() for x in (q, k, v)]

    def step():
        return _sdpa(*static, causal=True)

    graph, captured = capture_graph(step)
    fresh = _dense(2, 4, 4, 512, 512, 128, seed=2)
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, _sdpa(*fresh, causal=True))


# --------------------------------------------------------------------------------------------------
# Cases of PyTorch's test/test_varlen_attention.py, run with the provider active.


class _PackedBlock(nn.Module):
    """A projection, varlen attention over packed rows, and an output projection."""

    def __init__(self, dim, heads, dtype):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False, device="cuda", dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=False, device="cuda", dtype=dtype)

    def forward(self, x, cu, max_len, scale=None, window_size=(-1, -1)):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = (t.reshape(x.shape[0], self.heads, -1) for t in self.qkv(x).chunk(3, dim=-1))
        y = varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, window_size=window_size)
        return self.proj(y.reshape(x.shape[0], -1))

    def padded(self, x, lengths, scale=None, window_size=(-1, -1)):
        """The same block on a padded batch through SDPA with an explicit mask."""
        batch, length, dim = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        pos = torch.arange(length, device=x.device)
        mask = (pos[None, :] < lengths[:, None])[:, None, None, :]
        left, right = window_size
        rel = pos[None, :] - pos[:, None]  # key - query
        if left >= 0:
            mask = mask & (rel >= -left)
        if right >= 0:
            mask = mask & (rel <= right)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return self.proj(y.transpose(1, 2).reshape(batch, length, dim))


def _ragged_batch(batch, max_len, dim, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lengths = [int(n) * 64 for n in torch.randint(1, max_len // 64 + 1, (batch,), generator=g)]
    rows = [torch.randn(n, dim, generator=g) for n in lengths]
    packed = torch.cat(rows).to("cuda")
    padded = torch.zeros(batch, max(lengths), dim)
    for i, r in enumerate(rows):
        padded[i, :len(r)] = r
    offsets = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    return lengths, offsets, packed, padded.to("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_case_basic_functionality(provider, dtype):
    torch.manual_seed(42)
    block = _PackedBlock(1024, 16, dtype)
    x = torch.randn(1024, 1024, device="cuda", dtype=dtype, requires_grad=True)
    cu = torch.tensor([0, 512, 1024], device="cuda", dtype=torch.int32)
    out = block(x, cu, 512)
    assert out.shape == (1024, 1024) and out.dtype == dtype
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert grad.shape == x.shape and torch.isfinite(grad).all()
    assert provider.forward == 1 and provider.backward == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("scale", [None, 0.1])
@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (4, 0), (-1, 4), (0, 0), (0, 1),
                                         (8, 2), (1025, 1025)])
def test_torch_case_varlen_vs_sdpa(provider, dtype, scale, window_size):
    """Packed varlen_attn (our kernels) against masked SDPA on a padded batch, both against a
    float32 golden run: ours within twice SDPA's error plus rounding, as torch's test bounds it."""
    torch.manual_seed(42)
    lengths, cu, packed, padded = _ragged_batch(4, 1024, 1024, dtype, seed=42)
    golden = _PackedBlock(1024, 16, torch.float32)
    block = _PackedBlock(1024, 16, dtype)
    with torch.no_grad():
        block.qkv.weight.copy_(golden.qkv.weight.to(dtype))
        block.proj.weight.copy_(golden.proj.weight.to(dtype))
    x_packed = packed.to(dtype).requires_grad_()
    x_padded = padded.to(dtype).requires_grad_()
    x_golden = padded.clone().requires_grad_()
    seq = torch.tensor(lengths, device="cuda")
    ours = block(x_packed, cu, max(lengths), scale=scale, window_size=window_size)
    sdpa = block.padded(x_padded, seq, scale=scale, window_size=window_size)
    gold = golden.padded(x_golden, seq, scale=scale, window_size=window_size)
    dout = torch.randn_like(ours)
    dout_padded = torch.zeros_like(sdpa)
    start = 0
    for i, n in enumerate(lengths):
        dout_padded[i, :n] = dout[start:start + n]
        start += n
    g_ours = torch.autograd.grad(ours, x_packed, dout)[0]
    g_sdpa = torch.autograd.grad(sdpa, x_padded, dout_padded)[0]
    g_gold = torch.autograd.grad(gold, x_golden, dout_padded.float())[0]
    start = 0
    for i, n in enumerate(lengths):
        for mine, theirs, want in ((ours[start:start + n], sdpa[i, :n], gold[i, :n]),
                                   (g_ours[start:start + n], g_sdpa[i, :n], g_gold[i, :n])):
            rounding = 2 * (want + 0.3 - 0.3 - want).abs().max().item()
            err = (mine - want.to(dtype)).abs().max().item()
            their_err = (theirs - want.to(dtype)).abs().max().item()
            assert err <= 2 * their_err + rounding
        start += n
    assert provider.forward == 1 and provider.backward == 1


@pytest.mark.parametrize("window_size", [(-1, -1), (-1, 0), (4, 4), (0, -1)])
def test_torch_case_batch_invariance(provider, window_size):
    """A sequence's output and gradients do not depend on its neighbours or its place."""
    from torch.nn.attention.varlen import varlen_attn

    torch.manual_seed(42)
    lengths = [64, 128, 64, 128]
    seqs = [[torch.randn(n, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
             for _ in range(3)] for n in lengths]

    def run(order):
        q, k, v = (torch.cat([seqs[i][j] for i in order]) for j in range(3))
        cu = torch.tensor([0] + [lengths[i] for i in order], device="cuda").cumsum(0).int()
        out = varlen_attn(q, k, v, cu, cu, 128, 128, window_size=window_size)
        dout = torch.cat([torch.full_like(seqs[i][0], 0.01 * (i + 1)) for i in order])
        grads = torch.autograd.grad(out, [s[j] for s in seqs for j in range(3)], dout,
                                    allow_unused=True)
        parts = dict(zip(order, out.split([lengths[i] for i in order])))
        return parts, grads

    base_out, base_grads = run([0, 1, 2, 3])
    perm_out, perm_grads = run([2, 0, 3, 1])
    for i in range(4):
        torch.testing.assert_close(base_out[i], perm_out[i])
    for a, b in zip(base_grads, perm_grads):
        torch.testing.assert_close(a, b)


def test_torch_case_compiled_block_calls_the_ops(provider):
    """torch.compile (eager backend, fullgraph) of the packed block: torch's varlen ops are
    called forward and backward, and they reach our kernels."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(42)
    block = _PackedBlock(1024, 16, torch.bfloat16)
    x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 512, 1024], device="cuda", dtype=torch.int32)
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    with Ops() as mode:
        out = compiled(x, cu, 512)
        torch.autograd.grad(out, x, torch.ones_like(out))
    assert any("torch_attn._varlen_attn." in n for n in mode.names)
    assert any("torch_attn._varlen_attn_backward" in n for n in mode.names)
    assert provider.forward == 1 and provider.backward == 1
