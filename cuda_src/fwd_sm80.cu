// FlashAttention-2 forward for packed variable-length batches, on mma.sync tensor cores (sm_80+).
//
// One CTA computes one query tile (kBlockM rows of one sequence, one head). It streams the key/value
// tiles that the mask allows, last tile first (so the tile that needs element masking is met while
// the running max is still forming), through a ring of kStages K slots and kStages V slots filled
// by cp.async. O and lse are written once at the end.
//
// A shared-memory tile of kBlockN keys may be consumed in kSubTiles register sub-tiles of kSubN
// keys (QK^T, softmax, PV each): the score registers shrink with kSubN while barriers and copies
// stay per kBlockN. Copy schedule:
//  - one sub-tile: K and V staggered as in FlashAttention-2: V[i] is requested while S = Q K[i]^T
//    is computed and K[i + kStages] while P V[i] is, so each copy overlaps a GEMM;
//  - several sub-tiles: K[i + kStages - 1] and V[i + kStages - 1] are requested together at the
//    top of iteration i (their slots were freed by iteration i - 1), needing kStages >= 2.
//
// A paged KV cache (CV_PAGED): k and v are page pools (pages, page_size, H_kv, D) that
// block_table names per sequence (row b: its pages in key order), each sequence's key count from
// cu_seqlens_k's differences and seqused_k (either may be null; load_paged_seq_info); K/V tiles
// are gathered a row at a time (load_tile_paged_async), for any page size.
//
// Decode tiles (CV_DECODE), for few query rows against many keys: a CTA serves one K/V head of one
// sequence, its tile's rows the (token, query head) pairs of that K/V head's query heads, token-
// major (GQA packing: each K/V tile is read once for all of them, not once per query head), and
// the grid's x covers the sequence's query tiles times the key splits: split s of num_splits takes
// an even share of the key tiles the rows need. One split writes O and lse as the other tiles do;
// several write fp32 partials that varlen_fwd_combine (split_combine.cuh) merges. Grid (x, K/V
// heads, sequences) from the host's shapes alone; a CTA strides over its sequence's query tiles, so
// a loose max_seqlen_q never loses rows.
//
// Score modifiers (score_mod.cuh; CV_SOFTCAP, CV_ALIBI, CV_SINKS): softcap and ALiBi apply to each
// score tile before the mask, the sink at the end (with split keys, in the combine instead).
//
// Specialization (-D from cupy_varlen/_spec.py): CV_HEAD_DIM (head-dim tile), CV_BLOCK_M,
// CV_BLOCK_N, CV_SUB_N, CV_WARPS, CV_STAGES, CV_WINDOWED, CV_MIN_BLOCKS, CV_QK_UNROLL,
// CV_DTYPE_BF16, CV_PAGED, CV_DECODE, CV_SOFTCAP, CV_ALIBI, CV_SINKS.

#include "common.cuh"
#include "epilogue.cuh"
#include "mask.cuh"
#include "mma_sm80.cuh"
#include "score_mod.cuh"
#include "seqlen.cuh"
#include "softmax.cuh"
#include "tiles.cuh"
#if CV_DECODE
#include "split_combine.cuh"
#else
#include "scheduler.cuh"
#endif

constexpr int kHeadDim = CV_HEAD_DIM;
constexpr int kBlockM = CV_BLOCK_M;
constexpr int kBlockN = CV_BLOCK_N;
constexpr int kSubN = CV_SUB_N;
constexpr int kSubTiles = kBlockN / kSubN;
constexpr int kWarps = CV_WARPS;
constexpr int kStages = CV_STAGES;
constexpr int kThreads = kWarps * 32;
constexpr int kWarpRows = kBlockM / kWarps;
constexpr int kMAtoms = kWarpRows / 16;
constexpr int kNAtoms = kSubN / 8;
constexpr int kDAtoms = kHeadDim / 8;
constexpr bool kStaggerK = kSubTiles == 1;
// cp.async groups younger than K[i] / V[i] that may still be in flight when each is awaited.
constexpr int kPendingAfterK = kStaggerK ? 2 * (kStages - 1) : 2 * kStages - 3;
constexpr int kPendingAfterV = 2 * (kStages - 1);
static_assert(kWarpRows % 16 == 0, "each warp owns whole 16-row mma blocks");
static_assert(kBlockN % kSubN == 0 && kSubN % 16 == 0, "sub-tiles split the key tile evenly");
static_assert(kStaggerK ? kStages >= 1 : kStages >= 2, "sub-tiled schedule needs two K/V slots");

