"""Argument validation (no GPU needed: every check except device placement runs before any CUDA
work, so CPU tensors reach them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cupy_varlen
from cupy_varlen import _arrays, _checks


def packed(total=10, heads=4, heads_kv=None, head_dim=64, dtype=torch.bfloat16):
    heads_kv = heads if heads_kv is None else heads_kv
    q = torch.randn(total, heads, head_dim).to(dtype)
    k = torch.randn(total, heads_kv, head_dim).to(dtype)
    v = torch.randn(total, heads_kv, head_dim).to(dtype)
    cu = torch.tensor([0, 4, total], dtype=torch.int32)
    return q, k, v, cu, cu


def call(q, k, v, cu_q, cu_k, max_q=6, max_k=6, **kw):
    return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def expect(exc, *needles):
    """Error of type exc from varlen_attn whose message names every needle (the argument, what
    was expected)."""
    return pytest.raises(exc, match="^varlen_attn: .*" + ".*".join(needles))


def test_valid_arguments_reach_the_device_check():
    with expect(ValueError, "q", "CUDA device"):
        call(*packed())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32])
def test_unsupported_dtype(dtype):
    q, k, v, cu_q, cu_k = packed()
    with expect(TypeError, "q", "float16 or bfloat16"):
        call(q.to(dtype), k, v, cu_q, cu_k)


def test_mixed_dtypes():
    q, k, v, cu_q, cu_k = packed()
    with expect(TypeError, "k", "differs"):
        call(q, k.half(), v, cu_q, cu_k)
    with expect(TypeError, "v", "differs"):
        call(q, k, v.half(), cu_q, cu_k)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_wrong_rank(name):
    args = dict(zip("qkv", packed()[:3]))
    args[name] = args[name].flatten(1)
    with expect(ValueError, name, "3-D"):
        call(args["q"], args["k"], args["v"], *packed()[3:])


@pytest.mark.parametrize("head_dim", [4, 12, 260, 264])
def test_unsupported_head_dim(head_dim):
    with expect(ValueError, "head dim", "multiple of 8"):
        call(*packed(head_dim=head_dim))


def test_head_dims_differ():
    q, k, v, cu_q, cu_k = packed()
    with expect(ValueError, "k", "head dim"):
        call(q[..., :32], k, v, cu_q, cu_k)


def test_v_shape_must_match_k():
    q, k, v, cu_q, cu_k = packed()
    with expect(ValueError, "v", "shape"):
        call(q, k, v[:-1], cu_q, cu_k)


def test_gqa_heads_must_divide():
    with expect(ValueError, "k", "divide"):
        call(*packed(heads=6, heads_kv=4))


def test_non_contiguous_last_dim():
    q, k, v, cu_q, cu_k = packed(head_dim=128)
    with expect(ValueError, "q", "last dimension"):
        call(q[..., ::2], k[..., ::2], v[..., ::2], cu_q, cu_k)


def test_cu_seqlens_dtype_rank_length():
    q, k, v, cu_q, cu_k = packed()
    with expect(TypeError, "cu_seqlens_q", "int32"):
        call(q, k, v, cu_q.long(), cu_k)
    with expect(ValueError, "cu_seqlens_k", "1-D"):
        call(q, k, v, cu_q, cu_k.view(1, -1))
    with expect(ValueError, "cu_seqlens_k", "length"):
        call(q, k, v, cu_q, torch.tensor([0, 10], dtype=torch.int32))
    with expect(ValueError, "cu_seqlens_q", "no sequences"):
        call(q, k, v, torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))


def test_max_seqlen_must_be_int():
    with expect(TypeError, "max_seqlen_q", "int"):
        call(*packed(), max_q=6.0)
    with expect(TypeError, "max_seqlen_k", "int"):
        call(*packed(), max_k=torch.tensor(6))
    with expect(ValueError, "max_seqlen_q", ">= 0"):
        call(*packed(), max_q=-1)


@pytest.mark.parametrize("window", [(-2, 0), (0, -5)])
def test_window_values(window):
    with expect(ValueError, "window_size", ">= -1"):
        call(*packed(), window_size=window)


def test_window_shape_and_causal_conflict():
    with expect(TypeError, "window_size", "pair"):
        call(*packed(), window_size=(1, 2, 3))
    with expect(ValueError, "window_size", "causal"):
        call(*packed(), causal=True, window_size=(-1, 4))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale(scale):
    with expect(ValueError, "scale", "finite positive"):
        call(*packed(), scale=scale)


def test_bool_flags():
    with expect(TypeError, "causal", "bool"):
        call(*packed(), causal="yes")
    with expect(TypeError, "return_lse", "bool"):
        call(*packed(), return_lse=1)


def test_out_checks():
    q, k, v, cu_q, cu_k = packed()
    with expect(ValueError, "out", "shape"):
        call(q, k, v, cu_q, cu_k, out=torch.empty(3, 4, 64, dtype=q.dtype))
    with expect(TypeError, "out", "dtype"):
        call(q, k, v, cu_q, cu_k, out=torch.empty_like(q, dtype=torch.float16))
    with expect(ValueError, "out", "last dimension"):
        call(q, k, v, cu_q, cu_k, out=torch.empty(10, 4, 128, dtype=q.dtype)[..., ::2])


def test_mixed_array_types():
    q, k, v, cu_q, cu_k = packed()
    with expect(TypeError, "q", "torch tensor or CuPy"):
        call(q.float().numpy(), k, v, cu_q, cu_k)
    with expect(TypeError, "cu_seqlens_q", "torch array"):
        call(q, k, v, [0, 4, 10], cu_k)


# check_inputs=True: the offsets check itself runs on any torch device, so its logic is tested
# here on CPU tensors; tests/test_forward.py runs it through varlen_attn on the GPU.
def _offsets(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("values,total,max_len,match", [
    ([1, 5, 9], 9, 8, r"cu_seqlens_q must start at 0, got 1"),
    ([0, 5, 3, 9], 9, 8, r"cu_seqlens_q must be non-decreasing \(a sequence has length -2\)"),
    ([0, 5, 8], 9, 8, r"cu_seqlens_q must end at q's total tokens 9, got 8"),
    ([0, 5, 9], 9, 4, r"max_seqlen_q is 4 but cu_seqlens_q has a sequence of 5 tokens"),
])
def test_check_inputs_rejects_bad_offsets(values, total, max_len, match):
    with pytest.raises(ValueError, match="varlen_attn: " + match):
        _checks.check_offsets(_arrays.torch_framework(), _checks.VARLEN_ATTN, "cu_seqlens_q",
                              _offsets(values), total, "q", "max_seqlen_q", max_len)


@pytest.mark.parametrize("values,total,max_len", [
    ([0, 5, 9], 9, 5), ([0, 0, 0], 0, 0), ([0], 0, 0), ([0, 3, 3, 10], 10, 1 << 20),
])
def test_check_inputs_accepts_valid_offsets(values, total, max_len):
    fw = _arrays.torch_framework()
    _checks.check_offsets(fw, _checks.VARLEN_ATTN, "cu_seqlens_k", _offsets(values), total, "k",
                          "max_seqlen_k", max_len)
    assert fw.offsets_summary(_offsets(values)[::1]) == (
        values[0], values[-1], min(np.diff(values), default=0), max(np.diff(values), default=0))


def test_check_inputs_must_be_bool():
    q = torch.zeros(4, 1, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="check_inputs must be a bool"):
        cupy_varlen.varlen_attn(q, q, q, cu, cu, 4, 4, check_inputs="yes")
