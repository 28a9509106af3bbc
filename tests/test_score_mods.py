"""Score modifiers in the kernels (issue #18): logit softcap, attention sinks and ALiBi slopes.

CPU (no GPU needed): the entry points' signatures, argument validation of varlen_attn and
varlen_attn_backward on CPU tensors (every check but device placement runs before any CUDA work),
and the kernel specs' modifier flags.

GPU (skipped without one): forward and backward against the float64 reference with the same
modifiers (cupy_varlen.reference.varlen_attn_reference), on both kernel families, with masks,
GQA, Lq != Lk and empty sequences, decode tiles and split-KV, seqused_k and paged caches, the CuPy
path, a CUDA graph and torch.compile. Every call writes into NaN-poisoned outputs on random data.

Tolerance rule (GPU): torch has no kernel with these modifiers to compare with, so a result's
relative error against the float64 reference must be under the dtype's floor (conftest.ERROR_FLOOR)
and at most twice the error of the same call without modifiers against the reference without them,
never below conftest.MIN_BOUND nor twice the error of the modified reference rounded to the output
dtype (where the unmodified call is exact, as a row with one key whose output is that key's value,
its error says nothing of what the modified call can reach). A modifier is a few fp32 operations
per score and must cost no more accuracy than that: one applied slightly wrong (an ALiBi distance
off by one, a sink added in every split, a softcap derivative missing) fails. Every case also
checks that its modifiers change the reference's result materially (MATERIAL), so a kernel that
ignores one cannot pass.
"""

from __future__ import annotations

import inspect
import math
import re

import numpy as np
import pytest
import torch

import cupy_varlen
from conftest import (DTYPES, ERROR_FLOOR, MIN_BOUND, capture_graph, cu_seqlens, dead_rows,
                      make_packed, max_len, random_like, reference_grads, rel_error, requires_gpu,
                      select_kernel_family)
from cupy_varlen import _spec
from cupy_varlen.reference import allowed_keys_mask, varlen_attn_reference

NAN = float("nan")


# --------------------------------------------------------------------------------------------------
# Signatures (CPU)