typedef SmemTile<kBlockM, kHeadDim> QTile;
typedef SmemTile<kBlockN, kHeadDim> KVTile;

extern "C" __global__ void __launch_bounds__(kThreads, CV_MIN_BLOCKS)
varlen_fwd(const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
           u16* __restrict__ out, float* __restrict__ lse,
           const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
           const int* __restrict__ schedule, const int* __restrict__ seqused_k,
           const int* __restrict__ block_table, float* __restrict__ partial,
           const float* __restrict__ alibi_slopes, const float* __restrict__ sinks,
           i64 q_row_stride, i64 q_head_stride, i64 k_row_stride, i64 k_head_stride,
           i64 v_row_stride, i64 v_head_stride, i64 o_row_stride, i64 o_head_stride,
           i64 lse_head_stride, i64 k_page_stride, i64 v_page_stride, i64 block_table_stride,
           i64 alibi_batch_stride, int heads_per_kv, int head_dim, float scale, float scale_log2,
           float softcap_in, float softcap_out, int window_left, int window_right, int page_size,
           int k_capacity, int num_splits, int num_heads, int total_q) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

#if CV_PAGED
#define CV_LOAD_SEQ_INFO(batch_idx) \
  load_paged_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k, batch_idx, k_capacity)
#else
#define CV_LOAD_SEQ_INFO(batch_idx) load_seq_info(cu_seqlens_q, cu_seqlens_k, seqused_k, batch_idx)
#endif
#if CV_DECODE
  const int group = heads_per_kv;  // packed rows per token (a kernel parameter: not a register)
  struct {
    int batch_idx, m_block;
  } work;  // the grid's, not a schedule's
  for (work.m_block = blockIdx.x / num_splits;; work.m_block += gridDim.x / num_splits) {
  work.batch_idx = blockIdx.z;
  SeqInfo seq = CV_LOAD_SEQ_INFO(work.batch_idx);
  if (work.m_block * kBlockM >= seq.q_len * group) break;
  const int kv_head = blockIdx.y;
  const int split = blockIdx.x % num_splits;
  __syncthreads();  // the previous tile's O staging (in Q's space) has been read
#else
  TileWork work;
  int head;
  if (!decode_tile(schedule, heads_per_kv, blockIdx.x, work, head)) return;
  const int kv_head = head / heads_per_kv;
  SeqInfo seq = CV_LOAD_SEQ_INFO(work.batch_idx);
#endif
#if CV_WINDOWED
  const AttnWindow window = {window_left, window_right};
#else
  const AttnWindow window = {-1, -1};
#endif
  int m0 = work.m_block * kBlockM;
#if CV_DECODE
  int rows_valid = min(kBlockM, seq.q_len * group - m0);
  // The query positions the tile's rows hold, which the mask and the key range speak of.
  const int pos_first = m0 / group, pos_last = (m0 + rows_valid - 1) / group;
#else
  int rows_valid = min(kBlockM, seq.q_len - m0);
  const int pos_first = m0, pos_last = m0 + rows_valid - 1;
#endif
  const int chunks_valid = head_dim / 8;

  const MaskBand band = make_band(seq.q_len, seq.k_len, window);
#if CV_DECODE
  const KeyBlockRange range =
      split_share(key_block_range(pos_first, pos_last, seq.k_len, band, kBlockN), split, num_splits);
#else
  const KeyBlockRange range = key_block_range(pos_first, pos_last, seq.k_len, band, kBlockN);
#endif
  const TileMaskTest<kSubN> mask_test(pos_first, pos_last, seq.k_len, band);
  const int n_iters = range.count();

  const u32 q_smem = smem_addr(smem);
  const u32 k_smem = q_smem + QTile::kBytes;
  const u32 v_smem = k_smem + kStages * KVTile::kBytes;

  // Iteration i visits key tile n_block_max - 1 - i. Every call commits a group, empty past the
  // last tile, so the wait counts below hold for any number of iterations. The tile's address is
  // rebuilt from the kernel parameters on each call: two 64-bit sequence base pointers kept live
  // through the main loop are what spill first at 255 registers.
  auto load_kv = [&](u32 slots, const u16* base, i64 row_stride, i64 head_stride,
                     i64 page_stride, int iter) {
    if (iter < n_iters) {
      const int n0 = (range.n_block_max - 1 - iter) * kBlockN;
#if CV_PAGED
      load_tile_paged_async<kBlockN, kHeadDim, kThreads>(
          slots + (iter % kStages) * KVTile::kBytes, base + (i64)opaque(kv_head) * head_stride,
          page_stride, row_stride, block_table + (i64)opaque(work.batch_idx) * block_table_stride,
          page_size, n0, seq.k_len - n0, chunks_valid, tid);
#else
      const u16* tile = base + (i64)(opaque(seq.k_start) + n0) * row_stride +
                        (i64)opaque(kv_head) * head_stride;
      load_tile_async<kBlockN, kHeadDim, kThreads>(slots + (iter % kStages) * KVTile::kBytes,
                                                   tile, row_stride, seq.k_len - n0, chunks_valid,
                                                   tid);
#endif
    }
    cp_async_commit();
  };

  // Issue order K0 (with Q), V0, K1, V1, ...; see the copy schedule above.
#if CV_DECODE
  load_rows_async<kBlockM, kHeadDim, kThreads>(
      q_smem,
      [&](int r) {
        const int row = m0 + r, token = row / group;
        return q + (i64)(seq.q_start + token) * q_row_stride +
               (i64)(kv_head * group + row - token * group) * q_head_stride;
      },
      q, rows_valid, chunks_valid, tid);
#else
  const u16* q_tile = q + (i64)(seq.q_start + m0) * q_row_stride + (i64)head * q_head_stride;
  load_tile_async<kBlockM, kHeadDim, kThreads>(q_smem, q_tile, q_row_stride, rows_valid,
                                               chunks_valid, tid);
#endif
  load_kv(k_smem, k, k_row_stride, k_head_stride, k_page_stride, 0);
  if (kStaggerK) {
#pragma unroll
    for (int s = 1; s < kStages; ++s) {
      load_kv(v_smem, v, v_row_stride, v_head_stride, v_page_stride, s - 1);
      load_kv(k_smem, k, k_row_stride, k_head_stride, k_page_stride, s);
    }
  } else {
    load_kv(v_smem, v, v_row_stride, v_head_stride, v_page_stride, 0);
#pragma unroll
    for (int s = 1; s < kStages - 1; ++s) {
      load_kv(k_smem, k, k_row_stride, k_head_stride, k_page_stride, s);
      load_kv(v_smem, v, v_row_stride, v_head_stride, v_page_stride, s);
    }
  }

  float acc_o[kMAtoms][kDAtoms][4];
  zero_fragments(acc_o);
  OnlineSoftmax<kMAtoms> softmax;
  const LaneCoords lc(lane);
  const int warp_row0 = warp * kWarpRows;
#if CV_ALIBI
#if CV_DECODE
  // Each packed row's own query position (as a key position: token + Lk - Lq) and head's slope.
  float alibi_pos[kMAtoms][2], alibi_row_slope[kMAtoms][2];
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + (lane >> 2) + 8 * h;
      const int token = (m0 + row) / group;
      alibi_pos[m][h] = (float)token + (float)(seq.k_len - seq.q_len);
      // Rows past the tile's last are never stored: no slope to read for them.
      alibi_row_slope[m][h] =
          row < rows_valid ? alibi_slope(alibi_slopes, alibi_batch_stride, work.batch_idx,
                                         kv_head * group + m0 + row - token * group, scale)
                           : 0.f;
    }
