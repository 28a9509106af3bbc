// FlashAttention-2 backward for packed variable-length batches, on mma.sync tensor cores (sm_80+).
//
// With P = softmax(scale * Q K^T) recomputed from the forward's lse, and delta = rowsum(dO * O):
//   dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dK = scale dS^T Q,   dQ = scale dS K.
//
// Kernels (the tile scheduler comes from scheduler.cuh):
//  - varlen_bwd_preprocess: delta and lse in log2 units per (query row, head); zeroes the fp32 dQ
//    accumulator in atomic mode.
//  - varlen_bwd_dkdv: one CTA per (key tile of one sequence, K/V head). K and V stay in shared
//    memory while the CTA walks every query tile the mask lets it see, for every query head of the
//    group, so dK and dV (GQA: summed over the group) accumulate in registers and are written once,
//    without atomics. Its schedule is the forward's with the roles of queries and keys swapped.
//  - atomic mode (CV_DQ_ATOMIC=1): the same CTA also forms dS K for each query tile and adds it to
//    the fp32 accumulator with atomics; varlen_bwd_dq_convert then scales and rounds it into dq.
//  - deterministic mode (CV_DQ_ATOMIC=0): varlen_bwd_dq, one CTA per (query tile, head), streams
//    the key tiles and recomputes S and dP to form dQ in registers: no atomics, bitwise repeatable
//    gradients, for two extra GEMMs per tile pair.
//
// P^T and dS^T are staged in shared memory (16-bit) between the GEMM that makes them (warps over
// keys x queries) and the GEMMs that consume them (warps over keys x head dim for dK/dV, queries x
// head dim for dQ), so each phase has its own warp grid.
//
// Specialization (-D from cupy_varlen/_spec.py): CV_DTYPE_BF16, CV_HEAD_DIM, CV_BLOCK_M (queries per
// step), CV_BLOCK_N (keys per CTA), CV_WARPS, CV_STAGES (Q/dO ring), CV_WINDOWED, CV_S_WARP_ROWS,
// CV_KV_WARP_ROWS, CV_DQ_WARP_ROWS, CV_DQ_ATOMIC, CV_DQ_BLOCK_N, CV_DQ_STAGES.

constexpr int kHeadDim = CV_HEAD_DIM;
constexpr int kBlockM = CV_BLOCK_M;
constexpr int kBlockN = CV_BLOCK_N;
constexpr int kWarps = CV_WARPS;
constexpr int kThreads = kWarps * 32;
constexpr int kStages = CV_STAGES;
constexpr float kLog2e = 1.4426950408889634f;
// With two or more Q/dO slots the next tile's copy overlaps this tile's GEMMs; one slot (small
// shared memory, large head dims) is refilled after them.
constexpr bool kPrefetch = kStages >= 2;
static_assert(kThreads >= 2 * kBlockM, "one thread per lse and delta value of a query tile");

typedef SmemTile<kBlockM, kHeadDim> QTile;  // Q and dO
typedef SmemTile<kBlockN, kHeadDim> KTile;  // K and V; dK and dV are staged in their place
typedef SmemTile<kBlockN, kBlockM> STile;   // P^T and dS^T: keys x queries

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
  float* dq_accum;   // (total_q, heads, head_dim) fp32, atomic mode only
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  const int* schedule_kv;  // key tiles (scheduler.cuh layout, keys as rows)
  const int* schedule_q;   // query tiles, deterministic mode
  i64 q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride;
  i64 o_row_stride, o_head_stride, do_row_stride, do_head_stride;
  i64 dq_row_stride, dq_head_stride, dk_row_stride, dk_head_stride, dv_row_stride, dv_head_stride;
  i64 lse_head_stride, lse_row_stride;
  i64 total_q;
  int heads, heads_per_kv, head_dim;
  float scale, scale_log2;
  int window_left, window_right;
};
// The host packs this byte for byte (cupy_varlen/_launch.py, _BWD_PARAMS: 16 pointers, 19 int64,
// 3 int32, 2 float, 2 int32, padding).
static_assert(sizeof(BwdParams) == 312, "BwdParams layout must match the host's packing");

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
    float* dq_row = p.dq_accum ? p.dq_accum + (row * p.heads + head) * p.head_dim : nullptr;
    for (int c = sub; c < p.head_dim / 8; c += kPrepLanes) {
      const uint4 a = *reinterpret_cast<const uint4*>(o + 8 * c);
      const uint4 b = *reinterpret_cast<const uint4*>(d + 8 * c);
      acc += dot_halves(a.x, b.x) + dot_halves(a.y, b.y) + dot_halves(a.z, b.z) +
             dot_halves(a.w, b.w);
      if (dq_row) {
        reinterpret_cast<float4*>(dq_row + 8 * c)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        reinterpret_cast<float4*>(dq_row + 8 * c)[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
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
  }
}

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

extern "C" __global__ void __launch_bounds__(kThreads, 1)
varlen_bwd_dkdv(const __grid_constant__ BwdParams p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  TileWork work;
  int kv_head;
  if (!decode_tile(p.schedule_kv, 1, blockIdx.x, work, kv_head)) return;
  const SeqInfo seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, work.batch_idx);
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
  const int m_blocks = range.count();
  const int n_iters = m_blocks * p.heads_per_kv;

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

  // Step `it` visits query tile n_block_min + it % m_blocks of query head it / m_blocks of the
  // group. Every call commits a group (empty past the end) so the wait counts hold.
  auto load_query_tile = [&](int it) {
    if (it < n_iters) {
      const int head = kv_head * p.heads_per_kv + it / m_blocks;
      const int m0 = (range.n_block_min + it % m_blocks) * kBlockM;
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
    const int m0 = (range.n_block_min + it % m_blocks) * kBlockM;

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
    if (mask_test.needs_mask(m0))
      apply_mask(pt, n0 + sg.row0, m0 + sg.col0, lane, seq.q_len, band_t);
    // Keys past the sequence hold zeros, whose score is 0, not -inf: exp2(0 - lse) could overflow.
    if (keys_valid < kBlockN) mask_rows_from(pt, sg.row0, keys_valid, lane);
    softmax_backward(pt, dst, stats, stats + kBlockM * 4, sg.col0, p.scale_log2, lane);
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
      const int head = kv_head * p.heads_per_kv + it / m_blocks;
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
// dq = scale * accumulator, rounded to 16 bits: one thread per 8 elements.

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

#else
// ---------------------------------------------------------------------------------------------
// Deterministic dQ: one CTA per (query tile, head), 16 query rows per warp, key tiles streamed
// through a ring of CV_DQ_STAGES K/V slot pairs.

constexpr int kDqBlockN = CV_DQ_BLOCK_N;
constexpr int kDqStages = CV_DQ_STAGES;
constexpr int kDqWarps = kBlockM / 16;
constexpr int kDqThreads = kDqWarps * 32;
constexpr int kDqNAtoms = kDqBlockN / 8;
constexpr int kDAtoms = kHeadDim / 8;
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
  const SeqInfo seq = load_seq_info(p.cu_seqlens_q, p.cu_seqlens_k, work.batch_idx);
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
    if (mask_test.needs_mask(n0)) apply_mask(s, m0 + warp_row0, n0, lane, seq.k_len, band);
#pragma unroll
    for (int n = 0; n < kDqNAtoms; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = fast_exp2(fmaf(s[0][n][e], p.scale_log2, -row_lse[e / 2]));
        ds[0][n][e] = pv * (ds[0][n][e] - row_delta[e / 2]);
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
