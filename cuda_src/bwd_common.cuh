// FlashAttention-2 backward for packed variable-length batches: what every dK/dV kernel family
// shares (the parameter block, the preprocess, and the dQ kernels of both modes).
//
// With P = softmax(scale * Q K^T) recomputed from the forward's lse, and delta = rowsum(dO * O):
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale dS^T Q,   dQ = scale dS K.
//
// Kernels (the tile scheduler comes from scheduler.cuh):
//  - varlen_bwd_preprocess: delta and lse in log2 units per (query row, head); zeroes the fp32 dQ
//    accumulator in atomic and ordered modes.
//  - varlen_bwd_dkdv (bwd_sm80.cu on mma.sync, bwd_sm90.cu on wgmma): one CTA per (key tile of one
//    sequence, K/V head). K and V stay in shared memory while the CTA walks every query tile the
//    mask lets it see, for every query head of the group, so dK and dV (GQA: summed over the
//    group) accumulate in registers and are written once, without atomics. Its schedule is the
//    forward's with the roles of queries and keys swapped.
//  - atomic mode (CV_DQ_ATOMIC=1): the dK/dV CTA also forms dS K for each query tile and adds it to
//    the fp32 accumulator with atomics; varlen_bwd_dq_convert then scales and rounds it into dq.
//    The accumulator's layout is the family's (bwd_sm80.cu: row-major; bwd_sm90.cu: the
//    consumers' fragments, a whole query tile at a time), and so is its dq_convert.
//  - deterministic mode (CV_DQ_ATOMIC=0): varlen_bwd_dq, one CTA per (query tile, head), streams
//    the key tiles and recomputes S and dP to form dQ in registers: no atomics, bitwise repeatable
//    gradients, for two extra GEMMs per tile pair.
//  - varlen_bwd_dsinks (with attention sinks): dsinks[h] = -sum_i exp(sink_h - lse_i) delta_i over
//    head h's query rows, in a fixed order (bitwise repeatable in both modes).
//
// Score modifiers (score_mod.cuh; CV_SOFTCAP, CV_ALIBI): the kernels that recompute S apply them
// as the forward did, before the mask; a softcap also scales dS by its slope, 1 - tanh^2. Sinks
// change nothing here beyond dsinks: the forward's lse holds the sink, so P is already right.
//
// Specialization (-D from cupy_varlen/_spec.py): CV_DTYPE_BF16, CV_HEAD_DIM, CV_BLOCK_M (queries per
// step), CV_BLOCK_N (keys per CTA), CV_WINDOWED, CV_DQ_ATOMIC, CV_DQ_ORDERED, CV_DQ_BLOCK_N,
// CV_DQ_STAGES, CV_SOFTCAP, CV_ALIBI, and the dK/dV family's own.
//
// Ordered mode (CV_DQ_ATOMIC=1 and CV_DQ_ORDERED=1, the sm90 family's deterministic mode): the
// atomic mode's kernels, but the dK/dV CTAs add each query tile's dQ partials one after the other in
// key-tile order (a counter per query tile and head, see BwdParams::dq_order), so the fp32 sums, and
// dq, are the same bits on every run. The key tiles are then scheduled in that order (each
// sequence's from its last), so a CTA only ever waits for CTAs launched before it.
#pragma once

#include "common.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "scheduler.cuh"
#include "score_mod.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"
#include "tiles.cuh"

constexpr int kHeadDim = CV_HEAD_DIM;
constexpr int kBlockM = CV_BLOCK_M;
constexpr int kBlockN = CV_BLOCK_N;
constexpr int kDAtoms = kHeadDim / 8;
constexpr float kLog2e = 1.4426950408889634f;

typedef SmemTile<kBlockM, kHeadDim> QTile;  // Q and dO
typedef SmemTile<kBlockN, kHeadDim> KTile;  // K and V; dK and dV are staged in their place