#else
  const float alibi = alibi_slope(alibi_slopes, alibi_batch_stride, work.batch_idx, head, scale);
#endif
#endif

  for (int it = 0; it < n_iters; ++it) {
    const u32 k_slot = k_smem + (it % kStages) * KVTile::kBytes;
    const u32 v_slot = v_smem + (it % kStages) * KVTile::kBytes;
    const int n0 = (range.n_block_max - 1 - it) * kBlockN;

    cp_async_wait<kPendingAfterK>();  // K[it] landed
    __syncthreads();                  // ... for every thread; iteration it - 1 freed its slots
    if (!kStaggerK)
      load_kv(k_smem, k, k_row_stride, k_head_stride, k_page_stride, it + kStages - 1);
    load_kv(v_smem, v, v_row_stride, v_head_stride, v_page_stride, it + kStages - 1);

    // Rolled: unrolled, ptxas overlaps the next sub-tile's QK^T with this one's PV and keeps two
    // score tiles live, which is what sub-tiling exists to avoid.
#pragma unroll 1
    for (int sub = 0; sub < kSubTiles; ++sub) {
      float s[kMAtoms][kNAtoms][4];
      zero_fragments(s);
      gemm_qk<kMAtoms, kNAtoms, kHeadDim, kBlockM, kBlockN, CV_QK_UNROLL>(
          s, q_smem, k_slot, warp_row0, sub * kSubN, lc);
      const int sub_n0 = n0 + sub * kSubN;
#if CV_SOFTCAP
      apply_softcap(s, Softcap{softcap_in, softcap_out});
#endif
#if CV_ALIBI
#if CV_DECODE
      apply_alibi_rows(s, alibi_pos, alibi_row_slope, sub_n0, lane);
#else
      apply_alibi(s, m0 + warp_row0, sub_n0, seq.k_len - seq.q_len, alibi, lane);
#endif
#endif
#if CV_DECODE
      if (mask_test.needs_mask(sub_n0))
        apply_mask_grouped(s, m0 + warp_row0, sub_n0, lane, seq.k_len, band, group);
#else
      if (mask_test.needs_mask(sub_n0)) apply_mask(s, m0 + warp_row0, sub_n0, lane, seq.k_len, band);
#endif

      if (sub == 0) {
        cp_async_wait<kPendingAfterV>();  // V[it] landed
        __syncthreads();                  // ... for every thread (and K[it] is read, if staggered)
        if (kStaggerK) load_kv(k_smem, k, k_row_stride, k_head_stride, k_page_stride, it + kStages);
      }

      softmax.update(s, acc_o, scale_log2);
      gemm_pv<kMAtoms, kNAtoms, kDAtoms, kHeadDim, kBlockN>(acc_o, s, v_slot, sub * kSubN, lc);
    }
  }

