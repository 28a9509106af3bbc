// Varlen work assignment: one CTA per (query tile of one sequence, head), no CTA spent on padding,
// heaviest tiles first.
//
// A one-block kernel reads cu_seqlens on the device (the host never does) and writes the schedule
// (in_order: sequence by sequence, each sequence's tiles last to first, for the ordered dQ
// additions):
// the number of query tiles and their list sorted by cost, longest first (LPT), where a tile's cost
// is the number of key tiles its mask lets it visit (so causal and windowed tiles are weighed by
// their real work). The sort is a counting sort into kCostBuckets cost buckets: LPT only needs the
// order roughly right, and it runs in a few passes of one block. The order of tiles within a
// bucket depends on atomics, but no result does: every tile is computed independently.
//
// Consecutive tiles of one sequence that fall in the same bucket get consecutive ranks (one atomic
// reserves the run of up to 32 that one warp holds). The 1-D grid is a host-side upper bound on tiles (tile_bound) times heads and
// walks ranks head by head: CTA i takes rank (i / g) mod tile_bound of head
// g * (i / (g * tile_bound)) + i mod g, g being the query heads per K/V head. So the query heads that
// share K/V run side by side, the query tiles of one (sequence, head) run at the same time and read
// the same K/V from L2, and the grid ends on the cheapest tiles of the last heads. Surplus CTAs
// (ranks past the real tile count) exit at once.
#pragma once

#include "common.cuh"
#include "mask.cuh"
#include "seqlen.cuh"

constexpr int kCostBuckets = 1024;
constexpr int kScheduleThreads = 1024;

// Workspace (int32): [0] number of tiles, [1] the grid's tile bound, [2] the next work item of a
// persistent grid, [3] padding (keeps the int2 entries 8-byte aligned), then (batch_idx, m_block)
// per tile by rank.
constexpr int kScheduleHeader = 4;
constexpr int kWorkCounter = 2;

struct TileWork {
  int batch_idx;  // sequence
  int m_block;    // query tile within the sequence
};

CV_DEVICE int tile_cost(const SeqInfo& seq, int m_block, int block_m, int block_n, AttnWindow w) {
  const int row_first = m_block * block_m;
  const int row_last = min(row_first + block_m, seq.q_len) - 1;
  const MaskBand band = make_band(seq.q_len, seq.k_len, w);
  // +1: a tile with no key to visit still loads Q and writes O.
  return key_block_range(row_first, row_last, seq.k_len, band, block_n).count() + 1;
}

CV_DEVICE int cost_bucket(int cost, int max_cost) {
  return (int)((i64)cost * (kCostBuckets - 1) / max_cost);
}

// Block-wide exclusive prefix sum of one value per thread (blockDim.x == kScheduleThreads).
CV_DEVICE int block_exclusive_sum(int value, int* warp_totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int inclusive = value;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int up = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == 31) warp_totals[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int total = warp_totals[lane];
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(0xffffffffu, total, d);
      if (lane >= d) total += up;
    }
    warp_totals[lane] = total;
  }
  __syncthreads();
  return (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - value;
}

// Calls visit(valid, b, seq, m) for every query tile m of every sequence b of the batch, on every
// lane of every warp in step (lanes without a tile pass valid = false), so visit may use warp
// collectives. Warp w takes groups of per_warp consecutive sequences, one per lane, and the group's
// tiles are then dealt to its lanes 32 at a time: one long sequence spreads over a whole warp, a
// batch of short ones over the whole block, and no thread walks a sequence tile by tile.
template <class Visit>
CV_DEVICE void for_each_tile(const int* __restrict__ cu_seqlens_q,
                             const int* __restrict__ cu_seqlens_k, int batch, int block_m,
                             Visit&& visit) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int per_warp = min(32, max(1, (batch + warps - 1) / warps));
  for (int first = warp * per_warp; first < batch; first += warps * per_warp) {
    const bool mine = lane < per_warp && first + lane < batch;
    const SeqInfo seq = mine ? load_seq_info(cu_seqlens_q, cu_seqlens_k, first + lane)
                             : SeqInfo{0, 0, 0, 0};
    // Inclusive scan of the tile counts over the lanes: lane l's tiles end at `end`.
    int end = (seq.q_len + block_m - 1) / block_m;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int up = __shfl_up_sync(full, end, d);
      if (lane >= d) end += up;
    }
    const int total = __shfl_sync(full, end, 31);
    for (int t0 = 0; t0 < total; t0 += 32) {
      const int t = t0 + lane;
      int owner = 0;  // the first lane whose tiles end past t
#pragma unroll
      for (int step = 16; step > 0; step >>= 1)
        if (__shfl_sync(full, end, owner + step - 1) <= t) owner += step;
      const int before = __shfl_sync(full, end, (owner + 31) & 31);
      const SeqInfo s = {__shfl_sync(full, seq.q_start, owner), __shfl_sync(full, seq.q_len, owner),
                         __shfl_sync(full, seq.k_start, owner), __shfl_sync(full, seq.k_len, owner)};
      visit(t < total, first + owner, s, t - (owner > 0 ? before : 0));
    }
  }
}

