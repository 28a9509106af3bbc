"""Property-based tests (hypothesis): random packed batches against the float64 reference.

- CPU (runs in CI): the reference itself against an independent dense formulation (one masked
  softmax over the whole packed batch, with a block-diagonal document mask), on random ragged
  batches, masks and GQA layouts.
- GPU: cupy_varlen's forward on random batches (lengths including 0, 1 and primes, Lq != Lk,
  GQA ratios, every head-dim class, both dtypes, causal and windows, strided views, both kernel
  families), checked like every forward test (NaN-poisoned out=, error at most 1.5x torch
  varlen_attn's, lse); and the backward on the same kind of batches, both dQ modes, checked like
  every backward test (dq, dk, dv against float64 autograd, exact zeros where nothing attends,
  NaN-poisoned preallocated gradients, deterministic results bitwise equal to autograd's).
- GPU, score modifiers: forward and backward on the same kind of batches (head dims 64 and 128)
  with a drawn modifier set (softcap with large logits, sinks, ALiBi per head or per sequence,
  all three), checked like test_score_mods' cases (the reference with the same modifiers, twice
  the unmodified call's error at most, dead rows, dsinks).

Budget: a fixed, derandomized number of examples (seconds on the H100). For a longer search set
CUPY_VARLEN_FUZZ_EXAMPLES (e.g. 2000) and run ``pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import math
import os

import torch

# A plain import: hypothesis is in the test extra, and an environment without it must fail at
# collection rather than skip these tests unnoticed.
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import check_backward, check_forward, cu_seqlens, is_hopper, requires_gpu
from cupy_varlen.reference import varlen_attn_reference

_LONG = int(os.environ.get("CUPY_VARLEN_FUZZ_EXAMPLES", "0"))


def _budget(default: int):
    return settings(max_examples=_LONG or default, derandomize=not _LONG, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Lengths that break tiling assumptions: empty, single, primes, tile edges +-1.
_LENGTHS = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 13, 31, 63, 64, 65, 127, 128, 129, 191, 257]),
                     st.integers(0, 300))


@st.composite
def _batches(draw, max_batch=6, head_dims=(8, 16, 40, 64, 72, 96, 128, 136, 160, 192, 256)):
    batch = draw(st.integers(1, max_batch))
    lens_q = draw(st.lists(_LENGTHS, min_size=batch, max_size=batch))
    same = draw(st.booleans())
    lens_k = lens_q if same else draw(st.lists(_LENGTHS, min_size=batch, max_size=batch))
    heads_kv = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from(head_dims))
    causal = draw(st.booleans())
    left = draw(st.sampled_from([-1, -1, 0, 1, 17, 100]))
    right = 0 if causal else draw(st.sampled_from([-1, -1, 0, 5, 64]))
    return dict(lens_q=lens_q, lens_k=lens_k, heads=heads_kv * group, heads_kv=heads_kv,
                head_dim=head_dim, causal=causal, window=(left, right))


def _dense_reference(q, k, v, lens_q, lens_k, causal, window, scale):
    """One masked softmax over the whole packed batch: query i may see key j iff both belong to
    the same sequence and the window/causal band allows it (bottom-right aligned)."""
    seq_q = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q))
    seq_k = torch.repeat_interleave(torch.arange(len(lens_k)), torch.tensor(lens_k))
    start_q = torch.tensor([0] + lens_q).cumsum(0)[seq_q]
    start_k = torch.tensor([0] + lens_k).cumsum(0)[seq_k]
    i = torch.arange(len(seq_q)) - start_q
    j = torch.arange(len(seq_k)) - start_k
    diag = torch.tensor(lens_k)[seq_q] - torch.tensor(lens_q)[seq_q]
    rel = j[None, :] - (i + diag)[:, None]  # key position relative to the query's diagonal
    left, right = window
    if causal:
        right = 0
    allowed = seq_q[:, None] == seq_k[None, :]
    if left >= 0:
        allowed &= rel >= -left
    if right >= 0:
        allowed &= rel <= right
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # (H, Tk, D)
    vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
    s = torch.einsum("qhd,hkd->hqk", q, kk) * scale
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # (H, Tq), -inf for rows with no key
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.einsum("hqk,hkd->qhd", p, vv)
    return out, lse


@_budget(60)
@given(_batches(head_dims=(8, 16, 40)), st.floats(0.05, 2.0))
def test_reference_matches_a_dense_masked_softmax(case, scale):
    g = torch.Generator().manual_seed(sum(case["lens_q"]) + 7 * case["head_dim"])
    lens_q, lens_k = case["lens_q"], case["lens_k"]
    q = torch.randn(sum(lens_q), case["heads"], case["head_dim"], generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), case["heads_kv"], case["head_dim"], generator=g,
                    dtype=torch.float64)
    v = torch.randn_like(k)
    out, lse = varlen_attn_reference(q, k, v, cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu"),
                                     causal=case["causal"], scale=scale,
                                     window_size=case["window"], return_lse=True)
    dense_out, dense_lse = _dense_reference(q, k, v, lens_q, lens_k, case["causal"],
                                            case["window"], scale)
    torch.testing.assert_close(out, dense_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, dense_lse, rtol=1e-10, atol=1e-10)



def _random_inputs(case, dtype, packed_view, seed):
    """q, k, v for a drawn case on the GPU: standard normal; with ``packed_view`` (where shapes
    allow) views of one (T, 3, H, D) tensor, row stride 3 H D, no copy."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float16
    lens_q, lens_k = case["lens_q"], case["lens_k"]
    h, hkv, d = case["heads"], case["heads_kv"], case["head_dim"]
    g = torch.Generator().manual_seed(seed)
    if packed_view and lens_q == lens_k and h == hkv:
        qkv = torch.randn(sum(lens_q), 3, h, d, generator=g).to("cuda", torch_dtype)
        return qkv.unbind(1)
    q = torch.randn(sum(lens_q), h, d, generator=g).to("cuda", torch_dtype)
    k = torch.randn(sum(lens_k), hkv, d, generator=g).to("cuda", torch_dtype)
    v = torch.randn(sum(lens_k), hkv, d, generator=g).to("cuda", torch_dtype)
    return q, k, v