#if CV_DECODE
  {
  // As the scheduled tiles below: re-derived, not held through the main loop; query rows only.
  const int kv_head = opaque(blockIdx.y);
  seq = load_paged_seq_info(cu_seqlens_q, nullptr, nullptr, opaque(blockIdx.z), 0);
  m0 = work.m_block * kBlockM;
  rows_valid = min(kBlockM, seq.q_len * group - m0);
  float row_lse[kMAtoms][2];
#if CV_SINKS
  // Split keys leave the sink to the combine, which meets every split's share of a row.
  float sink[kMAtoms][2];
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + (lane >> 2) + 8 * h;
      sink[m][h] = num_splits == 1 && row < rows_valid
                       ? __ldg(sinks + kv_head * group + (m0 + row) % group)
                       : neg_inf();
    }
  softmax.finalize_with_sink(acc_o, scale, sink, row_lse);
#else
  softmax.finalize(acc_o, scale, row_lse);
#endif
  // Straight from the fragments (few rows: no staging, no barrier). Tile row r: token
  // (m0 + r) / group, query head kv_head * group + (m0 + r) % group. One split writes O and lse;
  // several, each split's share of O (normalized) and its lse in fp32 (split_combine.cuh).
  const i64 split_rows = (i64)total_q * num_heads;
  float* o_part = partial + partial_o_offset(num_splits, split_rows);
  const int split = opaque(blockIdx.x) % num_splits;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + (lane >> 2) + 8 * h;
      if (row >= rows_valid) continue;
      const int token = (m0 + row) / group;
      const int qh = kv_head * group + m0 + row - token * group;
      if (num_splits == 1) {
        if (lse != nullptr && (lane & 3) == 0)
          lse[(i64)qh * lse_head_stride + seq.q_start + token] = row_lse[m][h];
        u16* dst = out + (i64)(seq.q_start + token) * o_row_stride + (i64)qh * o_head_stride +
                   2 * (lane & 3);
#pragma unroll
        for (int d = 0; d < kDAtoms; ++d)
          if (8 * d < head_dim)
            *reinterpret_cast<u32*>(dst + 8 * d) =
                pack_float2(acc_o[m][d][2 * h], acc_o[m][d][2 * h + 1]);
      } else {
        const i64 at = split * split_rows + (i64)(seq.q_start + token) * num_heads + qh;
        if ((lane & 3) == 0) partial[at] = row_lse[m][h];
        float* dst = o_part + at * head_dim + 2 * (lane & 3);
#pragma unroll
        for (int d = 0; d < kDAtoms; ++d)
          if (8 * d < head_dim)
            *reinterpret_cast<float2*>(dst + 8 * d) =
                make_float2(acc_o[m][d][2 * h], acc_o[m][d][2 * h + 1]);
      }
    }
  // Q's copy is still in flight where no key tile was (an empty share): it must land before the
  // next tile's Q copy targets the same space.
  cp_async_wait<0>();
  }
  }  // query tiles