struct BwdParams {
  const u16* q;
  const u16* k;
  const u16* v;
  const u16* out;
  const u16* dout;
  u16* dq;
  u16* dk;
  u16* dv;
  const float* lse;  // the forward's, (heads, total_q) with strides
  float* lse_log2;   // (heads, total_q), contiguous: lse * log2(e), +inf where lse is -inf
  float* delta;      // (heads, total_q), contiguous
  float* dq_accum;   // fp32, atomic and ordered modes, in the family's layout (dq_accum_floats)
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  const int* schedule_kv;  // key tiles (scheduler.cuh layout, keys as rows)
  const int* schedule_q;   // query tiles, deterministic mode with the dQ kernel
  // Ordered mode (CV_DQ_ORDERED): per (query head, first row of a query tile, consumer) the count
  // of key tiles whose dQ partial has been added, (heads, total_q, 2), zeroed by the preprocess.
  int* dq_order;
  const float* alibi_slopes;  // CV_ALIBI: (batch, heads) with row stride alibi_batch_stride
  const float* sinks;         // (heads,) or null: no sinks, no dsinks
  float* dsinks;              // (heads,)
  float* sink_partials;       // (heads, varlen_bwd_dsinks' chunks)
  int* sink_tickets;          // (heads,), zeroed by the preprocess
  i64 q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  i64 o_row_stride, o_head_stride, do_row_stride, do_head_stride;
  i64 dq_row_stride, dq_head_stride, dk_row_stride, dk_head_stride, dv_row_stride, dv_head_stride;
  i64 lse_head_stride, lse_row_stride;
  i64 total_q;
  i64 dq_accum_floats;  // the accumulator's size, a multiple of 4 (0 without one)
  i64 alibi_batch_stride;
  int heads, heads_per_kv, head_dim;
  float scale, scale_log2, softcap_in, softcap_out;
  int window_left, window_right;
  int batch;
  int use_qdo_map;  // 1: q_map and do_map are valid maps of q and dout
  // q and dout as (total_q, heads, head_dim), kBlockM-row x 64-element boxes with the 128-byte
  // swizzle (QTile's panels): the sm90 dK/dV kernel's TMA loads of whole query tiles.
  TensorMap q_map, do_map;
};
// The host packs this byte for byte (cupy_varlen/_launch.py, _BWD_PARAMS: 22 pointers, 21 int64,
// 3 int32, 4 float, 4 int32, padding to the maps' 64-byte alignment, two 128-byte maps).
static_assert(sizeof(BwdParams) == 704, "BwdParams layout must match the host's packing");

// The ALiBi slope of a sequence's query head in raw units (score_mod.cuh), and the softcap.
CV_DEVICE float bwd_alibi_slope(const BwdParams& p, int batch, int head) {
  return alibi_slope(p.alibi_slopes, p.alibi_batch_stride, batch, head, p.scale);
}
CV_DEVICE Softcap bwd_softcap(const BwdParams& p) { return Softcap{p.softcap_in, p.softcap_out}; }

CV_DEVICE AttnWindow bwd_window(const BwdParams& p) {
#if CV_WINDOWED
  return AttnWindow{p.window_left, p.window_right};
#else
  return AttnWindow{-1, -1};
#endif
}

// ---------------------------------------------------------------------------------------------
// Preprocess: 8 lanes per (row, head), each summing whole 16-byte chunks.

constexpr int kPrepThreads = 256;
constexpr int kPrepLanes = 8;

extern "C" __global__ void __launch_bounds__(kPrepThreads)
varlen_bwd_preprocess(const BwdParams p) {
  // The dQ accumulator, whatever the family's layout, as float4s over the whole grid.
  for (i64 i = (i64)blockIdx.x * kPrepThreads + threadIdx.x; i < p.dq_accum_floats / 4;
       i += (i64)gridDim.x * kPrepThreads)
    reinterpret_cast<float4*>(p.dq_accum)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (p.sink_tickets != nullptr && blockIdx.x == 0)
    for (int h = threadIdx.x; h < p.heads; h += kPrepThreads) p.sink_tickets[h] = 0;
  const i64 item = ((i64)blockIdx.x * kPrepThreads + threadIdx.x) / kPrepLanes;
  const int sub = threadIdx.x % kPrepLanes;
  // No early return: the lanes of a row reduce with shuffles over the whole warp.
  const bool valid = item < p.total_q * p.heads;
  const i64 row = valid ? item / p.heads : 0;
  const int head = valid ? (int)(item - row * p.heads) : 0;
  float acc = 0.f;
  if (valid) {
    const u16* o = p.out + row * p.o_row_stride + head * p.o_head_stride;
    const u16* d = p.dout + row * p.do_row_stride + head * p.do_head_stride;
    for (int c = sub; c < p.head_dim / 8; c += kPrepLanes) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + 8 * c);
      const uint4 b = *reinterpret_cast<const uint4*>(d + 8 * c);
      acc += dot_halves(a.x, b.x) + dot_halves(a.y, b.y) + dot_halves(a.z, b.z) +
             dot_halves(a.w, b.w);
    }
  }
