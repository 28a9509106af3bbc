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
// persistent grid, [3] padding, [4, 16) the head order (HeadOrder), then (batch_idx, m_block) per
// tile by rank (the header's even length keeps these int2 entries 8-byte aligned).
constexpr int kScheduleHeader = 16;
constexpr int kWorkCounter = 2;
constexpr int kHeadOrder = 4;
// The grid's last head group is made wide enough that its work covers, on every SM, this many times
// the longest tile: one head at a time, a head's longest tiles start last and run alone where a
// head's work is short beside them (one long sequence among short ones; few sequences).
constexpr int kTailCover = 2;

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

// n / d for 0 <= n < 2^31 by a multiply and a shift (round-up method); a division by a runtime
// value held registers into the sm90 backward's main loop (4-12 bytes of spill).
struct FastDivisor {
  unsigned magic, shift;
  CV_DEVICE static FastDivisor of(unsigned d) {
    const unsigned shift = d > 1 ? 32 - __clz(d - 1) : 0;
    return {(unsigned)((1ull << (32 + shift)) / d + 1 - (1ull << 32)), shift};
  }
  CV_DEVICE int operator()(int n) const {
    return (int)((__umulhi((unsigned)n, magic) + (unsigned)n) >> shift);
  }
};

// The order in which a grid takes (rank, head) items: heads `group` at a time, each group's ranks
// longest first and its heads side by side, then the last `last` heads (last >= group) likewise.
// The schedule kernel sizes the last group from the batch's real costs (kTailCover) and writes it
// at workspace[kHeadOrder]; `ranks` per head is the real tile count (persistent grids) or the tile
// bound (grids of one CTA per tile bound and head, whose surplus CTAs exit).
struct HeadOrder {
  int lead_items, lead_heads, group_items, group, last;
  FastDivisor by_group_items, by_group, by_last;

  CV_DEVICE static void write(int* __restrict__ ws, int ranks, int heads, int group, int last) {
    const int lead_heads = heads - last;
    const int words[] = {lead_heads * ranks, lead_heads, group * ranks, group, last};
    for (int i = 0; i < 5; ++i) ws[kHeadOrder + i] = words[i];
    const FastDivisor divs[] = {FastDivisor::of(max(group * ranks, 1)), FastDivisor::of(group),
                                FastDivisor::of(last)};
    for (int i = 0; i < 3; ++i) {
      ws[kHeadOrder + 5 + 2 * i] = (int)divs[i].magic;
      ws[kHeadOrder + 6 + 2 * i] = (int)divs[i].shift;
    }
  }

  CV_DEVICE static HeadOrder load(const int* __restrict__ ws) {
    const int* h = ws + kHeadOrder;
    return HeadOrder{__ldg(h), __ldg(h + 1), __ldg(h + 2), __ldg(h + 3), __ldg(h + 4),
                     {(unsigned)__ldg(h + 5), (unsigned)__ldg(h + 6)},
                     {(unsigned)__ldg(h + 7), (unsigned)__ldg(h + 8)},
                     {(unsigned)__ldg(h + 9), (unsigned)__ldg(h + 10)}};
  }

  CV_DEVICE void decode(int item, int& rank, int& head) const {
    if (item < lead_items) {
      const int g = by_group_items(item);
      const int in_group = item - g * group_items;
      rank = by_group(in_group);
      head = g * group + (in_group - rank * group);
    } else {
      const int in_group = item - lead_items;
      rank = by_last(in_group);
      head = lead_heads + (in_group - rank * last);
    }
  }
};

