// FlashAttention-2 backward, the dK/dV kernel (and atomic dQ with its conversion) on mma.sync
// tensor cores (sm_80+); the algorithm, the parameters and the other kernels are in bwd_common.cuh.
//
// P^T and dS^T are staged in shared memory (16-bit) between the GEMM that makes them (warps over
// keys x queries) and the GEMMs that consume them (warps over keys x head dim for dK/dV, queries x
// head dim for dQ), so each phase has its own warp grid.
//
// Specialization (-D from cupy_varlen/_spec.py), beyond bwd_common.cuh's: CV_WARPS, CV_STAGES (Q/dO
// ring), CV_S_WARP_ROWS, CV_KV_WARP_ROWS, CV_DQ_WARP_ROWS.

#include "bwd_common.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "score_mod.cuh"
#include "softmax.cuh"

constexpr int kWarps = CV_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = CV_STAGES;
// With two or more Q/dO slots the next tile's copy overlaps this tile's GEMMs; one slot (small
// shared memory, large head dims) is refilled after them.
constexpr bool kPrefetch = kStages >= 2;
static_assert(kThreads >= 2 * kBlockM, "one thread per lse and delta value of a query tile");

typedef SmemTile<kBlockN, kBlockM> STile;  // P^T and dS^T: keys x queries

// ---------------------------------------------------------------------------------------------
// dK, dV (and, in atomic mode, dQ): one CTA per (key tile, K/V head).

// Which warp owns which kRowsPerWarp x kColsPerWarp block of a kRows x kCols GEMM result: kWarpRows
// warps down the rows, the rest across the columns.
template <int kRows, int kCols, int kWarpRows>
struct WarpGrid {
  static constexpr int kRowsPerWarp = kRows / kWarpRows;
  static constexpr int kColsPerWarp = kCols / (kWarps / kWarpRows);
  static constexpr int kMAtoms = kRowsPerWarp / 16;
  static constexpr int kNAtoms = kColsPerWarp / 8;
  static_assert(kWarps % kWarpRows == 0 && kRows % (16 * kWarpRows) == 0 &&
                    kCols % (16 * (kWarps / kWarpRows)) == 0,
                "warp blocks must be whole 16 x 16 mma tiles");
  int row0, col0;
  CV_DEVICE explicit WarpGrid(int warp)
      : row0((warp % kWarpRows) * kRowsPerWarp), col0((warp / kWarpRows) * kColsPerWarp) {}
};
typedef WarpGrid<kBlockN, kBlockM, CV_S_WARP_ROWS> SGrid;     // S^T, dP^T: keys x queries
typedef WarpGrid<kBlockN, kHeadDim, CV_KV_WARP_ROWS> KVGrid;  // dK, dV: keys x head dim
typedef WarpGrid<kBlockM, kHeadDim, CV_DQ_WARP_ROWS> DQGrid;  // dQ: queries x head dim

// Partly rolled reductions: fully unrolled, ptxas hoists the fragment loads of later k-steps while
// the dK/dV accumulators (half the register file) are live, and spills. Measured on H100 (d128,
// 64 x 128 tiles): spill-free and the fastest of the spill-free variants.
constexpr int kSUnroll = kHeadDim / 16 < 4 ? kHeadDim / 16 : 4;

