"""Offline search for the sm80 forward kernel's tile table (cupy_varlen/_spec.py: _TILE_TABLES).
(The sm90 kernel's few tiles, _TILES_WGMMA, were chosen by measurement: docs/performance.md.)

For every architecture and head-dim tile, walks an ordered list of candidate tile shapes (largest
tiles and deepest pipelines first) and keeps the first that (a) fits the shared memory budget with
the CTAs per SM it was sized for, and (b) compiles with no register spills for every dtype and mask
kind, as ptxas reports it. Needs no GPU: NVRTC compiles for any target.

    python benchmarks/lab/tune_tiles.py [--archs sm_90a sm_80 ...] [--jobs 2]

Prints the table as Python to paste into _spec.py. The CPU tests re-check the shipped table.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Run from a source checkout without installing: the package sits two levels up.
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
if (_REPO_ROOT / "cupy_varlen").is_dir() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from cupy_varlen import _build, _spec  # noqa: E402
from cupy_varlen._spec import TileConfig  # noqa: E402

# Shared memory per SM (bytes), from the CUDA programming guide; each CTA also reserves 1 KB.
SMEM_PER_SM = {"sm_80": 164 * 1024, "sm_86": 100 * 1024, "sm_89": 100 * 1024, "sm_90a": 228 * 1024}


def candidates(tile: int):
    """Tile shapes in order of preference (measured on the H100, docs/performance.md), each with
    the QK^T unroll factors to try. Fields: block_m, block_n, warps, stages, min_blocks, sub_n."""
    unrolls = (0, 2, 1, 3, 4)
    if tile <= 64:
        shapes = [(128, 128, 4, 2, 2, 64), (128, 64, 4, 2, 2, 0), (128, 128, 4, 2, 2, 32)]
    elif tile <= 128:
        shapes = [(128, 64, 4, 2, 2, 0), (128, 64, 4, 2, 2, 32), (128, 32, 4, 2, 2, 0),
                  (128, 64, 4, 1, 2, 0), (128, 64, 8, 2, 1, 0), (64, 64, 4, 2, 2, 0)]
    else:
        shapes = [(128, 64, 8, 2, 1, 0), (128, 64, 8, 1, 1, 0), (128, 32, 8, 2, 1, 0),
                  (64, 64, 4, 1, 1, 0)]
    for block_m, block_n, warps, stages, min_blocks, sub_n in shapes:
        for u in unrolls:
            yield TileConfig(block_m, block_n, warps, stages, min_blocks, qk_unroll=u, sub_n=sub_n)


def fits(arch: str, tile: int, cfg: TileConfig) -> bool:
    smem = tile * 2 * (cfg.block_m + 2 * cfg.stages * cfg.block_n)
    return (
        smem <= _spec.SMEM_LIMIT[arch]
        and cfg.min_blocks * (smem + 1024) <= SMEM_PER_SM[arch]
        and cfg.block_m % (cfg.warps * 16) == 0
        and (cfg.keys_per_subtile == cfg.block_n or cfg.stages >= 2)
    )


def spill_free(arch: str, tile: int, cfg: TileConfig):
    regs = []
    for dtype in _spec.DTYPES:
        for windowed in (False, True):
            spec = _spec.FwdSpec(dtype, tile, cfg, windowed, arch)
            usage = _build.compile_spec(spec, use_disk_cache=False).usage[spec.kernel_name]
            if usage.spills:
                return None
            regs.append(usage.registers)
    return max(regs)


def search(job):
    arch, tile = job
    for cfg in candidates(tile):
        if fits(arch, tile, cfg):
            regs = spill_free(arch, tile, cfg)
            if regs is not None:
                return arch, tile, cfg, regs
    return arch, tile, None, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(_spec.ARCHS))
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    jobs = [(a, t) for a in args.archs for t in _spec.HEAD_DIM_TILES]
    with ProcessPoolExecutor(args.jobs) as ex:
        results = list(ex.map(search, jobs))
    for arch in args.archs:
        print(f"# {arch}")
        for a, tile, cfg, regs in results:
            if a == arch:
                print(f"    {tile}: {cfg!r},  # {regs} registers")


if __name__ == "__main__":
    main()