def test_signatures_take_the_modifiers():
    fwd = inspect.signature(cupy_varlen.varlen_attn).parameters
    bwd = inspect.signature(cupy_varlen.varlen_attn_backward).parameters
    for params in (fwd, bwd):
        assert params["softcap"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["softcap"].default == 0.0
        for name in ("sinks", "alibi_slopes"):
            assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[name].default is None
    assert bwd["dsinks"].kind is inspect.Parameter.KEYWORD_ONLY and bwd["dsinks"].default is None
    assert "dsinks" not in fwd


# --------------------------------------------------------------------------------------------------
# Validation on CPU tensors. Checks that need no device run before the device check (which comes
# last), so an invalid modifier on CPU tensors raises its own error, and valid ones reach
# "q must be on a CUDA device". Four query heads, two K/V heads, two sequences.

HEADS, HEADS_KV, BATCH = 4, 2, 2


def _f32(*shape):
    return torch.zeros(shape, dtype=torch.float32)


def _cpu_forward_args(path):
    """Positional arguments and extra keywords of a valid CPU call on ``path``: "eager" (no
    grad), "autograd" (q requires grad: the torch integration's checks) or "paged" (page pools
    and a block table: the paged entry's checks)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    q = rand(10, HEADS, 64)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    extra = {}
    if path == "paged":
        k, v = rand(3, 8, HEADS_KV, 64), rand(3, 8, HEADS_KV, 64)
        cu_k = None
        extra = dict(seqused_k=torch.tensor([4, 6], dtype=torch.int32),
                     block_table=torch.tensor([[0, 1], [2, 0]], dtype=torch.int32))
    else:
        k, v = rand(10, HEADS_KV, 64), rand(10, HEADS_KV, 64)
        cu_k = cu_q
    if path == "autograd":
        q.requires_grad_()
    return (q, k, v, cu_q, cu_k, 6, 8), extra


def _raises(function, exc, name):
    return pytest.raises(exc, match=f"^{function}: {re.escape(name)}(?!\\w)")


PATHS = ["eager", "autograd", "paged"]

# (modifier keywords, error, argument the message starts with). Factories: fresh tensors per case.
FORWARD_ERRORS = [
    pytest.param(lambda: dict(softcap=True), TypeError, "softcap", id="softcap-True"),
    pytest.param(lambda: dict(softcap=False), TypeError, "softcap", id="softcap-False"),
    pytest.param(lambda: dict(softcap="5.0"), TypeError, "softcap", id="softcap-str"),
    pytest.param(lambda: dict(softcap=None), TypeError, "softcap", id="softcap-None"),
    pytest.param(lambda: dict(softcap=1j), TypeError, "softcap", id="softcap-complex"),
    pytest.param(lambda: dict(softcap=-1.0), ValueError, "softcap", id="softcap-negative"),
    pytest.param(lambda: dict(softcap=-1), ValueError, "softcap", id="softcap-negative-int"),
    pytest.param(lambda: dict(softcap=math.nan), ValueError, "softcap", id="softcap-nan"),
    pytest.param(lambda: dict(softcap=math.inf), ValueError, "softcap", id="softcap-inf"),
    pytest.param(lambda: dict(softcap=-math.inf), ValueError, "softcap", id="softcap--inf"),
    pytest.param(lambda: dict(sinks=np.zeros(HEADS, dtype=np.float32)), TypeError, "sinks",
                 id="sinks-numpy"),
    pytest.param(lambda: dict(sinks=[0.0] * HEADS), TypeError, "sinks", id="sinks-list"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).half()), TypeError, "sinks", id="sinks-fp16"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).bfloat16()), TypeError, "sinks", id="sinks-bf16"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).double()), TypeError, "sinks", id="sinks-fp64"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).int()), TypeError, "sinks", id="sinks-int32"),
    pytest.param(lambda: dict(sinks=_f32(HEADS + 1)), ValueError, "sinks", id="sinks-(H+1,)"),
    pytest.param(lambda: dict(sinks=_f32(HEADS_KV)), ValueError, "sinks", id="sinks-(H_kv,)"),
    pytest.param(lambda: dict(sinks=_f32(1, HEADS)), ValueError, "sinks", id="sinks-(1,H)"),
    pytest.param(lambda: dict(sinks=_f32(BATCH, HEADS)), ValueError, "sinks", id="sinks-(B,H)"),
    pytest.param(lambda: dict(sinks=_f32()), ValueError, "sinks", id="sinks-0d"),
    pytest.param(lambda: dict(sinks=_f32(2 * HEADS)[::2]), ValueError, "sinks",
                 id="sinks-strided"),
    pytest.param(lambda: dict(alibi_slopes=np.zeros(HEADS, dtype=np.float32)), TypeError,
                 "alibi_slopes", id="alibi-numpy"),
    pytest.param(lambda: dict(alibi_slopes=[0.0] * HEADS), TypeError, "alibi_slopes",
                 id="alibi-list"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS).half()), TypeError, "alibi_slopes",
                 id="alibi-fp16"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, HEADS).bfloat16()), TypeError,
                 "alibi_slopes", id="alibi-bf16"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS).double()), TypeError, "alibi_slopes",
                 id="alibi-fp64"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS + 1)), ValueError, "alibi_slopes",
                 id="alibi-(H+1,)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS_KV)), ValueError, "alibi_slopes",
                 id="alibi-(H_kv,)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH + 1, HEADS)), ValueError, "alibi_slopes",
                 id="alibi-(B+1,H)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, HEADS_KV)), ValueError, "alibi_slopes",
                 id="alibi-(B,H_kv)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(1, HEADS)), ValueError, "alibi_slopes",
                 id="alibi-(1,H)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, HEADS, 1)), ValueError, "alibi_slopes",
                 id="alibi-3d"),
    pytest.param(lambda: dict(alibi_slopes=_f32()), ValueError, "alibi_slopes", id="alibi-0d"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS, BATCH).t()), ValueError, "alibi_slopes",
                 id="alibi-last-stride-2"),
    # The first bad modifier named, the others valid.
    pytest.param(lambda: dict(softcap=5.0, sinks=_f32(HEADS), alibi_slopes=_f32(HEADS + 1)),
                 ValueError, "alibi_slopes", id="all-bad-alibi"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mods,exc,name", FORWARD_ERRORS)
def test_forward_rejects_bad_modifiers(path, mods, exc, name):
    args, extra = _cpu_forward_args(path)
    with _raises("varlen_attn", exc, name):
        cupy_varlen.varlen_attn(*args, **extra, **mods())


FORWARD_VALID = [
    pytest.param(lambda: dict(softcap=0.0), id="softcap-0.0"),
    pytest.param(lambda: dict(softcap=0), id="softcap-int-0"),
    pytest.param(lambda: dict(softcap=5), id="softcap-int-5"),
    pytest.param(lambda: dict(softcap=30.0), id="softcap-30"),
    pytest.param(lambda: dict(softcap=np.float32(2.5)), id="softcap-np.float32"),
    pytest.param(lambda: dict(sinks=_f32(HEADS)), id="sinks"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS)), id="alibi-(H,)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, HEADS)), id="alibi-(B,H)"),
    # Rows of a wider buffer: row-strided, last stride 1.
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, 2 * HEADS)[:, :HEADS]),
                 id="alibi-row-strided"),
    pytest.param(lambda: dict(softcap=5.0, sinks=_f32(HEADS), alibi_slopes=_f32(BATCH, HEADS)),
                 id="all"),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mods", FORWARD_VALID)
def test_forward_valid_modifiers_reach_the_device_check(path, mods):
    args, extra = _cpu_forward_args(path)
    with pytest.raises(ValueError, match="^varlen_attn: q .*CUDA device"):
        cupy_varlen.varlen_attn(*args, **extra, **mods())


def _cpu_backward_args():
    q, k, v, cu_q, cu_k = make_packed([4, 6], heads=HEADS, heads_kv=HEADS_KV, head_dim=64,
                                      device="cpu")
    g = torch.Generator().manual_seed(1)
    out = torch.randn(q.shape, generator=g).to(q.dtype)
    dout = torch.randn(q.shape, generator=g).to(q.dtype)
    lse = torch.randn(HEADS, q.shape[0], generator=g)
    return dout, q, k, v, out, lse, cu_q, cu_k, 6, 6


BACKWARD_ERRORS = [
    pytest.param(lambda: dict(softcap=True), TypeError, "softcap", id="softcap-True"),
    pytest.param(lambda: dict(softcap=None), TypeError, "softcap", id="softcap-None"),
    pytest.param(lambda: dict(softcap=-1.0), ValueError, "softcap", id="softcap-negative"),
    pytest.param(lambda: dict(softcap=math.nan), ValueError, "softcap", id="softcap-nan"),
    pytest.param(lambda: dict(softcap=math.inf), ValueError, "softcap", id="softcap-inf"),
    pytest.param(lambda: dict(sinks=np.zeros(HEADS, dtype=np.float32)), TypeError, "sinks",
                 id="sinks-numpy"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).double()), TypeError, "sinks", id="sinks-fp64"),
    pytest.param(lambda: dict(sinks=_f32(HEADS).half()), TypeError, "sinks", id="sinks-fp16"),
    pytest.param(lambda: dict(sinks=_f32(HEADS + 1)), ValueError, "sinks", id="sinks-(H+1,)"),
    pytest.param(lambda: dict(sinks=_f32(HEADS_KV)), ValueError, "sinks", id="sinks-(H_kv,)"),
    pytest.param(lambda: dict(alibi_slopes=np.zeros(HEADS, dtype=np.float32)), TypeError,
                 "alibi_slopes", id="alibi-numpy"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS).half()), TypeError, "alibi_slopes",
                 id="alibi-fp16"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH + 1, HEADS)), ValueError, "alibi_slopes",
                 id="alibi-(B+1,H)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS, 1)), ValueError, "alibi_slopes",
                 id="alibi-(H,1)"),
    pytest.param(lambda: dict(sinks=_f32(HEADS), dsinks=_f32(HEADS).double()), TypeError,
                 "dsinks", id="dsinks-fp64"),
    pytest.param(lambda: dict(sinks=_f32(HEADS), dsinks=_f32(HEADS + 1)), ValueError, "dsinks",
                 id="dsinks-(H+1,)"),
    pytest.param(lambda: dict(sinks=_f32(HEADS), dsinks=np.zeros(HEADS, dtype=np.float32)),
                 TypeError, "dsinks", id="dsinks-numpy"),
]


@pytest.mark.parametrize("mods,exc,name", BACKWARD_ERRORS)
def test_backward_rejects_bad_modifiers(mods, exc, name):
    with _raises("varlen_attn_backward", exc, name):
        cupy_varlen.varlen_attn_backward(*_cpu_backward_args(), **mods())


@pytest.mark.parametrize("mods", [
    pytest.param(lambda: dict(softcap=5.0), id="softcap"),
    pytest.param(lambda: dict(sinks=_f32(HEADS)), id="sinks"),
    pytest.param(lambda: dict(sinks=_f32(HEADS), dsinks=_f32(HEADS)), id="sinks-dsinks"),
    pytest.param(lambda: dict(alibi_slopes=_f32(HEADS)), id="alibi-(H,)"),
    pytest.param(lambda: dict(alibi_slopes=_f32(BATCH, HEADS)), id="alibi-(B,H)"),
    pytest.param(lambda: dict(softcap=5.0, sinks=_f32(HEADS), alibi_slopes=_f32(BATCH, HEADS),
                              dsinks=_f32(HEADS)), id="all"),
])
def test_backward_valid_modifiers_reach_the_device_check(mods):
    with pytest.raises(ValueError, match="^varlen_attn_backward: q .*CUDA device"):
        cupy_varlen.varlen_attn_backward(*_cpu_backward_args(), **mods())


# --------------------------------------------------------------------------------------------------
# Kernel specs (CPU): the modifiers as compile-time flags. Names here follow cupy_varlen/_spec.py;
# a spec without modifiers is the spec of before (same equality, hash and str).

MODIFIER_DEFINES = {"softcap": "CV_SOFTCAP", "alibi": "CV_ALIBI", "sinks": "CV_SINKS"}
FWD_FLAG_SETS = [dict(softcap=True), dict(alibi=True), dict(sinks=True),
                 dict(softcap=True, alibi=True, sinks=True)]
FWD_VARIANTS = {  # (arch, choice, keywords, expected family)
    "sm80": ("sm_80", "auto", {}, "sm80"),
    "sm90": ("sm_90a", "sm90", {}, "sm90"),
    "paged": ("sm_90a", "auto", dict(paged=True), "sm80"),
    "decode": ("sm_86", "auto", dict(decode=True), "sm80"),
}


def _flag_id(flags):
    return "+".join(sorted(flags))


@pytest.mark.parametrize("variant", list(FWD_VARIANTS))
@pytest.mark.parametrize("flags", FWD_FLAG_SETS, ids=_flag_id)
def test_fwd_spec_carries_the_modifier_flags(variant, flags):
    arch, choice, kw, family = FWD_VARIANTS[variant]
    spec = _spec.choose_fwd_spec("bf16", 128, True, arch, choice, **kw, **flags)
    plain = _spec.choose_fwd_spec("bf16", 128, True, arch, choice, **kw)
    assert spec.kernel == plain.kernel == family
    assert spec.paged == plain.paged and spec.decode == plain.decode
    for name, define in MODIFIER_DEFINES.items():
        assert spec.defines[define] == int(flags.get(name, False)), define
        assert plain.defines[define] == 0, define
        assert (f"-D{define}=1" in spec.options) == flags.get(name, False)
        assert (name in str(spec)) == flags.get(name, False), str(spec)
        assert name not in str(plain)
    assert spec != plain and str(spec) != str(plain)


@pytest.mark.parametrize("family,arch,deterministic", [
    ("sm80", "sm_80", False), ("sm80", "sm_80", True), ("sm90", "sm_90a", False),
    ("sm90", "sm_90a", True),
])
@pytest.mark.parametrize("flags", [dict(softcap=True), dict(alibi=True),
                                   dict(softcap=True, alibi=True)], ids=_flag_id)
def test_bwd_spec_carries_the_modifier_flags(family, arch, deterministic, flags):
    spec = _spec.choose_bwd_spec("bf16", 128, False, arch, deterministic, family, **flags)
    plain = _spec.choose_bwd_spec("bf16", 128, False, arch, deterministic, family)
    assert spec.kernel == plain.kernel == family
    for name in ("softcap", "alibi"):
        define = MODIFIER_DEFINES[name]
        assert spec.defines[define] == int(flags.get(name, False)), define
        assert plain.defines[define] == 0, define
        assert (name in str(spec)) == flags.get(name, False), str(spec)
        assert name not in str(plain)
    assert spec != plain and str(spec) != str(plain)


def test_specs_without_modifiers_are_unchanged():
    for args, kw in ((("bf16", 128, False, "sm_90a"), {}), (("fp16", 64, True, "sm_80"), {}),
                     (("bf16", 64, False, "sm_90a", "auto", True), {}),
                     (("bf16", 128, True, "sm_90a"), dict(paged=True)),
                     (("fp16", 256, False, "sm_86"), dict(decode=True))):
        plain = _spec.choose_fwd_spec(*args, **kw)
        explicit = _spec.choose_fwd_spec(*args, **kw, softcap=False, alibi=False, sinks=False)
        assert plain == explicit and hash(plain) == hash(explicit) and str(plain) == str(explicit)
        # Built from the fields every spec had before the modifiers: the same spec.
        rebuilt = _spec.FwdSpec(dtype=plain.dtype, head_dim_tile=plain.head_dim_tile,
                                tiles=plain.tiles, windowed=plain.windowed, arch=plain.arch,
                                kernel=plain.kernel, paged=plain.paged, decode=plain.decode)
        assert rebuilt == plain and hash(rebuilt) == hash(plain) and str(rebuilt) == str(plain)
    assert re.fullmatch(r"fwd\[sm90 bf16 d128 \d+x\d+(/\d+)? w\d+ s\d+( u\d+)? full sm_90a\]",
                        str(_spec.choose_fwd_spec("bf16", 128, False, "sm_90a"))), \
        str(_spec.choose_fwd_spec("bf16", 128, False, "sm_90a"))
    for det in (False, True):
        plain = _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", det)
        explicit = _spec.choose_bwd_spec("bf16", 128, False, "sm_90a", det, "auto",
                                         softcap=False, alibi=False)
        assert plain == explicit and hash(plain) == hash(explicit) and str(plain) == str(explicit)
        rebuilt = _spec.BwdSpec(dtype=plain.dtype, head_dim_tile=plain.head_dim_tile,
                                tiles=plain.tiles, windowed=plain.windowed, arch=plain.arch,
                                deterministic=plain.deterministic, kernel=plain.kernel)
        assert rebuilt == plain and str(rebuilt) == str(plain)
        mode = "ordered" if det else "atomic"
        assert re.fullmatch(rf"bwd\[sm90 bf16 d128 \d+x\d+ w\d+ s\d+ {mode} full sm_90a\]",
                            str(plain)), str(plain)


# --------------------------------------------------------------------------------------------------
# GPU: data and checks.

MODIFIERS = ["softcap", "sinks", "alibi", "alibi_per_seq", "all"]
SOFTCAP = 5.0
# q's scale where a softcap is on: scaled logits of standard deviation 4, so the cap of 5 bends
# most of the scores a row's softmax weighs. (Caps far above the logits are a no-op.)
SOFTCAP_LOGITS = 4.0
# How far (relative, as rel_error) a modifier must move the reference's result for a case to
# count: far above any dtype floor, so that a kernel ignoring the modifier fails the error bound.
MATERIAL = 0.1
# Rows without an allowed key: lse is the sink itself, up to fp32 rounding.
SINK_LSE_ATOL = 1e-4


def alibi_base_slopes(heads):
    """ALiBi's geometric slopes 2^(-8 (h + 1) / H)."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)],
                        dtype=torch.float32)