#else
  // Re-derive the tile's coordinates rather than hold them through the main loop (opaque() makes
  // the compiler reload them instead of keeping the first values live).
  decode_tile(schedule, heads_per_kv, opaque(blockIdx.x), work, head);
  // Its query rows only.
#if CV_PAGED
  seq = load_paged_seq_info(cu_seqlens_q, nullptr, nullptr, work.batch_idx, 0);
#else
  seq = load_seq_info(cu_seqlens_q, cu_seqlens_k, nullptr, work.batch_idx);
#endif
  m0 = work.m_block * kBlockM;
  rows_valid = min(kBlockM, seq.q_len - m0);

  float row_lse[kMAtoms][2];
#if CV_SINKS
  float sink[kMAtoms][2];
  const float head_sink = __ldg(sinks + head);
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m) sink[m][0] = sink[m][1] = head_sink;
  softmax.finalize_with_sink(acc_o, scale, sink, row_lse);
#else
  softmax.finalize(acc_o, scale, row_lse);
#endif
  if (lse != nullptr)
    store_lse(row_lse, lse + (i64)head * lse_head_stride + seq.q_start + m0, rows_valid, warp_row0,
              lane);

  // The Q tile's space stages O: every warp must be past its last read of Q, and no copy may still
  // be landing in shared memory (the trailing groups are empty, but Q's may be all there is).
  cp_async_wait<0>();
  __syncthreads();
  store_output<kMAtoms, kDAtoms, kBlockM, kHeadDim, kThreads>(
      acc_o, q_smem, out + (i64)(seq.q_start + m0) * o_row_stride + (i64)head * o_head_stride,
      o_row_stride, rows_valid, chunks_valid, warp_row0, lane, tid);
#endif
#undef CV_LOAD_SEQ_INFO
}
