"""The torch integration: custom ops, autograd wiring, torch.compile, CUDA graphs, the compat module.

CPU tests (no GPU needed) check what does not need the kernels: fake (meta) implementations under
FakeTensorMode, argument validation on the autograd path and in varlen_attn_backward, the compat
module's signature and argument mapping, and, with the two kernel entry points replaced by the
float64 reference (fixture ``reference_kernels``), the op plumbing itself: torch.library.opcheck,
gradients through the registered autograd formula, and torch.compile(fullgraph=True) traces.
GPU tests run the same paths on the real kernels, against eager runs and torch's varlen_attn.
"""

from __future__ import annotations

import collections
import copy
import inspect
import itertools
import math
import re

import pytest
import torch

import cupy_varlen
from conftest import (ERROR_FLOOR, capture_graph, cu_seqlens, grad_bound, make_packed,
                      reference_grads, rel_error, requires_gpu, run_python, torch_varlen_out)
from cupy_varlen import _api, _checks, _torch, compat
from cupy_varlen.reference import allowed_keys_mask, gather_paged_keys, varlen_attn_reference

FWD_OP = torch.ops.cupy_varlen.varlen_attn.default
BWD_OP = torch.ops.cupy_varlen.varlen_attn_backward.default


def expect(exc, *needles):
    """Error of type exc whose message names every needle (the argument, what was expected)."""
    return pytest.raises(exc, match=".*".join(needles))


def expect_from(function, exc, name, *needles):
    """Error of type exc raised for ``function`` about argument ``name``: the message starts
    "<function>: <name>" (``name`` whole: "q" does not match "query") and names every needle."""
    return pytest.raises(exc, match=f"^{function}: {re.escape(name)}(?!\\w).*" + ".*".join(needles))


# --------------------------------------------------------------------------------------------------
# The kernels replaced by the float64 reference (CPU tensors): isolates the torch plumbing.


def _analytic_grads(dout, q, k, v, cu_q, cu_k, causal, scale, window_size):
    """dq, dk, dv in float64 from the closed form (dS = P * (dP - rowsum(dO * O))); autograd is not
    available inside an op's implementation. Also cross-checks reference_grads (autograd)."""
    q, k, v, dout = (x.to(torch.float64) for x in (q, k, v, dout))
    scale = 1.0 / math.sqrt(q.shape[2]) if scale is None else scale
    group, heads_kv = q.shape[1] // k.shape[1], k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        dos = dout[q0:q1].transpose(0, 1)
        s = (qs @ ks.transpose(1, 2) * scale).masked_fill(
            ~allowed_keys_mask(q1 - q0, k1 - k0, causal, window_size), -math.inf)
        lse = torch.logsumexp(s, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))
        ds = p * (dos @ vs.transpose(1, 2) - (dos * (p @ vs)).sum(-1, keepdim=True))
        dq[q0:q1] = (ds @ ks * scale).transpose(0, 1)
        n = k1 - k0
        dk[k0:k1] = (ds.transpose(1, 2) @ qs * scale).reshape(heads_kv, group, n, -1).sum(1) \
            .transpose(0, 1)
        dv[k0:k1] = (p.transpose(1, 2) @ dos).reshape(heads_kv, group, n, -1).sum(1) \
            .transpose(0, 1)
    return dq, dk, dv


@pytest.fixture
def reference_kernels(monkeypatch):
    """Replaces the launch plans' kernels with the reference, writing into the buffers the real
    plan would (everything up to the launch runs: checks, routing, allocation), and lets CPU
    tensors past the device check. Records each run's arguments. Plans are not cached, so every
    call takes the checked path."""
    calls = []

    class ForwardPlan:
        device = -1

        def __init__(self, qi, batch, scale, left, right, return_lse, softcap):
            self.shape, self.scale, self.left, self.right = qi.shape, scale, left, right
            self.batch, self.return_lse, self.softcap = batch, return_lse, softcap

        def run(self, fw, q, k, v, cu_q, cu_k, out, seqused_k, block_table, sinks, alibi, ptrs):
            window = (self.left, self.right)
            calls.append(dict(kind="forward", scale=self.scale, window=window,
                              seqused_k=seqused_k, block_table=block_table,
                              softcap=self.softcap, sinks=sinks, alibi_slopes=alibi))
            o, lse_ref = varlen_attn_reference(q, k, v, cu_q, cu_k, scale=self.scale,
                                               window_size=window, return_lse=True,
                                               seqused_k=seqused_k, block_table=block_table,
                                               softcap=self.softcap, sinks=sinks,
                                               alibi_slopes=alibi)
            result = fw.empty(self.shape, q) if out is None else out
            result.copy_(o)
            return (result, lse_ref.float()) if self.return_lse else result

    class BackwardPlan:
        device = -1

        def __init__(self, scale, left, right, deterministic, softcap):
            self.scale, self.window, self.deterministic = scale, (left, right), deterministic
            self.softcap = softcap

        def run(self, fw, dout, q, k, v, out, lse, cu_q, cu_k, dq, dk, dv, sinks, alibi, dsinks,
                ptrs):
            calls.append(dict(kind="backward", dout=dout, deterministic=self.deterministic,
                              scale=self.scale, window=self.window, softcap=self.softcap,
                              sinks=sinks, alibi_slopes=alibi))
            if self.softcap or sinks is not None or alibi is not None:
                grads = _modified_grads(dout, q, k, v, cu_q, cu_k, self.scale, self.window,
                                        self.softcap, sinks, alibi)
            else:
                grads = _analytic_grads(dout, q, k, v, cu_q, cu_k, False, self.scale,
                                        self.window)
            result = tuple(g.to(x.dtype) if given is None else given.copy_(g)
                           for g, given, x in zip(grads, (dq, dk, dv), (q, k, v)))
            if sinks is None:
                return result
            dsinks = grads[3].float() if dsinks is None else dsinks.copy_(grads[3])
            return (*result, dsinks)

    def plan_forward(qi, ki, vi, cu_qi, cu_ki, oi, batch, scale, left, right, return_lse,
                     ui=None, bi=None, sizes=(None, None, None), mods=(0.0, None, None)):
        return ForwardPlan(qi, batch, scale, left, right, return_lse, mods[0])

    def plan_backward(doi, qi, ki, vi, oi, li, cu_qi, cu_ki, grads, batch, scale, left, right,
                      deterministic, mods=(0.0, None, None)):
        return BackwardPlan(scale, left, right, deterministic, mods[0])

    monkeypatch.setattr(_checks, "check_devices", lambda names, named_infos: None)
    monkeypatch.setattr(_api, "_plan_forward", plan_forward)
    monkeypatch.setattr(_api, "_plan_backward", plan_backward)
    monkeypatch.setattr(_api, "_remember", lambda plans, key, plan: None)
    monkeypatch.setattr(_api, "_current_device", lambda: -1)
    return calls


def _modified_grads(dout, q, k, v, cu_q, cu_k, scale, window, softcap, sinks, alibi):
    """(dq, dk, dv, dsinks or None) in float64 from the closed forms the kernels use with score
    modifiers (dS through the softcap's slope 1 - tanh^2, dsinks = -sum of P_sink * rowsum(dO * O)),
    since an op's implementation has no autograd; test_score_modifiers_through_autograd checks
    them against autograd through the reference."""
    from cupy_varlen.reference import alibi_distance

    q, k, v, dout = (x.to(torch.float64) for x in (q, k, v, dout))
    heads = q.shape[1]
    group, heads_kv = heads // k.shape[1], k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dsinks = None if sinks is None else torch.zeros(heads, dtype=torch.float64)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        qs = q[q0:q1].transpose(0, 1)
        ks = k[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[k0:k1].transpose(0, 1).repeat_interleave(group, 0)
        dos = dout[q0:q1].transpose(0, 1)
        s = qs @ ks.transpose(1, 2) * scale
        slope = torch.ones_like(s)
        if softcap:
            t = torch.tanh(s / softcap)
            s, slope = softcap * t, 1 - t * t
        if alibi is not None:
            rows = alibi if alibi.dim() == 1 else alibi[b]
            s = s - rows.double().view(heads, 1, 1) * alibi_distance(q1 - q0, k1 - k0).double()
        s = s.masked_fill(~allowed_keys_mask(q1 - q0, k1 - k0, False, window), -math.inf)
        columns = s if sinks is None else torch.cat(
            [s, sinks.double().view(heads, 1, 1).expand(heads, q1 - q0, 1)], -1)
        lse = torch.logsumexp(columns, -1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))
        delta = (dos * (p @ vs)).sum(-1, keepdim=True)
        if sinks is not None:
            p_sink = torch.exp(sinks.double().view(heads, 1, 1) - lse)
            dsinks -= (p_sink * delta).sum((1, 2))
        ds = p * (dos @ vs.transpose(1, 2) - delta) * slope
        dq[q0:q1] = (ds @ ks * scale).transpose(0, 1)
        n = k1 - k0
        if n == 0:  # the sink alone: dsinks only
            continue
        dk[k0:k1] = (ds.transpose(1, 2) @ qs * scale).reshape(heads_kv, group, n, -1).sum(1) \
            .transpose(0, 1)
        dv[k0:k1] = (p.transpose(1, 2) @ dos).reshape(heads_kv, group, n, -1).sum(1) \
            .transpose(0, 1)
    return dq, dk, dv, dsinks