def make_modifiers(kind, heads, batch, seed, device="cuda"):
    """The modifier keywords of ``kind`` (one of MODIFIERS): float32 sinks of mean 3 (a row's
    lse is a few units, so the sink takes a sizeable share of short rows), ALiBi slopes of one
    (H,) row or per sequence (B, H), each a random multiple of the geometric slopes."""
    g = torch.Generator().manual_seed(10007 + seed)
    mods = {}
    if kind in ("softcap", "all"):
        mods["softcap"] = SOFTCAP
    if kind in ("sinks", "all"):
        mods["sinks"] = (torch.randn(heads, generator=g) * 2 + 3).to(device)
    if kind == "alibi":
        mods["alibi_slopes"] = alibi_base_slopes(heads).to(device)
    if kind in ("alibi_per_seq", "all"):
        factor = 0.25 + 1.75 * torch.rand(batch, heads, generator=g)
        mods["alibi_slopes"] = (alibi_base_slopes(heads) * factor).contiguous().to(device)
    return mods


def logit_scale(kind):
    return SOFTCAP_LOGITS if kind in ("softcap", "all") else 1.0


def key_counts(cu_k, seqused_k, block_table):
    """Each sequence's keys that take part (seqused_k where given, else cu_seqlens_k's steps)."""
    if seqused_k is not None:
        counts = seqused_k.tolist()
        if cu_k is not None:
            counts = [min(n, s) for n, s in zip(counts, (cu_k[1:] - cu_k[:-1]).tolist())]
        return counts
    return (cu_k[1:] - cu_k[:-1]).tolist()


