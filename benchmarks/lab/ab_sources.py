"""Interleaved A/B timing of kernel variants against each other and torch, in one process.

    python benchmarks/lab/ab_sources.py VARIANT [VARIANT ...] [--configs NAME ...] [--runs N]

A variant is one or more parts joined by '+':
  tree                       the working tree as it is;
  DIR                        a directory whose files replace the cuda_src/ files of the same name
                             (a copy of fwd_sm90.cu with one change, say);
  tiles:KEY:D:BMxBNsS[:W]    a forward TileConfig override (benchmark tuning hook of _spec): KEY is
                             "sm90" or an arch, D the head-dim tile, BM x BN tiles, S stages, W
                             warps (default: one producer plus BM / 64 consumer warpgroups for
                             sm90, 4 otherwise), e.g. tiles:sm90:64:128x128s6.
Give the same variant twice (e.g. `tree tree`, reported as tree and tree') to see the spread between
identical kernels in the run: a difference between variants smaller than that spread is noise.

Why interleaved: the H100 clocks drift as it heats, within seconds of sustained load. Timing one
method for N calls and then the next favours whichever runs first; here call r of every variant
and of torch's varlen_attn runs back to back, so drift spreads evenly. Each timed call is one CUDA
event pair around one forward (medians reported), preceded by an untimed call of the same variant
(switching variants re-dispatches; the timed call then finds its kernel cached); the order rotates
every round, because the call timed first in a round reads a few percent faster. The first output
of every variant is compared with the float64 reference for configs of at most 40k tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Run from a source checkout: the package sits at the repository root (two levels up) and
# bench_varlen.py in benchmarks/ (one level up).
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

REFERENCE_MAX_TOKENS = 40_000
DEFAULT_CONFIGS = ("b32_8k_d64_full", "b32_8k_d64_causal", "b32_8k_d128_full",
                   "b32_8k_d128_causal")


def parse_tiles(part: str):
    """'tiles:KEY:D:BMxBNsS[:W]' -> ((KEY, D), TileConfig)."""
    from cupy_varlen import _spec

    fields = part.split(":")
    if len(fields) not in (4, 5):
        raise SystemExit(f"bad tiles part {part!r}: want tiles:KEY:D:BMxBNsS[:W]")
    key, tile, shape = fields[1], int(fields[2]), fields[3]
    bm, rest = shape.split("x")
    bn, stages = rest.split("s")
    bm, bn, stages = int(bm), int(bn), int(stages)
    warps = int(fields[4]) if len(fields) == 5 else (4 * (1 + bm // 64) if key == "sm90" else 4)
    return (key, tile), _spec.TileConfig(bm, bn, warps, stages, 1)


class Variants:
    """Applies one variant at a time by swapping source text and tile overrides in place."""

    def __init__(self, names):
        from cupy_varlen import _build

        self._read_source = _build._read_source
        # Which compiled source each variant ran (short cache keys), recorded as kernels load:
        # two variants that differ in their files yet ran one key would be timing one kernel.
        self.keys = {}
        self.current = None
        compile_spec = _build.compile_spec

        def recording_compile(spec, **kwargs):
            compiled = compile_spec(spec, **kwargs)
            self.keys.setdefault(self.current, set()).add(compiled.key[:10])
            return compiled

        _build.compile_spec = recording_compile
        self.parts = {}  # label -> (files, tiles); a repeated name gets a label of its own
        for name in names:
            label = name
            while label in self.parts:
                label += "'"
            files, tiles = {}, {}
            for part in name.split("+"):
                if part == "tree":
                    continue
                if part.startswith("tiles:"):
                    key, cfg = parse_tiles(part)
                    tiles[key] = cfg
                elif os.path.isdir(part):
                    files.update({p.name: p.read_text() for p in Path(part).iterdir()
                                  if p.is_file()})
                else:
                    raise SystemExit(f"variant part {part!r}: not 'tree', tiles:..., or a directory")
            self.parts[label] = (files, tiles)

    def use(self, label):
        from cupy_varlen import _api, _build, _spec

        files, tiles = self.parts[label]
        self.current = label
        _build._read_source = lambda src, files=files: files.get(src) or self._read_source(src)
        _spec.tile_overrides.clear()
        _spec.tile_overrides.update(tiles)
        _api.clear_caches()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--kernel", choices=("auto", "sm80", "sm90"), default="auto",
                    help="forward kernel family for every variant (as CUPY_VARLEN_FWD_KERNEL)")
    args = ap.parse_args()

    import torch
    from torch.nn.attention.varlen import varlen_attn as torch_varlen

    import cupy_varlen
    from bench_varlen import grid_configs, make_inputs, time_rotated
    from cupy_varlen.reference import varlen_attn_reference

    from cupy_varlen import _spec

    _spec.forward_kernel = args.kernel
    variants = Variants(args.variants)
    grid = grid_configs()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, runs {args.runs}, "
          f"forward kernel {args.kernel}")
    for name in args.configs:
        cfg = grid[name]
        inp = make_inputs(cfg, "bf16")
        q, k, v, cu_q, cu_k = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k
        window = (-1, 0) if cfg.causal else (-1, -1)
        fns = {var: (lambda: cupy_varlen.varlen_attn(q, k, v, cu_q, cu_k, inp.max_q, inp.max_k,
                                                     causal=cfg.causal))
               for var in variants.parts}
        fns["torch"] = lambda: torch_varlen(q, k, v, cu_q, cu_k, inp.max_q, inp.max_k,
                                            window_size=window)
        errors = {}
        if q.shape[0] <= REFERENCE_MAX_TOKENS:
            ref = varlen_attn_reference(q.double(), k.double(), v.double(), cu_q, cu_k,
                                        causal=cfg.causal)
            for var, fn in fns.items():
                if var != "torch":
                    variants.use(var)
                errors[var] = ((fn().double() - ref).norm() / ref.norm()).item()
        times = time_rotated(fns, args.runs, args.warmup,
                             before=lambda var: variants.use(var) if var != "torch" else None)
        tflops = {var: cfg.flops() / sorted(t)[len(t) // 2] / 1e9 for var, t in times.items()}
        print(f"{name:22s} " + "  ".join(f"{var} {tf:.0f}" for var, tf in tflops.items())
              + " TF/s | vs torch " + "  ".join(f"{var} {tflops[var] / tflops['torch']:.3f}"
                                              for var in variants.parts)
              + ("" if not errors else " | rel. error " + "  ".join(
                  f"{var} {e:.2e}" for var, e in errors.items())), flush=True)
        print("  kernels: " + "  ".join(f"{var} {','.join(sorted(variants.keys.get(var, ())))}"
                                       for var in variants.parts), flush=True)
        variants.keys.clear()
        del inp, fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