def cpu_packed(q_lens=(5, 0, 9, 16), k_lens=(7, 3, 0, 16), heads=4, heads_kv=2, head_dim=16,
               dtype=torch.float16, seed=0, requires_grad=True):
    q, k, v, cu_q, cu_k = make_packed(list(q_lens), list(k_lens), heads=heads, heads_kv=heads_kv,
                                      head_dim=head_dim, dtype=dtype, seed=seed, device="cpu")
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v, cu_q, cu_k


# --------------------------------------------------------------------------------------------------
# Fake implementations (no data read): shapes, dtypes, devices, strides.


def test_fake_ops_on_fake_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(37, 8, 64, dtype=torch.bfloat16, device="cuda")
        kv = torch.empty(41, 2, 2, 64, dtype=torch.bfloat16, device="cuda")
        k, v = kv.unbind(1)  # strided views
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        out, lse = FWD_OP(q, k, v, cu, cu, 20, 20, True, 0.125, -1, 0, False, False)
        assert isinstance(out, FakeTensor) and isinstance(lse, FakeTensor)
        assert out.shape == (37, 8, 64) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert lse.shape == (8, 37) and lse.dtype == torch.float32 and lse.is_contiguous()
        assert out.device == q.device == lse.device
        dout = torch.empty(37, 2, 8, 64, dtype=torch.bfloat16, device="cuda").select(1, 0)
        dq, dk, dv, dsinks = BWD_OP(dout, q, k, v, out, lse, cu, cu, 20, 20, True, 0.125, -1, 0,
                                    True)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape == (41, 2, 64)
        assert all(g.dtype == torch.bfloat16 and g.device == q.device and g.is_contiguous()
                   for g in (dq, dk, dv))
        assert dsinks.shape == (0,) and dsinks.dtype == torch.float32  # no sinks: a placeholder
        sinks = torch.empty(8, dtype=torch.float32, device="cuda")
        dsinks = BWD_OP(dout, q, k, v, out, lse, cu, cu, 20, 20, True, 0.125, -1, 0, True, 30.0,
                        sinks)[3]
        assert dsinks.shape == (8,) and dsinks.dtype == torch.float32
        # The public entry points route fake tensors through the op.
        out2, lse2 = cupy_varlen.varlen_attn(q, k, v, cu, cu, 20, 20, causal=True,
                                             return_lse=True)
        assert isinstance(out2, FakeTensor) and out2.shape == q.shape and lse2.shape == (8, 37)
        out3 = compat.varlen_attn(q, k, v, cu, cu, 20, 20, enable_gqa=True)
        assert isinstance(out3, FakeTensor) and out3.shape == q.shape


def test_fake_autograd():
    """The registered autograd formula under FakeTensorMode: grads get their inputs' shapes.
    (CPU fake tensors: a CPU-only torch cannot build autograd nodes on a fake CUDA device.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(37, 8, 64, dtype=torch.float16, requires_grad=True)
        k = torch.empty(41, 1, 64, dtype=torch.float16, requires_grad=True)
        v = torch.empty(41, 1, 64, dtype=torch.float16, requires_grad=True)
        cu = torch.empty(4, dtype=torch.int32)
        out, lse = cupy_varlen.varlen_attn(q, k, v, cu, cu, 20, 20, return_lse=True)
        assert out.requires_grad and not lse.requires_grad
        out.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


# --------------------------------------------------------------------------------------------------
# The op plumbing with the reference standing in for the kernels.


@pytest.mark.parametrize("causal,scale,window,heads_kv", [
    (False, 0.25, (-1, -1), 4), (True, 0.125, (-1, 0), 2), (False, 0.3, (3, 2), 1),
])
def test_opcheck(reference_kernels, causal, scale, window, heads_kv):
    q, k, v, cu_q, cu_k = cpu_packed(heads_kv=heads_kv)
    args = (q, k, v, cu_q, cu_k, 16, 16, causal, scale, *window, False, False)
    torch.library.opcheck(FWD_OP, args)
    with torch.no_grad():
        out, lse = FWD_OP(*args)
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, cu_q, cu_k, 16, 16, causal,
                scale, *window, False)
    torch.library.opcheck(BWD_OP, bwd_args)


@pytest.fixture(params=["direct", "op"])
def autograd_path(request, monkeypatch):
    """Eager autograd both ways: the direct autograd.Function and the custom op's registration."""
    monkeypatch.setattr(_torch, "_EAGER_FAST_PATH", request.param == "direct")
    return "_EagerVarlenAttn" if request.param == "direct" else "cupy_varlen_varlen_attn"


@pytest.mark.parametrize("kw", [
    dict(), dict(causal=True), dict(scale=0.3, window_size=(3, 2)), dict(window_size=(-1, 0)),
    dict(causal=True, window_size=(4, -1)),
])
def test_gradients_through_the_op(reference_kernels, autograd_path, kw):
    """setup_context/backward hand the backward what the forward used (scale resolved, causal
    folded into the window, GQA shapes): gradients equal float64 autograd of the reference."""
    q, k, v, cu_q, cu_k = cpu_packed()
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, **kw)
    assert autograd_path in type(out.grad_fn).__name__
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = reference_grads(q, k, v, cu_q, cu_k, dout, **kw)
    for g, r, x in zip(grads, ref, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert rel_error(g, r) < 2e-3  # fp16 rounding of a float64 result
    left, right = kw.get("window_size", (-1, -1))
    window = (left, 0 if kw.get("causal") else right)
    assert [c["kind"] for c in reference_kernels] == ["forward", "backward"]
    for call in reference_kernels:
        assert call["scale"] == kw.get("scale", 0.25)  # 1/sqrt(16), resolved before the op
        assert call["window"] == window


def test_backward_receives_deterministic_and_dout_layouts(reference_kernels, autograd_path):
    q, k, v, cu_q, cu_k = cpu_packed()
    for deterministic in (False, True):
        out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, deterministic=deterministic)
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert reference_kernels[-1]["deterministic"] is deterministic
    # Row-strided dout goes to the kernel as it is; a non-unit last stride is copied first.
    wide = torch.randn(q.shape[0], 8, 32, dtype=q.dtype)
    for dout, passed_as_is in ((wide[:, ::2, :16], True), (wide[:, :4, ::2], False)):
        out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16)
        torch.autograd.grad(out, (q, k, v), dout)
        got = reference_kernels[-1]["dout"]
        assert got.stride(-1) == 1 and torch.equal(got, dout)
        assert (got.data_ptr() == dout.data_ptr()) is passed_as_is


def test_out_argument_under_autograd(reference_kernels, autograd_path):
    q, k, v, cu_q, cu_k = cpu_packed()
    buf = torch.full((q.shape[0], 8, 16), math.nan, dtype=q.dtype)
    out = buf[:, 1::2]
    ret, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, out=out, return_lse=True)
    assert ret is out and torch.isnan(buf[:, ::2]).all() and not torch.isnan(out).any()
    assert lse.shape == (4, q.shape[0])
    dout = torch.randn_like(q)
    grads = torch.autograd.grad(ret, (q, k, v), dout)
    ref = reference_grads(q, k, v, cu_q, cu_k, dout)
    assert all(rel_error(g, r) < 2e-3 for g, r in zip(grads, ref))


def test_lse_is_not_differentiable(reference_kernels, autograd_path):
    q, k, v, cu_q, cu_k = cpu_packed()
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_compile_fullgraph_traces_through(reference_kernels):
    """torch.compile(fullgraph=True) of a function calling varlen_attn (and compat.varlen_attn):
    no graph break, the ops in the graph, results and gradients equal to eager, also over batches
    of changing size (max_seqlen becomes a SymInt) and without grad."""
    import torch._dynamo

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    def fn(q, k, v, cu_q, cu_k, max_q, max_k):
        out, lse = cupy_varlen.varlen_attn(q * 2, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                           return_lse=True)
        out2 = compat.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(3, 0),
                                  enable_gqa=True)
        return (out.float() ** 2).sum() + out2.float().sum() + lse.clamp(min=-5).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for i, (q_lens, k_lens) in enumerate((([5, 0, 9], [7, 3, 9]), ([7, 3, 9], [7, 3, 9]),
                                          ([12, 1, 4, 6], [12, 2, 0, 6]))):
        q, k, v, cu_q, cu_k = cpu_packed(q_lens, k_lens, seed=i)
        args = (q, k, v, cu_q, cu_k, max(q_lens), max(k_lens))
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, (q, k, v))
        loss_eager = fn(*args)
        grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
        assert torch.equal(loss, loss_eager)
        assert all(torch.equal(a, b) for a, b in zip(grads, grads_eager))
        with torch.no_grad():
            assert torch.equal(compiled(*args), loss_eager.detach())
    assert graphs and all("cupy_varlen" in g for g in graphs)
    torch._dynamo.reset()