#pragma unroll
  for (int d = 1; d < kPrepLanes; d <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, d);
  if (valid && sub == 0) {
    const i64 at = (i64)head * p.total_q + row;
    p.delta[at] = acc;
    const float lse = p.lse[head * p.lse_head_stride + row * p.lse_row_stride];
    // A row with no allowed key (lse -inf) must get P = exp2(s - lse) = 0, never exp2(+inf).
    p.lse_log2[at] = lse == neg_inf() ? -neg_inf() : lse * kLog2e;
    if (p.dq_order) reinterpret_cast<int2*>(p.dq_order)[at] = make_int2(0, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// dsinks: grid (chunks, heads). Chunk c of head h sums its kSinkRows rows in a fixed thread order
// and tree and stores the partial; the head's last chunk to finish (by ticket) adds the partials
// in chunk order. Which CTA does the last sum varies, what it sums and in which order does not: the
// same bits on every run. One chunk writes its sum straight away (no ticket, no preprocess: the
// batch without query rows gets 0).

constexpr int kSinkThreads = 256;  // cupy_varlen/_launch.py: SINK_THREADS
constexpr int kSinkRows = 8192;    // cupy_varlen/_launch.py: SINK_ROWS

// The CTA's sum of one value per thread in a fixed tree; thread 0 gets it.
CV_DEVICE float block_sum_fixed(float x, float* warp_sums) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = x;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0)
#pragma unroll
    for (int w = 0; w < kSinkThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be written again
  return total;
}

extern "C" __global__ void __launch_bounds__(kSinkThreads)
varlen_bwd_dsinks(const BwdParams p) {
  __shared__ float warp_sums[kSinkThreads / 32];
  __shared__ int last;
  const int head = blockIdx.y, chunk = blockIdx.x;
  const float sink_log2 = __ldg(p.sinks + head) * kLog2e;
  const i64 begin = (i64)chunk * kSinkRows;
  const i64 end = begin + kSinkRows < p.total_q ? begin + kSinkRows : p.total_q;
  const float* lse_log2 = p.lse_log2 + (i64)head * p.total_q;
  const float* delta = p.delta + (i64)head * p.total_q;
  float acc = 0.f;
  for (i64 i = begin + threadIdx.x; i < end; i += kSinkThreads)
    acc += fast_exp2(sink_log2 - lse_log2[i]) * delta[i];  // the sink's probability in row i
  const float total = block_sum_fixed(acc, warp_sums);
  if (gridDim.x == 1) {
    if (threadIdx.x == 0) p.dsinks[head] = 0.f - total;  // 0, not -0, for a sum of nothing
    return;
  }
  if (threadIdx.x == 0) {
    p.sink_partials[(i64)head * gridDim.x + chunk] = total;
    __threadfence();  // the partial before the ticket
    last = atomicAdd(p.sink_tickets + head, 1) == (int)gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();  // every other chunk's partial, seen through its ticket
  float part = 0.f;
  for (int c = threadIdx.x; c < (int)gridDim.x; c += kSinkThreads)
    part += __ldcg(p.sink_partials + (i64)head * gridDim.x + c);
  const float sum = block_sum_fixed(part, warp_sums);
  if (threadIdx.x == 0) p.dsinks[head] = 0.f - sum;
}

// A position of the walk, advanced a step at a time (QueryTileWalk::advance): no division by the
// runtime tile count per step, whose I2F / MUFU.RCP chain the sm90 consumers' first mask test of
// each step waited on (ncu, H200, 2026-12-02: 7% of the causal D128 backward's warp samples).
struct QueryTileCursor {
  int m_block;  // the query tile's index in its sequence
  int head_in_group;
  int left;  // steps left on this query head
};

// The steps of a dK/dV CTA: every query tile of range (in kBlockM units) for each query head of
// the GQA group. Each key tile starts its walk at a different query tile (rotated by the key tile's
// index): with a full mask, the CTAs of one (sequence, head) would otherwise all add into the same
// dQ rows at the same moment, and their atomics serialize in L2.
//
// Ordered mode (CV_DQ_ORDERED) adds each query tile's partials in key-tile order instead, from the
// last key tile that sees it down to the first, and walks unrotated: the key tile n sees its query
// tiles from its first, so the key tiles of a query tile reach it in their order, the last one first
// (causal: key tile n's first query tile is about n, which only key tiles <= n see), and each waits
// only for its predecessor's addition.
struct QueryTileWalk {
  int n_block_min, m_blocks, rotation, steps;
  QueryTileWalk() = default;
  CV_DEVICE QueryTileWalk(KeyBlockRange range, int key_block, int heads_per_kv)
      : n_block_min(range.n_block_min),
        m_blocks(range.count()),
#if CV_DQ_ORDERED
        rotation(0),
#else
        rotation(m_blocks > 0 ? key_block % m_blocks : 0),
#endif
        steps(m_blocks * heads_per_kv) {}
  CV_DEVICE int head_in_group(int step) const { return step / m_blocks; }
  CV_DEVICE int m0(int step) const {
    int j = step % m_blocks + rotation;
    if (j >= m_blocks) j -= m_blocks;
    return (n_block_min + j) * kBlockM;
  }
  CV_DEVICE QueryTileCursor begin() const { return {n_block_min + rotation, 0, m_blocks}; }
  // The cursor of step + 1 from that of step: m0 = m_block * kBlockM and head_in_group as above.
  CV_DEVICE void advance(QueryTileCursor& c) const {
    if (--c.left == 0) {
      c.left = m_blocks;
      ++c.head_in_group;
      c.m_block = n_block_min + rotation;
    } else if (++c.m_block == n_block_min + m_blocks) {
      c.m_block = n_block_min;
    }
  }
};

constexpr int kStatBytes = 2 * kBlockM * 4;  // lse_log2 and delta of one query tile

// Starts copying floats src[0..count) to shared memory, thread t taking element t; elements at or
// past n are zero-filled without being read.
CV_DEVICE void load_stats_async(u32 dst, const float* src, int n, int count, int tid) {
  if (tid >= 0 && tid < count) {
    const bool valid = tid < n;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst + 4 * tid),
                 "l"(valid ? src + tid : src), "r"(valid ? 4 : 0));
  }
}