// The last group's width (see HeadOrder): enough heads that their work, spread over `sms` SMs,
// covers the longest tile kTailCover times; at least `group`, at most all, and the heads before it
// whole groups.
CV_DEVICE int last_group_heads(unsigned long long cost_per_head, int max_cost, int heads, int group,
                               int sms) {
  const unsigned long long cover = (unsigned long long)kTailCover * max_cost * sms;
  const unsigned long long need =
      cost_per_head ? (cover + cost_per_head - 1) / cost_per_head : (unsigned long long)heads;
  const int last = (int)min((unsigned long long)heads, max(need, (unsigned long long)group));
  return heads - (heads - last) / group * group;
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
                             const int* __restrict__ cu_seqlens_k,
                             const int* __restrict__ seqused_k, int k_capacity, int batch,
                             int block_m, Visit&& visit) {
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int per_warp = min(32, max(1, (batch + warps - 1) / warps));
  for (int first = warp * per_warp; first < batch; first += warps * per_warp) {
    const bool mine = lane < per_warp && first + lane < batch;
    const SeqInfo seq = mine ? load_any_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k,
                                                 first + lane, k_capacity)
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
// aims at two resident blocks on sm_90, caps itself at 32 and spills). k_capacity: a paged cache's
// keys per sequence, or -1 without one (load_any_seq_info).
extern "C" __global__ void __launch_bounds__(kScheduleThreads, 1)
varlen_tile_schedule(const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                     const int* __restrict__ seqused_k, int* __restrict__ workspace, int batch,
                     int block_m, int block_n, int window_left, int window_right, int tile_bound,
                     int in_order, int heads, int head_group, int sms, int ranks_bound,
                     int k_capacity) {
  __shared__ int bucket_count[kCostBuckets];
  __shared__ int warp_totals[32];
  __shared__ int max_cost, num_tiles;
  __shared__ unsigned long long total_cost;
  const unsigned full = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const AttnWindow window = {window_left, window_right};
  for (int i = threadIdx.x; i < kCostBuckets; i += blockDim.x) bucket_count[i] = 0;
  if (threadIdx.x == 0) max_cost = num_tiles = 0, total_cost = 0;
  __syncthreads();

  // The batch's totals (the tile count, the longest tile, the summed cost: the head order's last
  // group and LPT's buckets), spread over the block: one thread per sequence would walk a long
  // sequence's tiles alone. The passes after it recompute costs rather than store them.
  int my_max = 0, my_tiles = 0;
  unsigned long long my_cost = 0;
  for_each_tile(cu_seqlens_q, cu_seqlens_k, seqused_k, k_capacity, batch, block_m,
                [&](bool valid, int, SeqInfo seq, int m) {
                  if (!valid) return;
                  const int cost = tile_cost(seq, m, block_m, block_n, window);
                  my_max = max(my_max, cost);
                  my_cost += cost;
                  ++my_tiles;
                });
  my_max = __reduce_max_sync(full, my_max);
  my_tiles = __reduce_add_sync(full, my_tiles);
  for (int d = 16; d > 0; d >>= 1) my_cost += __shfl_xor_sync(full, my_cost, d);
  if (lane == 0) {
    atomicMax(&max_cost, my_max);
    atomicAdd(&num_tiles, my_tiles);
    atomicAdd(&total_cost, my_cost);
  }
  __syncthreads();

  int* order = workspace + kScheduleHeader;
  if (in_order) {
    // Sequence by sequence, each from its last tile (the ordered dQ additions of the backward go
    // from the last key tile down and need every CTA's predecessors launched before it): rank =
    // the tiles of the sequences before plus the tile's index from the end.
    int before = 0;
    for (int b0 = 0; b0 < batch; b0 += kScheduleThreads) {
      const int b = b0 + threadIdx.x;
      const int tiles =
          b < batch
              ? (load_any_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k, b, k_capacity).q_len +
                 block_m - 1) /
                    block_m
              : 0;
      const int first = before + block_exclusive_sum(tiles, warp_totals);
      for (int m = 0; m < tiles; ++m) {
        order[2 * (first + tiles - 1 - m)] = b;
        order[2 * (first + tiles - 1 - m) + 1] = m;
      }
      before += warp_totals[31];
      __syncthreads();  // warp_totals is rewritten by the next round's sum
    }
  } else {
    const int cost_cap = max(max_cost, 1);
    for_each_tile(cu_seqlens_q, cu_seqlens_k, seqused_k, k_capacity, batch, block_m,
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
    for_each_tile(cu_seqlens_q, cu_seqlens_k, seqused_k, k_capacity, batch, block_m,
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
  }
  if (threadIdx.x == 0) {
    workspace[0] = num_tiles;
    workspace[1] = tile_bound;
    workspace[kWorkCounter] = 0;
    HeadOrder::write(workspace, ranks_bound ? tile_bound : num_tiles, heads, head_group,
                     last_group_heads(total_cost, max_cost, heads, head_group, sms));
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

// The work of CTA `cta` of a grid of tile_bound x heads CTAs in the schedule's head order
// (HeadOrder, written with ranks = the tile bound); false for surplus CTAs.
CV_DEVICE bool decode_tile_in_head_order(const int* __restrict__ workspace, int cta, TileWork& w,
                                         int& head) {
  int rank;
  HeadOrder::load(workspace).decode(cta, rank, head);
  if (rank >= __ldg(workspace)) return false;
  w = tile_at_rank(workspace, rank);
  return true;
}

// The work items of a persistent grid (one CTA per SM): items 0 .. num_tiles x heads - 1, each taken
// once, the first gridDim.x by block index and the rest from the workspace's counter, in the
// schedule's head order (HeadOrder, written with ranks = the real tile count). The host picks the
// lead groups: a K/V head's query heads, or all heads where all of K and V fit in L2 anyway (the
// tiles running at once share their heads' K and V in L2); the schedule widens the last group
// where a head's work is short beside its longest tile (seed batch head by head: SMs busy 91k
// cycles on average against 122k for the last).
struct PersistentScheduler {
  int* workspace;
  int num_tiles, total_items;

  CV_DEVICE PersistentScheduler(int* workspace, int num_heads)
      : workspace(workspace), num_tiles(__ldg(workspace)), total_items(num_tiles * num_heads) {}

  CV_DEVICE int first_item() const { return blockIdx.x; }
  // One atomic on the counter: issue it early, its latency is a global round trip.
  CV_DEVICE int next_item() const {
    return atomicAdd(workspace + kWorkCounter, 1) + (int)gridDim.x;
  }
  CV_DEVICE bool done(int item) const { return item >= total_items; }

  // The query tile and head of an item that is not done. The order is read again per item (from
  // L1): held across the loop, its eleven words made the 24-register producer spill.
  CV_DEVICE TileWork tile(int item, int& head) const {
    int rank;
    HeadOrder::load(workspace).decode(item, rank, head);
    return tile_at_rank(workspace, rank);
  }
};