extern "C" __global__ void __launch_bounds__(kThreads, 1)
varlen_bwd_dkdv(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  TileWork work;
  int kv_head;
  if (!decode_tile(p.schedule_kv, 1, blockIdx.x, work, kv_head)) return;
  const SeqInfo seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, nullptr, work.batch_idx);
  const int n0 = work.m_block * kBlockN;  // the schedule's rows are keys here
  const int keys_valid = min(kBlockN, seq.k_len - n0);
  const int chunks_valid = p.head_dim / 8;

  // Key j and query i meet iff band.lo <= j - i <= band.hi; seen from the keys, that is the band
  // [-hi, -lo] of i - j, so the forward's tile-range and mask arithmetic apply with the roles
  // swapped (queries past q_len are the "tail").
  const MaskBand band = make_band(seq.q_len, seq.k_len, bwd_window(p));
  const MaskBand band_t = {-band.hi, -band.lo};
  const int key_last = n0 + keys_valid - 1;
  const KeyBlockRange range = key_block_range(n0, key_last, seq.q_len, band_t, kBlockM);
  const TileMaskTest<kBlockM> mask_test(n0, key_last, seq.q_len, band_t);
  const QueryTileWalk walk(range, work.m_block, p.heads_per_kv);
  const int n_iters = walk.steps;

  const u32 k_smem = smem_addr(smem);
  const u32 v_smem = k_smem + KTile::kBytes;
  const u32 q_smem = v_smem + KTile::kBytes;
  const u32 do_smem = q_smem + kStages * QTile::kBytes;
  const u32 pt_smem = do_smem + kStages * QTile::kBytes;
  const u32 ds_smem = pt_smem + STile::kBytes;
  const u32 stat_smem = ds_smem + STile::kBytes;

  load_tile_async<kBlockN, kHeadDim, kThreads>(
      k_smem, p.k + (i64)(seq.k_start + n0) * p.k_row_stride + (i64)kv_head * p.k_head_stride,
      p.k_row_stride, keys_valid, chunks_valid, tid);
  load_tile_async<kBlockN, kHeadDim, kThreads>(
      v_smem, p.v + (i64)(seq.k_start + n0) * p.v_row_stride + (i64)kv_head * p.v_head_stride,
      p.v_row_stride, keys_valid, chunks_valid, tid);

  // Step `it` visits query tile walk.m0(it) of query head walk.head_in_group(it) of the group.
  // Every call commits a group (empty past the end) so the wait counts hold.
  auto load_query_tile = [&](int it) {
    if (it < n_iters) {
      const int head = kv_head * p.heads_per_kv + walk.head_in_group(it);
      const int m0 = walk.m0(it);
      const int rows = seq.q_len - m0;
      const int stage = it % kStages;
      const i64 row0 = seq.q_start + m0;
      load_tile_async<kBlockM, kHeadDim, kThreads>(
          q_smem + stage * QTile::kBytes, p.q + row0 * p.q_row_stride + head * p.q_head_stride,
          p.q_row_stride, rows, chunks_valid, tid);
      load_tile_async<kBlockM, kHeadDim, kThreads>(
          do_smem + stage * QTile::kBytes,
          p.dout + row0 * p.do_row_stride + head * p.do_head_stride, p.do_row_stride, rows,
          chunks_valid, tid);
      const i64 at = (i64)head * p.total_q + row0;
      const u32 stats = stat_smem + stage * kStatBytes;
      // Rows past the sequence read lse 0 and delta 0; the tail mask zeroes their P anyway.
      load_stats_async(stats, p.lse_log2 + at, rows, kBlockM, tid);
      load_stats_async(stats + kBlockM * 4, p.delta + at, rows, kBlockM, tid - kBlockM);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < (kPrefetch ? kStages - 1 : 1); ++s) load_query_tile(s);

  const SGrid sg(warp);
  const KVGrid kvg(warp);
  const LaneCoords lc(lane);
  float acc_dv[KVGrid::kMAtoms][KVGrid::kNAtoms][4];
  float acc_dk[KVGrid::kMAtoms][KVGrid::kNAtoms][4];
  zero_fragments(acc_dv);
  zero_fragments(acc_dk);

  for (int it = 0; it < n_iters; ++it) {
    const int stage = it % kStages;
    const u32 q_slot = q_smem + stage * QTile::kBytes;
    const u32 do_slot = do_smem + stage * QTile::kBytes;
    const u32 stats = stat_smem + stage * kStatBytes;
    const int m0 = walk.m0(it);

    cp_async_wait<kPrefetch ? kStages - 2 : 0>();  // this step's Q, dO, stats (and K, V) landed
    __syncthreads();  // ... for every thread; the previous step freed its slots
    if (kPrefetch) load_query_tile(it + kStages - 1);

    // P^T and dS^T of this warp's keys x queries.
    float pt[SGrid::kMAtoms][SGrid::kNAtoms][4];
    float dst[SGrid::kMAtoms][SGrid::kNAtoms][4];
    zero_fragments(pt);
    zero_fragments(dst);
    gemm_ss<SGrid::kMAtoms, SGrid::kNAtoms, kHeadDim, KTile, false, QTile, false, kSUnroll>(
        pt, k_smem, sg.row0, q_slot, sg.col0, lc);
    gemm_ss<SGrid::kMAtoms, SGrid::kNAtoms, kHeadDim, KTile, false, QTile, false, kSUnroll>(
        dst, v_smem, sg.row0, do_slot, sg.col0, lc);
#if CV_SOFTCAP
    apply_softcap(pt, bwd_softcap(p));
#endif
#if CV_ALIBI
    apply_alibi(pt, n0 + sg.row0, m0 + sg.col0, seq.q_len - seq.k_len,
                bwd_alibi_slope(p, work.batch_idx, kv_head * p.heads_per_kv + walk.head_in_group(it)),
                lane);
#endif
    if (mask_test.needs_mask(m0))
      apply_mask(pt, n0 + sg.row0, m0 + sg.col0, lane, seq.q_len, band_t);
    // Keys past the sequence hold zeros, whose score is 0, not -inf: exp2(0 - lse) could overflow.
    if (keys_valid < kBlockN) mask_rows_from(pt, sg.row0, keys_valid, lane);
#if CV_SOFTCAP
    softmax_backward_softcap(pt, dst, stats, stats + kBlockM * 4, sg.col0, p.scale_log2,
                             p.softcap_in, lane);
#else
    softmax_backward(pt, dst, stats, stats + kBlockM * 4, sg.col0, p.scale_log2, lane);
#endif
    stage_fragments<STile>(pt, pt_smem, sg.row0, sg.col0 / 8, lane);
    stage_fragments<STile>(dst, ds_smem, sg.row0, sg.col0 / 8, lane);
    __syncthreads();

    gemm_ss<KVGrid::kMAtoms, KVGrid::kNAtoms, kBlockM, STile, false, QTile, true>(
        acc_dv, pt_smem, kvg.row0, do_slot, kvg.col0, lc);
    gemm_ss<KVGrid::kMAtoms, KVGrid::kNAtoms, kBlockM, STile, false, QTile, true>(
        acc_dk, ds_smem, kvg.row0, q_slot, kvg.col0, lc);
#if CV_DQ_ATOMIC
    {
      const DQGrid dqg(warp);
      float dq[DQGrid::kMAtoms][DQGrid::kNAtoms][4];
      zero_fragments(dq);
      gemm_ss<DQGrid::kMAtoms, DQGrid::kNAtoms, kBlockN, STile, true, KTile, true, 1>(
          dq, ds_smem, dqg.row0, k_smem, dqg.col0, lc);
      const int head = kv_head * p.heads_per_kv + walk.head_in_group(it);
      const i64 row_stride = (i64)p.heads * p.head_dim;
      add_fragments_atomic(dq, p.dq_accum + (i64)(seq.q_start + m0) * row_stride +
                                   (i64)head * p.head_dim,
                           row_stride, seq.q_len - m0, p.head_dim, dqg.row0, dqg.col0, lane);
    }
#endif
    if (!kPrefetch) {
      __syncthreads();  // every read of the one slot is done
      load_query_tile(it + 1);
    }
  }

  // K and V are read for the last time above; dV and dK are staged in their place.
  cp_async_wait<0>();
  __syncthreads();
  stage_fragments<KTile>(acc_dv, v_smem, kvg.row0, kvg.col0 / 8, lane);
  stage_fragments<KTile>(acc_dk, k_smem, kvg.row0, kvg.col0 / 8, lane, p.scale);
  __syncthreads();
  write_staged_tile<KTile, kThreads>(
      v_smem, p.dv + (i64)(seq.k_start + n0) * p.dv_row_stride + (i64)kv_head * p.dv_head_stride,
      p.dv_row_stride, keys_valid, chunks_valid, tid);
  write_staged_tile<KTile, kThreads>(
      k_smem, p.dk + (i64)(seq.k_start + n0) * p.dk_row_stride + (i64)kv_head * p.dk_head_stride,
      p.dk_row_stride, keys_valid, chunks_valid, tid);
}

