"""Interleaved A/B of the working tree against another revision of the package, forward and
functional backward, in one process.

    git archive REV cupy_varlen cuda_src | tar -x -C DIR      # once, on a machine with the repository
    python benchmarks/lab/ab_revisions.py [DIR ...] [--self-check] [--configs NAME ...] [--runs N]
        [--json OUT]

Each DIR holds another revision's ``cupy_varlen/`` and ``cuda_src/``. Its package is imported under
a name of its own (the directory's name) without its torch integration (whose custom ops would
collide with the tree's), so all run eager calls side by side. Each config times, interleaved and
rotated (bench_varlen.time_rotated): the tree twice (``tree`` and ``tree'``: their spread is the
noise), each other revision, and torch's varlen_attn, for the forward and then for the backward
from the same out and lse. A change is neutral where ``DIR / tree`` stays within the tree-to-tree
spread.

Calibrate first with ``--self-check``, which imports the tree's own package as one more revision
(``self``): on the H200 (2026-12-02) revisions with the tree's very forward kernels read 1.7-6%
slower than the tree on the large forward configs, so ``self / tree`` is the bar a revision must
beat, not 1.

Why not ab_sources.py: that swaps cuda_src files under the tree's Python, which cannot express a
change that moves code between the host and the kernels (a new define, a new file layout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

DEFAULT_CONFIGS = ("b32_8k_d128_full", "b32_8k_d128_causal", "b32_8k_d64_full",
                   "b32_8k_d64_causal", "skewed_d128_causal", "gqa_32_8_odd_causal",
                   "many_short_d64_full", "seed_full", "seed_causal")


def import_revision(root: Path, name: str):
    """The package in ``root/cupy_varlen`` as module ``name``, without its torch submodule."""
    pkg_dir = root / "cupy_varlen"
    if not (pkg_dir / "__init__.py").is_file() or not (root / "cuda_src").is_dir():
        raise SystemExit(f"{root}: needs cupy_varlen/ and cuda_src/ of a revision")
    # A None entry makes `from . import _torch` raise ImportError: revisions that import it at load
    # time handle that as "no torch integration"; later ones are told that no call needs it. Their
    # eager paths serve torch tensors all the same.
    sys.modules[f"{name}._torch"] = None
    spec = importlib.util.spec_from_file_location(name, pkg_dir / "__init__.py",
                                                  submodule_search_locations=[str(pkg_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    api = importlib.import_module(f"{name}._api")
    if hasattr(api, "_needs_autograd"):  # revisions that load _torch on the first tensor
        api._needs_autograd = lambda q, k, v: False
    return module


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bases", type=Path, nargs="*", help="directories with other revisions' packages")
    ap.add_argument("--self-check", action="store_true",
                    help="also import the tree's own package as a revision ('self'): self/tree "
                         "shows what the harness does to a revision that differs in nothing")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--deterministic", action="store_true",
                    help="time the deterministic backward (every revision's)")
    ap.add_argument("--json", type=Path, help="write every time here")
    args = ap.parse_args()

    import torch
    from torch.nn.attention.varlen import varlen_attn as torch_varlen

    import cupy_varlen
    from bench_varlen import environment_info, grid_configs, make_inputs, time_rotated

    others = {path.name: import_revision(path.resolve(), f"cv_rev_{i}")
              for i, path in enumerate(args.bases)}
    if args.self_check:
        others["self"] = import_revision(HERE.parent.parent, "cv_rev_self")
    if not others:
        raise SystemExit("nothing to compare: give revision directories or --self-check")
    grid = grid_configs()
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, runs {args.runs}; "
          f"revisions {', '.join(map(str, args.bases))}"
          + ("; deterministic backward" if args.deterministic else ""))
    for name in args.configs:
        cfg = grid[name]
        inp = make_inputs(cfg, "bf16")
        q, k, v, cu_q, cu_k = inp.q, inp.k, inp.v, inp.cu_q, inp.cu_k
        mq, mk, causal = inp.max_q, inp.max_k, cfg.causal
        window = (-1, 0) if causal else (-1, -1)
        packages = {"tree": cupy_varlen, "tree'": cupy_varlen, **others}
        forward = {label: (lambda pkg=pkg: pkg.varlen_attn(q, k, v, cu_q, cu_k, mq, mk,
                                                           causal=causal))
                   for label, pkg in packages.items()}
        forward["torch"] = lambda: torch_varlen(q, k, v, cu_q, cu_k, mq, mk, window_size=window)
        dout = torch.randn_like(q)
        saved = {label: pkg.varlen_attn(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                        return_lse=True) for label, pkg in packages.items()}
        backward = {label: (lambda pkg=pkg, label=label: pkg.varlen_attn_backward(
            dout, q, k, v, *saved[label], cu_q, cu_k, mq, mk, causal=causal,
            deterministic=args.deterministic))
            for label, pkg in packages.items()}
        # The packages must compute the same thing before their times mean anything.
        g_tree = backward["tree"]()
        diff = {}
        for label in others:
            out_tree, out_other = saved["tree"][0].float(), saved[label][0].float()
            g_other = backward[label]()
            diff[label] = (((out_tree - out_other).norm() / out_tree.norm()).item(),
                           max(((a.float() - b.float()).norm() / a.float().norm()).item()
                               for a, b in zip(g_tree, g_other)))
        for pass_, fns in (("fwd", forward), ("bwd", backward)):
            times = time_rotated(fns, args.runs, args.warmup)
            med = {label: sorted(t)[len(t) // 2] for label, t in times.items()}
            which = 0 if pass_ == "fwd" else 1
            row = {"config": name, "pass": pass_, "median_ms": med, "times_ms": times,
                   "rel_diff_vs_tree": {label: d[which] for label, d in diff.items()}}
            rows.append(row)
            noise = abs(med["tree'"] / med["tree"] - 1)
            extra = f"  torch {med['torch']:.3f}" if "torch" in med else ""
            tree = med["tree"]
            print(f"{name:22s} {pass_}  tree {tree:.3f} ms (spread {noise:.3f}){extra} | "
                  + "  ".join(f"{label}/tree {med[label] / tree:.3f} (diff {d[which]:.1e})"
                              for label, d in diff.items()), flush=True)
        del inp, saved, forward, backward
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps({"environment": environment_info(),
                                         "revisions": [str(b) for b in args.bases]
                                         + (["self"] if args.self_check else []),
                                         "runs": args.runs, "deterministic": args.deterministic,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