class _KernelFamily:
    """Runs the body under kernel family ``kernel``, forward and backward (sm90 only where the GPU
    has it)."""

    def __init__(self, kernel):
        from cupy_varlen import _spec

        self.spec = _spec
        self.kernel = kernel if kernel != "sm90" or is_hopper() else "sm80"

    def __enter__(self):
        self.old = self.spec.forward_kernel, self.spec.backward_kernel
        self.spec.forward_kernel = self.spec.backward_kernel = self.kernel

    def __exit__(self, *exc):
        self.spec.forward_kernel, self.spec.backward_kernel = self.old


@requires_gpu
@_budget(120)
@given(_batches(), st.sampled_from(["bf16", "fp16"]), st.sampled_from(["sm80", "sm90"]),
       st.booleans())
def test_forward_on_random_batches(case, dtype, kernel, packed_view):
    q, k, v = _random_inputs(case, dtype, packed_view, sum(case["lens_q"]) * 31 + case["head_dim"])
    with _KernelFamily(kernel):
        check_forward(q, k, v, cu_seqlens(case["lens_q"]), cu_seqlens(case["lens_k"]),
                      causal=case["causal"], window_size=case["window"])


@requires_gpu
@_budget(40)
@given(_batches(max_batch=4), st.sampled_from(["bf16", "fp16"]), st.sampled_from(["sm80", "sm90"]),
       st.booleans(), st.booleans())
def test_backward_on_random_batches(case, dtype, kernel, packed_view, deterministic):
    seed = sum(case["lens_k"]) * 37 + case["head_dim"]
    q, k, v = _random_inputs(case, dtype, packed_view, seed)
    with _KernelFamily(kernel):
        check_backward(q, k, v, cu_seqlens(case["lens_q"]), cu_seqlens(case["lens_k"]),
                       causal=case["causal"], window_size=case["window"],
                       deterministic=deterministic, seed=seed)


_MODIFIERS = st.sampled_from(["softcap", "sinks", "alibi", "alibi_per_seq", "all"])


def _modified_inputs(case, dtype, kind, seed):
    from test_score_mods import logit_scale, make_modifiers

    q, k, v = _random_inputs(case, dtype, False, seed)
    mods = make_modifiers(kind, case["heads"], len(case["lens_q"]), seed)
    return q * logit_scale(kind), k, v, mods


@requires_gpu
@_budget(40)
@given(_batches(head_dims=(64, 128)), st.sampled_from(["bf16", "fp16"]),
       st.sampled_from(["sm80", "sm90"]), _MODIFIERS)
def test_modified_forward_on_random_batches(case, dtype, kernel, kind):
    from test_score_mods import check_modified_forward

    q, k, v, mods = _modified_inputs(case, dtype, kind, sum(case["lens_q"]) * 41 + 3)
    with _KernelFamily(kernel):
        check_modified_forward(q, k, v, cu_seqlens(case["lens_q"]), cu_seqlens(case["lens_k"]),
                               mods, causal=case["causal"], window_size=case["window"],
                               material=False)


@requires_gpu
@_budget(20)
@given(_batches(max_batch=4, head_dims=(64, 128)), st.sampled_from(["bf16", "fp16"]),
       st.sampled_from(["sm80", "sm90"]), _MODIFIERS, st.booleans())
def test_modified_backward_on_random_batches(case, dtype, kernel, kind, deterministic):
    from test_score_mods import check_modified_backward

    seed = sum(case["lens_k"]) * 43 + 5
    q, k, v, mods = _modified_inputs(case, dtype, kind, seed)
    with _KernelFamily(kernel):
        check_modified_backward(q, k, v, cu_seqlens(case["lens_q"]), cu_seqlens(case["lens_k"]),
                                mods, causal=case["causal"], window_size=case["window"],
                                deterministic=deterministic, seed=seed, material=False)
