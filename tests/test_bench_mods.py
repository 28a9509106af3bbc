"""The score-modifier benchmark's GPU-free parts (CPU): its command line and tables of configs,
modifiers and bars; flex's score_mods and sinks against the float64 reference's definitions (eager
flex_attention on the CPU); the chunked reference; the check verdicts; the cost / speed arithmetic
and the report from a synthetic record; one modifier group run end to end on CPU stand-ins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPOSITORY
from cupy_varlen.reference import alibi_distance, varlen_attn_reference

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import bench_mods as bm  # noqa: E402
import bench_varlen as bv  # noqa: E402

flex_module = pytest.importorskip("torch.nn.attention.flex_attention")

# Eager flex_attention (the CPU stand-in for the compiled one) warns that it is not compiled.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------------------------
# Command line, configs, modifiers, bars
# --------------------------------------------------------------------------------------------

def test_defaults_and_selection():
    args = bm.parse_args([])
    assert args.mods == ["softcap", "sinks", "alibi"] and args.methods == ["cupy_varlen", "flex"]
    assert args.passes == ["fwd", "bwd"] and args.softcap == 50.0 and args.logit_scale == 4.0
    assert args.sink_mean is None and not args.check and args.timer == "do_bench"
    assert [c.name for c in args.selected] == ["seed_causal", "b32_8k_d128_causal"]

    args = bm.parse_args(["--configs", "b32_8k_d128", "seed_full", "--pass", "fwdbwd", "fwd",
                          "--mods", "alibi", "sinks", "--methods", "flex", "cupy_varlen"])
    assert [c.name for c in args.selected] == ["b32_8k_d128_full", "b32_8k_d128_causal",
                                               "seed_full"]
    assert args.passes == ["fwd", "fwdbwd"]  # bench_varlen's pass order
    assert args.mods == ["sinks", "alibi"] and args.methods == ["cupy_varlen", "flex"]


@pytest.mark.parametrize("argv", [
    ["--softcap", "0"],
    ["--softcap", "nan"],
    ["--logit-scale", "-1"],
    ["--configs", "no_such_config"],
    ["--passes", "both"],
    ["--mods", "rope"],
    ["--runs", "0"],
])
def test_bad_arguments_stop(argv):
    with pytest.raises(SystemExit) as exc:
        bm.parse_args(argv)
    assert exc.value.code == 2


def test_the_issue_configs_are_bench_varlens():
    grid = bv.grid_configs()
    seed, big = grid["seed_causal"], grid["b32_8k_d128_causal"]
    assert (len(seed.lengths_q), seed.heads, seed.heads_kv, seed.head_dim) == (8, 16, 16, 64)
    assert max(seed.lengths_q) <= 2048 and seed.causal
    assert (len(big.lengths_q), big.heads, big.heads_kv, big.head_dim) == (32, 16, 16, 128)
    assert max(big.lengths_q) <= 8192 and all(c.self_attention for c in (seed, big))
    assert set(bm.BAR_CONFIGS) == {"b32_8k_d128_full", "b32_8k_d128_causal"} <= set(grid)
    assert set(bm.DEFAULT_CONFIGS) <= set(grid)
    assert bm.bar_applies("b32_8k_d128_full") and not bm.bar_applies("seed_full")


def test_alibi_slopes_are_blooms():
    slopes = bm.alibi_slopes_list(16)
    assert len(slopes) == 16 and slopes[0] == pytest.approx(2 ** -0.5)
    assert slopes[-1] == pytest.approx(2 ** -8)
    assert bm.alibi_slopes_list(8) == pytest.approx([2.0 ** -i for i in range(1, 9)])
    assert all(a > b for a, b in zip(slopes, slopes[1:]))


def test_cost_bars():
    assert bm.cost_bar("softcap", "fwd") == 0.10 and bm.cost_bar("softcap", "bwd") == 0.15
    assert bm.cost_bar("softcap", "fwdbwd") is None
    assert all(bm.cost_bar("sinks", p) == 0.03 and bm.cost_bar("alibi", p) == 0.05
               for p in bv.PASSES)
    assert bm.FLEX_BAR == 3.0


def test_default_sink_mean_and_modifier_values():
    assert bm.default_sink_mean([64, 192], 4.0) == pytest.approx(math.log(128) + 8.0)
    cfg = bv.BenchConfig("t_full", [40, 100], [40, 100], 4, 2, 16)
    args = bm.parse_args(["--sink-mean", "3.0", "--softcap", "30"])
    values = bm.make_modifiers(cfg, args, device="cpu")
    sinks = values["sinks"]["sinks"]
    assert sinks.shape == (4,) and sinks.dtype == torch.float32
    assert sinks.is_leaf and sinks.requires_grad
    assert abs(float(sinks.mean()) - 3.0) < 3.0
    assert values["softcap"] == {"softcap": 30.0}
    assert values["alibi"]["alibi_slopes"].tolist() == pytest.approx(
        bm.alibi_slopes_list(4))
    again = bm.make_modifiers(cfg, args, device="cpu")["sinks"]["sinks"]
    assert torch.equal(sinks.detach(), again.detach())


# --------------------------------------------------------------------------------------------
# flex's equivalents against the reference's definitions
# --------------------------------------------------------------------------------------------

def test_softcap_score_mod_is_the_reference_formula():
    score = torch.linspace(-400, 400, 81, dtype=torch.float64)
    got = bm.softcap_score_mod(50.0)(score, None, None, None, None)
    assert torch.allclose(got, 50.0 * torch.tanh(score / 50.0), rtol=0, atol=1e-12)
    assert float(got.abs().max()) < 50.0 and got[40] == 0


def test_alibi_score_mod_is_the_reference_distance_within_each_document():
    lengths, heads = [5, 9, 3], 4
    slopes = torch.tensor(bm.alibi_slopes_list(heads), dtype=torch.float64)
    total = sum(lengths)
    q_idx = torch.arange(total).view(1, -1, 1)
    kv_idx = torch.arange(total).view(1, 1, -1)
    h = torch.arange(heads).view(-1, 1, 1)
    bias = bm.alibi_score_mod(slopes)(torch.zeros(heads, total, total, dtype=torch.float64),
                                      None, h, q_idx, kv_idx)
    start = 0
    for n in lengths:
        block = bias[:, start:start + n, start:start + n]
        want = -slopes.view(-1, 1, 1) * alibi_distance(n, n).to(torch.float64)
        assert torch.allclose(block, want, rtol=0, atol=1e-12)
        start += n


def _flex_inputs(lengths, heads, heads_kv, head_dim, logit_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, heads, head_dim, dtype=torch.float64, generator=g) * logit_scale
    k = torch.randn(total, heads_kv, head_dim, dtype=torch.float64, generator=g)
    v = torch.randn(total, heads_kv, head_dim, dtype=torch.float64, generator=g)
    cu = torch.tensor(bv.cu_seqlens_list(lengths), dtype=torch.int32)
    return q, k, v, cu


def math_flex(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
              return_aux=None):
    """flex_attention's own eager math (the function its CPU path runs), called directly:
    autograd differentiates it, where flex_attention refuses a backward on the CPU."""
    from torch._higher_order_ops.flex_attention import math_attention

    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    out, lse_log2, _ = math_attention(query, key, value, score_mod or (lambda s, b, h, m, n: s),
                                      block_mask.as_tuple(), scale, {})
    if return_aux is None:
        return out
    return out, flex_module.AuxOutput(lse=lse_log2 * math.log(2))


def _flex_case(mod, causal, flex, requires_grad):
    """(flex output, reference output, leaves) of one modifier on a small packed GQA batch."""
    lengths, heads, heads_kv = [40, 100, 7], 4, 2
    q, k, v, cu = _flex_inputs(lengths, heads, heads_kv, 16)
    leaves = [x.clone().requires_grad_(requires_grad) for x in (q, k, v)]
    sinks = torch.tensor([9.0, 6.0, 7.5, 8.0], dtype=torch.float64, requires_grad=True)
    values = {"softcap": {"softcap": 5.0}, "sinks": {"sinks": sinks},
              "alibi": {"alibi_slopes": torch.tensor(bm.alibi_slopes_list(heads),
                                                     dtype=torch.float64)}}[mod]
    score_mod, attention = bm.flex_modifier(mod, values, softcap=5.0)
    if mod == "sinks":
        attention = bm.sinks_attention(sinks, flex)
    block_mask = bv.document_block_mask(lengths, causal, (-1, -1), device="cpu")
    fq, fk, fv = (x.transpose(0, 1).unsqueeze(0) for x in leaves)
    out = (attention or flex)(fq, fk, fv, score_mod=score_mod, block_mask=block_mask,
                              enable_gqa=True)[0].transpose(0, 1)
    ref = varlen_attn_reference(*leaves, cu, cu, causal=causal, **values)
    without = varlen_attn_reference(q, k, v, cu, cu, causal=causal)
    assert bv.rel_error(without, ref.detach()) > 1e-3, "the modifier changed nothing"
    wrt = [x for x in leaves if x.requires_grad] + ([sinks] if mod == "sinks" else [])
    return out, ref, wrt


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mod", bm.MODS)
def test_flex_attention_with_each_modifier_is_the_reference(mod, causal):
    # The real (eager) flex_attention: the forward, and the sinks' gradient through its lse.
    out, ref, wrt = _flex_case(mod, causal, flex_module.flex_attention, requires_grad=False)
    assert bv.rel_error(out.detach(), ref.detach()) < 1e-12
    if wrt:
        dout = torch.randn(out.shape, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(5))
        (got,), (want,) = torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout)
        assert bv.rel_error(got, want) < 1e-10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mod", bm.MODS)
def test_flex_gradients_with_each_modifier_are_the_references(mod, causal):
    out, ref, wrt = _flex_case(mod, causal, math_flex, requires_grad=True)
    assert bv.rel_error(out.detach(), ref.detach()) < 1e-12
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for got, want in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(ref, wrt, dout)):
        assert bv.rel_error(got, want) < 1e-10


def test_sinks_attention_needs_an_lse_and_uses_it():
    def no_lse(query, key, value, score_mod=None, block_mask=None, enable_gqa=False):
        raise AssertionError("never called")

    with pytest.raises(bv.Unavailable, match="no lse"):
        bm.sinks_attention(torch.zeros(2), no_lse)

    def lse_flex(query, key, value, score_mod=None, block_mask=None, enable_gqa=False,
                 return_lse=False):
        assert return_lse
        return torch.ones(1, 2, 3, 4), torch.tensor([[[0.0, 1.0, -math.inf]] * 2])

    sinks = torch.tensor([0.0, 1.0])
    out = bm.sinks_attention(sinks, lse_flex)(None, None, None)
    share = torch.sigmoid(torch.tensor([[0.0, 1.0, -math.inf], [-1.0, 0.0, -math.inf]]))
    assert torch.allclose(out[0, :, :, 0], share) and torch.equal(out[0, :, 2], torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------
# The chunked reference
# --------------------------------------------------------------------------------------------

def test_reference_chunks_cover_every_sequence_and_head_once():
    lengths = [8000, 64, 4096, 128, 2048, 8192]
    for heads, heads_kv, budget in ((16, 16, 1 << 27), (32, 8, 1 << 27), (16, 4, 1 << 20)):
        chunks = bm.reference_chunks(lengths, lengths, heads, heads_kv, budget)
        group = heads // heads_kv
        seen = {}
        for b0, b1, h0, h1 in chunks:
            assert h0 % group == 0 and h1 % group == 0 and b1 > b0 and h1 > h0
            size = (h1 - h0) * sum(n * n for n in lengths[b0:b1])
            assert size <= budget or (b1 - b0 == 1 and h1 - h0 == group)
            for b in range(b0, b1):
                for h in range(h0, h1):
                    seen[(b, h)] = seen.get((b, h), 0) + 1
        assert seen == {(b, h): 1 for b in range(len(lengths)) for h in range(heads)}
    assert bm.reference_chunks([4, 4], [4, 4], 2, 1, 1 << 20) == [(0, 2, 0, 2)]


@pytest.mark.parametrize("mod", ("none",) + bm.MODS)
def test_chunked_reference_is_the_reference(mod):
    lengths, heads, heads_kv = [30, 0, 57, 12], 4, 2
    q, k, v, cu = _flex_inputs(lengths, heads, heads_kv, 8, seed=2)
    cfg = bv.BenchConfig("t_causal", lengths, lengths, heads, heads_kv, 8, causal=True)
    inp = bv.Inputs(cfg, q, k, v, cu, cu)
    sinks = torch.tensor([1.0, 4.0, 2.0, 3.0], dtype=torch.float32, requires_grad=True)
    modifiers = {"none": {}, "softcap": {"softcap": 2.0}, "sinks": {"sinks": sinks},
                 "alibi": {"alibi_slopes": torch.tensor([0.5, 0.25, 0.1, 0.05])}}[mod]
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = bm.reference_result(inp, modifiers, dout, max_elems=2 * 30 * 30)  # many chunks
    assert len(bm.reference_chunks(lengths, lengths, heads, heads_kv, 2 * 30 * 30)) > 4
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    kw = dict(modifiers)
    if mod == "sinks":
        kw["sinks"] = sinks.detach().double().requires_grad_()
        leaves.append(kw["sinks"])
    out = varlen_attn_reference(*leaves[:3], cu, cu, causal=True, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.allclose(got["out"], out.detach(), rtol=0, atol=1e-12)
    names = ["dq", "dk", "dv"] + (["dsinks"] if mod == "sinks" else [])
    assert sorted(got) == sorted(["out"] + names)
    for name, want in zip(names, grads):
        assert torch.allclose(got[name], want, rtol=0, atol=1e-10), name
    assert set(bm.reference_result(inp, modifiers)) == {"out"}


def test_default_inputs_make_every_modifier_visible_to_the_check():
    # At --logit-scale 4 and the default sink mean, a kernel that ignored a modifier would be off
    # by more than twice the tightest tolerance (a quarter of bf16's floor).
    lengths, heads = [256, 512, 128], 4
    q, k, v, cu = _flex_inputs(lengths, heads, heads, 64, logit_scale=4.0, seed=3)
    cfg = bv.BenchConfig("t_causal", lengths, lengths, heads, heads, 64, causal=True)
    inp = bv.Inputs(cfg, q, k, v, cu, cu)
    args = bm.parse_args([])
    values = bm.make_modifiers(cfg, args, device="cpu")
    none = bm.reference_result(inp, {})
    tightest = bm.CHECK_FLOOR["bf16"] / 4
    for mod in bm.MODS:
        effect = bm.modifier_effect(bm.reference_result(inp, values[mod]), none)["out"]
        assert effect > 2 * tightest, (mod, effect)


# --------------------------------------------------------------------------------------------
# Check verdicts, costs, ratios, reports
# --------------------------------------------------------------------------------------------

def test_check_tolerance_and_verdict():
    floor = bm.CHECK_FLOOR["bf16"]
    assert bm.check_tolerance("bf16", "cupy_varlen", "none", None, "out") == floor
    assert bm.check_tolerance("bf16", "flex", "softcap", {"out": 1e-3}, "out") == floor
    assert bm.check_tolerance("bf16", "cupy_varlen", "softcap", {"out": 4e-3}, "out") == 8e-3
    assert bm.check_tolerance("bf16", "cupy_varlen", "softcap", {"out": 1e-4}, "out") == floor / 4
    assert bm.check_tolerance("bf16", "cupy_varlen", "softcap", {"out": 0.5}, "out") == floor
    assert bm.check_tolerance("bf16", "cupy_varlen", "sinks", {"dq": 4e-3}, "dsinks") == floor
    assert bm.check_tolerance("fp16", "cupy_varlen", "none", None, "dq") == 4e-3

    v = bm.check_verdict({"out": 6e-3}, "bf16", "cupy_varlen", "softcap", {"out": 4e-3},
                         {"out": 5e-2})
    assert v["check_ok"] and v["check_decisive"] and v["check_tol"] == {"out": 8e-3}
    v = bm.check_verdict({"out": 9e-3}, "bf16", "cupy_varlen", "softcap", {"out": 4e-3},
                         {"out": 1e-2})
    assert not v["check_ok"] and v["check_decisive"] is False
    v = bm.check_verdict({"dq": 1e-3, "dsinks": float("nan")}, "bf16", "flex", "sinks", None,
                         {"dq": 0.3})
    assert not v["check_ok"] and v["check_decisive"]
    assert bm.check_verdict({"out": 1e-3}, "bf16", "cupy_varlen", "none")["check_decisive"] is None


def test_cost_and_speed_arithmetic():
    assert bm.cost_of(1.05, 1.0) == pytest.approx(0.05)
    assert bm.cost_of(0.98, 1.0) == pytest.approx(-0.02)
    assert bm.time_ratio(1.1, 1.0) == pytest.approx(1.1)
    assert bm.cost_of(None, 1.0) is None and bm.cost_of(1.0, None) is None
    assert bm.speedup_vs_flex(2.0, 7.0) == pytest.approx(3.5)
    assert bm.speedup_vs_flex(None, 7.0) is None


def _row(config, method, mod, group, pass_, ms, errors=None, ok=None, error=None):
    row = {"config": config, "method": method, "mod": mod, "group": group, "pass": pass_,
           "median_ms": ms, "min_ms": None, "p90_ms": None, "note": "", "error": error,
           "tflops": None if ms is None else 100.0 / ms}
    if errors is not None:
        row.update(check_errors=errors, check_ok=ok, check_decisive=True)
    return row


def _synthetic_record(config="b32_8k_d128_causal"):
    rows = [
        _row(config, "cupy_varlen", "none", "softcap", "fwd", 10.0, {"out": 3e-3}, True),
        _row(config, "cupy_varlen", "softcap", "softcap", "fwd", 10.5, {"out": 4e-3}, True),
        _row(config, "flex", "softcap", "softcap", "fwd", 40.0, {"out": 5e-3}, True),
        _row(config, "cupy_varlen", "none", "sinks", "fwd", 10.2, {"out": 3e-3}, True),
        _row(config, "cupy_varlen", "sinks", "sinks", "fwd", 10.71, {"out": 0.3}, False),
        _row(config, "flex", "sinks", "sinks", "fwd", 25.0, {"out": 4e-3}, True),
        _row(config, "cupy_varlen", "none", "sinks", "bwd", 30.0),
        _row(config, "cupy_varlen", "sinks", "sinks", "bwd", None, error="TypeError: sinks"),
        _row(config, "flex", "sinks", "sinks", "bwd", 99.0),
    ]
    return {"config": config, "params": {}, "rows": rows, "summary": bm.summarize(rows, config),
            "baseline_spread": bm.baseline_spread(rows)}


def test_summary_lines_costs_bars_and_checks():
    record = _synthetic_record()
    lines = {(s["pass"], s["mod"]): s for s in record["summary"]}
    assert set(lines) == {("fwd", "softcap"), ("fwd", "sinks"), ("bwd", "softcap"),
                          ("bwd", "sinks")}
    cap = lines[("fwd", "softcap")]
    assert cap["cost"] == pytest.approx(0.05) and cap["cost_bar"] == 0.10 and cap["cost_ok"]
    assert cap["speedup_vs_flex"] == pytest.approx(40 / 10.5) and cap["flex_ok"]
    assert cap["none_ms"] == 10.0 and cap["check_ok"] and cap["check_err"] == 4e-3
    sinks = lines[("fwd", "sinks")]
    # measured against the baseline timed beside it (10.2), not the softcap group's (10.0)
    assert sinks["cost"] == pytest.approx(0.05) and sinks["cost_ok"] is False
    assert sinks["speedup_vs_flex"] == pytest.approx(25 / 10.71) and sinks["flex_ok"] is False
    assert sinks["check_ok"] is False
    failed = lines[("bwd", "sinks")]
    assert failed["cost"] is None and failed["cost_ok"] is None and failed["ms"] is None
    assert failed["errors"] == {"cupy_varlen": "TypeError: sinks"}
    assert lines[("bwd", "softcap")]["ms"] is None
    assert record["baseline_spread"] == {"fwd": pytest.approx(0.02)}

    elsewhere = {(s["pass"], s["mod"]): s for s in bm.summarize(record["rows"], "seed_causal")}
    assert elsewhere[("fwd", "softcap")]["cost_ok"] is None
    assert elsewhere[("fwd", "softcap")]["cost"] == pytest.approx(0.05)


def test_report_tables_and_json_round_trip(tmp_path, capsys):
    record = _synthetic_record()
    table = bm.summary_table(record)
    assert "+5.0%" in table and "<=10% ok" in table and "<=3% MISS" in table
    assert ">=3x ok" in table and ">=3x MISS" in table and "FAIL" in table
    assert "TypeError: sinks" in table and "3.81" in table
    seed = bm.summary_table(_synthetic_record("seed_causal"))
    assert "(<=10%)" in seed and " ok" not in seed and "MISS" not in seed
    assert "slowest / fastest" in bm.record_report(record)
    assert "UNAVAILABLE: TypeError: sinks" in bm.rows_table(record)

    payload = {"benchmark": "bench_mods", "dtype": "bf16", "date": "2026-12-05T10:00:00",
               "environment": {"device": "test"}, "results": [record]}
    assert bm.failed_checks(payload) == [("b32_8k_d128_causal", "fwd", "sinks", "cupy_varlen")]
    path = tmp_path / "x_mods.json"
    bv.write_json(payload, path)
    assert json.loads(path.read_text())["results"][0]["summary"] == json.loads(
        json.dumps(record["summary"]))
    bm.main(["--from-json", str(path)])
    printed = capsys.readouterr().out
    assert "b32_8k_d128_causal" in printed and "CHECK FAILED" in printed and "+5.0%" in printed


def test_plot_from_a_synthetic_record(tmp_path):
    pytest.importorskip("matplotlib")
    payload = {"dtype": "bf16", "date": "2026-12-05T10:00:00", "environment": {"device": "t"},
               "results": [_synthetic_record()]}
    bm.plot_results(payload, [tmp_path / "p.png"])
    assert (tmp_path / "p.png").stat().st_size > 0


def test_source_commit_without_git_data(tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_VARLEN_COMMIT", "abc123")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert bm.source_commit(tmp_path) == "abc123"
    monkeypatch.delenv("CUPY_VARLEN_COMMIT")
    assert bm.source_commit(tmp_path) == "unknown"


def test_help_and_list_run_without_a_gpu():
    for flag in ("--help", "--list"):
        proc = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / "bench_mods.py"),
                               flag], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    assert "b32_8k_d128_causal" in proc.stdout and "(default, bar)" in proc.stdout


# --------------------------------------------------------------------------------------------
# One modifier group end to end on CPU stand-ins for the GPU methods
# --------------------------------------------------------------------------------------------

def _cpu_stand_ins(monkeypatch, ignore_modifier=False):
    """bench_varlen's GPU pieces replaced: ours by the reference in float32 (which ignores the
    modifier where asked), compiled flex by flex's eager math (differentiable on the CPU), the
    timer by one timed call."""
    def prepare_cupy_varlen(inp, **modifiers):
        cfg = inp.cfg
        used = {} if ignore_modifier else modifiers

        def fn():
            return varlen_attn_reference(inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k,
                                         causal=cfg.causal, compute_dtype=torch.float32, **used)

        return bv.Prepared(fn, unpack=lambda out: out, note="reference stand-in")

    def prepare_flex(inp, compile_limit_s, score_mod=None, attention=None):
        cfg = inp.cfg
        block_mask = bv.document_block_mask(cfg.lengths_q, cfg.causal, cfg.window, device="cpu")
        q, k, v = (x.transpose(0, 1).unsqueeze(0).contiguous() for x in (inp.q, inp.k, inp.v))
        attend = attention or math_flex

        def fn():
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask,
                          enable_gqa=cfg.heads_kv < cfg.heads)

        return bv.Prepared(fn, unpack=lambda out: out[0].transpose(0, 1), note="eager",
                           first_call_s=0.0)

    def one_call(fn, runs, warmup):
        t0 = time.perf_counter()
        fn()
        return {"median_ms": (time.perf_counter() - t0) * 1e3, "min_ms": None, "p90_ms": None}

    monkeypatch.setattr(bv, "prepare_cupy_varlen", prepare_cupy_varlen)
    monkeypatch.setattr(bv, "prepare_flex", prepare_flex)
    monkeypatch.setattr(flex_module, "flex_attention", math_flex)  # what sinks_attention calls
    monkeypatch.setattr(bm, "_timer", lambda args: one_call)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)


@pytest.mark.parametrize("mod", bm.MODS)
def test_a_modifier_group_runs_checks_and_summarizes(mod, monkeypatch):
    _cpu_stand_ins(monkeypatch)
    lengths, heads, heads_kv = [40, 100, 7], 4, 2
    cfg = bv.BenchConfig("t_causal", lengths, lengths, heads, heads_kv, 16, causal=True)
    q, k, v, cu = _flex_inputs(lengths, heads, heads_kv, 16, logit_scale=4.0)
    inp = bv.Inputs(cfg, *(x.float().requires_grad_() for x in (q, k, v)), cu, cu)
    args = bm.parse_args(["--passes", "fwd", "bwd", "fwdbwd", "--softcap", "8", "--check"])
    values = bm.make_modifiers(cfg, args, device="cpu")
    dout = bm.fixed_dout(inp, args.seed)
    ref_none = bm.reference_result(inp, {}, dout)
    rows, effect = bm.run_group(cfg, mod, inp, values, dout, args, ref_none)
    assert [(r["pass"], r["method"], r["mod"]) for r in rows] == [
        (p, m, x) for p in ("fwd", "bwd", "fwdbwd")
        for m, x in (("cupy_varlen", "none"), ("cupy_varlen", mod), ("flex", mod))]
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["check_ok"], (r["pass"], r["method"], r["mod"], r["check_errors"])
        assert r["median_ms"] > 0 and r["tflops"] > 0
        want = {"out"} if r["pass"] == "fwd" else {"dq", "dk", "dv"}
        if r["pass"] != "fwd" and r["mod"] == "sinks":
            want.add("dsinks")
        assert set(r["check_errors"]) == want
        assert max(r["check_errors"].values()) < 1e-4  # float32 and eager flex vs float64
    assert effect["out"] > 1e-2 and set(effect) == {"out", "dq", "dk", "dv"}
    lines = bm.summarize(rows, cfg.name)
    assert len(lines) == 3 and all(s["cost"] is not None and s["speedup_vs_flex"] for s in lines)


@pytest.mark.parametrize("mod", bm.MODS)
def test_a_kernel_that_ignores_its_modifier_fails_the_check(mod, monkeypatch):
    _cpu_stand_ins(monkeypatch, ignore_modifier=True)
    lengths, heads = [64, 96], 4
    cfg = bv.BenchConfig("t_full", lengths, lengths, heads, heads, 16)
    q, k, v, cu = _flex_inputs(lengths, heads, heads, 16, logit_scale=4.0, seed=4)
    inp = bv.Inputs(cfg, *(x.float() for x in (q, k, v)), cu, cu)
    args = bm.parse_args(["--passes", "fwd", "--methods", "cupy_varlen", "--check"])
    values = bm.make_modifiers(cfg, args, device="cpu")
    ref_none = bm.reference_result(inp, {})
    rows, _ = bm.run_group(cfg, mod, inp, values, bm.fixed_dout(inp, 0), args, ref_none)
    none, wrong = rows
    assert none["check_ok"] and wrong["mod"] == mod
    assert wrong["check_ok"] is False and wrong["check_decisive"]
    payload = {"results": [{"config": cfg.name, "rows": rows}]}
    assert bm.failed_checks(payload) == [(cfg.name, "fwd", mod, "cupy_varlen")]
