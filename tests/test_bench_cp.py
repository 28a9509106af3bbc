"""bench_cp's command line, batch and its --smoke run end to end (CPU processes, gloo)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import REPOSITORY

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import bench_cp  # noqa: E402
from cupy_varlen.distributed import SCHEMES  # noqa: E402


def test_defaults_are_the_issue_batch():
    args = bench_cp.parse_args([])
    assert tuple(args.schemes) == bench_cp.SCHEMES == SCHEMES
    assert (args.tokens, args.min_doc, args.max_doc) == (256 * 1024, 1024, 64 * 1024)
    assert (args.heads, args.heads_kv, args.head_dim, args.full) == (32, 8, 128, False)


@pytest.mark.parametrize("argv", [["--heads", "6", "--heads-kv", "4"],
                                  ["--min-doc", "9", "--max-doc", "8"], ["--runs", "0"]])
def test_bad_arguments_stop(argv):
    with pytest.raises(SystemExit):
        bench_cp.parse_args(argv)


def test_document_lengths_fill_the_batch():
    lengths = bench_cp.document_lengths(256 * 1024, 1024, 64 * 1024, seed=0)
    assert sum(lengths) == 256 * 1024
    assert all(1024 <= n <= 64 * 1024 for n in lengths[:-1]) and 1 <= lengths[-1] <= 64 * 1024
    assert lengths == bench_cp.document_lengths(256 * 1024, 1024, 64 * 1024, seed=0)


def test_smoke_run_writes_every_field(tmp_path):
    out = tmp_path / "cp.json"
    bench_cp.main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["world"] == 2 and sum(result["local_tokens"]) == result["batch"]["tokens"]
    assert sum(result["batch"]["lengths"]) == result["batch"]["tokens"]
    assert set(result["schemes"]) == {"allgather", "ring"}
    for scheme in result["schemes"].values():
        assert scheme["step_ms"] == max(scheme["step_ms_per_rank"]) > 0
        assert scheme["throughput_ratio"] == pytest.approx(result["one_gpu_ms"] /
                                                           scheme["step_ms"])
    assert 0 < result["comm_share"] and result["one_gpu_ms"] > 0
    assert len(result["ring_hops_ms_per_rank"]) == 2 and min(result["ring_hops_ms_per_rank"]) > 0
