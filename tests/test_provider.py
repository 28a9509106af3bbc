"""cupy_varlen as torch's flash-attention implementation (cupy_varlen._provider): CPU part.

Registration, the installed torch's op schemas against the overrides, the dispatcher plumbing
(binding by name, the fallback to torch's kernel), and the mapping of aten's arguments onto the
packed kernels: dense (B, H, L, D) tensors folded into packed views, lse layouts, windows, the
``out=`` variant, the backward. The mapping runs here with the kernels replaced by the float64
reference (``_provider.run_forward`` / ``run_backward``), so every layout decision is checked
without a GPU; tests/test_provider_gpu.py runs the same paths on the kernels.
"""

from __future__ import annotations

import math

import pytest
import torch

import cupy_varlen  # noqa: F401  (registers with torch's registry: torch is imported)
from conftest import run_python
from cupy_varlen import _provider
from cupy_varlen._provider import HEAD, SEQ
from cupy_varlen.reference import varlen_attn_reference

attention = pytest.importorskip("torch.nn.attention")
if not hasattr(attention, "register_flash_attention_impl"):
    pytest.skip("this torch has no flash-attention registry", allow_module_level=True)

REQUIRED_OPS = ("_flash_attention_forward", "_flash_attention_backward",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_flash_attention_backward")


# --------------------------------------------------------------------------------------------------
# Registration.


def test_registered_after_torch_and_not_active():
    assert "cupy_varlen" in attention.list_flash_attention_impls()
    assert attention.current_flash_attention_impl() != "cupy_varlen"


def test_import_order():
    """Imported before torch: nothing of torch, no registration until the documented import."""
    out = run_python(
        "import sys, cupy_varlen\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'cupy_varlen._provider' not in sys.modules\n"
        "import torch.nn.attention as A\n"
        "print('cupy_varlen' in A.list_flash_attention_impls())\n"
        "import cupy_varlen.compat\n"
        "print('cupy_varlen' in A.list_flash_attention_impls())\n"
        "print('cupy_varlen._provider' in sys.modules)\n"
        "print(A.current_flash_attention_impl())\n")
    assert out.split() == ["False", "True", "False", "None"]


def test_activation_installs_and_restore_removes_the_cuda_kernels():
    """On a CPU build the flash ops have no CUDA kernel: activation adds ours, restore takes them
    away again (deregistered at once, not at garbage collection)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = [f"aten::{op}" for op in _provider.OVERRIDDEN_OPS
             if _provider.installed_schema(op) is not None]
    before = [has(name, "CUDA") for name in names]
    attention.activate_flash_attention_impl("cupy_varlen")
    try:
        assert attention.current_flash_attention_impl() == "cupy_varlen"
        assert all(has(name, "CUDA") for name in names)
    finally:
        attention.restore_flash_attention_impl()
    assert attention.current_flash_attention_impl() is None
    assert [has(name, "CUDA") for name in names] == before


# --------------------------------------------------------------------------------------------------
# The installed torch's schemas.


@pytest.mark.parametrize("op_name", sorted(_provider.OVERRIDDEN_OPS))
def test_override_accepts_the_installed_schema(op_name):
    schema = _provider.installed_schema(op_name)
    if schema is None:
        assert op_name not in REQUIRED_OPS, f"this torch lacks aten::{op_name}"
        pytest.skip(f"this torch has no aten::{op_name}")
    assert _provider.schema_mismatches(schema, _provider.OVERRIDDEN_OPS[op_name]) == []


def test_returns_match_the_schemas():
    """The overrides return as many values as each schema declares."""
    counts = {"_flash_attention_forward": 5, "_flash_attention_forward_no_dropout_inplace": 1,
              "_flash_attention_backward": 3, "_scaled_dot_product_flash_attention": 9,
              "_scaled_dot_product_flash_attention_backward": 3}
    for op_name, count in counts.items():
        schema = _provider.installed_schema(op_name)
        if schema is not None:
            assert len(schema.returns) == count, op_name


# --------------------------------------------------------------------------------------------------
# The dispatcher plumbing (_Override), with a made-up schema.


class _Kernel:
    """Stands for torch's SafeKernelFunction: records call_boxed."""

    def __init__(self):
        self.calls = []

    def call_boxed(self, keyset, *args, **kwargs):
        self.calls.append((keyset, args, kwargs))
        return "torch's kernel"


def _impl(query, scale_in, *, scale=None, window=None):
    if scale == -1.0:
        raise _provider.Unsupported("scale=-1")
    return ("ours", query, scale_in, scale, window)


def test_override_passes_arguments_through_when_the_schema_binds():
    schema = torch._C.parse_schema(
        "aten::fake(Tensor query, float scale_in, *, float? scale=None, int? window=None) -> Tensor")
    override = _provider._Override("fake", _impl, schema, _Kernel())
    assert override.direct
    assert override("keys", 1, 2.0, window=3) == ("ours", 1, 2.0, None, 3)


def test_override_binds_by_name_and_guards_arguments_it_does_not_know():
    # Other positional names and a keyword-only argument the override lacks.
    schema = torch._C.parse_schema(
        "aten::fake(Tensor query, float scale_in, *, float? scale=None, int? extra=None) -> Tensor")
    original = _Kernel()
    override = _provider._Override("fake", _impl, schema, original)
    assert not override.direct
    assert override("keys", 1, 2.0, scale=0.5) == ("ours", 1, 2.0, 0.5, None)
    assert override("keys", 1, 2.0, extra=7) == "torch's kernel"
    assert original.calls == [("keys", (1, 2.0), {"extra": 7})]


def test_unsupported_calls_go_to_torchs_kernel():
    schema = torch._C.parse_schema(
        "aten::fake(Tensor query, float scale_in, *, float? scale=None, int? window=None) -> Tensor")
    original = _Kernel()
    override = _provider._Override("fake", _impl, schema, original)
    assert override("keys", 1, 2.0, scale=-1.0) == "torch's kernel"
    assert original.calls == [("keys", (1, 2.0), {"scale": -1.0})]


def test_unsupported_without_torchs_kernel_names_the_feature_and_the_way_back():
    schema = torch._C.parse_schema(
        "aten::fake(Tensor query, float scale_in, *, float? scale=None, int? window=None) -> Tensor")
    override = _provider._Override("fake", _impl, schema, None)
    with pytest.raises(RuntimeError) as exc:
        override("keys", 1, 2.0, scale=-1.0)
    message = str(exc.value)
    assert "scale=-1" in message and "aten.fake" in message
    assert "torch.nn.attention.restore_flash_attention_impl()" in message


def test_no_original_kernel_on_a_cpu_build():
    if torch.cuda.is_available():
        pytest.skip("a CUDA build has torch's kernels")
    assert _provider._original_kernel("_flash_attention_forward") is None


# --------------------------------------------------------------------------------------------------
# Dense tensors as packed views.


def _bshd(batch, length, heads, dim, layout, dtype=torch.float32):
    """A (B, L, H, D) tensor of distinct values in one of the layouts SDPA callers produce."""
    n = batch * length * heads * dim
    values = torch.arange(n, dtype=dtype)
    if layout == "bshd":  # x.view(B, L, H, D): the model layout (SDPA sees its transpose)
        return values.view(batch, length, heads, dim)
    if layout == "bhsd":  # torch.randn(B, H, L, D)
        return values.view(batch, heads, length, dim).transpose(1, 2)
    if layout == "qkv":  # one of q, k, v sliced out of a packed (B, L, 3, H, D) projection
        return torch.arange(3 * n, dtype=dtype).view(batch, length, 3, heads, dim)[:, :, 1]
    if layout == "lhbd":  # seq-first (L, B, H, D) memory: no fold
        return values.view(length, batch, heads, dim).transpose(0, 1)
    raise ValueError(layout)


@pytest.mark.parametrize("layout,mode", [("bshd", SEQ), ("bhsd", HEAD), ("qkv", SEQ)])
@pytest.mark.parametrize("shape", [(2, 5, 3, 8), (1, 5, 3, 8), (2, 1, 3, 8), (3, 4, 1, 16)])
def test_fold_is_a_view_with_the_packed_values(layout, mode, shape):
    x = _bshd(*shape, layout)
    batch, length, heads, dim = shape
    view = _provider.fold(x, mode)
    assert view is not None
    if mode == SEQ:
        expected = x.reshape(batch * length, heads, dim)
    else:
        expected = x.permute(0, 2, 1, 3).reshape(batch * heads * length, 1, dim)
    assert torch.equal(view, expected)
    assert view.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert all(s % 8 == 0 for s in view.stride()[:-1]), view.stride()
    view.zero_()  # writes land in the caller's tensor
    assert not x.any()


@pytest.mark.parametrize("layout,mode", [("bhsd", SEQ), ("lhbd", SEQ), ("lhbd", HEAD),
                                         ("bshd", HEAD), ("qkv", HEAD)])
def test_fold_refuses_layouts_it_cannot_express(layout, mode):
    x = _bshd(2, 5, 3, 8, layout)
    assert _provider.fold(x, mode) is None
    copied = _provider.fold_or_copy(x, mode)
    assert copied is not None
    assert torch.equal(copied, _provider.fold(_provider.empty_folded(x.shape, x, mode)
                                              .copy_(x), mode))


def test_fold_refuses_a_strided_last_dim():
    x = torch.zeros(2, 5, 3, 16)[..., ::2]
    assert _provider.fold(x, SEQ) is None and _provider.fold(x, HEAD) is None


def test_choose_mode():
    model = [_bshd(2, 5, 4, 8, "bshd") for _ in range(3)]
    plain = [_bshd(2, 5, 4, 8, "bhsd") for _ in range(3)]
    assert _provider.choose_mode(model, True) == SEQ
    assert _provider.choose_mode(plain, True) == HEAD
    assert _provider.choose_mode(plain, False) == SEQ  # GQA: one head per sequence cannot pair
    assert _provider.choose_mode(plain[:2] + model[:1], True) == HEAD
    assert _provider.choose_mode(model[:2] + plain[:1], True) == SEQ


def test_uniform_offsets():
    assert _provider.uniform_offsets(3, 5, "cpu").tolist() == [0, 5, 10, 15]
    assert _provider.uniform_offsets(2, 0, "cpu").tolist() == [0, 0, 0]
    assert _provider.uniform_offsets(0, 7, "cpu").tolist() == [0]
    assert _provider.uniform_offsets(3, 5, "cpu").dtype == torch.int32


@pytest.mark.parametrize("mode", [SEQ, HEAD])
def test_lse_layouts_round_trip(mode):
    batch, heads, length = 2, 3, 5
    dense = torch.randn(batch, heads, length)
    packed = _provider.lse_from_dense(dense, mode)
    rows = batch * length if mode == SEQ else batch * heads * length
    assert packed.shape == ((heads, rows) if mode == SEQ else (1, rows))
    back = _provider.lse_to_dense(packed.contiguous(), mode, batch, heads, length)
    assert torch.equal(back, dense) and back.is_contiguous()
    if mode == SEQ:  # row b*L + l of head h is lse[b, h, l]
        assert packed[1, 1 * length + 2] == dense[1, 1, 2]


@pytest.mark.parametrize("given,causal,expected", [
    ((None, None), False, (-1, -1)), ((None, None), True, (-1, 0)), ((-1, 0), True, (-1, 0)),
    ((16, 4), False, (16, 4)), ((16, 4), True, (16, 0)), ((-5, -2), False, (-1, -1))])
def test_window_mapping(given, causal, expected):
    assert _provider._window(*given, causal) == expected


# --------------------------------------------------------------------------------------------------
# The overrides on CPU, the kernels replaced by the float64 reference.


class _ReferenceKernels:
    """run_forward / run_backward on the float64 reference; records what the kernels were given."""

    def __init__(self):
        self.forward_calls = []
        self.backward_calls = []

    def run_forward(self, names, q, k, v, cu_q, cu_k, max_q, max_k, scale, window, out,
                    seqused_k=None, block_table=None, num_splits=None, alibi_slopes=None):
        self.forward_calls.append(dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k, max_q=max_q,
                                       max_k=max_k, out=out, window=window,
                                       num_splits=num_splits, alibi_slopes=alibi_slopes))
        ref, lse = varlen_attn_reference(q, k, v, cu_q, cu_k, scale=scale, window_size=window,
                                         return_lse=True, seqused_k=seqused_k,
                                         block_table=block_table, alibi_slopes=alibi_slopes)
        out.copy_(ref)
        return out, lse.float()

    def run_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, window,
                     deterministic, dq, dk, dv):
        self.backward_calls.append(dict(q=q, lse=lse, dq=dq))
        for target, grad in zip((dq, dk, dv),
                                reference_backward(dout, q, k, v, cu_q, cu_k, scale, window)):
            target.copy_(grad)


