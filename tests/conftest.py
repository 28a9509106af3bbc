"""Shared test helpers: packed-batch construction, the reference comparison, torch's varlen_attn.

Tolerance rule (GPU tests): a kernel's relative error ||out - ref|| / ||ref|| against the float64
reference must be at most 1.5x the error of torch.nn.attention.varlen.varlen_attn on the same
inputs where torch supports the case, and under the dtype's floor otherwise (bf16 2e-2, fp16 4e-3:
a few units of the output's rounding). lse is compared in float32 against the reference's.
"""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cupy_varlen.reference import allowed_keys_mask, varlen_attn_reference


def cuda_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


requires_gpu = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")

REPOSITORY = Path(__file__).resolve().parent.parent


def run_python(code: str) -> str:
    """Runs ``code`` in a fresh interpreter (this one, importing this cupy_varlen) outside the
    repository; returns its stdout, failing the test with its stderr on a non-zero exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPOSITORY)] + sys.path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPOSITORY.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def is_hopper() -> bool:
    """The current GPU can run the sm90 kernel family."""
    import cupy

    return cupy.cuda.Device().compute_capability.startswith("9")


def select_kernel_family(family, monkeypatch, attribute):
    """Runs the calling test under kernel family ``family`` ("sm80" or "sm90") of the dispatch
    switch ``cupy_varlen._spec.<attribute>`` (forward_kernel or backward_kernel); sm90 only where
    the GPU is a Hopper. Head dims the sm90 family does not cover run sm80 under either choice."""
    if family == "sm90" and not is_hopper():
        pytest.skip("the sm90 kernels need a Hopper GPU")
    from cupy_varlen import _spec

    monkeypatch.setattr(_spec, attribute, family)
    return family

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ERROR_FLOOR = {torch.bfloat16: 2e-2, torch.float16: 4e-3}


def capture_graph(step, warmup=2):
    """(graph, step's result inside the capture): ``step`` run ``warmup`` times on a side stream
    first (kernels compiled, allocator pools warm: neither may happen inside a capture), then
    captured once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    return graph, captured


def cu_seqlens(lengths, device="cuda"):
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def make_packed(q_lens, k_lens=None, heads=4, heads_kv=None, head_dim=64, dtype=torch.bfloat16,
                seed=0, device="cuda", logit_scale=1.0):
    """Random packed q, k, v (standard normal, never zeros) and their cu_seqlens."""
    k_lens = q_lens if k_lens is None else k_lens
    heads_kv = heads if heads_kv is None else heads_kv
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(rows, h):
        return torch.randn(rows, h, head_dim, generator=g).to(device=device, dtype=dtype)

    q = rand(sum(q_lens), heads)
    k = rand(sum(k_lens), heads_kv)
    v = rand(sum(k_lens), heads_kv)
    if logit_scale != 1.0:
        q = (q.float() * logit_scale).to(dtype)
    return q, k, v, cu_seqlens(q_lens, device), cu_seqlens(k_lens, device)


def rel_error(out, ref) -> float:
    out = torch.as_tensor(out).to(torch.float64)
    ref = ref.to(torch.float64)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def torch_varlen_out(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, scale=None,
                     window_size=(-1, -1)):
    """torch's varlen_attn on the same inputs, or None where this torch cannot run the case."""
    fn = _torch_varlen()
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    left, right = window_size
    if causal:
        right = 0
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (left, right)
    elif left != -1 or right not in (-1, 0):
        return None
    elif right == 0:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" not in params:
            return None
        kwargs["scale"] = scale
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
    try:
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    except Exception:
        return None


def check_forward(q, k, v, cu_q, cu_k, *, causal=False, scale=None, window_size=(-1, -1),
                  max_q=None, max_k=None, compare_torch=True, check_lse=True, seqused_k=None,
                  num_splits=None):
    """Runs cupy_varlen into a NaN-poisoned output, checks every element was written, and
    compares out and lse with the float64 reference under the tolerance rule. Returns the error.
    (With seqused_k, torch's bound is not consulted: torch before 2.13 lacks it.)"""
    import cupy_varlen

    lens_q = (cu_q[1:] - cu_q[:-1]).tolist()
    lens_k = (cu_k[1:] - cu_k[:-1]).tolist()
    max_q = max(lens_q, default=0) if max_q is None else max_q
    max_k = max(lens_k, default=0) if max_k is None else max_k
    out = torch.full_like(q, float("nan"))
    got, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                       scale=scale, window_size=window_size, return_lse=True,
                                       out=out, seqused_k=seqused_k, num_splits=num_splits)
    assert got is out
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    ref, ref_lse = varlen_attn_reference(q, k, v, cu_q, cu_k, causal=causal, scale=scale,
                                         window_size=window_size, return_lse=True,
                                         seqused_k=seqused_k)
    err = rel_error(out, ref)
    bound = ERROR_FLOOR[q.dtype]
    if compare_torch and seqused_k is None:
        theirs = torch_varlen_out(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                  window_size=window_size)
        if theirs is not None and q.shape[0] > 0 and ref.norm() > 0:
            bound = max(1.5 * rel_error(theirs, ref), 1e-3 if q.dtype == torch.bfloat16 else 2e-4)
    assert err <= bound, f"relative error {err:.3g} > bound {bound:.3g}"
    if check_lse:
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs"
        assert (lse[~finite] == -math.inf).all(), "rows with no key must have lse -inf"
        if finite.any():
            lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
            assert lse_err <= 2e-3 + 1e-4 * ref_lse[finite].abs().max().item(), lse_err
    return err