def dead_query_rows(cu_q, counts, causal, window_size):
    """(T_q,) bool: query rows with no allowed key among their sequence's ``counts`` keys."""
    cq = cu_q.tolist()
    dead = torch.zeros(cq[-1], dtype=torch.bool)
    for b, n in enumerate(counts):
        allowed = allowed_keys_mask(cq[b + 1] - cq[b], n, causal, window_size)
        dead[cq[b]:cq[b + 1]] = ~allowed.any(dim=1)
    return dead.to(cu_q.device)


def modified_bound(err_plain, ref, dtype):
    """The 2x rule's bound (module docstring) for a result whose float64 reference is ``ref``."""
    return max(2 * err_plain, 2 * rel_error(ref.to(dtype), ref), MIN_BOUND[dtype])


def _forward_into_poison(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
    out = torch.full_like(q, NAN)
    got, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                       out=out, **kw)
    assert got is out, "out= must be written in place and returned"
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "NaN in lse"
    return out, lse


def check_modified_forward(q, k, v, cu_q, cu_k, mods, *, causal=False, window_size=(-1, -1),
                           max_q=None, max_k=None, seqused_k=None, block_table=None,
                           num_splits=None, material=True):
    """The modified call into a NaN-poisoned out= against the float64 reference with the same
    modifiers, under the tolerance rule (the module docstring), with lse; the rows with no
    allowed key get out 0 and lse -inf, or the sink with sinks. ``material``: also require the
    modifiers to move the result (MATERIAL; the fuzz tests' drawn batches need not). Returns
    (out, lse)."""
    counts = key_counts(cu_k, seqused_k, block_table)
    max_q = max_len(cu_q) if max_q is None else max_q
    max_k = max(counts, default=0) if max_k is None else max_k
    mask = dict(causal=causal, window_size=window_size)
    cache = dict(seqused_k=seqused_k, block_table=block_table)
    out, lse = _forward_into_poison(q, k, v, cu_q, cu_k, max_q, max_k, num_splits=num_splits,
                                    **mask, **cache, **mods)
    plain, _ = _forward_into_poison(q, k, v, cu_q, cu_k, max_q, max_k, num_splits=num_splits,
                                    **mask, **cache)
    ref, ref_lse = varlen_attn_reference(q, k, v, cu_q, cu_k, return_lse=True, **mask, **cache,
                                         **mods)
    ref_plain = varlen_attn_reference(q, k, v, cu_q, cu_k, **mask, **cache)

    if material:
        changed = rel_error(ref, ref_plain)
        assert changed >= MATERIAL, f"the modifiers move the reference by {changed:.3g} only"
        assert rel_error(out, ref_plain) >= MATERIAL / 2, "the kernel ignored the modifiers"
    err, err_plain = rel_error(out, ref), rel_error(plain, ref_plain)
    floor = ERROR_FLOOR[q.dtype]
    assert err <= floor, f"relative error {err:.3g} > floor {floor:.3g}"
    bound = modified_bound(err_plain, ref, q.dtype)
    assert err <= bound, (f"relative error {err:.3g} > {bound:.3g}, twice the unmodified "
                          f"call's {err_plain:.3g} (or the rounding of the reference)")

    heads, total_q = lse.shape
    dead = dead_query_rows(cu_q, counts, causal, window_size)
    assert (out[dead] == 0).all(), "rows with no allowed key must be 0"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse -inf pattern differs"
    sinks = mods.get("sinks")
    if sinks is not None:
        assert finite.all()
        if dead.any():
            expect = sinks.view(heads, 1).expand(heads, total_q)[:, dead]
            assert torch.allclose(lse[:, dead], expect, rtol=1e-5, atol=SINK_LSE_ATOL), \
                "rows with no allowed key must have lse = sinks[h]"
    else:
        assert (lse[:, dead] == -math.inf).all(), "rows with no key must have lse -inf"
    if finite.any():
        lse_err = (lse.double()[finite] - ref_lse[finite]).abs().max().item()
        assert lse_err <= 2e-3 + 1e-4 * ref_lse[finite].abs().max().item(), lse_err
    return out, lse


