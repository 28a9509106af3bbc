// Combining a split-KV forward's partial results (the decode tiles of fwd_sm80.cu, CV_DECODE).
//
// A forward split over keys leaves, per split s and (token, head) row, the row's output over its
// share of the keys, normalized, and that share's lse (-inf where the share held no allowed key).
// The whole row's lse is the log-sum-exp of the shares' and its output their sum weighted by
// exp(lse_s - lse). Layout, fp32, rows (token, head) token-major over the whole batch:
//   lse_s: partial[s * rows + row],  O_s: partial[lse_entries + (s * rows + row) * head_dim]
// with rows = total_q * num_heads and lse_entries = num_splits * rows rounded up to 16 bytes (the
// O rows' 8-byte stores stay aligned). An attention sink (score_mod.cuh; sinks non-null, one logit
// per head) is one more share here, of output 0: the splits leave it out.
#pragma once

#include "common.cuh"

constexpr int kCombineThreads = 128;  // cupy_varlen/_launch.py: COMBINE_THREADS
constexpr int kCombineWarps = kCombineThreads / 32;
// Columns per lane: head_dim <= 256 as 32 lanes x 4 pairs.
constexpr int kCombinePairs = 4;

CV_DEVICE i64 partial_o_offset(int num_splits, i64 split_rows) {
  return (num_splits * split_rows + 3) & ~(i64)3;
}

CV_DEVICE float warp_max(float x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, d));
  return x;
}

CV_DEVICE float warp_sum(float x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_xor_sync(0xffffffffu, x, d);
  return x;
}

// Grid (row slots, sequences): a warp combines a row of sequence blockIdx.y at a time, striding by
// the grid, so every row is written whatever the grid's width (the host sizes it from
// max_seqlen_q, which may be loose). Only rows of sequences are written: rows of the packed batch
// past the last offset stay as they are, as in the unsplit kernels.
extern "C" __global__ void __launch_bounds__(kCombineThreads)
varlen_fwd_combine(const float* __restrict__ partial, u16* __restrict__ out,
                   float* __restrict__ lse, const int* __restrict__ cu_seqlens_q,
                   const float* __restrict__ sinks, i64 o_row_stride, i64 o_head_stride, i64 lse_head_stride, int num_splits,
                   int num_heads, int total_q, int head_dim) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int q_start = __ldg(cu_seqlens_q + blockIdx.y);
  const int q_len = max(__ldg(cu_seqlens_q + blockIdx.y + 1) - q_start, 0);
  const int rows = q_len * num_heads;
  const i64 split_rows = (i64)total_q * num_heads;
  const float* lse_part = partial;
  const float* o_part = partial + partial_o_offset(num_splits, split_rows);
  for (int r = blockIdx.x * kCombineWarps + warp; r < rows; r += gridDim.x * kCombineWarps) {
    const int token = r / num_heads, head = r - token * num_heads;
    const i64 row = (i64)(q_start + token) * num_heads + head;
    float row_max = neg_inf();
    for (int s = lane; s < num_splits; s += 32) row_max = fmaxf(row_max, lse_part[s * split_rows + row]);
    row_max = warp_max(row_max);
    const float sink = sinks != nullptr ? __ldg(sinks + head) : neg_inf();
    row_max = fmaxf(row_max, sink);
    const bool empty = row_max == neg_inf();
    float sum = 0.f;
    if (!empty)
      for (int s = lane; s < num_splits; s += 32) sum += __expf(lse_part[s * split_rows + row] - row_max);
    sum = warp_sum(sum);
    if (sinks != nullptr && !empty) sum += __expf(sink - row_max);
    const float row_lse = empty ? neg_inf() : row_max + __logf(sum);

    float2 acc[kCombinePairs];
#pragma unroll
    for (int c = 0; c < kCombinePairs; ++c) acc[c] = make_float2(0.f, 0.f);
    if (!empty)
      for (int s = 0; s < num_splits; ++s) {
        const float w = __expf(lse_part[s * split_rows + row] - row_lse);  // -inf share: 0
        const float* o = o_part + (s * split_rows + row) * head_dim;
#pragma unroll
        for (int c = 0; c < kCombinePairs; ++c) {
          const int col = 2 * lane + 64 * c;
          if (col < head_dim) {
            const float2 x = *reinterpret_cast<const float2*>(o + col);
            acc[c].x += w * x.x;
            acc[c].y += w * x.y;
          }
        }
      }
    u16* dst = out + (i64)(q_start + token) * o_row_stride + (i64)head * o_head_stride;
#pragma unroll
    for (int c = 0; c < kCombinePairs; ++c) {
      const int col = 2 * lane + 64 * c;
      if (col < head_dim) *reinterpret_cast<u32*>(dst + col) = pack_float2(acc[c].x, acc[c].y);
    }
    if (lse != nullptr && lane == 0) lse[(i64)head * lse_head_stride + q_start + token] = row_lse;
  }
}