#if CV_DQ_ATOMIC
// ---------------------------------------------------------------------------------------------
// The accumulator is (total_q, heads, head_dim), row-major. dq = scale * accumulator, rounded to
// 16 bits: one thread per 8 elements.

constexpr int kConvertThreads = 256;

extern "C" __global__ void __launch_bounds__(kConvertThreads)
varlen_bwd_dq_convert(const BwdParams p) {
  const int chunks = p.head_dim / 8;
  const i64 idx = (i64)blockIdx.x * kConvertThreads + threadIdx.x;
  if (idx >= p.total_q * p.heads * chunks) return;
  const i64 row_head = idx / chunks;
  const int chunk = (int)(idx - row_head * chunks);
  const i64 row = row_head / p.heads;
  const int head = (int)(row_head - row * p.heads);
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + row_head * p.head_dim + 8 * chunk);
  const float4 a = src[0], b = src[1];
  const float s = p.scale;
  uint4 packed;
  packed.x = pack_float2(a.x * s, a.y * s);
  packed.y = pack_float2(a.z * s, a.w * s);
  packed.z = pack_float2(b.x * s, b.y * s);
  packed.w = pack_float2(b.z * s, b.w * s);
  *reinterpret_cast<uint4*>(p.dq + row * p.dq_row_stride + head * p.dq_head_stride + 8 * chunk) =
      packed;
}
#endif