def reference_backward(dout, q, k, v, cu_q, cu_k, scale, window):
    """(dq, dk, dv) in float64 by the attention backward's formulas. Not autograd: an override
    runs below torch's autograd dispatch key, where nothing is recorded."""
    from cupy_varlen.reference import allowed_keys_mask

    dout, q, k, v = (x.double() for x in (dout, q, k, v))
    group = q.shape[1] // k.shape[1]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        rows, keys = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        qs, do = q[rows].transpose(0, 1), dout[rows].transpose(0, 1)  # (H, Lq, D)
        ks, vs = (x[keys].transpose(0, 1).repeat_interleave(group, 0) for x in (k, v))
        allowed = allowed_keys_mask(qs.shape[1], ks.shape[1], False, window)
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~allowed, -math.inf)
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows without keys: 0
        dprobs = do @ vs.transpose(1, 2)
        dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True))
        heads_kv = k.shape[1]
        dq[rows] = (dscores @ ks * scale).transpose(0, 1)
        dk[keys] = (dscores.transpose(1, 2) @ qs * scale).view(
            heads_kv, group, -1, q.shape[-1]).sum(1).transpose(0, 1)
        dv[keys] = (probs.transpose(1, 2) @ do).view(heads_kv, group, -1, q.shape[-1]).sum(
            1).transpose(0, 1)
    return dq, dk, dv