def modified_grads(q, k, v, cu_q, cu_k, dout, mods, *, max_q, max_k, deterministic=False,
                   **kw):
    """((dq, dk, dv), dsinks) through torch autograd of cupy_varlen.varlen_attn; the sinks, where
    given, are a leaf that requires grad (dsinks None without sinks)."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    call_mods = dict(mods)
    if mods.get("sinks") is not None:
        call_mods["sinks"] = mods["sinks"].detach().clone().requires_grad_()
        leaves.append(call_mods["sinks"])
    out = cupy_varlen.varlen_attn(*leaves[:3], cu_q, cu_k, max_q, max_k,
                                  deterministic=deterministic, **kw, **call_mods)
    grads = torch.autograd.grad(out, leaves, dout)
    return tuple(grads[:3]), (grads[3] if len(grads) == 4 else None)


def reference_grads_modified(q, k, v, cu_q, cu_k, dout, mods, **kw):
    """((dq, dk, dv), dsinks) in float64: autograd through the reference with the modifiers, on
    upcast copies of the inputs (the sinks a float64 leaf)."""
    leaves = [x.detach().to(torch.float64).requires_grad_() for x in (q, k, v)]
    ref_mods = dict(mods)
    if mods.get("sinks") is not None:
        ref_mods["sinks"] = mods["sinks"].detach().to(torch.float64).requires_grad_()
        leaves.append(ref_mods["sinks"])
    with torch.enable_grad():
        out = varlen_attn_reference(*leaves[:3], cu_q, cu_k, **kw, **ref_mods)
        grads = torch.autograd.grad(out, leaves, dout.to(torch.float64), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return tuple(grads[:3]), (grads[3] if len(grads) == 4 else None)


def check_modified_backward(q, k, v, cu_q, cu_k, mods, *, causal=False, window_size=(-1, -1),
                            deterministic=False, seed=0, material=True):
    """Autograd gradients (dq, dk, dv and, with sinks, sinks.grad) against float64 autograd of
    the reference under the tolerance rule, dead rows exactly 0; then the functional backward
    into NaN-poisoned dq, dk, dv (and dsinks); ``material`` as in check_modified_forward.
    Returns the autograd ((dq, dk, dv), dsinks)."""
    max_q, max_k = max_len(cu_q), max_len(cu_k)
    dout = random_like(q, seed + 1000)
    kw = dict(causal=causal, window_size=window_size)
    grads, dsinks = modified_grads(q, k, v, cu_q, cu_k, dout, mods, max_q=max_q, max_k=max_k,
                                   deterministic=deterministic, **kw)
    ref, ref_dsinks = reference_grads_modified(q, k, v, cu_q, cu_k, dout, mods, **kw)
    plain, _ = modified_grads(q, k, v, cu_q, cu_k, dout, {}, max_q=max_q, max_k=max_k,
                              deterministic=deterministic, **kw)
    ref_plain = reference_grads(q, k, v, cu_q, cu_k, dout, **kw)
    dead_q, dead_k = dead_rows(cu_q, cu_k, causal, window_size)
    floor = ERROR_FLOOR[q.dtype]
    bounds = []
    for name, x, g, r, p, rp, dead in zip(("dq", "dk", "dv"), (q, k, v), grads, ref, plain,
                                          ref_plain, (dead_q, dead_k, dead_k)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite elements"
        assert (g[dead] == 0).all(), f"{name}: rows that attend (or are attended by) nothing"
        changed = rel_error(r, rp)
        assert not material or changed >= MATERIAL, \
            f"{name}: the modifiers move the reference by {changed:.3g}"
        err, err_plain = rel_error(g, r), rel_error(p, rp)
        bound = modified_bound(err_plain, r, q.dtype)
        assert err <= floor, f"{name}: relative error {err:.3g} > floor {floor:.3g}"
        assert err <= bound, (f"{name}: relative error {err:.3g} > {bound:.3g}, twice the "
                              f"unmodified call's {err_plain:.3g} (or the rounding of the "
                              f"reference)")
        bounds.append(min(bound, floor))
    sinks = mods.get("sinks")
    if sinks is not None:
        assert dsinks.shape == sinks.shape and dsinks.dtype == torch.float32
        assert torch.isfinite(dsinks).all()
        err = rel_error(dsinks, ref_dsinks)
        assert err <= floor, f"sinks.grad: relative error {err:.3g} > floor {floor:.3g}"
    else:
        assert dsinks is None

    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                       **kw, **mods)
    poisoned = {name: torch.full_like(x, NAN) for name, x in zip(("dq", "dk", "dv"), (q, k, v))}
    if sinks is not None:
        poisoned["dsinks"] = torch.full_like(sinks, NAN)
    ret = cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                           deterministic=deterministic, **kw, **mods, **poisoned)
    assert len(ret) == len(poisoned), "(dq, dk, dv), and dsinks with sinks"
    for (name, buf), got in zip(poisoned.items(), ret):
        assert got is buf, f"{name}= must be written in place and returned"
        assert not torch.isnan(got).any(), f"{name}: unwritten (or NaN) elements"
    for name, got, g, r, bound in zip(("dq", "dk", "dv"), ret, grads, ref, bounds):
        if deterministic:  # same kernels, same inputs, fixed order: same bits
            assert torch.equal(got, g), f"{name}: functional and autograd results differ"
        else:
            assert rel_error(got, r) <= bound, name
    if sinks is not None:
        assert rel_error(ret[3], ref_dsinks) <= floor, "dsinks"
    return grads, dsinks


# --------------------------------------------------------------------------------------------------
# GPU: forward against the reference.

MASKS = {
    "full": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "window64_0": (False, (64, 0)),
    "window32_16": (False, (32, 16)),
}
# Lq > Lk (under causal and the windows, the rows before the diagonal see no key), Lq < Lk, a
# sequence without keys, one without queries, lengths off the tile multiples.
FWD_Q = [100, 5, 50, 0, 130, 1, 64]
FWD_K = [30, 400, 0, 9, 130, 64, 200]


@requires_gpu
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_forward_masks(modifier, family, mask, monkeypatch):
    select_kernel_family(family, monkeypatch, "forward_kernel")
    causal, window = MASKS[mask]
    seed = MODIFIERS.index(modifier) * 10 + list(MASKS).index(mask)
    q, k, v, cu_q, cu_k = make_packed(FWD_Q, FWD_K, heads=8, heads_kv=2, head_dim=128,
                                      seed=seed, logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 8, len(FWD_Q), seed)
    check_modified_forward(q, k, v, cu_q, cu_k, mods, causal=causal, window_size=window)


# (dtype, head dim, heads, heads_kv, mask): the other head-dim tiles and fp16. Head dim 96 is
# sm80 only (the sm90 family covers 64, 128 and 256 and would fall back).
SHAPES = [("bf16", 64, 4, 4, "causal"), ("bf16", 96, 4, 2, "window32_16"),
          ("bf16", 256, 4, 1, "causal"), ("fp16", 128, 8, 2, "full"),
          ("fp16", 64, 8, 2, "window64_0")]
SHAPE_CASES = [pytest.param(family, *shape, id=f"{family}-{shape[0]}-d{shape[1]}-{shape[4]}")
               for family in ("sm80", "sm90") for shape in SHAPES
               if not (family == "sm90" and shape[1] == 96)]


@requires_gpu
@pytest.mark.parametrize("family,dtype,head_dim,heads,heads_kv,mask", SHAPE_CASES)
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_forward_head_dims_and_dtypes(modifier, family, dtype, head_dim, heads, heads_kv, mask,
                                      monkeypatch):
    select_kernel_family(family, monkeypatch, "forward_kernel")
    causal, window = MASKS[mask]
    seed = MODIFIERS.index(modifier) * 100 + head_dim + heads_kv
    q, k, v, cu_q, cu_k = make_packed(FWD_Q, FWD_K, heads=heads, heads_kv=heads_kv,
                                      head_dim=head_dim, dtype=DTYPES[dtype], seed=seed,
                                      logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, heads, len(FWD_Q), seed)
    check_modified_forward(q, k, v, cu_q, cu_k, mods, causal=causal, window_size=window)


@requires_gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_forward_sm90_long_row_tiles(modifier, causal, monkeypatch):
    """The sm90 tiles for long sequences (three consumer warpgroups, 192 query rows at head dim
    64), forced on every batch: the modifiers' row positions across the third warpgroup."""
    from cupy_varlen import _api

    select_kernel_family("sm90", monkeypatch, "forward_kernel")
    monkeypatch.setattr(_spec, "LONG_ROWS_MEAN", 0)
    _api.clear_caches()  # no plan made under the other threshold may serve
    try:
        seed = 500 + MODIFIERS.index(modifier) * 2 + causal
        q, k, v, cu_q, cu_k = make_packed(FWD_Q, FWD_K, heads=8, heads_kv=2, head_dim=64,
                                          seed=seed, logit_scale=logit_scale(modifier))
        mods = make_modifiers(modifier, 8, len(FWD_Q), seed)
        check_modified_forward(q, k, v, cu_q, cu_k, mods, causal=causal)
    finally:
        _api.clear_caches()


# --------------------------------------------------------------------------------------------------
# GPU: decode-shaped calls (decode tiles, split-KV) and paged caches.

DECODE_CONFIGS = {
    # 32 query heads per 8 K/V heads, head dim 128, a cache whose slots are longer than their
    # used counts (NaN past them), no mask: an empty used count and a context of one among them.
    "gqa32_8-d128-seqused": dict(heads=32, heads_kv=8, head_dim=128, window=(-1, -1),
                                 lens_q=[1, 1, 1, 0, 1, 1, 1],
                                 slots=[1200, 64, 3000, 50, 8, 200, 129],
                                 used=[1000, 0, 3000, 50, 1, 129, 64]),
    # 8 per 2, head dim 64, packed keys (an empty key sequence), a sliding window.
    "gqa8_2-d64-window": dict(heads=8, heads_kv=2, head_dim=64, window=(200, 0),
                              lens_q=[1, 1, 1, 0, 1, 1], slots=[1000, 0, 3000, 50, 1, 129],
                              used=None),
}


def decode_batch(config, seed, kind, device="cuda"):
    """q, k, v, cu_q, cu_k, seqused_k (or None) of a DECODE_CONFIGS entry; k and v NaN past each
    used count (a kernel that read one would put NaN in the output)."""
    c = DECODE_CONFIGS[config]
    q, k, v, cu_q, cu_k = make_packed(c["lens_q"], c["slots"], heads=c["heads"],
                                      heads_kv=c["heads_kv"], head_dim=c["head_dim"], seed=seed,
                                      device=device, logit_scale=logit_scale(kind))
    used = None
    if c["used"] is not None:
        for b, n in enumerate(c["used"]):
            start, end = cu_k[b].item(), cu_k[b + 1].item()
            k[start + n:end] = NAN
            v[start + n:end] = NAN
        used = torch.tensor(c["used"], dtype=torch.int32, device=device)
    return q, k, v, cu_q, cu_k, used