def test_both_eager_paths_agree(reference_kernels):
    """The direct path and the op give the same outputs and gradients; anything that has to see
    the op (here a dispatch mode: FlopCounterMode) gets the op even when the direct path is on."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, cu_q, cu_k = cpu_packed()
    dout = torch.randn_like(q)
    results = []
    for mode in (None, FlopCounterMode(display=False)):
        with mode if mode is not None else torch.enable_grad():
            out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True,
                                               return_lse=True)
            grads = torch.autograd.grad(out, (q, k, v), dout)
        results.append((type(out.grad_fn).__name__, out, lse, grads))
    (name_a, *a), (name_b, *b) = results
    assert "_EagerVarlenAttn" in name_a and "cupy_varlen_varlen_attn" in name_b
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


@pytest.mark.parametrize("fast_path", [True, False])
def test_errors_inside_the_op_keep_their_type_and_message(monkeypatch, fast_path):
    """The eager implementation validates inside the op; its errors reach the caller unchanged."""
    monkeypatch.setattr(_torch, "_EAGER_FAST_PATH", fast_path)
    q, k, v, cu_q, cu_k = cpu_packed()
    with expect(ValueError, "q", "CUDA device"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16)


# --------------------------------------------------------------------------------------------------
# Routing and validation on the autograd path (CPU tensors that require grad).


def test_needs_autograd():
    t = torch.zeros(4, 2, 8)
    g = torch.zeros(4, 2, 8, requires_grad=True)
    assert not _torch.needs_autograd(t, t, t)
    assert _torch.needs_autograd(t, g, t)
    with torch.no_grad():
        assert not _torch.needs_autograd(g, g, g)
    with torch.inference_mode():
        assert not _torch.needs_autograd(t, t, t)
    assert _torch.needs_autograd(torch.nn.Parameter(t), t, t)
    assert not _torch.needs_autograd(t.numpy(), t, t)  # not a tensor: the eager path names it
    assert not _torch.needs_autograd(g, t.numpy(), t)


@pytest.mark.parametrize("case,exc,needles", [
    (dict(q=lambda q: q.float()), TypeError, ("q", "float16 or bfloat16")),
    (dict(k=lambda k: k.to(torch.bfloat16)), TypeError, ("k", "differs")),
    (dict(v=lambda v: v.flatten(1)), ValueError, ("v", "3-D")),
    (dict(v=lambda v: v[:-1]), ValueError, ("v", "shape")),
    (dict(q=lambda q: q[..., :8]), ValueError, ("k", "head dim")),
    (dict(q=lambda q: torch.cat([q, q[:, :1]], 1)), ValueError, ("k", "divide")),
    (dict(cu_q=lambda cu: cu.long()), TypeError, ("cu_seqlens_q", "int32")),
    (dict(cu_k=lambda cu: cu[:-1]), ValueError, ("cu_seqlens_k", "length")),
    (dict(max_q=6.0), TypeError, ("max_seqlen_q", "int")),
    (dict(max_k=-1), ValueError, ("max_seqlen_k", ">= 0")),
    (dict(scale=0.0), ValueError, ("scale", "finite positive")),
    (dict(scale="1"), TypeError, ("scale", "float")),
    (dict(window_size=(1, 2, 3)), TypeError, ("window_size", "pair")),
    (dict(window_size=(-2, 0)), ValueError, ("window_size", ">= -1")),
    (dict(causal=True, window_size=(-1, 4)), ValueError, ("window_size", "causal")),
    (dict(causal="yes"), TypeError, ("causal", "bool")),
    (dict(return_lse=1), TypeError, ("return_lse", "bool")),
    (dict(deterministic="yes"), TypeError, ("deterministic", "bool")),
    (dict(check_inputs=None), TypeError, ("check_inputs", "bool")),
    (dict(out=lambda q: torch.empty(3, 4, 16, dtype=q.dtype)), ValueError, ("out", "shape")),
    (dict(out=lambda q: torch.empty_like(q, dtype=torch.bfloat16)), TypeError, ("out", "dtype")),
])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_validation_messages_match_eager(case, exc, needles, requires_grad):
    """The autograd path rejects what the eager path rejects, with the same message."""
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    tensors = dict(q=q, k=k, v=v, cu_q=cu_q, cu_k=cu_k)
    kw = dict(max_q=16, max_k=16)
    for name, change in case.items():
        if name in tensors:
            tensors[name] = change(tensors[name])
        elif name == "out":
            kw["out"] = change(q)
        else:
            kw[name] = change
    if requires_grad:
        for name in ("q", "k", "v"):
            if tensors[name].is_floating_point():
                tensors[name] = tensors[name].detach().requires_grad_()
    with expect_from("varlen_attn", exc, *needles):
        cupy_varlen.varlen_attn(tensors["q"], tensors["k"], tensors["v"], tensors["cu_q"],
                                tensors["cu_k"], kw.pop("max_q"), kw.pop("max_k"), **kw)


def _bwd_args(heads=4, heads_kv=2, total=10, head_dim=64, dtype=torch.bfloat16):
    q, k, v, cu_q, cu_k = make_packed([4, total - 4], heads=heads, heads_kv=heads_kv,
                                      head_dim=head_dim, dtype=dtype, device="cpu")
    out = torch.randn_like(q)
    lse = torch.randn(heads, total, dtype=torch.float32)
    return dict(dout=torch.randn_like(q), q=q, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k)


def _call_bwd(args, **kw):
    return cupy_varlen.varlen_attn_backward(
        args["dout"], args["q"], args["k"], args["v"], args["out"], args["lse"],
        args["cu_seqlens_q"], args["cu_seqlens_k"], kw.pop("max_q", 6), kw.pop("max_k", 6), **kw)


def test_backward_valid_arguments_reach_the_device_check():
    with expect_from("varlen_attn_backward", ValueError, "q", "CUDA device"):
        _call_bwd(_bwd_args())


@pytest.mark.parametrize("name,change,exc,needles", [
    ("q", lambda x: x.float(), TypeError, ("q", "float16 or bfloat16")),
    ("k", lambda x: x.half(), TypeError, ("k", "differs")),
    ("v", lambda x: x[:-1], ValueError, ("v", "shape")),
    ("dout", lambda x: x[:-1], ValueError, ("dout", "shape")),
    ("dout", lambda x: x.half(), TypeError, ("dout", "dtype")),
    ("dout", lambda x: torch.randn(10, 4, 128, dtype=x.dtype)[..., ::2], ValueError,
     ("dout", "last dimension")),
    ("out", lambda x: x[:, :2], ValueError, ("out", "shape")),
    ("out", lambda x: x.half(), TypeError, ("out", "dtype")),
    ("lse", lambda x: x.t().contiguous(), ValueError, ("lse", "shape")),
    ("lse", lambda x: x.half(), TypeError, ("lse", "float32")),
    ("cu_seqlens_q", lambda x: x.long(), TypeError, ("cu_seqlens_q", "int32")),
    ("cu_seqlens_k", lambda x: x[:-1], ValueError, ("cu_seqlens_k", "length")),
])
def test_backward_validation_names_the_argument(name, change, exc, needles):
    args = _bwd_args()
    args[name] = change(args[name])
    with expect_from("varlen_attn_backward", exc, *needles):
        _call_bwd(args)


@pytest.mark.parametrize("kw,exc,needles", [
    (dict(max_q=6.0), TypeError, ("max_seqlen_q", "int")),
    (dict(scale=-1.0), ValueError, ("scale", "finite positive")),
    (dict(window_size=(0,)), TypeError, ("window_size", "pair")),
    (dict(causal=True, window_size=(3, 2)), ValueError, ("window_size", "causal")),
    (dict(deterministic="no"), TypeError, ("deterministic", "bool")),
    (dict(causal=1), TypeError, ("causal", "bool")),
])
def test_backward_scalar_validation(kw, exc, needles):
    with expect_from("varlen_attn_backward", exc, *needles):
        _call_bwd(_bwd_args(), **kw)


@pytest.mark.parametrize("name,change,exc,needles", [
    ("dq", lambda a: torch.empty_like(a["k"]), ValueError, ("dq", "shape")),
    ("dk", lambda a: torch.empty_like(a["k"], dtype=torch.float16), TypeError, ("dk", "dtype")),
    ("dv", lambda a: torch.empty(10, 2, 128, dtype=torch.bfloat16)[..., ::2], ValueError,
     ("dv", "last dimension")),
    ("dq", lambda a: a["q"].float().numpy(), TypeError, ("dq", "torch")),
])
def test_backward_output_validation(name, change, exc, needles):
    args = _bwd_args()
    with expect_from("varlen_attn_backward", exc, *needles):
        _call_bwd(args, **{name: change(args)})


# --------------------------------------------------------------------------------------------------
# compat: torch's signature and rules.


def _torch_varlen_module():
    try:
        from torch.nn.attention import varlen
    except ImportError:
        return None
    return varlen


@pytest.mark.parametrize("name", ["varlen_attn", "varlen_attn_out"])
def test_compat_signature_matches_torch(name):
    varlen = _torch_varlen_module()
    if varlen is None or not hasattr(varlen, name):
        pytest.skip(f"this torch has no torch.nn.attention.varlen.{name}")
    theirs = inspect.signature(getattr(varlen, name)).parameters
    ours = inspect.signature(getattr(compat, name)).parameters
    for pname, p in theirs.items():
        assert pname in ours, f"torch's parameter {pname} is missing"
        assert ours[pname].kind == p.kind, pname
        assert ours[pname].default == p.default, pname
    # Positional order is torch's; anything extra (for older torch versions) is keyword-only.
    positional = [n for n, p in theirs.items() if p.kind != p.KEYWORD_ONLY]
    assert [n for n, p in ours.items() if p.kind != p.KEYWORD_ONLY] == positional
    assert compat.AuxRequest is varlen.AuxRequest


@pytest.fixture
def captured(monkeypatch):
    """compat's call into cupy_varlen's varlen_attn, recorded (as {parameter: value} of
    _api._varlen_attn) instead of run."""
    calls = []
    signature = inspect.signature(_api._varlen_attn)

    def fake(*args, **kwargs):
        calls.append(dict(signature.bind(*args, **kwargs).arguments))
        return "result"

    monkeypatch.setattr(_api, "_varlen_attn", fake)
    return calls


def test_compat_maps_arguments(captured):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    assert compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True) == "result"
    call = captured[-1]
    assert call.pop("names").function == "varlen_attn"
    assert call == dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=16,
                        max_seqlen_k=16, causal=False, scale=None, window_size=(-1, -1),
                        return_lse=False, out=None, deterministic=False, check_inputs=False,
                        seqused_k=None, block_table=None, num_splits=None)
    compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, num_splits=1)
    assert captured[-1]["num_splits"] == 1
    used = torch.tensor([5, 3, 0, 9], dtype=torch.int32)
    compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, seqused_k=used)
    assert captured[-1]["seqused_k"] is used
    compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, scale=0.5,
                       window_size=(-7, 0), return_aux=compat.AuxRequest(lse=True), num_splits=1)
    call = captured[-1]
    assert (call["scale"], call["window_size"], call["return_lse"]) == (0.5, (-1, 0), True)
    compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True,
                       return_aux=compat.AuxRequest(lse=False))
    assert captured[-1]["return_lse"] is False
    out = torch.empty_like(q)
    compat.varlen_attn_out(out, q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, window_size=[5, 0])
    call = captured[-1]
    assert call["out"] is out and call["window_size"] == (5, 0)
    assert call["names"].function == "varlen_attn_out"
    prev = (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        torch.use_deterministic_algorithms(True)
        compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True)
        assert captured[-1]["deterministic"] is True
        torch.use_deterministic_algorithms(True, warn_only=True)  # torch's FA2 stays atomic then
        compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True)
        assert captured[-1]["deterministic"] is False
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])


def test_compat_cu_seq_k_none_needs_block_table():
    q, k, v, cu_q, cu_k = cpu_packed(heads_kv=4, requires_grad=False)
    with expect(ValueError, "cu_seq_k may be None only with block_table"):
        compat.varlen_attn(q, k, v, cu_q, None, 16, 16)


def test_compat_block_table(reference_kernels):
    """torch's paged form: page pools for key and value, the counts from seqused_k or from
    cu_seq_k's steps, cu_seq_k=None allowed; errors in torch's spelling."""
    q, k, v, cu_q, table, used = _cpu_paged(heads=4, heads_kv=2)
    kg, cu_k = gather_paged_keys(k, table, used)
    vg, _ = gather_paged_keys(v, table, used)
    expected = varlen_attn_reference(q, kg, vg, cu_q, cu_k, window_size=(-1, 0))
    for counts in (dict(seqused_k=used), dict(cu_seq_k=cu_k)):
        cu_arg = counts.pop("cu_seq_k", None)
        got = compat.varlen_attn(q, k, v, cu_q, cu_arg, 3, 9, window_size=(-1, 0),
                                 enable_gqa=True, block_table=table, **counts)
        torch.testing.assert_close(got.double(), expected, atol=2e-3, rtol=2e-3)
    out = torch.empty_like(q)
    assert compat.varlen_attn_out(out, q, k, v, cu_q, None, 3, 9, enable_gqa=True,
                                  seqused_k=used, block_table=table) is out
    with expect(ValueError, "key must be 4-D"):
        compat.varlen_attn(q, kg, vg, cu_q, None, 3, 9, enable_gqa=True, seqused_k=used,
                           block_table=table)
    with expect(ValueError, "same number of heads"):
        compat.varlen_attn(q, k, v, cu_q, None, 3, 9, seqused_k=used, block_table=table)


def test_compat_head_rules_are_torchs():
    q, k, v, cu_q, cu_k = cpu_packed(heads=4, heads_kv=2, requires_grad=False)
    with expect(ValueError, "same number of heads", "enable_gqa=True"):
        compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16)
    q3 = torch.cat([q, q[:, :1]], dim=1)  # 5 query heads over 2 KV heads
    with expect(ValueError, "multiple of kv heads"):
        compat.varlen_attn(q3, k, v, cu_q, cu_k, 16, 16, enable_gqa=True)
    with expect(ValueError, "window_size must have length 2"):
        compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, window_size=(1, 2, 3))
    # Valid: reaches cupy_varlen's device check, which speaks compat's names.
    with expect_from("varlen_attn", ValueError, "query", "CUDA device"):
        compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, num_splits=1)


@pytest.fixture(params=["eager", "direct", "op"])
def call_path(request, monkeypatch):
    """How a call runs: eager (no grad), autograd's direct path, autograd through the op."""
    monkeypatch.setattr(_torch, "_EAGER_FAST_PATH", request.param != "op")
    return request.param


