"""The decode benchmark's GPU-free parts (CPU): its config grid, byte accounting, the paged pool it
builds (every used key reachable through the page table, pages scattered, spare pages left), the
required-method stop, and the report read back from a saved JSON."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
import torch

from conftest import REPOSITORY
from cupy_varlen.reference import gather_paged_keys, varlen_attn_reference

sys.path.insert(0, str(REPOSITORY / "benchmarks"))

import bench_decode as bd  # noqa: E402
import bench_varlen as bv  # noqa: E402


def test_grid_names_batches_contexts_and_heads():
    grid = bd.grid_configs()
    expected = {f"b{b}_ctx{c}_gqa{h}_8" for b in (1, 8, 64, 256) for c in ("1k", "8k", "32k")
                for h in (32, 64)} | {"b1_ctx128k_gqa32_8", "b1_ctx128k_gqa64_8"}
    expected |= {f"{shape}_gqa{h}_8" for h in (32, 64) for shape in (
        "b8_ctx8k_chunk512", "b8_ctx32k_chunk512", "b1_ctx32k_chunk2048")}
    assert set(grid) == expected and len(grid) == 32
    assert all(c.q_len == 1 for c in grid.values() if "chunk" not in c.name)
    chunk = grid["b8_ctx32k_chunk512_gqa64_8"]
    assert (chunk.batch, chunk.context, chunk.q_len, chunk.heads) == (8, 32768, 512, 64)
    cfg = grid["b64_ctx8k_gqa32_8"]
    assert (cfg.batch, cfg.context, cfg.heads, cfg.heads_kv, cfg.head_dim) == (64, 8192, 32, 8, 128)
    long = grid["b1_ctx128k_gqa64_8"]
    assert (long.batch, long.context, long.heads, long.heads_kv) == (1, 131072, 64, 8)
    for c in grid.values():
        assert c.used == [c.context] * c.batch
        # every slot is a multiple of 256 with a tail past the used keys
        assert all(s % 256 == 0 and s > n for s, n in zip(c.slots, c.used))
    assert [c.name for c in bv.select_configs(["b64_ctx8k"], grid)] == [
        "b64_ctx8k_gqa32_8", "b64_ctx8k_gqa64_8"]
    assert grid["b1_ctx1k_gqa32_8"].slots == [1280]


def test_attended_bytes_on_a_hand_computed_case():
    # keys 3 + 5 = 8, H_kv 2, D 8, K and V, 2 bytes: 8 * 2 * 8 * 2 * 2 = 512;
    # q and out: 2 tensors * 2 sequences * H 4 * D 8 * 2 bytes = 256
    assert bd.attended_bytes([3, 5], heads=4, heads_kv=2, head_dim=8) == {
        "kv": 512, "q_out": 256, "total": 768}
    b = bd.grid_configs()["b1_ctx1k_gqa32_8"].bytes()
    assert b["kv"] == 1024 * 8 * 128 * 2 * 2 and b["q_out"] == 2 * 32 * 128 * 2
    rows = bd.finalize_rows([{"median_ms": 0.5, "gpu_ms": 0.25},
                             {"median_ms": None}], nbytes=2e9, copy_tb_s=5.0)
    assert rows[0]["tb_s"] == pytest.approx(4.0) and rows[0]["gpu_tb_s"] == pytest.approx(8.0)
    assert rows[0]["copy_fraction"] == pytest.approx(0.8) and rows[0]["graph_tb_s"] is None
    assert rows[1]["tb_s"] is None and rows[1]["copy_fraction"] is None
    assert bd.finalize_rows([{"median_ms": 1.0}], 1e9, None)[0]["copy_fraction"] is None


def test_chunked_prefill_counts_query_rows_and_causal_flops():
    # 2 sequences of 5 used keys, the last 3 tokens as queries: rows see 3, 4, 5 keys (12 pairs).
    assert bd.causal_flops([5, 5], q_len=3, heads=2, head_dim=4) == 4 * 24 * 2 * 4
    assert bd.attended_bytes([5, 5], heads=2, heads_kv=1, head_dim=4, q_len=3)["q_out"] == \
        2 * 2 * 3 * 2 * 4 * 2
    cfg = bd.grid_configs()["b1_ctx32k_chunk2048_gqa32_8"]
    assert cfg.flops() == 4 * (2048 * 32768 - 2048 * 2047 // 2) * 32 * 128
    rows = bd.finalize_rows([{"median_ms": 2.0}], nbytes=1e9, copy_tb_s=None, flops=4e12)
    assert rows[0]["tflops"] == pytest.approx(2000.0)
    inp = bd.make_contiguous_inputs(bd.DecodeConfig("t", 3, 40, 4, 2, head_dim=8, q_len=5),
                                    device="cpu")
    assert tuple(inp.q.shape) == (15, 4, 8) and inp.cu_q.tolist() == [0, 5, 10, 15]


def test_page_table_layout_scatters_pages_and_leaves_spares():
    used = [0, 1, 15, 16, 17, 40]
    table, num_pages = bd.page_table_layout(used, 16, seed=3)
    needed = [0, 1, 1, 1, 2, 3]
    assert table.dtype == np.int32 and table.shape == (6, 3)
    assert num_pages == sum(needed) + bd.MIN_SPARE_PAGES
    taken = np.concatenate([table[b, :n] for b, n in enumerate(needed)])
    assert len(set(taken.tolist())) == len(taken) and taken.min() >= 0
    assert taken.max() < num_pages
    assert len(set(range(num_pages)) - set(taken.tolist())) == bd.MIN_SPARE_PAGES
    again, _ = bd.page_table_layout(used, 16, seed=3)
    assert np.array_equal(table, again)

    big, pages = bd.page_table_layout([1000] * 4, 16, seed=0)
    flat = big.reshape(-1)
    assert pages - flat.size == max(bd.MIN_SPARE_PAGES, flat.size // bd.SPARE_PAGE_DIVISOR)
    assert not np.array_equal(flat, np.sort(flat)), "pages are not shuffled"
    assert not np.array_equal(big, bd.page_table_layout([1000] * 4, 16, seed=1)[0])


@pytest.mark.parametrize("page_size", [4, 16, 64])
def test_paged_pool_holds_the_contiguous_keys(page_size):
    cfg = bd.DecodeConfig("tiny", batch=3, context=37, heads=4, heads_kv=2, head_dim=16)
    cont = bd.make_contiguous_inputs(cfg, seed=1, device="cpu")
    assert cont.k.shape == (3 * 256, 2, 16) and cont.cu_k.tolist() == [0, 256, 512, 768]
    assert cont.seqused_k.tolist() == [37] * 3 and cont.cu_q.tolist() == [0, 1, 2, 3]
    paged = bd.make_paged_inputs(cont, page_size, seed=1, chunk_rows=7)
    assert paged.cu_k is None and paged.layout == f"paged {page_size}"
    assert paged.k.shape[1:] == (page_size, 2, 16) and paged.block_table.dtype == torch.int32
    assert paged.max_k == 37 and cont.max_k == 256

    starts = cont.cu_k.tolist()[:-1]
    for pool, dense in ((paged.k, cont.k), (paged.v, cont.v)):
        packed, cu = gather_paged_keys(pool, paged.block_table, paged.seqused_k)
        assert cu.tolist() == [0, 37, 74, 111]
        assert torch.equal(packed, torch.cat([dense[s:s + 37] for s in starts]))
    taken = set(paged.block_table.reshape(-1).tolist())
    unused = sorted(set(range(paged.k.shape[0])) - taken)
    assert unused, "the pool has no spare page"
    assert not paged.k[unused].any() and not paged.v[unused].any()

    ref = varlen_attn_reference(cont.q, cont.k, cont.v, cont.cu_q, cont.cu_k, causal=True,
                                seqused_k=cont.seqused_k)
    got = bd.reference_output(paged)
    assert torch.allclose(got, ref, rtol=0, atol=1e-12)


def _fake_varlen_attn(calls, with_block_table):
    if with_block_table:
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, seqused_k=None,
                        block_table=None):
            calls.append(dict(cu_k=cu_k, max_q=max_q, max_k=max_k, causal=causal,
                              seqused_k=seqused_k, block_table=block_table))
            return q
    else:
        def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, causal=False, seqused_k=None):
            calls.append(dict(cu_k=cu_k, max_k=max_k, seqused_k=seqused_k))
            return q
    return varlen_attn


def test_cupy_varlen_paged_is_unavailable_until_varlen_attn_takes_block_table(monkeypatch):
    import cupy_varlen

    cfg = bd.DecodeConfig("tiny", batch=2, context=20, heads=4, heads_kv=2, head_dim=16)
    cont = bd.make_contiguous_inputs(cfg, device="cpu")
    paged = bd.make_paged_inputs(cont, 8)
    calls = []
    monkeypatch.setattr(cupy_varlen, "varlen_attn", _fake_varlen_attn(calls, False))
    with pytest.raises(bv.Unavailable, match="block_table not supported yet"):
        bd.prepare_cupy_varlen(paged)
    bd.prepare_cupy_varlen(cont).fn()
    assert calls[-1]["cu_k"] is cont.cu_k and calls[-1]["max_k"] == 256
    assert calls[-1]["seqused_k"] is cont.seqused_k

    monkeypatch.setattr(cupy_varlen, "varlen_attn", _fake_varlen_attn(calls, True))
    bd.prepare_cupy_varlen(paged).fn()
    assert calls[-1] == dict(cu_k=None, max_q=1, max_k=20, causal=True,
                             seqused_k=paged.seqused_k, block_table=paged.block_table)


def test_torch_varlen_says_what_this_torch_lacks_and_which_path_runs(monkeypatch):
    cfg = bd.DecodeConfig("tiny", batch=2, context=20, heads=4, heads_kv=2, head_dim=16)
    cont = bd.make_contiguous_inputs(cfg, device="cpu")
    paged = bd.make_paged_inputs(cont, 8)
    calls = []

    def new_torch(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False,
                  seqused_k=None, block_table=None):
        calls.append(dict(cu_k=cu_k, max_k=max_k, window_size=window_size,
                          enable_gqa=enable_gqa, block_table=block_table))

    def old_torch(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, enable_gqa=False):
        raise AssertionError("not to be called")

    monkeypatch.setattr(bv, "_torch_varlen_fn", lambda: old_torch)
    lacks = re.escape(f"torch {torch.__version__}: varlen_attn has no seqused_k")
    with pytest.raises(bv.Unavailable, match=lacks + "$"):
        bd.prepare_torch_varlen(cont)
    with pytest.raises(bv.Unavailable, match="no seqused_k, block_table"):
        bd.prepare_torch_varlen(paged)

    monkeypatch.setattr(bv, "_torch_varlen_fn", lambda: new_torch)
    prepared = bd.prepare_torch_varlen(paged)
    assert "aten._flash_attention_forward" in prepared.note or "cuDNN" in prepared.note
    assert "block_table" in prepared.note and "window_size=(-1, 0)" in prepared.note
    prepared.fn()
    assert calls[-1]["cu_k"].tolist() == [0, 20, 40]  # offsets of seqused_k
    assert calls[-1]["block_table"] is paged.block_table and calls[-1]["enable_gqa"]
    bd.prepare_torch_varlen(cont).fn()
    assert calls[-1]["cu_k"] is cont.cu_k and calls[-1]["max_k"] == 256


def _run_dry(monkeypatch, tmp_path, *extra):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "run.json"
    bd.main(["--device", "cpu", "--configs", "b1_ctx1k", "--out", str(out), *extra])
    return out


def test_require_stops_after_the_first_config_where_a_method_did_not_run(
        monkeypatch, tmp_path, capsys):
    def unavailable(inp):
        raise bv.Unavailable("flash_attn.cute not importable: (test)")

    monkeypatch.setitem(bd.PREPARE, "fa4", unavailable)
    out = tmp_path / "run.json"
    with pytest.raises(SystemExit) as exc:
        _run_dry(monkeypatch, tmp_path, "--methods", "cupy_varlen", "fa4", "--require", "fa4")
    assert exc.value.code == 2
    assert "fa4: flash_attn.cute not importable: (test)" in capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    assert [r["config"] for r in results] == ["b1_ctx1k_gqa32_8"]  # of two selected
    by = {r["method"]: r for r in results[0]["rows"]}
    assert by["cupy_varlen"]["error"] is None and "dry run" in by["cupy_varlen"]["note"]
    assert by["fa4"]["error"] == "flash_attn.cute not importable: (test)"

    # the same run without the requirement, or requiring only what ran, goes through
    for extra in ([], ["--require", "cupy_varlen"]):
        _run_dry(monkeypatch, tmp_path, "--methods", "cupy_varlen", "fa4", *extra)
        assert len(json.loads(out.read_text())["results"]) == 2


def test_require_a_paged_method_that_is_not_implemented(monkeypatch, tmp_path, capsys):
    import cupy_varlen

    monkeypatch.setattr(cupy_varlen, "varlen_attn", _fake_varlen_attn([], False))
    with pytest.raises(SystemExit) as exc:
        _run_dry(monkeypatch, tmp_path, "--methods", "cupy_varlen", "cupy_varlen_paged",
                 "--page-sizes", "16", "--require", "cupy_varlen_paged")
    assert exc.value.code == 2
    assert "cupy_varlen_paged: block_table not supported yet" in capsys.readouterr().err


def test_parse_args_rejects_requirements_outside_the_methods_and_bad_page_sizes():
    args = bd.parse_args(["--methods", "fa4", "cupy_varlen", "--require", "fa4"])
    assert args.methods == ["cupy_varlen", "fa4"] and args.page_sizes == [16, 256]
    for argv in (["--methods", "cupy_varlen", "--require", "fa4"], ["--page-sizes", "0"]):
        with pytest.raises(SystemExit) as exc:
            bd.parse_args(argv)
        assert exc.value.code == 2


def test_json_round_trip_through_from_json(monkeypatch, tmp_path, capsys):
    import cupy_varlen

    monkeypatch.setattr(cupy_varlen, "varlen_attn", _fake_varlen_attn([], False))
    out = _run_dry(monkeypatch, tmp_path, "--methods", "cupy_varlen", "cupy_varlen_paged",
                   "--check")
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "bench_decode" and payload["environment"]["device"]
    assert payload["args"]["check"] and payload["date"] and "--device cpu" in payload["command"]
    first = payload["results"][0]
    # the two layouts hold the same keys: their references agree
    assert set(first["paged_reference_vs_contiguous"]) == {"paged 16", "paged 256"}
    assert max(first["paged_reference_vs_contiguous"].values()) < 1e-12
    assert [(r["method"], r["layout"]) for r in first["rows"]] == [
        ("cupy_varlen", "contiguous"), ("cupy_varlen_paged", "paged 16"),
        ("cupy_varlen_paged", "paged 256")]

    # numbers as a GPU run would have left them: 4210688 bytes in 2 µs = 2.11 TB/s, 53 % of 4
    payload["copy_bandwidth"] = {"tb_s": 4.0, "buffer_bytes": 1 << 31, "median_ms": 1.07}
    first["rows"][0]["median_ms"] = 0.002
    bd.finalize_rows(first["rows"], first["params"]["bytes"]["total"], 4.0)
    bv.write_json(payload, out)
    capsys.readouterr()
    bd.main(["--from-json", str(out)])
    text = capsys.readouterr().out
    assert "copy bandwidth: 4.00 TB/s (2 GiB buffer" in text
    assert "--- b1_ctx1k_gqa32_8 (4.2 MB) ---" in text and "b1_ctx1k_gqa64_8" in text
    assert "2.11 (53%)" in text
    assert text.count("UNAVAILABLE: block_table not supported yet") == 4  # 2 configs x 2 sizes


def test_plot_from_json(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    out = _run_dry(monkeypatch, tmp_path, "--methods", "cupy_varlen")
    bd.main(["--from-json", str(out), "--plot"])
    assert out.with_suffix(".png").stat().st_size > 0