@requires_gpu
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("config", list(DECODE_CONFIGS))
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_decode(modifier, config, num_splits):
    """One query token per sequence: the decode tiles (GQA-packed rows), split across CTAs
    (None: the shapes choose; 4: at most four) or not (1); the sink joins the combine once."""
    seed = 600 + MODIFIERS.index(modifier) * 10 + list(DECODE_CONFIGS).index(config)
    q, k, v, cu_q, cu_k, used = decode_batch(config, seed, modifier)
    c = DECODE_CONFIGS[config]
    mods = make_modifiers(modifier, c["heads"], len(c["lens_q"]), seed)
    check_modified_forward(q, k, v, cu_q, cu_k, mods, window_size=c["window"], seqused_k=used,
                           max_k=max(c["slots"]), num_splits=num_splits)


def paged_cache(lens_q, used, page_size, *, heads=8, heads_kv=2, head_dim=128, seed=0,
                dtype=torch.bfloat16, q_scale=1.0, spare_pages=3, device="cuda"):
    """q and page pools k, v whose unreached pages and page tails hold NaN, a shuffled block
    table (enough pages for each count plus one), cu_seqlens_q and seqused_k."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lens_q)
    per_seq = max(-(-n // page_size) for n in used) + 1
    num_pages = batch * per_seq + spare_pages
    q = (torch.randn(sum(lens_q), heads, head_dim, generator=g) * q_scale).to(dtype)
    k = torch.full((num_pages, page_size, heads_kv, head_dim), NAN, dtype=dtype)
    v = k.clone()
    table = torch.randperm(num_pages, generator=g)[:batch * per_seq].view(batch, per_seq)
    table = table.to(torch.int32).contiguous()
    for b, n in enumerate(used):
        for p in range(-(-n // page_size)):
            rows = min(page_size, n - p * page_size)
            page = table[b, p].item()
            k[page, :rows] = torch.randn(rows, heads_kv, head_dim, generator=g).to(dtype)
            v[page, :rows] = torch.randn(rows, heads_kv, head_dim, generator=g).to(dtype)
    return (q.to(device), k.to(device), v.to(device), cu_seqlens(lens_q, device),
            table.to(device), torch.tensor(used, dtype=torch.int32, device=device))


PAGE_SIZES = {1: "full", 7: "causal", 16: "window64_0", 64: "causal"}
PAGED_Q = [1, 1, 37, 0, 5, 130]
PAGED_USED = [257, 0, 150, 3, 700, 200]


@requires_gpu
@pytest.mark.parametrize("page_size", list(PAGE_SIZES))
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_paged(modifier, page_size):
    """Decode rows, chunked prefill, an empty count and counts across many pages; ALiBi aligns to
    the used count; NaN in the pages and page tails no count reaches is never read."""
    causal, window = MASKS[PAGE_SIZES[page_size]]
    seed = 700 + MODIFIERS.index(modifier) * 100 + page_size
    q, k, v, cu_q, table, used = paged_cache(PAGED_Q, PAGED_USED, page_size, seed=seed,
                                             q_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 8, len(PAGED_Q), seed)
    check_modified_forward(q, k, v, cu_q, None, mods, causal=causal, window_size=window,
                           seqused_k=used, block_table=table)


@requires_gpu
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_paged_decode(modifier):
    """The decode tiles over a paged cache with pages of 16, split by the shapes."""
    seed = 800 + MODIFIERS.index(modifier)
    lens_q, used = [1, 1, 1, 1], [900, 1, 0, 2500]
    q, k, v, cu_q, table, seq_used = paged_cache(lens_q, used, 16, heads=16, heads_kv=2,
                                                 seed=seed, q_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 16, len(lens_q), seed)
    check_modified_forward(q, k, v, cu_q, None, mods, seqused_k=seq_used, block_table=table)


FLAG_KINDS = {"softcap": "softcap", "sinks": "sinks", "alibi": "alibi_per_seq", "all": "all"}


@requires_gpu
@pytest.mark.parametrize("path", ["prefill-sm80", "prefill-sm90", "decode", "paged", "backward"])
@pytest.mark.parametrize("flags", list(FLAG_KINDS))
def test_calls_load_the_modifier_specs(path, flags, monkeypatch):
    """Each path dispatches to a kernel compiled with its modifiers' flags, the decode tiles and
    the paged gather included (the backward: softcap and ALiBi only; the sink is in lse)."""
    from cupy_varlen import _api, _build

    if path.startswith("prefill"):
        select_kernel_family(path.split("-")[1], monkeypatch, "forward_kernel")
    loaded = []
    load_kernels = _build.load_kernels
    monkeypatch.setattr(_build, "load_kernels",
                        lambda spec, device: loaded.append(spec) or load_kernels(spec, device))
    kind = FLAG_KINDS[flags]
    _api.clear_caches()
    try:
        if path == "paged":
            q, k, v, cu_q, table, used = paged_cache([1, 130, 3], [300, 200, 40], 16, seed=9)
            mods = make_modifiers(kind, 8, 3, 9)
            cupy_varlen.varlen_attn(q, k, v, cu_q, None, 130, 300, seqused_k=used,
                                    block_table=table, **mods)
        elif path == "decode":
            q, k, v, cu_q, cu_k = make_packed([1, 1], [4000, 3000], heads=32, heads_kv=8,
                                              head_dim=128, seed=2)
            mods = make_modifiers(kind, 32, 2, 2)
            cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4000, **mods)
        else:
            q, k, v, cu_q, cu_k = make_packed(FWD_Q, FWD_K, heads=8, heads_kv=2, head_dim=128,
                                              seed=3)
            mods = make_modifiers(kind, 8, len(FWD_Q), 3)
            out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 130, 400, causal=True,
                                               return_lse=True, **mods)
            if path == "backward":
                cupy_varlen.varlen_attn_backward(random_like(q, 4), q, k, v, out, lse, cu_q,
                                                 cu_k, 130, 400, causal=True, **mods)
        torch.cuda.synchronize()
    finally:
        _api.clear_caches()
    expect = {name: int(flags in (name, "all")) for name in MODIFIER_DEFINES}
    if path == "backward":
        (spec,) = [s for s in loaded if isinstance(s, _spec.BwdSpec)]
        for name in ("softcap", "alibi"):
            assert spec.defines[MODIFIER_DEFINES[name]] == expect[name], (name, str(spec))
        return
    (spec,) = [s for s in loaded if isinstance(s, _spec.FwdSpec)]
    for name, define in MODIFIER_DEFINES.items():
        assert spec.defines[define] == expect[name], (name, str(spec))
    assert spec.decode == (path == "decode") and spec.paged == (path == "paged"), str(spec)
    if path.startswith("prefill"):
        assert spec.kernel == path.split("-")[1], str(spec)


# --------------------------------------------------------------------------------------------------
# GPU: backward against float64 autograd of the reference.

# Lq > Lk (dead rows under causal and the window), an empty query sequence (its keys get
# dk = dv = 0), an empty key sequence (its row gets dq = 0), lengths off the tile multiples.
BWD_Q = [100, 0, 1, 128, 64, 129]
BWD_K = [30, 3, 0, 127, 300, 129]
# mask -> head dim: head dim 128 without a mask takes the sm90 backward's 80-query tiles.
BWD_MASKS = {"full": 128, "causal": 64, "window32_16": 128}


@requires_gpu
@pytest.mark.parametrize("mask", list(BWD_MASKS))
@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_backward(modifier, family, mask, monkeypatch):
    select_kernel_family(family, monkeypatch, "backward_kernel")
    causal, window = MASKS[mask]
    seed = 900 + MODIFIERS.index(modifier) * 10 + list(BWD_MASKS).index(mask)
    q, k, v, cu_q, cu_k = make_packed(BWD_Q, BWD_K, heads=8, heads_kv=2,
                                      head_dim=BWD_MASKS[mask], seed=seed,
                                      logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 8, len(BWD_Q), seed)
    check_modified_backward(q, k, v, cu_q, cu_k, mods, causal=causal, window_size=window,
                            seed=seed)


# (family, dtype, head dim, heads, heads_kv, mask); the sm90 backward covers 64 and 128 only.
BWD_SHAPES = [("sm80", "fp16", 64, 8, 2, "causal"), ("sm90", "fp16", 64, 8, 2, "causal"),
              ("sm80", "bf16", 96, 4, 4, "full"), ("sm80", "bf16", 256, 4, 1, "causal")]


@requires_gpu
@pytest.mark.parametrize("family,dtype,head_dim,heads,heads_kv,mask", BWD_SHAPES,
                         ids=lambda x: str(x))
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_backward_head_dims_and_dtypes(modifier, family, dtype, head_dim, heads, heads_kv, mask,
                                       monkeypatch):
    select_kernel_family(family, monkeypatch, "backward_kernel")
    causal, window = MASKS[mask]
    seed = 1000 + MODIFIERS.index(modifier) * 10 + head_dim
    q, k, v, cu_q, cu_k = make_packed(BWD_Q, BWD_K, heads=heads, heads_kv=heads_kv,
                                      head_dim=head_dim, dtype=DTYPES[dtype], seed=seed,
                                      logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, heads, len(BWD_Q), seed)
    check_modified_backward(q, k, v, cu_q, cu_k, mods, causal=causal, window_size=window,
                            seed=seed)


@requires_gpu
@pytest.mark.parametrize("family", ["sm80", "sm90"])
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_backward_deterministic_bitwise(modifier, family, monkeypatch):
    """deterministic=True: as accurate, the functional and autograd gradients the same bits, and
    the same bits on every run, sinks' gradient included."""
    select_kernel_family(family, monkeypatch, "backward_kernel")
    seed = 1100 + MODIFIERS.index(modifier)
    q, k, v, cu_q, cu_k = make_packed(BWD_Q, BWD_K, heads=8, heads_kv=2, head_dim=128,
                                      seed=seed, logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 8, len(BWD_Q), seed)
    first, first_ds = check_modified_backward(q, k, v, cu_q, cu_k, mods, deterministic=True,
                                              seed=seed)
    dout = random_like(q, seed + 1000)  # check_modified_backward's
    max_q, max_k = max_len(cu_q), max_len(cu_k)
    for _ in range(2):
        again, ds = modified_grads(q, k, v, cu_q, cu_k, dout, mods, max_q=max_q, max_k=max_k,
                                   deterministic=True)
        for name, a, b in zip(("dq", "dk", "dv"), again, first):
            assert torch.equal(a, b), f"{name} differs between deterministic runs"
        assert (ds is None) == (first_ds is None)
        if ds is not None:
            assert torch.equal(ds, first_ds), "sinks.grad differs between deterministic runs"
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True,
                                       **mods)
    runs = [cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                             deterministic=True, **mods) for _ in range(2)]
    assert len(runs[0]) == (4 if "sinks" in mods else 3)
    for a, b in zip(*runs):
        assert torch.equal(a, b), "functional gradients differ between deterministic runs"