def _compat_call(function, path, change):
    """compat.<function> on valid CPU arguments after ``change`` ({parameter: new value, or a
    function of the valid value}); inputs require grad on the autograd paths."""
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    args = dict(query=q, key=k, value=v, cu_seq_q=cu_q, cu_seq_k=cu_k, max_q=16, max_k=16)
    if function == "varlen_attn_out":
        args = dict(out=torch.empty_like(q), **args)
    for name, new in change.items():
        args[name] = new(args[name]) if callable(new) else new
    if path != "eager":
        for name in ("query", "key", "value"):
            if args[name].is_floating_point():
                args[name] = args[name].detach().requires_grad_()
    return getattr(compat, function)(*args.values(), enable_gqa=True)


COMPAT_ERRORS = [
    (dict(query=lambda x: x.float()), TypeError, "query", "must be float16 or bfloat16"),
    (dict(key=lambda x: x.to(torch.bfloat16)), TypeError, "key", "differs from query's"),
    (dict(value=lambda x: x[:-1]), ValueError, "value", "must equal key's shape"),
    (dict(query=lambda x: x.flatten(1)), ValueError, "query", "must be 3-D"),
    (dict(query=lambda x: x[..., :8]), ValueError, "key", "differs from query's head dim"),
    (dict(cu_seq_q=lambda x: x.long()), TypeError, "cu_seq_q", "must be int32"),
    (dict(cu_seq_k=lambda x: x[:-1]), ValueError, "cu_seq_k", "differs from cu_seq_q's"),
    (dict(cu_seq_k=lambda x: x.tolist()), TypeError, "cu_seq_k", "torch array like query"),
    (dict(cu_seq_q=lambda x: x[:1], cu_seq_k=lambda x: x[:1]), ValueError, "cu_seq_q",
     "has no sequences (length 1) but query or key has tokens"),
    (dict(max_q=6.0), TypeError, "max_q", "must be a Python int"),
    (dict(max_k=-1), ValueError, "max_k", "must be >= 0"),
    (dict(), ValueError, "query", "must be on a CUDA device"),  # everything else valid
]