// minBlocks 1: one block runs at a time, so it may use 64 registers per thread (without it ptxas
// aims at two resident blocks on sm_90, caps itself at 32 and spills).
extern "C" __global__ void __launch_bounds__(kScheduleThreads, 1)
varlen_tile_schedule(const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                     int* __restrict__ workspace, int batch, int block_m, int block_n,
                     int window_left, int window_right, int tile_bound, int in_order) {
  __shared__ int bucket_count[kCostBuckets];
  __shared__ int warp_totals[32];
  __shared__ int max_cost, num_tiles;
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const AttnWindow window = {window_left, window_right};
  if (in_order) {
    // Sequence by sequence, each from its last tile (the ordered dQ additions of the backward go
    // from the last key tile down and need every CTA's predecessors launched before it): rank =
    // the tiles of the sequences before plus the tile's index from the end.
    int* order = workspace + kScheduleHeader;
    int before = 0;
    for (int b0 = 0; b0 < batch; b0 += kScheduleThreads) {
      const int b = b0 + threadIdx.x;
      const int tiles = b < batch ? (load_seq_info(cu_seqlens_q, cu_seqlens_k, b).q_len +
                                     block_m - 1) / block_m
                                  : 0;
      const int first = before + block_exclusive_sum(tiles, warp_totals);
      for (int m = 0; m < tiles; ++m) {
        order[2 * (first + tiles - 1 - m)] = b;
        order[2 * (first + tiles - 1 - m) + 1] = m;
      }
      before += warp_totals[31];
      __syncthreads();  // warp_totals is rewritten by the next round's sum
    }
    if (threadIdx.x == 0) {
      workspace[0] = before;
      workspace[1] = tile_bound;
      workspace[kWorkCounter] = 0;
    }
    return;
  }
  for (int i = threadIdx.x; i < kCostBuckets; i += blockDim.x) bucket_count[i] = 0;
  if (threadIdx.x == 0) max_cost = num_tiles = 0;
  __syncthreads();

  // The passes recompute costs rather than store them.
  int my_max = 0, my_tiles = 0;
  for_each_tile(cu_seqlens_q, cu_seqlens_k, batch, block_m,
                [&](bool valid, int, SeqInfo seq, int m) {
                  if (!valid) return;
                  my_max = max(my_max, tile_cost(seq, m, block_m, block_n, window));
                  ++my_tiles;
                });
  my_max = __reduce_max_sync(full, my_max);
  my_tiles = __reduce_add_sync(full, my_tiles);
  if (lane == 0) {
    atomicMax(&max_cost, my_max);
    atomicAdd(&num_tiles, my_tiles);
  }
  __syncthreads();
  const int cost_cap = max(max_cost, 1);

  for_each_tile(cu_seqlens_q, cu_seqlens_k, batch, block_m,
                [&](bool valid, int, SeqInfo seq, int m) {
                  if (valid)
                    atomicAdd(&bucket_count[cost_bucket(
                                  tile_cost(seq, m, block_m, block_n, window), cost_cap)], 1);
                });
  __syncthreads();

  // Bucket k's first rank: the tiles of every costlier bucket come before it.
  const int bucket = kCostBuckets - 1 - threadIdx.x;
  const int count = bucket_count[bucket];
  const int first_rank = block_exclusive_sum(count, warp_totals);
  bucket_count[bucket] = first_rank;  // from here on: the bucket's next free rank
  __syncthreads();

  // Lanes holding tiles of one sequence in one bucket reserve their ranks with one atomic, the
  // later tiles first.
  int* order = workspace + kScheduleHeader;
  for_each_tile(cu_seqlens_q, cu_seqlens_k, batch, block_m,
                [&](bool valid, int b, SeqInfo seq, int m) {
                  const int bucket =
                      valid ? cost_bucket(tile_cost(seq, m, block_m, block_n, window), cost_cap)
                            : -1;
                  const unsigned group =
                      __match_any_sync(full, ((unsigned long long)(unsigned)b << 32) |
                                                 (unsigned)bucket);
                  if (!valid) return;
                  const int leader = __ffs(group) - 1;
                  int base = 0;
                  if (lane == leader) base = atomicAdd(&bucket_count[bucket], __popc(group));
                  base = __shfl_sync(group, base, leader);
                  // Lanes above this one hold later tiles of the sequence: they go first.
                  const int rank = base + __popc(group & ~((2u << lane) - 1u));
                  order[2 * rank] = b;
                  order[2 * rank + 1] = m;
                });
  if (threadIdx.x == 0) {
    workspace[0] = num_tiles;
    workspace[1] = tile_bound;
    workspace[kWorkCounter] = 0;
  }
}

