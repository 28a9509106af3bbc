"""Sweep of the decode tiles' shape (cupy_varlen/_spec.py: _decode_tiles) on the GPU: for each
candidate (keys per tile, K/V ring depth, CTAs per SM) that fits shared memory and compiles
without spills, the TB/s of bench_decode's configs, contiguous and paged, in one process.

    python benchmarks/lab/decode_tiles.py [--configs b64_ctx8k_gqa32_8 ...] [--page-sizes 16 256]
        [--runs 20] [--json OUT]

Each candidate replaces the table's entry through ``_spec.tile_overrides[("decode", arch,
tile)]`` (launch plans are cleared between candidates); the first row is the table's own choice.
The split count follows the candidate's CTAs per SM (_launch.decode_splits).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(_REPO_ROOT))
sys.path.insert(0, str(_REPO_ROOT / "benchmarks"))

import bench_decode as bd  # noqa: E402

DEFAULT_CONFIGS = ("b64_ctx8k_gqa32_8", "b8_ctx32k_gqa32_8", "b1_ctx128k_gqa32_8",
                   "b256_ctx1k_gqa32_8")


def candidates(arch: str, tile: int):
    """(block_n, stages, min_blocks) shapes that fit the SM's shared memory, the table's first."""
    from cupy_varlen import _spec

    table = _spec._decode_tiles(arch, tile)
    shapes = [table]
    per_sm = _spec.SMEM_LIMIT[arch] + 1024
    for block_n in (64, 128):
        for stages in (2, 3, 4, 5):
            for blocks in (1, 2, 3):
                smem = tile * 2 * (_spec.DECODE_BLOCK_M + 2 * stages * block_n)
                if smem > _spec.SMEM_LIMIT[arch] or blocks * (smem + 1024) > per_sm:
                    continue
                shape = _spec.TileConfig(_spec.DECODE_BLOCK_M, block_n, 4, stages, blocks,
                                         table.qk_unroll)
                if shape not in shapes:
                    shapes.append(shape)
    return shapes


def _no_spills(log: str) -> bool:
    import re

    return all(int(n) == 0 for n in re.findall(r"(\d+) bytes spill stores", log))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--page-sizes", nargs="+", type=int, default=[16, 256])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    import torch

    from cupy_varlen import _api, _build, _spec

    arch = _api._device_arch(torch.cuda.current_device())
    tile = _spec.head_dim_tile(bd.HEAD_DIM)
    configs = bd.grid_configs()
    bench_args = argparse.Namespace(runs=args.runs, warmup=5, timer="do_bench", host_calls=0,
                                    gpu_calls=0, graph=False)
    rows = []
    for shape in candidates(arch, tile):
        spec = _spec.choose_fwd_spec("bf16", tile, True, arch, decode=True)
        spec = type(spec)(spec.dtype, spec.head_dim_tile, shape, True, arch, "sm80", False, True)
        if not _no_spills(_build.compile_spec(spec).log):
            print(f"{shape}: spills, skipped", flush=True)
            continue
        _spec.tile_overrides[("decode", arch, tile)] = shape
        _api.clear_caches()
        for name in args.configs:
            cfg = configs[name]
            contiguous = bd.make_contiguous_inputs(cfg)
            layouts = [contiguous] + [bd.make_paged_inputs(contiguous, p) for p in args.page_sizes]
            for inp in layouts:
                fn = bd.prepare_cupy_varlen(inp).fn
                ms = bd.measure(fn, bench_args)["median_ms"]
                tb = bd.tb_per_s(cfg.bytes()["total"], ms)
                rows.append(dict(block_n=shape.block_n, stages=shape.stages,
                                 min_blocks=shape.min_blocks, config=name, layout=inp.layout,
                                 median_ms=ms, tb_s=tb))
                print(f"n{shape.block_n} s{shape.stages} b{shape.min_blocks}  {name:22s} "
                      f"{inp.layout:10s} {tb:5.2f} TB/s", flush=True)
            del contiguous, layouts
            torch.cuda.empty_cache()
    _spec.tile_overrides.pop(("decode", arch, tile), None)
    _api.clear_caches()
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
