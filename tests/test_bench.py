"""The benchmark's command line and its required-method stop (CPU): a run meant to compare against
a peer must stop, not finish without it."""

from __future__ import annotations

import sys

import pytest

from conftest import REPOSITORY

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import bench_varlen  # noqa: E402


def test_required_methods_must_be_selected():
    args = bench_varlen.parse_args(["--require", "fa4", "torch_varlen"])
    assert args.require == ["fa4", "torch_varlen"]
    with pytest.raises(SystemExit) as exc:
        bench_varlen.parse_args(["--methods", "cupy_varlen", "torch_varlen", "--require", "fa4"])
    assert exc.value.code == 2


def test_required_failures_name_the_methods_that_did_not_run():
    def row(method, error=None):
        return {"method": method, "error": error}

    record = {"config": "seed_full",
              "rows": [row("cupy_varlen"), row("fa4", "flash_attn.cute not importable"),
                       row("torch_varlen"), row("flex", "compile too slow")]}
    assert bench_varlen.required_failures(record, ["fa4", "torch_varlen"]) == [
        ("fa4", "flash_attn.cute not importable")]
    assert bench_varlen.required_failures(record, []) == []
    assert bench_varlen.required_failures(record, ["cupy_varlen"]) == []