@requires_gpu
def test_sinks_gradient_alone_and_sinks_as_a_constant():
    """sinks that require grad make the call differentiable on their own (q, k, v constants);
    sinks that do not are a constant of a call differentiated in q."""
    q, k, v, cu_q, cu_k = make_packed(BWD_Q, BWD_K, heads=8, heads_kv=2, head_dim=64, seed=1200)
    sinks = make_modifiers("sinks", 8, len(BWD_Q), 1200)["sinks"]
    dout = random_like(q, 1201)
    max_q, max_k = max_len(cu_q), max_len(cu_k)
    (ref_dq, _, _), ref_ds = reference_grads_modified(q, k, v, cu_q, cu_k, dout, dict(sinks=sinks),
                                                      causal=True)
    floor = ERROR_FLOOR[q.dtype]

    leaf = sinks.clone().requires_grad_()
    out = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, sinks=leaf)
    assert out.requires_grad
    (ds,) = torch.autograd.grad(out, leaf, dout)
    assert ds.shape == sinks.shape and ds.dtype == torch.float32
    assert rel_error(ds, ref_ds) <= floor

    q_leaf = q.detach().requires_grad_()
    out = cupy_varlen.varlen_attn(q_leaf, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                  sinks=sinks)
    (dq,) = torch.autograd.grad(out, q_leaf, dout)
    assert rel_error(dq, ref_dq) <= floor
    assert sinks.grad is None and not sinks.requires_grad


# --------------------------------------------------------------------------------------------------
# GPU: CuPy arrays, validation on the device, CUDA graphs, torch.compile.


@requires_gpu
@pytest.mark.parametrize("modifier", MODIFIERS)
def test_cupy_arrays_match_torch_bitwise(modifier):
    """CuPy q, k, v and modifier arrays: CuPy results, the torch path's bits (same kernels),
    forward and functional backward (deterministic), preallocated outputs included."""
    import cupy

    seed = 1300 + MODIFIERS.index(modifier)
    q, k, v, cu_q, cu_k = make_packed(FWD_Q, FWD_K, heads=8, heads_kv=2, head_dim=64, seed=seed,
                                      logit_scale=logit_scale(modifier))
    mods = make_modifiers(modifier, 8, len(FWD_Q), seed)
    max_q, max_k = max_len(cu_q), max_len(cu_k)
    dout = random_like(q, seed + 1)
    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=True,
                                       return_lse=True, **mods)
    grads = cupy_varlen.varlen_attn_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                             causal=True, deterministic=True, **mods)
    assert len(grads) == (4 if "sinks" in mods else 3)

    c = cupy.from_dlpack
    cq, ck, cv, ccu_q, ccu_k, cdout = (c(x) for x in (q, k, v, cu_q, cu_k, dout))
    cmods = {name: c(x) if isinstance(x, torch.Tensor) else x for name, x in mods.items()}
    cout, clse = cupy_varlen.varlen_attn(cq, ck, cv, ccu_q, ccu_k, max_q, max_k, causal=True,
                                         return_lse=True, **cmods)
    assert isinstance(cout, cupy.ndarray) and isinstance(clse, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(cout), out)
    assert torch.equal(torch.from_dlpack(clse), lse)
    alone = cupy_varlen.varlen_attn(cq, ck, cv, ccu_q, ccu_k, max_q, max_k, causal=True, **cmods)
    assert isinstance(alone, cupy.ndarray) and torch.equal(torch.from_dlpack(alone), out)

    cgrads = cupy_varlen.varlen_attn_backward(cdout, cq, ck, cv, cout, clse, ccu_q, ccu_k, max_q,
                                              max_k, causal=True, deterministic=True, **cmods)
    assert len(cgrads) == len(grads)
    for got, expect in zip(cgrads, grads):
        assert isinstance(got, cupy.ndarray) and torch.equal(torch.from_dlpack(got), expect)

    names = ("dq", "dk", "dv", "dsinks")[:len(grads)]
    pre = {name: c(torch.full_like(g, NAN)) for name, g in zip(names, grads)}
    ret = cupy_varlen.varlen_attn_backward(cdout, cq, ck, cv, cout, clse, ccu_q, ccu_k, max_q,
                                           max_k, causal=True, deterministic=True, **cmods, **pre)
    for got, buf, expect in zip(ret, pre.values(), grads):
        assert got is buf and torch.equal(torch.from_dlpack(got), expect)