#if !CV_DQ_ATOMIC
// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (query tile, head), 16 query rows per warp, key tiles streamed
// through a ring of CV_DQ_STAGES K/V slot pairs.

constexpr int kDqBlockN = CV_DQ_BLOCK_N;
constexpr int kDqStages = CV_DQ_STAGES;
constexpr int kDqWarps = kBlockM / 16;
constexpr int kDqThreads = kDqWarps * 32;
constexpr int kDqNAtoms = kDqBlockN / 8;
static_assert(kDqStages >= 2, "the K/V ring overlaps the next tile's copy with this tile's GEMMs");
typedef SmemTile<kDqBlockN, kHeadDim> DqKVTile;

extern "C" __global__ void __launch_bounds__(kDqThreads, 1)
varlen_bwd_dq(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  TileWork work;
  int head;
  if (!decode_tile(p.schedule_q, p.heads_per_kv, blockIdx.x, work, head)) return;
  const int kv_head = head / p.heads_per_kv;
  const SeqInfo seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, nullptr, work.batch_idx);
  const int m0 = work.m_block * kBlockM;
  const int rows_valid = min(kBlockM, seq.q_len - m0);
  const int chunks_valid = p.head_dim / 8;
  const MaskBand band = make_band(seq.q_len, seq.k_len, bwd_window(p));
  const KeyBlockRange range = key_block_range(m0, m0 + rows_valid - 1, seq.k_len, band, kDqBlockN);
  const TileMaskTest<kDqBlockN> mask_test(m0, m0 + rows_valid - 1, seq.k_len, band);
  const int n_iters = range.count();

  const u32 q_smem = smem_addr(smem);
  const u32 do_smem = q_smem + QTile::kBytes;
  const u32 k_smem = do_smem + QTile::kBytes;
  const u32 v_smem = k_smem + kDqStages * DqKVTile::kBytes;
  const i64 row0 = seq.q_start + m0;
  load_tile_async<kBlockM, kHeadDim, kDqThreads>(
      q_smem, p.q + row0 * p.q_row_stride + (i64)head * p.q_head_stride, p.q_row_stride,
      rows_valid, chunks_valid, tid);
  load_tile_async<kBlockM, kHeadDim, kDqThreads>(
      do_smem, p.dout + row0 * p.do_row_stride + (i64)head * p.do_head_stride, p.do_row_stride,
      rows_valid, chunks_valid, tid);
  auto load_kv = [&](int it) {
    if (it < n_iters) {
      const int n0 = (range.n_block_min + it) * kDqBlockN;
      const i64 key0 = seq.k_start + n0;
      const int slot = (it % kDqStages) * DqKVTile::kBytes;
      load_tile_async<kDqBlockN, kHeadDim, kDqThreads>(
          k_smem + slot, p.k + key0 * p.k_row_stride + (i64)kv_head * p.k_head_stride,
          p.k_row_stride, seq.k_len - n0, chunks_valid, tid);
      load_tile_async<kDqBlockN, kHeadDim, kDqThreads>(
          v_smem + slot, p.v + key0 * p.v_row_stride + (i64)kv_head * p.v_head_stride,
          p.v_row_stride, seq.k_len - n0, chunks_valid, tid);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < kDqStages - 1; ++s) load_kv(s);

  // This lane's two rows (group, group + 8 of the warp's 16): lse and delta straight to registers.
  const int warp_row0 = warp * 16;
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = warp_row0 + (lane >> 2) + 8 * h;
    const i64 at = (i64)head * p.total_q + row0 + row;
    row_lse[h] = row < rows_valid ? p.lse_log2[at] : -neg_inf();
    row_delta[h] = row < rows_valid ? p.delta[at] : 0.f;
  }

  const LaneCoords lc(lane);