// Work item `item` in the order described above, ranks counted modulo `ranks_per_head`.
CV_DEVICE void decode_item(const int* __restrict__ workspace, int heads_per_kv, int ranks_per_head,
                           int item, int& rank, int& head) {
  const int rest = item / heads_per_kv;
  const int kv_head = rest / ranks_per_head;
  rank = rest - kv_head * ranks_per_head;
  head = kv_head * heads_per_kv + (item - rest * heads_per_kv);
}

// Work item `item` with the heads taken `group` at a time, rank-major within a group (group 1:
// head by head as decode_item with one query head per K/V head; group num_heads: rank-major).
CV_DEVICE void decode_item_head_groups(int num_heads, int ranks_per_head, int group, int item,
                                       int& rank, int& head) {
  const int g = item / (group * ranks_per_head);
  const int in_group = item - g * group * ranks_per_head;
  const int heads_here = min(group, num_heads - g * group);
  rank = in_group / heads_here;
  head = g * group + (in_group - rank * heads_here);
}

CV_DEVICE TileWork tile_at_rank(const int* __restrict__ workspace, int rank) {
  const int2 entry = __ldg(reinterpret_cast<const int2*>(workspace + kScheduleHeader) + rank);
  return TileWork{entry.x, entry.y};
}

// The work of CTA `cta` of a grid of tile_bound x heads CTAs; false for surplus CTAs.
CV_DEVICE bool decode_tile(const int* __restrict__ workspace, int heads_per_kv, int cta,
                           TileWork& w, int& head) {
  int rank;
  decode_item(workspace, heads_per_kv, __ldg(workspace + 1), cta, rank, head);
  if (rank >= __ldg(workspace)) return false;
  w = tile_at_rank(workspace, rank);
  return true;
}

// decode_tile with the heads in groups (decode_item_head_groups); surplus CTAs end each group.
CV_DEVICE bool decode_tile_head_groups(const int* __restrict__ workspace, int num_heads, int group,
                                       int cta, TileWork& w, int& head) {
  int rank;
  decode_item_head_groups(num_heads, __ldg(workspace + 1), group, cta, rank, head);
  if (rank >= __ldg(workspace)) return false;
  w = tile_at_rank(workspace, rank);
  return true;
}

// The work items of a persistent grid (one CTA per SM): items 0 .. num_tiles x heads - 1, each taken
// once, the first gridDim.x by block index and the rest from the workspace's counter.
//
// Items are normally taken head by head, each head's tiles longest first (decode_item): the tiles
// running at once then share their heads' K and V in L2. Where all of K and V fit in L2 anyway, the
// host asks for one longest-first order over every head instead (rank-major, the heads of a K/V
// group side by side): head by head, the last heads' longest tiles start near the end and set the
// kernel's length (seed batch: SMs busy 91k cycles on average against 122k for the last).
struct PersistentScheduler {
  int* workspace;
  int num_tiles, num_heads, heads_per_kv, total_items;
  bool across_heads;

  CV_DEVICE PersistentScheduler(int* workspace, int num_heads, int heads_per_kv, bool across_heads)
      : workspace(workspace),
        num_tiles(__ldg(workspace)),
        num_heads(num_heads),
        heads_per_kv(heads_per_kv),
        total_items(num_tiles * num_heads),
        across_heads(across_heads) {}

  CV_DEVICE int first_item() const { return blockIdx.x; }
  // One atomic on the counter: issue it early, its latency is a global round trip.
  CV_DEVICE int next_item() const {
    return atomicAdd(workspace + kWorkCounter, 1) + (int)gridDim.x;
  }
  CV_DEVICE bool done(int item) const { return item >= total_items; }

  // The query tile and head of an item that is not done.
  CV_DEVICE TileWork tile(int item, int& head) const {
    int rank;
    if (across_heads) {
      rank = item / num_heads;
      head = item - rank * num_heads;
    } else {
      decode_item(workspace, heads_per_kv, num_tiles, item, rank, head);
    }
    return tile_at_rank(workspace, rank);
  }
};