@pytest.mark.parametrize("function", ["varlen_attn", "varlen_attn_out"])
@pytest.mark.parametrize("change,exc,shown,needle", COMPAT_ERRORS)
def test_compat_errors_speak_compat_names(function, call_path, change, exc, shown, needle):
    """A compat caller reads its own parameter names and function, never cupy_varlen's, on every
    path (the device check, the last one, included)."""
    with pytest.raises(exc) as info:
        _compat_call(function, call_path, change)
    message = str(info.value)
    assert message.startswith(f"{function}: {shown} ") and needle in message, message
    assert "cu_seqlens" not in message and "max_seqlen" not in message, message
    assert not re.search(r"(?<!\w)[qkv](?!\w)", message), message  # q, k, v, q's, ...


@pytest.mark.parametrize("change,exc,needle", [
    (dict(out=lambda x: x[:-1]), ValueError, "must equal query's shape"),
    (dict(out=lambda x: x.to(torch.bfloat16)), TypeError, "must equal query's dtype"),
])
def test_compat_out_errors(call_path, change, exc, needle):
    with expect_from("varlen_attn_out", exc, "out", re.escape(needle)):
        _compat_call("varlen_attn_out", call_path, change)


@pytest.mark.parametrize("function", ["varlen_attn", "varlen_attn_out"])
@pytest.mark.parametrize("kw,needle", [
    (dict(num_splits=0), "num_splits must be >= 1, got 0"),
    (dict(num_splits=1.5), "num_splits must be a Python int"),
    (dict(seqused_k=torch.ones(4)), "seqused_k must be int32"),
    (dict(seqused_k=torch.ones(3, dtype=torch.int32)), re.escape("seqused_k must be 1-D with one count per sequence")),
    (dict(block_table=torch.ones(2, 1, dtype=torch.int32)), "key must be 4-D"),
    (dict(window_size=(1, 2, 3)), "window_size must have length 2"),
])
def test_compat_own_rules_name_the_function(function, kw, needle):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    leading = (torch.empty_like(q),) if function == "varlen_attn_out" else ()
    with pytest.raises((NotImplementedError, ValueError, TypeError),
                       match=f"^{function}: {needle}"):
        getattr(compat, function)(*leading, q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True, **kw)


# --------------------------------------------------------------------------------------------------
# Each argument checked once per call.

_COUNTED_CHECKS = ("check_qkv", "check_cu_seqlens", "check_scale", "check_window", "check_like",
                   "check_batch", "check_devices")


@pytest.fixture
def check_counts(reference_kernels, monkeypatch):
    """How often each check ran, by name (the device check is the fixture's no-op)."""
    counts = collections.Counter()
    for name in _COUNTED_CHECKS:
        def counting(*args, _name=name, _check=getattr(_checks, name), **kwargs):
            counts[_name] += 1
            return _check(*args, **kwargs)

        monkeypatch.setattr(_checks, name, counting)
    return counts


@pytest.mark.parametrize("requires_grad", [False, True])
def test_each_argument_is_checked_once(check_counts, requires_grad):
    """Eager calls and the direct autograd path check each argument once; the direct backward
    checks nothing again (its arguments are the forward's, dout comes from autograd)."""
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=requires_grad)
    out = torch.empty_like(q)
    result = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True,
                                     window_size=(4, -1), out=out)
    assert result is out
    assert check_counts == {name: 1 for name in _COUNTED_CHECKS}
    if requires_grad:  # (once: the op path would check twice, see the next test)
        check_counts.clear()
        torch.autograd.grad(result, (q, k, v), torch.ones_like(result))
        assert not check_counts


def test_the_op_checks_again(check_counts, monkeypatch):
    """Through the op the autograd entry checks with the caller's names and the op's
    implementation checks everything again before the kernels (a direct torch.ops call, or a
    compiled graph, has nothing else in front of it); its backward checks once."""
    monkeypatch.setattr(_torch, "_EAGER_FAST_PATH", False)
    q, k, v, cu_q, cu_k = cpu_packed()
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16)
    assert "cupy_varlen_varlen_attn" in type(out.grad_fn).__name__
    assert check_counts == {name: 2 for name in _COUNTED_CHECKS if name != "check_like"}
    check_counts.clear()
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert check_counts == {"check_qkv": 1, "check_cu_seqlens": 1, "check_scale": 1,
                            "check_window": 1, "check_like": 2, "check_batch": 1,
                            "check_devices": 1}  # check_like: dout and out


def test_direct_torch_ops_call_is_checked():
    """The op's implementation guards the kernels itself."""
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    with expect_from("varlen_attn", ValueError, "v", "shape"):
        FWD_OP(q, k, v[:-1], cu_q, cu_k, 16, 16, False, 0.25, -1, -1, False, False)
    with expect_from("varlen_attn_backward", ValueError, "dout", "shape"):
        BWD_OP(q[:-1], q, k, v, q, torch.zeros(4, q.shape[0]), cu_q, cu_k, 16, 16, False, 0.25,
               -1, -1, False)


# --------------------------------------------------------------------------------------------------
# FlopCounterMode counts the ops as torch counts its own flash attention.

# cpu_packed(): lengths (5, 0, 9, 16) x (7, 3, 0, 16), 4 query heads, head dim 16.
_SCORE_ENTRIES = 4 * (5 * 7 + 0 * 3 + 9 * 0 + 16 * 16)  # query heads x sum of Lq * Lk
_FWD_FLOPS = 2 * _SCORE_ENTRIES * (16 + 16)  # QK^T and PV
_BWD_FLOPS = 2 * _SCORE_ENTRIES * (3 * 16 + 2 * 16)  # QK^T again, dP, dV, dQ, dK


def _flop_formula(op):
    from torch.utils.flop_counter import flop_registry

    return flop_registry[op]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("q_lens,k_lens,heads,heads_kv,head_dim", [
    ([5, 0, 9, 16], [7, 3, 0, 16], 4, 2, 16), ([300, 1024, 77], [300, 1024, 77], 16, 4, 128),
    ([1], [4096], 8, 8, 64), ([0, 0], [3, 0], 2, 1, 8),
])
def test_flop_formulas_are_torchs(device, q_lens, k_lens, heads, heads_kv, head_dim):
    """Our registered formulas against torch's for aten._flash_attention_forward / _backward on
    the same arguments: real offsets (sum over sequences) and meta ones (max_seqlen for every
    sequence, torch's rule where the values cannot be read). torch counts GQA as attention over
    the query heads (K/V broadcast); its formula is given K/V with the query's head count, which
    older torch versions require."""
    q = torch.empty(sum(q_lens), heads, head_dim, device=device)
    k = torch.empty(sum(k_lens), heads_kv, head_dim, device=device)
    v = torch.empty_like(k)
    k_full = torch.empty(sum(k_lens), heads, head_dim, device=device)
    lse = torch.empty(heads, q.shape[0], device=device)
    cu_q, cu_k = cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)
    max_q, max_k = max(q_lens) + 3, max(k_lens) + 5  # loose: shows in the meta count
    ours = _flop_formula(torch.ops.cupy_varlen.varlen_attn)(
        q, k, v, cu_q, cu_k, max_q, max_k, True, 0.1, -1, 0, False, False, out_val=None)
    theirs = _flop_formula(torch.ops.aten._flash_attention_forward)(
        q, k_full, k_full, cu_q, cu_k, max_q, max_k, 0.0, True, False, out_val=None)
    ours_bwd = _flop_formula(torch.ops.cupy_varlen.varlen_attn_backward)(
        q, q, k, v, q, lse, cu_q, cu_k, max_q, max_k, True, 0.1, -1, 0, False, out_val=None)
    theirs_bwd = _flop_formula(torch.ops.aten._flash_attention_backward)(
        q, q, k_full, k_full, q, lse, cu_q, cu_k, max_q, max_k, 0.0, True, None, None,
        out_val=None)
    assert (ours, ours_bwd) == (theirs, theirs_bwd)
    pairs = (zip(q_lens, k_lens) if device == "cpu"
             else [(max_q, max_k)] * len(q_lens))
    entries = heads * sum(lq * lk for lq, lk in pairs)
    assert (ours, ours_bwd) == (4 * entries * head_dim, 10 * entries * head_dim)