@pytest.fixture
def kernels(monkeypatch):
    fake = _ReferenceKernels()
    monkeypatch.setattr(_provider, "run_forward", fake.run_forward)
    monkeypatch.setattr(_provider, "run_backward", fake.run_backward)
    monkeypatch.setattr(_provider, "_device_unsupported", lambda query, tensors: None)
    return fake


def _sdpa_inputs(batch, heads, heads_kv, length, length_k, dim, layout, dtype=torch.bfloat16,
                 seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(h, n):
        if layout == "bhsd":
            return torch.randn(batch, h, n, dim, generator=g).to(dtype)
        return torch.randn(batch, n, h, dim, generator=g).to(dtype).transpose(1, 2)

    return make(heads, length), make(heads_kv, length_k), make(heads_kv, length_k)


def _math_sdpa(q, k, v, causal, scale=None):
    """float64 math SDPA with its lse (B, H, L), GQA by repeating k and v."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril(scores.shape[-1]
                                                                    - scores.shape[-2])
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, -1) @ v, torch.logsumexp(scores, -1)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads_kv", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_forward_mapping(kernels, layout, heads_kv, causal):
    batch, heads, length, dim = 2, 4, 6, 16
    q, k, v = _sdpa_inputs(batch, heads, heads_kv, length, length, dim, layout)
    result = _provider.scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=0.3)
    assert len(result) == 9
    out, lse, cum_q, cum_k, max_q, max_k, rng_state, unused, debug = result
    assert (cum_q, cum_k, max_q, max_k) == (None, None, length, length)
    assert rng_state.shape == (2,) and rng_state.dtype == torch.uint64
    assert unused.shape == () and unused.dtype == torch.uint64
    assert debug.numel() == 0 and debug.dtype == q.dtype
    # The layouts of torch's fake implementation: out like the query, lse (B, H, L) contiguous.
    assert out.shape == q.shape and out.stride() == torch.empty_like(q).stride()
    assert lse.shape == (batch, heads, length) and lse.is_contiguous()
    assert lse.dtype == torch.float32
    ref, ref_lse = _math_sdpa(q, k, v, causal, scale=0.3)
    assert (out.double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    (call,) = kernels.forward_calls
    # No copies where the strides allow a fold: the kernels read the caller's memory.
    if layout == "bshd" or heads_kv == heads:
        assert call["q"].data_ptr() == q.data_ptr() and call["k"].data_ptr() == k.data_ptr()
        assert call["out"].data_ptr() == out.data_ptr()
    folded_batch = batch * heads if layout == "bhsd" and heads_kv == heads else batch
    assert call["cu_q"].tolist() == list(range(0, (folded_batch + 1) * length, length))
    assert call["window"] == ((-1, 0) if causal else (-1, -1))


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads_kv", [4, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backward_mapping(kernels, layout, heads_kv, causal):
    batch, heads, length, length_k, dim = 2, 4, 5, 7, 16
    q, k, v = _sdpa_inputs(batch, heads, heads_kv, length, length_k, dim, layout)
    out, lse = _provider.scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[:2]
    dout = torch.randn(batch, length, heads, dim, generator=torch.Generator().manual_seed(3)
                       ).to(q.dtype).transpose(1, 2)
    dq, dk, dv = _provider.scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse, None, None, length, length_k, 0.0, causal,
        torch.empty(2, dtype=torch.uint64), torch.empty((), dtype=torch.uint64))
    for grad, x in ((dq, q), (dk, k), (dv, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype
        assert grad.stride() == torch.empty_like(x).stride()
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = _math_sdpa(*leaves, causal and length == length_k)
    if causal and length != length_k:  # bottom-right, as the flash kernels align it
        ref = varlen_attn_reference(
            *(x.transpose(1, 2).reshape(-1, x.shape[1], dim) for x in leaves),
            _provider.uniform_offsets(batch, length, "cpu"),
            _provider.uniform_offsets(batch, length_k, "cpu"), causal=True
        ).view(batch, length, heads, dim).transpose(1, 2)
    expected = torch.autograd.grad(ref, leaves, dout.double())
    for name, got, want in zip("qkv", (dq, dk, dv), expected):
        err = (got.double() - want).norm() / want.norm()
        assert err < 2e-2, (name, err)


@pytest.mark.parametrize("causal,window", [(False, (None, None)), (True, (None, None)),
                                           (False, (3, 1)), (True, (2, None))])
def test_varlen_forward_and_backward_mapping(kernels, causal, window):
    lengths = [5, 0, 9, 3]
    cu = torch.tensor([0, 5, 5, 14, 17], dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(17, 4, 16, generator=g).bfloat16()
    k = torch.randn(17, 2, 16, generator=g).bfloat16()
    v = torch.randn(17, 2, 16, generator=g).bfloat16()
    out, lse, rng_state, unused, debug = _provider.flash_attention_forward(
        q, k, v, cu, cu, max(lengths), max(lengths), 0.0, causal, False,
        window_size_left=window[0], window_size_right=window[1])
    expected_window = _provider._window(*window, causal)
    ref, ref_lse = varlen_attn_reference(q, k, v, cu, cu, window_size=expected_window,
                                         return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, 17) and lse.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 2e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-5
    (call,) = kernels.forward_calls
    assert call["q"] is q and call["cu_q"] is cu and call["window"] == expected_window

    dout = torch.randn(17, 4, 16, generator=g).bfloat16()
    dq, dk, dv = _provider.flash_attention_backward(
        dout, q, k, v, out, lse, cu, cu, max(lengths), max(lengths), 0.0, causal, rng_state,
        unused, window_size_left=window[0], window_size_right=window[1])
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    (bcall,) = kernels.backward_calls
    assert bcall["lse"] is lse and bcall["dq"] is dq


def test_out_variant_writes_into_out(kernels):
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(10, 2, 8, generator=g).half() for _ in range(3))
    packed = torch.zeros(10, 3, 2, 8, dtype=torch.half)
    out = packed[:, 1]  # a strided view: written in place
    lse = _provider.flash_attention_forward_no_dropout_inplace(
        out, q, k, v, cu, cu, 6, 6, 0.0, True, False, num_splits=1)
    assert kernels.forward_calls[-1]["num_splits"] == 1  # aten's 0 or None would be None
    ref, ref_lse = varlen_attn_reference(q, k, v, cu, cu, causal=True, return_lse=True)
    assert (packed[:, 1].double() - ref).abs().max() < 4e-3
    assert not packed[:, 0].any() and not packed[:, 2].any()
    assert torch.allclose(lse.double(), ref_lse, atol=1e-5)


def test_dense_flash_forward_takes_bshd(kernels):
    """``_flash_attention_forward`` without offsets: (B, L, H, D) in, lse (B, H, L)."""
    q, k, v = (x.transpose(1, 2) for x in _sdpa_inputs(2, 2, 2, 5, 5, 8, "bshd"))
    out, lse = _provider.flash_attention_forward(q, k, v, None, None, 5, 5, 0.0, False, False)[:2]
    ref, ref_lse = _math_sdpa(*(x.transpose(1, 2) for x in (q, k, v)), False)
    assert out.shape == q.shape and lse.shape == (2, 2, 5)
    assert (out.transpose(1, 2).double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-5


@pytest.mark.parametrize("change,feature", [
    (dict(dropout_p=0.1), "dropout_p"),
    (dict(return_debug_mask=True), "return_debug_mask"),
    (dict(dtype=torch.float32), "float32"),
    (dict(dim=12), "head dim 12"),
    (dict(dim=264), "head dim 264"),
    (dict(scale=0.0), "scale"),
])
def test_unsupported_forward_calls_name_the_feature(kernels, change, feature):
    dtype = change.pop("dtype", torch.bfloat16)
    dim = change.pop("dim", 16)
    q, k, v = _sdpa_inputs(1, 2, 2, 4, 4, dim, "bhsd", dtype=dtype)
    kwargs = dict(dropout_p=0.0, is_causal=False, return_debug_mask=False)
    kwargs.update(change)
    scale = kwargs.pop("scale", None)
    with pytest.raises(_provider.Unsupported, match=feature):
        _provider.scaled_dot_product_flash_attention(q, k, v, **kwargs, scale=scale)
    assert not kernels.forward_calls


def test_varlen_alibi_is_served_for_inference_only(kernels):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q, k, v = (torch.randn(7, 2, 8, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
               for i in range(3))
    slopes = torch.tensor([[0.5, 0.25], [0.125, 1.0]])
    out, lse = _provider.flash_attention_forward(q, k, v, cu, cu, 4, 4, 0.0, True, False,
                                                 alibi_slopes=slopes)[:2]
    assert kernels.forward_calls[-1]["alibi_slopes"] is slopes
    ref, ref_lse = varlen_attn_reference(q, k, v, cu, cu, causal=True, alibi_slopes=slopes,
                                         return_lse=True)
    assert torch.allclose(out.double(), ref, atol=2e-2) and torch.allclose(lse.double(), ref_lse)
    plain = varlen_attn_reference(q, k, v, cu, cu, causal=True)
    assert (ref - plain).abs().max() > 0.05  # the slopes took part
    calls = len(kernels.forward_calls)
    # aten's backward takes no slopes: a recorded call, float64 slopes or dense inputs are
    # torch's.
    with torch.enable_grad():
        leaf = q.clone().requires_grad_()
        with pytest.raises(_provider.Unsupported, match="alibi_slopes on inputs that require"):
            _provider.flash_attention_forward(leaf, k, v, cu, cu, 4, 4, 0.0, True, False,
                                              alibi_slopes=slopes)
    with pytest.raises(_provider.Unsupported, match="float32 only"):
        _provider.flash_attention_forward(q, k, v, cu, cu, 4, 4, 0.0, True, False,
                                          alibi_slopes=slopes.double())
    dense = torch.zeros(2, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(_provider.Unsupported, match="alibi_slopes with dense"):
        _provider.flash_attention_forward(dense, dense, dense, None, None, 4, 4, 0.0, False,
                                          False, alibi_slopes=slopes)
    assert len(kernels.forward_calls) == calls


def test_unsupported_varlen_arguments(kernels):
    cu = torch.tensor([0, 4], dtype=torch.int32)
    q = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    dense = torch.zeros(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.raises(_provider.Unsupported, match="dense"):
        _provider.flash_attention_forward(dense, dense, dense, None, None, 4, 4, 0.0, False,
                                          False, seqused_k=torch.tensor([3], dtype=torch.int32))
    with pytest.raises(ValueError, match="num_splits"):
        _provider.flash_attention_forward(q, q, q, cu, cu, 4, 4, 0.0, False, False,
                                          num_splits=-1)
    with pytest.raises(_provider.Unsupported, match="dropout_p"):
        _provider.flash_attention_backward(q, q, q, q, q, torch.zeros(2, 4), cu, cu, 4, 4, 0.5,
                                           False, None, None)
    assert not kernels.forward_calls and not kernels.backward_calls


def test_device_placement_is_checked_before_the_kernels():
    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(_provider.Unsupported, match="CUDA"):
        _provider.scaled_dot_product_flash_attention(q, q, q)


def test_override_as_the_dispatcher_calls_it(kernels):
    """Keyset first, then the arguments as the schema passes them; a dropout call goes to the
    kernel captured as torch's, with the arguments as they came."""
    schema = _provider.installed_schema("_flash_attention_forward")
    original = _Kernel()
    override = _provider._Override("_flash_attention_forward",
                                   _provider.OVERRIDDEN_OPS["_flash_attention_forward"], schema,
                                   original)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    q = torch.randn(4, 2, 8).bfloat16()
    out = override("keys", q, q, q, cu, cu, 4, 4, 0.0, True, False, scale=0.5)
    assert len(out) == 5 and len(kernels.forward_calls) == 1
    assert override("keys", q, q, q, cu, cu, 4, 4, 0.25, True, False) == "torch's kernel"
    assert original.calls == [("keys", (q, q, q, cu, cu, 4, 4, 0.25, True, False), {})]


@pytest.fixture
def on_cpu_key(kernels):
    """The overrides installed on the CPU dispatch key (where the flash ops have no kernel on any
    build): torch's real dispatcher, autograd formulas and callers, with the reference kernels."""
    handle = _provider.install("CPU")
    try:
        yield kernels
    finally:
        handle.remove()
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::_flash_attention_forward", "CPU")


def test_torch_varlen_attn_through_the_dispatcher(on_cpu_key):
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(11, 4, 16, generator=g).bfloat16().requires_grad_()
    k = torch.randn(11, 4, 16, generator=g).bfloat16().requires_grad_()
    v = torch.randn(11, 4, 16, generator=g).bfloat16().requires_grad_()
    out = varlen.varlen_attn(q, k, v, cu, cu, 7, 7, window_size=(-1, 0))
    ref = varlen_attn_reference(q.detach(), k.detach(), v.detach(), cu, cu, causal=True)
    assert (out.double() - ref).abs().max() < 2e-2
    dout = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(dout)
    expected = reference_backward(dout, q, k, v, cu, cu, None, (-1, 0))
    for x, want in zip((q, k, v), expected):
        assert (x.grad.double() - want).norm() / want.norm() < 2e-2
    assert len(on_cpu_key.forward_calls) == 1 and len(on_cpu_key.backward_calls) == 1


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_sdpa_op_and_its_autograd_through_the_dispatcher(on_cpu_key, heads_kv):
    q, k, v = (x.requires_grad_() for x in _sdpa_inputs(2, 4, heads_kv, 6, 6, 16, "bhsd"))
    result = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=True)
    out, lse = result[:2]
    ref, ref_lse = _math_sdpa(q.detach(), k.detach(), v.detach(), True)
    assert (out.double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-5
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).bfloat16()
    out.backward(dout)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    expected = torch.autograd.grad(_math_sdpa(*leaves, True)[0], leaves, dout.double())
    for x, want in zip((q, k, v), expected):
        assert (x.grad.double() - want).norm() / want.norm() < 2e-2
    assert len(on_cpu_key.backward_calls) == 1
