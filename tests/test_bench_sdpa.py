"""bench_sdpa's command line, config grid and FLOP counts (CPU)."""

from __future__ import annotations

import sys

import pytest

from conftest import REPOSITORY

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import bench_sdpa  # noqa: E402


def test_default_grid():
    args = bench_sdpa.parse_args([])
    assert args.methods == ["cupy_varlen", "torch_flash", "cudnn"]
    assert args.passes == ["fwd", "bwd"] and args.layout == "bshd" and not args.no_varlen
    # 5 lengths x 2 head dims x full/causal, every config 16k tokens of model dim 2048
    assert len(args.configs) == 20
    for cfg in args.configs:
        assert cfg.batch * cfg.length == 16384 and cfg.heads * cfg.head_dim == 2048
    assert {c.length for c in args.configs} == {1024, 2048, 4096, 8192, 16384}
    assert {(c.head_dim, c.heads) for c in args.configs} == {(64, 32), (128, 16)}


def test_selection_and_order():
    args = bench_sdpa.parse_args(["--lengths", "4096", "--head-dims", "128", "--masks",
                                  "causal", "--passes", "bwd", "--methods", "cudnn",
                                  "cupy_varlen", "--layout", "bhsd", "--no-varlen"])
    assert args.methods == ["cupy_varlen", "cudnn"] and args.layout == "bhsd"
    (cfg,) = args.configs
    assert (cfg.batch, cfg.heads, cfg.length, cfg.head_dim, cfg.causal) == (4, 16, 4096, 128,
                                                                              True)
    assert cfg.name == "L4096_B4_H16_D128_causal"


def test_flops():
    full = bench_sdpa.SdpaConfig(batch=2, heads=3, length=4, head_dim=8, causal=False)
    causal = bench_sdpa.SdpaConfig(batch=2, heads=3, length=4, head_dim=8, causal=True)
    assert full.flops("fwd") == 4 * 2 * 3 * 8 * 16
    assert causal.flops("fwd") == 4 * 2 * 3 * 8 * 10
    assert full.flops("bwd") == 2.5 * full.flops("fwd")


@pytest.mark.parametrize("argv", [
    ["--lengths", "3000"],                                     # 16384 is not a multiple
    ["--tokens", "1024", "--lengths", "2048"],                 # longer than the token budget
    ["--head-dims", "96", "--model-dim", "2000"],              # H * D must be the model dim
    ["--require", "varlen_torch", "--no-varlen"],              # required but not run
    ["--require", "cudnn", "--methods", "cupy_varlen"],
    ["--passes", "fwdbwd"],
])
def test_bad_arguments_stop(argv):
    with pytest.raises(SystemExit) as exc:
        bench_sdpa.parse_args(argv)
    assert exc.value.code == 2


def test_rows_table_and_speedups():
    import torch

    cfg = bench_sdpa.SdpaConfig(batch=1, heads=1, length=1024, head_dim=64, causal=False)
    rows = [bench_sdpa._row("cupy_varlen", cfg, "fwd", {"median_ms": 1.0}),
            bench_sdpa._row("torch_flash", cfg, "fwd", {"median_ms": 1.5}),
            bench_sdpa._row("cudnn", cfg, "fwd", error="not available")]
    ones = torch.ones(4)
    bench_sdpa._add_speedups(rows, "fwd", {"cupy_varlen": ones * 1.01, "torch_flash": ones},
                             "torch_flash")
    assert rows[0]["speedup_vs_torch_flash"] == pytest.approx(1.5)
    assert rows[0]["rel_diff_vs_baseline"] == pytest.approx(0.01)
    assert rows[1]["speedup_vs_torch_flash"] == pytest.approx(1.0)
    assert "speedup_vs_torch_flash" not in rows[2]
    assert rows[0]["tflops"] == pytest.approx(4 * 64 * 1024 ** 2 / 1e-3 / 1e12)
    table = bench_sdpa.rows_table(rows)
    assert "cupy_varlen" in table and "1.50" in table and "not available" in table


def test_backward_pass_uses_one_dout_for_every_method():
    # Each method's gradients are compared with the baseline's: they must come from the same dout.
    torch = pytest.importorskip("torch")
    x = torch.randn(5, 7, requires_grad=True)

    def grads(forward):
        return bench_sdpa._pass_fn(forward, [x], "bwd", seed=3)()[0]

    first = grads(lambda: x * 2.0)
    assert torch.equal(first, grads(lambda: 2.0 * x))
    assert not torch.equal(first, bench_sdpa._pass_fn(lambda: x * 2.0, [x], "bwd", seed=4)()[0])
    forward = x.sum
    assert bench_sdpa._pass_fn(forward, [x], "fwd", seed=3) is forward
