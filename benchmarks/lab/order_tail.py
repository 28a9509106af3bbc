"""How much of a grid's time the head order's tail costs, by simulation (no GPU).

    python benchmarks/lab/order_tail.py [--configs skewed_d128 seed ...] [--sms 132]

Models the sm90 kernels' grids as list scheduling: items in the grid's order (cuda_src/scheduler.cuh,
HeadOrder: lead groups of heads, each group's tiles longest first and its heads side by side, then
a last group), each taken by the first SM to come free, each costing the schedule's tile cost
(key tiles a query tile visits, forward; query tiles a key tile visits, backward; plus one).
Prints, per config and pass, the share of the SMs' time that is work (1.0: no tail) head by head
and with the last group the schedule kernel picks (last_group_heads, kTailCover). L2 is not
modelled: the lead groups stay one K/V head wide where the data the running tiles share would not
fit, and the last group widens only by as much as the tail needs.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

TAIL_COVER = 2  # cuda_src/scheduler.cuh: kTailCover


def tile_costs(rows, cols, block_rows, block_cols, causal):
    """Schedule cost of each row tile of one head (bottom-right causal): the column tiles it
    visits, plus one. Forward: rows are queries; backward: rows are keys and the mask transposed."""
    costs = []
    for lr, lc in zip(rows, cols):
        for start in range(0, lr, block_rows):
            last = min(lc, start + block_rows + lc - lr) if causal else lc
            costs.append(max(0, -(-last // block_cols)) + 1)
    return costs


def key_tile_costs(lens_q, lens_k, block_n, block_m, causal):
    costs = []
    for lq, lk in zip(lens_q, lens_k):
        for n0 in range(0, lk, block_n):
            first = max(0, n0 - (lk - lq)) if causal else 0
            costs.append(max(0, -(-(lq - first) // block_m)) + 1)
    return costs


def last_group_heads(costs, heads, group, sms):
    need = -(-TAIL_COVER * max(costs) * sms // sum(costs))
    last = min(heads, max(need, group))
    return heads - (heads - last) // group * group


def grid_order(costs, heads, group, last, heads_per_item=1):
    """Item costs in HeadOrder's order; each head stands for ``heads_per_item`` items a rank."""
    ordered = sorted(costs, reverse=True)
    sizes = [group] * ((heads - last) // group) + [last]
    return [c for size in sizes for c in ordered for _ in range(size * heads_per_item)]


def work_share(order, sms):
    free = [0.0] * sms
    for cost in order:
        heapq.heapreplace(free, free[0] + cost)
    return sum(order) / (sms * max(free))


def main():
    import bench_varlen as bv

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(bv.grid_configs()))
    ap.add_argument("--sms", type=int, default=132)
    args = ap.parse_args()
    for cfg in bv.select_configs(args.configs, bv.grid_configs()):
        lq, lk = cfg.lengths_q, cfg.lengths_k
        hpk = cfg.heads // cfg.heads_kv
        passes = (("fwd", tile_costs(lq, lk, 128, 128, cfg.causal), hpk),
                  ("bwd", key_tile_costs(lq, lk, 128, 64, cfg.causal), 1))
        for name, costs, per_item in passes:
            heads = cfg.heads_kv
            # The schedule counts the forward's items in query heads, a K/V head's at a time.
            last = last_group_heads(costs, heads * per_item, per_item, args.sms) // per_item
            before = work_share(grid_order(costs, heads, 1, 1, per_item), args.sms)
            after = work_share(grid_order(costs, heads, 1, last, per_item), args.sms)
            print(f"{cfg.name:24s} {name}  head by head {before:.3f}  last group of {last:2d} "
                  f"K/V heads {after:.3f}")


if __name__ == "__main__":
    main()