# Backward helpers (tests/test_backward.py, tests/test_torch_ops.py).

# The smallest bound a 1.5x-of-torch comparison may set: where torch's error is tiny (small or
# degenerate cases) the dtype's own rounding of the result still has to fit.
MIN_BOUND = {torch.bfloat16: 1e-3, torch.float16: 2e-4}


def reference_grads(q, k, v, cu_q, cu_k, dout, *, causal=False, scale=None,
                    window_size=(-1, -1)):
    """(dq, dk, dv) in float64: autograd through the reference on upcast copies of the inputs."""
    leaves = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    with torch.enable_grad():
        out = varlen_attn_reference(*leaves, cu_q, cu_k, causal=causal, scale=scale,
                                    window_size=window_size)
        if not out.requires_grad:  # no query rows at all: nothing depends on the inputs
            return tuple(torch.zeros_like(x) for x in leaves)
        grads = torch.autograd.grad(out, leaves, dout.to(torch.float64), allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves))


def torch_varlen_grads(q, k, v, cu_q, cu_k, max_q, max_k, dout, *, causal=False, scale=None,
                       window_size=(-1, -1)):
    """(dq, dk, dv) of torch's varlen_attn on the same inputs and dout, or None where this torch
    cannot run the case or returns non-finite gradients (its kernel's business, not a bound)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    try:
        with torch.enable_grad():
            out = torch_varlen_out(*leaves, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
                                   window_size=window_size)
            if out is None:
                return None
            grads = torch.autograd.grad(out, leaves, dout)
    except Exception:
        return None
    if not all(torch.isfinite(g).all() for g in grads):
        return None
    return grads


def grad_bound(dtype, ref, theirs) -> float:
    """The tolerance rule for one gradient: 1.5x torch's error where torch ran, else the floor."""
    if theirs is None or ref.norm() == 0:
        return ERROR_FLOOR[dtype]
    return max(1.5 * rel_error(theirs, ref), MIN_BOUND[dtype])


# Backward checks (tests/test_backward.py, tests/test_fuzz.py).


def max_len(cu):
    return max((cu[1:] - cu[:-1]).tolist(), default=0)


def random_like(x, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)