#if CV_ALIBI
  const float alibi = bwd_alibi_slope(p, work.batch_idx, head);
#endif
  float acc_dq[1][kDAtoms][4];
  zero_fragments(acc_dq);
  for (int it = 0; it < n_iters; ++it) {
    const int slot = (it % kDqStages) * DqKVTile::kBytes;
    const int n0 = (range.n_block_min + it) * kDqBlockN;
    cp_async_wait<kDqStages - 2>();
    __syncthreads();
    load_kv(it + kDqStages - 1);

    float s[1][kDqNAtoms][4], ds[1][kDqNAtoms][4];
    zero_fragments(s);
    zero_fragments(ds);
    gemm_ss<1, kDqNAtoms, kHeadDim, QTile, false, DqKVTile, false>(s, q_smem, warp_row0,
                                                                 k_smem + slot, 0, lc);
    gemm_ss<1, kDqNAtoms, kHeadDim, QTile, false, DqKVTile, false>(ds, do_smem, warp_row0,
                                                                 v_smem + slot, 0, lc);
#if CV_SOFTCAP
    apply_softcap(s, bwd_softcap(p));
#endif
#if CV_ALIBI
    apply_alibi(s, m0 + warp_row0, n0, seq.k_len - seq.q_len, alibi, lane);
#endif
    if (mask_test.needs_mask(n0)) apply_mask(s, m0 + warp_row0, n0, lane, seq.k_len, band);
#pragma unroll
    for (int n = 0; n < kDqNAtoms; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = fast_exp2(fmaf(s[0][n][e], p.scale_log2, -row_lse[e / 2]));
        ds[0][n][e] = pv * (ds[0][n][e] - row_delta[e / 2]);
#if CV_SOFTCAP
        ds[0][n][e] *= softcap_slope(s[0][n][e], p.softcap_in);
#endif
      }
    gemm_pv<1, kDqNAtoms, kDAtoms, kHeadDim, kDqBlockN>(acc_dq, ds, k_smem + slot, 0, lc);
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_fragments<QTile>(acc_dq, q_smem, warp_row0, 0, lane, p.scale);
  __syncthreads();
  write_staged_tile<QTile, kDqThreads>(
      q_smem, p.dq + row0 * p.dq_row_stride + (i64)head * p.dq_head_stride, p.dq_row_stride,
      rows_valid, chunks_valid, tid);
}
#endif