@pytest.mark.parametrize("grad", [False, True])
def test_flop_counter_counts_every_call(reference_kernels, grad):
    """Inference calls on plain tensors included: under the mode they take the op."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=grad)
    with FlopCounterMode(display=False) as counter:
        out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True)
        if grad:
            out.backward(torch.ones_like(out))
    expected = {torch.ops.cupy_varlen.varlen_attn: _FWD_FLOPS}
    if grad:
        expected[torch.ops.cupy_varlen.varlen_attn_backward] = _BWD_FLOPS
    assert counter.get_flop_counts()["Global"] == expected
    assert [c["kind"] for c in reference_kernels] == ["forward", "backward"][:1 + grad]


def test_flop_counter_sees_a_backward_that_starts_under_it(reference_kernels):
    """The direct path's forward ran unwatched; its backward, run under the mode, goes through
    the backward op."""
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, cu_q, cu_k = cpu_packed()
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16)
    assert "_EagerVarlenAttn" in type(out.grad_fn).__name__
    with FlopCounterMode(display=False) as counter:
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert counter.get_flop_counts()["Global"] == {
        torch.ops.cupy_varlen.varlen_attn_backward: _BWD_FLOPS}
    assert all(g.shape == x.shape for g, x in zip(grads, (q, k, v)))


def test_flop_counter_on_fake_tensors():
    """Shapes only (FakeTensorMode: no data, no GPU): every sequence counts as max_seqlen long,
    as torch counts its own varlen attention on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    with FakeTensorMode():
        q = torch.empty(37, 8, 64, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(41, 2, 64, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(4, dtype=torch.int32, device="cuda")
        with FlopCounterMode(display=False) as counter:
            compat.varlen_attn(q, k, k, cu, cu, 20, 30, window_size=(-1, 0), enable_gqa=True)
    assert counter.get_total_flops() == 3 * 4 * 8 * 20 * 30 * 64


def test_flop_counter_built_before_the_ops_exist():
    """A FlopCounterMode copies torch's formula registry when built; built before the first
    torch tensor reached cupy_varlen (so before the ops existed), it still counts them, whether
    the first call happens under it or it is entered later."""
    out = run_python(
        "import torch, cupy_varlen\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "first_call_inside = FlopCounterMode(display=False)\n"
        "entered_later = FlopCounterMode(display=False)\n"
        "with FakeTensorMode():\n"
        "    q = torch.empty(37, 8, 64, dtype=torch.bfloat16, device='cuda')\n"
        "    k = torch.empty(41, 2, 64, dtype=torch.bfloat16, device='cuda')\n"
        "    cu = torch.empty(4, dtype=torch.int32, device='cuda')\n"
        "    for counter in (first_call_inside, entered_later):\n"
        "        with counter:\n"
        "            cupy_varlen.varlen_attn(q, k, k, cu, cu, 20, 30, causal=True)\n"
        "print(first_call_inside.get_total_flops(), entered_later.get_total_flops())\n")
    assert out.split() == [str(3 * 4 * 8 * 20 * 30 * 64)] * 2


# --------------------------------------------------------------------------------------------------
# GPU: the real kernels.



@requires_gpu
def test_opcheck_cuda():
    """Fake vs real (strides included), schema, autograd registration, AOT dispatch: real kernels."""
    q, k, v, cu_q, cu_k = make_packed([37, 0, 64, 129], [50, 3, 64, 129], heads=4, heads_kv=2,
                                      head_dim=64, seed=1)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    args = (q, k, v, cu_q, cu_k, 129, 129, True, 0.125, -1, 0, False, False)
    torch.library.opcheck(FWD_OP, args)
    with torch.no_grad():
        out, lse = FWD_OP(*args)
    dout = torch.randn_like(out)
    for deterministic in (False, True):
        torch.library.opcheck(BWD_OP, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu_q,
                                       cu_k, 129, 129, True, 0.125, -1, 0, deterministic))


class TinyAttention(torch.nn.Module):
    """qkv projection -> attention over packed sequences -> output projection."""

    def __init__(self, attn, dim=128, heads=4, heads_kv=2, head_dim=32):
        super().__init__()
        self.attn, self.heads, self.heads_kv, self.head_dim = attn, heads, heads_kv, head_dim
        self.qkv = torch.nn.Linear(dim, (heads + 2 * heads_kv) * head_dim, bias=False)
        self.proj = torch.nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, x, cu, max_len):
        qkv = self.qkv(x).view(x.shape[0], self.heads + 2 * self.heads_kv, self.head_dim)
        q, k, v = qkv.split([self.heads, self.heads_kv, self.heads_kv], dim=1)  # strided views
        o = self.attn(q, k, v, cu, cu, max_len, max_len)
        return self.proj(o.reshape(x.shape[0], -1))


def _ours(q, k, v, cu_q, cu_k, max_q, max_k):
    return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)


def _theirs(q, k, v, cu_q, cu_k, max_q, max_k):
    out = torch_varlen_out(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
    if out is None:
        pytest.skip("this torch cannot run varlen_attn on this case")
    return out


@requires_gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compile_fullgraph_module_cuda(mode):
    """torch.compile(fullgraph=True) (inductor) of a module calling varlen_attn: loss and every
    gradient match eager. mode="reduce-overhead" runs the compiled forward and backward as CUDA
    graphs (recorded from the second step on), which leaves no per-call host cost of ours: three
    steps on new data, each checked."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    lens = [100, 1, 257, 30]
    model = TinyAttention(_ours).cuda().to(torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, mode=mode)
    cu = cu_seqlens(lens)
    for step in range(3 if mode == "reduce-overhead" else 1):
        x = torch.randn(sum(lens), 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        results = []
        for m in (model, compiled):
            y = m(x, cu, 257)
            loss = (y.float() ** 2).mean()
            params = [x, m.qkv.weight, m.proj.weight]
            # Cloned: a CUDA graph's outputs are overwritten by its next replay.
            results.append((loss.detach().clone(), y.detach().clone(),
                            [g.clone() for g in torch.autograd.grad(loss, params)]))
        (loss_e, y_e, g_e), (loss_c, y_c, g_c) = results
        assert rel_error(y_c, y_e.double()) < 1e-2, step
        assert abs(loss_c.item() - loss_e.item()) <= 1e-2 * abs(loss_e.item()), step
        for a, b in zip(g_c, g_e):
            assert torch.isfinite(a).all() and rel_error(a, b.double()) < 2e-2, step
    torch._dynamo.reset()


@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_graph_capture_forward_backward(deterministic):
    """Forward + backward captured in one CUDA graph, replayed on new data (new sequence
    boundaries included): the same results as eager calls on that data."""
    lens_a, lens_b = [300, 700, 24], [600, 400, 24]  # same batch and totals
    q, k, v, cu_q, cu_k = make_packed(lens_a, heads=4, heads_kv=2, head_dim=64, seed=2)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    static_cu = [cu_q.clone(), cu_k.clone()]
    static_dout = torch.randn_like(q)

    def step():
        out = cupy_varlen.varlen_attn(*leaves, *static_cu, 1024, 1024, causal=True,
                                      deterministic=deterministic)
        return (out, *torch.autograd.grad(out, leaves, static_dout))

    graph, captured = capture_graph(step)

    q2, k2, v2, cu_q2, cu_k2 = make_packed(lens_b, heads=4, heads_kv=2, head_dim=64, seed=3)
    dout2 = torch.randn_like(q2)
    with torch.no_grad():
        for dst, src in zip((*leaves, *static_cu, static_dout), (q2, k2, v2, cu_q2, cu_k2, dout2)):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    fresh = [x.clone().requires_grad_() for x in (q2, k2, v2)]
    out = cupy_varlen.varlen_attn(*fresh, cu_q2, cu_k2, 1024, 1024, causal=True,
                                  deterministic=deterministic)
    expected = (out, *torch.autograd.grad(out, fresh, dout2))
    ref = reference_grads(q2, k2, v2, cu_q2, cu_k2, dout2, causal=True)
    assert torch.equal(captured[0], expected[0])
    for got, e, r in zip(captured[1:], expected[1:], ref):
        if deterministic:
            assert torch.equal(got, e)
        else:  # atomic dQ: summation order may differ run to run
            assert rel_error(got, r) <= ERROR_FLOOR[q.dtype] and rel_error(e, r) <= \
                ERROR_FLOOR[q.dtype]


@requires_gpu
def test_training_loop_matches_torch_varlen():
    """A few Adam steps of a small attention layer on packed sequences (bf16 autocast): the loss
    curve follows the same loop with torch's varlen_attn step for step."""
    torch.manual_seed(4)
    lens = [200, 37, 1, 500, 90]
    cu = cu_seqlens(lens)
    x = torch.randn(sum(lens), 128, device="cuda")
    target = torch.randn(sum(lens), 128, device="cuda")
    base = TinyAttention(None).cuda()
    losses = {}
    for name, attn in (("ours", _ours), ("torch", _theirs)):
        model = copy.deepcopy(base)
        model.attn = attn
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses[name] = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x, cu, 500)
            loss = torch.nn.functional.mse_loss(y.float(), target)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["ours"], losses["torch"])):
        assert abs(a - b) <= 2e-2 * abs(b), f"step {step}: {a} vs torch's {b}"
    assert losses["ours"][-1] < losses["ours"][0]  # it trains


@requires_gpu
@pytest.mark.parametrize("window,gqa", [((-1, -1), False), ((-1, 0), True), ((64, 0), False),
                                        ((32, 16), True)])