@requires_gpu
@pytest.mark.parametrize("requires_grad", [False, True])
def test_modifier_arrays_elsewhere_are_rejected(requires_grad):
    """Host-memory sinks or slopes with CUDA q: ValueError; CuPy ones with torch q and torch ones
    with CuPy q: TypeError; before any kernel, on every path."""
    import cupy

    q, k, v, cu_q, cu_k = make_packed([4, 6], heads=HEADS, heads_kv=HEADS_KV, head_dim=64)
    if requires_grad:
        q.requires_grad_()
    cases = [(dict(sinks=_f32(HEADS)), ValueError, "sinks"),
             (dict(alibi_slopes=_f32(HEADS)), ValueError, "alibi_slopes"),
             (dict(alibi_slopes=_f32(BATCH, HEADS)), ValueError, "alibi_slopes"),
             (dict(sinks=cupy.zeros(HEADS, dtype=cupy.float32)), TypeError, "sinks"),
             (dict(alibi_slopes=cupy.zeros(HEADS, dtype=cupy.float32)), TypeError,
              "alibi_slopes")]
    for mods, exc, name in cases:
        with _raises("varlen_attn", exc, name):
            cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 6, 6, **mods)
    if requires_grad:
        return
    c = cupy.from_dlpack
    for mods, name in ((dict(sinks=_f32(HEADS).cuda()), "sinks"),
                       (dict(alibi_slopes=_f32(HEADS).cuda()), "alibi_slopes")):
        with _raises("varlen_attn", TypeError, name):
            cupy_varlen.varlen_attn(c(q), c(k), c(v), c(cu_q), c(cu_k), 6, 6, **mods)

    out, lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 6, 6, return_lse=True)
    args = (random_like(q, 5), q, k, v, out, lse, cu_q, cu_k, 6, 6)
    sinks = _f32(HEADS).cuda()
    for mods, exc, name in ((dict(sinks=_f32(HEADS)), ValueError, "sinks"),
                            (dict(alibi_slopes=_f32(HEADS)), ValueError, "alibi_slopes"),
                            (dict(sinks=sinks, dsinks=_f32(HEADS)), ValueError, "dsinks"),
                            (dict(sinks=c(sinks)), TypeError, "sinks")):
        with _raises("varlen_attn_backward", exc, name):
            cupy_varlen.varlen_attn_backward(*args, **mods)
    with _raises("varlen_attn_backward", TypeError, "sinks"):
        cupy_varlen.varlen_attn_backward(*(c(x) if isinstance(x, torch.Tensor) else x
                                           for x in args), sinks=sinks)


@requires_gpu
def test_cuda_graph_decode_step_with_alibi_and_sinks():
    """A split decode step over a cache (seqused_k) with per-sequence ALiBi slopes and sinks,
    captured once and replayed after the counts, the slopes and the sinks changed in place: the
    bits of an eager call on the new values (the sink of the row whose count became 0 in its
    lse), and the reference's result."""
    lens_q, slots = [1, 1, 1, 1], [4096, 300, 2048, 64]
    q, k, v, cu_q, cu_k = make_packed(lens_q, slots, heads=8, heads_kv=2, head_dim=128, seed=71)
    mods = make_modifiers("all", 8, 4, 71)  # its sinks and per-sequence slopes; no softcap
    sinks, slopes = mods["sinks"], mods["alibi_slopes"]
    used = torch.tensor([3000, 1, 2048, 0], dtype=torch.int32, device="cuda")
    out = torch.full_like(q, NAN)

    def step():
        return cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4096, seqused_k=used, out=out,
                                       return_lse=True, sinks=sinks, alibi_slopes=slopes)

    graph, (_, lse) = capture_graph(step)
    new = make_modifiers("all", 8, 4, 72)
    used.copy_(torch.tensor([4096, 0, 17, 64], dtype=torch.int32, device="cuda"))
    sinks.copy_(new["sinks"])
    slopes.copy_(new["alibi_slopes"])
    out.fill_(NAN)
    graph.replay()
    torch.cuda.synchronize()
    eager_out = torch.full_like(q, NAN)
    _, eager_lse = cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, 1, 4096, seqused_k=used,
                                           out=eager_out, return_lse=True, sinks=sinks,
                                           alibi_slopes=slopes)
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    assert (out[1] == 0).all()
    assert torch.allclose(lse[:, 1], new["sinks"], rtol=1e-5, atol=SINK_LSE_ATOL)
    ref = varlen_attn_reference(q, k, v, cu_q, cu_k, seqused_k=used, sinks=sinks,
                                alibi_slopes=slopes)
    assert rel_error(out, ref) <= ERROR_FLOOR[q.dtype]


@requires_gpu
def test_torch_compile_fullgraph_softcap_and_sinks():
    """torch.compile(fullgraph=True) of a function calling varlen_attn with a softcap and sinks
    that require grad: no graph break, loss, output and every gradient (the sinks' included) as
    eager's up to rounding."""
    import torch._dynamo

    lens = [100, 1, 257, 30]
    q, k, v, cu, _ = make_packed(lens, heads=8, heads_kv=2, head_dim=64, seed=81,
                                 logit_scale=SOFTCAP_LOGITS)
    sinks = make_modifiers("sinks", 8, len(lens), 81)["sinks"]
    w = random_like(q, 82)

    def fn(q, k, v, sinks, cu, w):
        out = cupy_varlen.varlen_attn(q, k, v, cu, cu, 257, 257, causal=True, softcap=SOFTCAP,
                                      sinks=sinks, deterministic=True)
        return (out.float() * w.float()).sum(), out

    torch._dynamo.reset()
    try:
        compiled = torch.compile(fn, fullgraph=True)
        results = []
        for f in (fn, compiled):
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, sinks)]
            loss, out = f(*leaves, cu, w)
            grads = torch.autograd.grad(loss, leaves)
            results.append((loss.detach(), out.detach(), grads))
    finally:
        torch._dynamo.reset()
    (loss_e, out_e, grads_e), (loss_c, out_c, grads_c) = results
    assert abs(loss_c.item() - loss_e.item()) <= 1e-3 * abs(loss_e.item()) + 1e-3
    assert rel_error(out_c, out_e) <= 2e-3
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), grads_c, grads_e):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all() and rel_error(a, b) <= 2e-3, name
    ref = varlen_attn_reference(q, k, v, cu, cu, causal=True, softcap=SOFTCAP, sinks=sinks)
    assert rel_error(out_e, ref) <= ERROR_FLOOR[q.dtype]