def dead_rows(cu_q, cu_k, causal, window_size):
    """(query rows with no allowed key, key rows that no query may attend), as boolean masks."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    dead_q = torch.zeros(cq[-1], dtype=torch.bool)
    dead_k = torch.zeros(ck[-1], dtype=torch.bool)
    for b in range(len(cq) - 1):
        allowed = allowed_keys_mask(cq[b + 1] - cq[b], ck[b + 1] - ck[b], causal, window_size)
        dead_q[cq[b]:cq[b + 1]] = ~allowed.any(dim=1)
        dead_k[ck[b]:ck[b + 1]] = ~allowed.any(dim=0)
    return dead_q.to(cu_q.device), dead_k.to(cu_q.device)


def autograd_grads(q, k, v, cu_q, cu_k, dout, *, max_q, max_k, **kw):
    """(dq, dk, dv) through torch autograd; q, k, v may be views of a leaf that requires grad."""
    import cupy_varlen

    q, k, v = (x if x.requires_grad else x.detach().requires_grad_() for x in (q, k, v))
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    return torch.autograd.grad(out, (q, k, v), dout)


def functional_grads(q, k, v, cu_q, cu_k, dout, *, max_q, max_k, causal=False, scale=None,
                     window_size=(-1, -1), deterministic=False, dq=None, dk=None, dv=None,
                     num_splits=None):
    """(dq, dk, dv) of cupy_varlen.varlen_attn_backward, with out and lse from the forward."""
    import cupy_varlen

    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                       scale=scale, window_size=window_size, return_lse=True,
                                       num_splits=num_splits)
    return cupy_varlen.varlen_attn_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal=causal, scale=scale,
        window_size=window_size, deterministic=deterministic, dq=dq, dk=dk, dv=dv)


def check_backward(q, k, v, cu_q, cu_k, *, causal=False, scale=None, window_size=(-1, -1),
                   deterministic=False, dout=None, compare_torch=True, seed=0):
    """Autograd gradients against the float64 reference under the tolerance rule, plus the
    functional backward into NaN-poisoned outputs. Returns the autograd (dq, dk, dv)."""
    max_q, max_k = max_len(cu_q), max_len(cu_k)
    if dout is None:
        dout = random_like(q, seed + 1000)
    kw = dict(causal=causal, scale=scale, window_size=window_size)
    grads = autograd_grads(q, k, v, cu_q, cu_k, dout, max_q=max_q, max_k=max_k,
                           deterministic=deterministic, **kw)
    ref = reference_grads(q, k, v, cu_q, cu_k, dout, **kw)
    theirs = (torch_varlen_grads(q, k, v, cu_q, cu_k, max_q, max_k, dout, **kw)
              if compare_torch else None) or (None, None, None)
    dead_q, dead_k = dead_rows(cu_q, cu_k, causal, window_size)
    bounds = []
    for name, x, g, r, t, dead in zip(("dq", "dk", "dv"), (q, k, v), grads, ref, theirs,
                                      (dead_q, dead_k, dead_k)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite elements"
        assert (g[dead] == 0).all(), f"{name}: rows that attend (or are attended by) nothing must be 0"
        bound = grad_bound(q.dtype, r, t)
        err = rel_error(g, r)
        assert err <= bound, f"{name}: relative error {err:.3g} > bound {bound:.3g}"
        bounds.append(bound)

    poisoned = [torch.full(x.shape, math.nan, dtype=x.dtype, device=x.device) for x in (q, k, v)]
    # The functional API takes dout contiguous in its last dim (the autograd op copies otherwise).
    fdout = dout if dout.stride(-1) == 1 else dout.contiguous()
    ret = functional_grads(q, k, v, cu_q, cu_k, fdout, max_q=max_q, max_k=max_k,
                           deterministic=deterministic, dq=poisoned[0], dk=poisoned[1],
                           dv=poisoned[2], **kw)
    for name, got, buf, g, r, bound in zip(("dq", "dk", "dv"), ret, poisoned, grads, ref, bounds):
        assert got is buf, f"{name}= must be written in place and returned"
        assert not torch.isnan(got).any(), f"{name}: unwritten (or NaN) elements"
        if deterministic:  # same kernels, same inputs, fixed order: same bits
            assert torch.equal(got, g), f"{name}: functional and autograd results differ"
        else:
            assert rel_error(got, r) <= bound, name
    return grads