def test_compat_matches_torch_varlen(window, gqa):
    """compat.varlen_attn against torch's on the same inputs: outputs, lse and gradients within
    the tolerance rule; rows with no allowed key have lse -inf here where torch has +inf."""
    varlen = _torch_varlen_module()
    if varlen is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" not in params or "return_aux" not in params or (
            gqa and "enable_gqa" not in params):
        pytest.skip("this torch's varlen_attn lacks an argument the case needs")
    q_lens, k_lens = [100, 300, 64, 7], [30, 300, 1, 0]  # Lq > Lk, an empty key sequence
    q, k, v, cu_q, cu_k = make_packed(q_lens, k_lens, heads=8, heads_kv=2 if gqa else 8,
                                      head_dim=64, seed=5)
    kw = dict(window_size=window, return_aux=compat.AuxRequest(lse=True))
    if gqa:
        kw["enable_gqa"] = True
    dout = torch.randn_like(q)
    results = {}
    for name, fn in (("ours", compat.varlen_attn), ("torch", varlen.varlen_attn)):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        try:
            out, lse = fn(*leaves, cu_q, cu_k, 300, 300, **kw)
        except Exception as e:  # noqa: BLE001 - torch's kernel may not take this case
            if name == "torch":
                pytest.skip(f"torch's varlen_attn cannot run this case: {e}")
            raise
        results[name] = (out, lse, torch.autograd.grad(out, leaves, dout))
    (out, lse, grads), (t_out, t_lse, t_grads) = results["ours"], results["torch"]
    ref, ref_lse = varlen_attn_reference(q, k, v, cu_q, cu_k, window_size=window,
                                         return_lse=True)
    assert rel_error(out, ref) <= max(1.5 * rel_error(t_out, ref), 1e-3)
    assert lse.shape == t_lse.shape == (8, q.shape[0]) and lse.dtype == t_lse.dtype
    finite = torch.isfinite(t_lse)
    assert not finite.all(), "the case must have rows with no allowed key"
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[~finite] == -math.inf).all()
    assert (lse[finite].double() - ref_lse[finite]).abs().max() <= 2e-3 + 1e-4 * ref_lse[
        finite].abs().max()
    ref_grads = reference_grads(q, k, v, cu_q, cu_k, dout, window_size=window)
    for g, t, r in zip(grads, t_grads, ref_grads):
        assert rel_error(g, r) <= grad_bound(q.dtype, r, t if torch.isfinite(t).all() else None)
    # varlen_attn_out: the same numbers, written into the caller's tensor.
    buf = torch.full_like(q, math.nan)
    ret = compat.varlen_attn_out(buf, q, k, v, cu_q, cu_k, 300, 300, **kw)
    assert ret[0] is buf and torch.equal(buf, out.detach()) and torch.equal(ret[1], lse)


@requires_gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [(300, 310), (2, 3000)])
def test_compat_num_splits_1_is_batch_invariant(causal, lens):
    """num_splits=1 promises a sequence the same bits whatever else is in the batch: no split of a
    row's keys and no kernel choice from the batch's shapes (alone, the (2, 3000) sequence would
    otherwise take the decode tiles; beside a long one, not)."""
    lq, lk = lens
    one = make_packed([lq], [lk], heads=4, head_dim=64, seed=6)
    qo, ko, vo, _, _ = make_packed([57, 1000], [60, 900], heads=4, head_dim=64, seed=7)
    window = (-1, 0) if causal else (-1, -1)
    q = torch.cat([qo[:57], one[0], qo[57:]])  # the sequence between two others
    k, v = (torch.cat([x[:60], y, x[60:]]) for x, y in ((ko, one[1]), (vo, one[2])))
    cu_q, cu_k = cu_seqlens([57, lq, 1000]), cu_seqlens([60, lk, 900])
    aux = compat.AuxRequest(lse=True)
    alone, alone_lse = compat.varlen_attn(*one, lq, lk, window_size=window, num_splits=1,
                                          return_aux=aux)
    batched, batched_lse = compat.varlen_attn(q, k, v, cu_q, cu_k, 1000, max(lk, 900),
                                              window_size=window, num_splits=1, return_aux=aux)
    assert torch.equal(batched[57:57 + lq], alone)
    assert torch.equal(batched_lse[:, 57:57 + lq], alone_lse)


@requires_gpu
def test_both_eager_paths_agree_cuda(monkeypatch):
    """The direct autograd.Function and the op's registered formula: the same bits (deterministic
    backward), forward and backward, on the real kernels."""
    q, k, v, cu_q, cu_k = make_packed([37, 0, 64, 129], [50, 3, 64, 129], heads=4, heads_kv=2,
                                      head_dim=64, seed=8)
    dout = torch.randn_like(q)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(_torch, "_EAGER_FAST_PATH", fast)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = cupy_varlen.varlen_attn(*leaves, cu_q, cu_k, 129, 129, causal=True,
                                           return_lse=True, deterministic=True)
        results.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_gpu
def test_flop_counter_matches_torch_varlen_cuda():
    """FlopCounterMode over the same forward + backward through compat.varlen_attn and torch's
    varlen_attn (the README's quick-start batch: GQA, causal) counts the same flops, also for an
    inference call. torch is given K/V repeated to the query heads: the same attention, and what
    its count of a GQA call is, where its flop formula takes GQA at all."""
    from torch.utils.flop_counter import FlopCounterMode

    varlen = _torch_varlen_module()
    if varlen is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    params = inspect.signature(varlen.varlen_attn).parameters
    if "window_size" not in params or "enable_gqa" not in params:
        pytest.skip("this torch's varlen_attn lacks window_size or enable_gqa")
    q, k, v, cu_q, cu_k = make_packed([300, 1024, 77], heads=16, heads_kv=4, head_dim=128,
                                      seed=9)
    kw = dict(window_size=(-1, 0), enable_gqa=True)
    totals = {}
    for name, fn in (("ours", compat.varlen_attn), ("torch", varlen.varlen_attn)):
        if name == "torch":
            k, v = (x.repeat_interleave(4, dim=1) for x in (k, v))
        with torch.no_grad(), FlopCounterMode(display=False) as inference:
            fn(q, k, v, cu_q, cu_k, 1024, 1024, **kw)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with FlopCounterMode(display=False) as training:
            out = fn(*leaves, cu_q, cu_k, 1024, 1024, **kw)
            out.backward(torch.ones_like(out))
        totals[name] = (inference.get_total_flops(), training.get_total_flops())
    entries = 16 * (300 * 300 + 1024 * 1024 + 77 * 77)
    assert totals["ours"] == totals["torch"] == (4 * entries * 128, 14 * entries * 128)


# --------------------------------------------------------------------------------------------------
# seqused_k through every entry point (the kernels replaced by the reference; GPU runs of the real
# kernels are in tests/test_forward.py).


@pytest.mark.parametrize("entry", ["varlen_attn", "compat"])
def test_seqused_k_reaches_the_kernels(reference_kernels, entry):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    used = torch.tensor([5, 1, 0, 9], dtype=torch.int32)
    if entry == "compat":
        got = compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True,
                                 window_size=(-1, 0), seqused_k=used)
    else:
        got = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True, seqused_k=used)
    assert reference_kernels[-1]["seqused_k"] is used
    expected = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, seqused_k=used)
    assert torch.allclose(got.double(), expected, atol=1e-3)
    # A plan made without seqused_k never serves a call with it: the key holds its layout.
    key_without = _api._forward_key(q, k, v, cu_q, cu_k, None, 16, 16, True, None, (-1, -1),
                                    False, False, False)
    key_with = _api._forward_key(q, k, v, cu_q, cu_k, None, 16, 16, True, None, (-1, -1),
                                 False, False, False, used)
    assert key_without[0] != key_with[0]


@pytest.mark.parametrize("entry", ["varlen_attn", "compat"])
def test_seqused_k_is_inference_only_on_every_autograd_path(reference_kernels, call_path, entry):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=call_path != "eager")
    used = torch.tensor([5, 1, 0, 9], dtype=torch.int32)

    def call():
        if entry == "compat":
            return compat.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, enable_gqa=True,
                                      seqused_k=used)
        return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, seqused_k=used)

    if call_path == "eager":
        call()
        return
    with pytest.raises(RuntimeError, match="varlen_attn: seqused_k is an inference-only"):
        call()
    with torch.no_grad():
        call()
    assert reference_kernels[-1]["seqused_k"] is used


def _cpu_paged(page_size=4, used=(5, 0, 9), pages_per_seq=3, heads=4, heads_kv=2, head_dim=16,
               seed=0):
    """q for len(used) one-to-three-row sequences, and a shuffled page pool whose unreached pages
    and page tails hold NaN."""
    g = torch.Generator().manual_seed(seed)
    batch = len(used)
    q_lens = [1 + b % 3 for b in range(batch)]
    cu_q = torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32)
    q = torch.randn(cu_q[-1].item(), heads, head_dim, generator=g).half()
    num_pages = batch * pages_per_seq + 2
    k = torch.full((num_pages, page_size, heads_kv, head_dim), float("nan")).half()
    v = k.clone()
    table = torch.randperm(num_pages, generator=g)[:batch * pages_per_seq].view(
        batch, pages_per_seq).to(torch.int32)
    for b, n in enumerate(used):
        for j in range(n):
            page, row = table[b, j // page_size], j % page_size
            k[page, row] = torch.randn(heads_kv, head_dim, generator=g).half()
            v[page, row] = torch.randn(heads_kv, head_dim, generator=g).half()
    return q, k, v, cu_q, table, torch.tensor(used, dtype=torch.int32)


def test_block_table_reaches_the_kernels(reference_kernels):
    """The paged path hands the plan its block table and seqused_k, with cu_seqlens_k None; its
    result is the reference's over the gathered keys, whose poisoned unreached rows change
    nothing."""
    q, k, v, cu_q, table, used = _cpu_paged()
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, None, 3, 9, causal=True, seqused_k=used,
                                  block_table=table)
    (call,) = [c for c in reference_kernels if c["kind"] == "forward"]
    assert call["block_table"] is table and call["seqused_k"] is used
    kg, cu_k = gather_paged_keys(k, table, used)
    vg, _ = gather_paged_keys(v, table, used)
    expected = varlen_attn_reference(q, kg, vg, cu_q, cu_k, causal=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    # The counts as FlashAttention-2 gives them, cu_seqlens_k's steps, and without seqused_k.
    by_offsets = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 9, causal=True,
                                         block_table=table)
    assert torch.equal(by_offsets, out)


@pytest.mark.parametrize("case,exc,match", [
    ("no_counts", ValueError, "block_table needs seqused_k or cu_seqlens_k"),
    ("cu_k_length", ValueError, "cu_seqlens_k length 3 differs"),
    ("table_dtype", TypeError, "block_table must be int32"),
    ("table_rows", ValueError, "block_table must be 2-D"),
    ("table_strided", ValueError, "block_table must be contiguous along its rows"),
    ("k_3d", ValueError, "k must be 4-D"),
    ("v_shape", ValueError, "v shape"),
    ("seqused_shape", ValueError, "seqused_k must be 1-D"),
])
def test_block_table_validation(reference_kernels, case, exc, match):
    q, k, v, cu_q, table, used = _cpu_paged()
    cu_k = None
    if case == "no_counts":
        used = None
    elif case == "cu_k_length":
        cu_k = cu_q[:-1].clone()
    elif case == "table_dtype":
        table = table.long()
    elif case == "table_rows":
        table = table[:-1]
    elif case == "table_strided":
        table = table.t().contiguous().t()
    elif case == "k_3d":
        k = k.flatten(0, 1)
    elif case == "v_shape":
        v = v[:-1]
    elif case == "seqused_shape":
        used = used[:-1]
    with pytest.raises(exc, match=match):
        cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 9, seqused_k=used, block_table=table)


def test_block_table_is_inference_only(reference_kernels):
    q, k, v, cu_q, table, used = _cpu_paged()
    q.requires_grad_()
    with pytest.raises(RuntimeError, match="block_table is an inference-only parameter"):
        cupy_varlen.varlen_attn(q, k, v, cu_q, None, 3, 9, seqused_k=used, block_table=table)


@pytest.mark.parametrize("counts", ["seqused_k", "cu_seqlens_k"])
def test_opcheck_paged(reference_kernels, counts):
    """The forward op with a block table (its schema's Optional cu_seqlens_k and block_table):
    schema, fake tensor and dispatch checks, the counts given either way; under torch.compile the
    paged call traces through the op."""
    q, k, v, cu_q, table, used = _cpu_paged()
    _, cu_k = gather_paged_keys(k, table, used)
    if counts == "seqused_k":
        cu_k = None
    else:
        used = None
    args = (q, k, v, cu_q, cu_k, 3, 9, True, 0.25, -1, 0, False, False, used, table)
    torch.library.opcheck(FWD_OP, args)
    out, lse = FWD_OP(*args)
    expected = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=True, scale=0.25,
                                     seqused_k=used, block_table=table)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)

    compiled = torch.compile(
        lambda q, k, v: cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 3, 9, causal=True,
                                                scale=0.25, seqused_k=used, block_table=table),
        backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), out)


# --------------------------------------------------------------------------------------------------
# Score modifiers through every autograd path (the kernels replaced by the reference; GPU runs of
# the real kernels are in tests/test_score_mods.py).


def _cpu_mods(heads=4, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sinks = torch.randn(heads, generator=g) + 1.0
    slopes = torch.rand(batch, heads, generator=g) * 0.5
    return sinks, slopes


def test_score_modifiers_through_autograd(reference_kernels, call_path):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=call_path != "eager")
    sinks, slopes = _cpu_mods()
    sinks.requires_grad_(call_path != "eager")
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True, softcap=3.0,
                                  sinks=sinks, alibi_slopes=slopes)
    forward = [c for c in reference_kernels if c["kind"] == "forward"][-1]
    assert forward["softcap"] == 3.0 and forward["sinks"] is not None
    assert forward["alibi_slopes"] is slopes
    expected = varlen_attn_reference(q.detach(), k.detach(), v.detach(), cu_q, cu_k, causal=True,
                                     softcap=3.0, sinks=sinks.detach(), alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)
    if call_path == "eager":
        return
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, sinks), dout)
    backward = [c for c in reference_kernels if c["kind"] == "backward"][-1]
    assert backward["softcap"] == 3.0 and backward["alibi_slopes"] is not None
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    ref_out = varlen_attn_reference(*leaves[:3], cu_q, cu_k, causal=True, softcap=3.0,
                                    sinks=leaves[3], alibi_slopes=slopes)
    ref = torch.autograd.grad(ref_out, leaves, dout.double())
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got.double(), want, atol=5e-3, rtol=5e-3)
    assert grads[3].dtype == torch.float32 and grads[3].shape == sinks.shape


def test_sinks_alone_make_the_call_differentiable(reference_kernels):
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    sinks = torch.nn.Parameter(_cpu_mods()[0])
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, sinks=sinks)
    assert out.requires_grad
    (dsinks,) = torch.autograd.grad(out.float().square().sum(), (sinks,))
    leaf = sinks.detach().double().requires_grad_()
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, sinks=leaf)
    (want,) = torch.autograd.grad(ref.square().sum(), (leaf,))
    torch.testing.assert_close(dsinks.double(), want, atol=5e-3, rtol=5e-3)
    with torch.no_grad():  # inference with a Parameter: no autograd, same result
        torch.testing.assert_close(
            cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, sinks=sinks), out.detach())


def test_modifier_plans_are_keyed_by_them():
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    sinks, slopes = _cpu_mods()
    base = (q, k, v, cu_q, cu_k, None, 16, 16, True, None, (-1, -1), False, False, False)
    keys = [_api._forward_key(*base)[0],
            _api._forward_key(*base, None, None, None, 3.0)[0],
            _api._forward_key(*base, None, None, None, 0.0, sinks)[0],
            _api._forward_key(*base, None, None, None, 0.0, None, slopes)[0],
            _api._forward_key(*base, None, None, None, 0.0, None, slopes[0])[0]]
    assert len(set(keys)) == len(keys)
    assert _api._forward_key(*base, None, None, None, 3)[0] == keys[1]  # an int cap keys as float
    assert _api._forward_key(*base, None, None, None, True) is None  # checked path: TypeError


def test_opcheck_score_modifiers(reference_kernels):
    """Both ops with the modifiers: schema, fake tensors, dispatch and autograd registration; the
    backward op's dsinks (an empty placeholder without sinks); torch.compile traces the call."""
    q, k, v, cu_q, cu_k = cpu_packed(requires_grad=False)
    sinks, slopes = _cpu_mods()
    args = (q, k, v, cu_q, cu_k, 16, 16, True, 0.25, -1, 0, False, False, None, None, None, 3.0,
            sinks, slopes)
    torch.library.opcheck(FWD_OP, args)
    out, lse = FWD_OP(*args)
    dout = torch.randn_like(out)
    bwd = (dout, q, k, v, out, lse, cu_q, cu_k, 16, 16, True, 0.25, -1, 0, False, 3.0, sinks,
           slopes)
    torch.library.opcheck(BWD_OP, bwd)
    assert BWD_OP(*bwd)[3].shape == sinks.shape
    assert BWD_OP(*bwd[:15])[3].shape == (0,)

    leaf = sinks.clone().requires_grad_()
    compiled = torch.compile(
        lambda q, k, v, s: cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 16, 16, causal=True,
                                                   scale=0.25, softcap=3.0, sinks=s,
                                                   alibi_slopes=slopes),
        backend="eager", fullgraph=True)
    got = compiled(q, k, v, leaf)
    torch.testing.assert_close(got, out)
    (dsinks,) = torch.autograd.grad(got, (leaf,), dout)
    assert dsinks.shape == sinks.shape and torch.isfinite(dsinks).all()
