// Online softmax over streamed key tiles (FlashAttention-2): per query row a running max and a
// running sum of exponentials; the output accumulator is rescaled whenever the max grows.
//
// Scores stay in raw (unscaled) units; the softmax scale is folded into one FFMA per score,
// exp2(s * scale_log2 - max * scale_log2), with scale_log2 = scale * log2(e). The host guarantees
// scale > 0, so multiplying by it preserves the order of scores and -inf stays -inf.
#pragma once

#include "common.cuh"

template <int kMAtoms>
struct OnlineSoftmax {
  // [m][half]: rows group and group + 8 of row block m.
  float row_max[kMAtoms][2];
  float row_sum[kMAtoms][2];  // partial over this lane's columns; reduced across the quad at the end

  CV_DEVICE OnlineSoftmax() {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[m][h] = neg_inf();
        row_sum[m][h] = 0.f;
      }
  }

  // Turns the score tile into probabilities (relative to the new running max) in place and
  // returns, per row, the factor that brings output accumulated so far to that max. Does not touch
  // the output, so it may run while a GEMM is still accumulating into it. Row by row, each row's
  // max as one FMNMX chain: the sm80 family's register budget is tuned to this form (four chains
  // spill 4 bytes in its head-dim-128 windowed paged tile on sm_90a); update_max and exponentiate
  // are the two halves for kernels that split them.
  template <int kNAtoms>
  CV_DEVICE void update_scores(float (&s)[kMAtoms][kNAtoms][4], float scale_log2,
                               float (&correction)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = row_max[m][h];
#pragma unroll
        for (int n = 0; n < kNAtoms; ++n)
          tile_max = fmaxf(tile_max, fmaxf(s[m][n][2 * h], s[m][n][2 * h + 1]));
        const float max_scaled = advance_max(m, h, quad_max(tile_max), scale_log2, correction);
        exponentiate_row(s, m, h, scale_log2, correction, max_scaled);
      }
  }

  // The first half of the online softmax for a whole tile: the new running max of each row, the
  // correction for what was accumulated against the old one, and the max in exp2 units. The
  // tile's max is taken over four independent chains per row: the first exponential waits for
  // it, and one chain through every atom is 2 * kNAtoms dependent FMNMX.
  template <int kNAtoms>
  CV_DEVICE void update_max(const float (&s)[kMAtoms][kNAtoms][4], float scale_log2,
                            float (&correction)[kMAtoms][2], float (&max_scaled)[kMAtoms][2]) {
    static_assert(kNAtoms >= 2, "four chains over a row's 2 * kNAtoms scores");
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float chain[4] = {s[m][0][2 * h], s[m][0][2 * h + 1], s[m][1][2 * h], s[m][1][2 * h + 1]};
#pragma unroll
        for (int n = 2; n < kNAtoms; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j)
            chain[2 * (n & 1) + j] = fmaxf(chain[2 * (n & 1) + j], s[m][n][2 * h + j]);
        const float tile_max = fmaxf(fmaxf(chain[0], chain[1]), fmaxf(chain[2], chain[3]));
        max_scaled[m][h] = advance_max(m, h, quad_max(fmaxf(tile_max, row_max[m][h])),
                                       scale_log2, correction);
      }
  }

  // The second half: the probabilities against update_max's max, in place, and the row sums.
  template <int kNAtoms>
  CV_DEVICE void exponentiate(float (&s)[kMAtoms][kNAtoms][4], float scale_log2,
                              const float (&correction)[kMAtoms][2],
                              const float (&max_scaled)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        exponentiate_row(s, m, h, scale_log2, correction, max_scaled[m][h]);
  }

  // Row (m, h) takes the new max (over the old one and the tile, quad-reduced): the correction
  // factor for the old accumulation, and the max in exp2 units. A row that has met only masked
  // keys keeps a max of -inf; exponentiating against 0 keeps its probabilities 0 instead of NaN
  // (-inf - -inf).
  CV_DEVICE float advance_max(int m, int h, float tile_max, float scale_log2,
                              float (&correction)[kMAtoms][2]) {
    const float max_scaled = (tile_max == neg_inf()) ? 0.f : tile_max * scale_log2;
    correction[m][h] = fast_exp2(row_max[m][h] * scale_log2 - max_scaled);
    row_max[m][h] = tile_max;
    return max_scaled;
  }

  template <int kNAtoms>
  CV_DEVICE void exponentiate_row(float (&s)[kMAtoms][kNAtoms][4], int m, int h, float scale_log2,
                                  const float (&correction)[kMAtoms][2], float max_scaled) {
    float tile_sum = 0.f;
#pragma unroll
    for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float p = fast_exp2(fmaf(s[m][n][2 * h + j], scale_log2, -max_scaled));
        s[m][n][2 * h + j] = p;
        tile_sum += p;
      }
    row_sum[m][h] = row_sum[m][h] * correction[m][h] + tile_sum;
  }

  // Applies the correction to the output without a branch, so that ptxas may schedule the
  // multiplies among the exponentials or under a GEMM (rescale's vote splits the block).
  template <int kDAtoms>
  static CV_DEVICE void rescale_always(float (&acc_o)[kMAtoms][kDAtoms][4],
                                       const float (&correction)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int d = 0; d < kDAtoms; ++d)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc_o[m][d][i] *= correction[m][i / 2];
  }

  // Applies update_scores' correction to the output accumulator. The warp vote was meant to skip
  // the multiplies once the running max settles, but it practically never fires: ptxas fuses the
  // correction's exponent into an FMA whose rounding residue keeps the factor off 1 (ncu: the
  // multiplies ran in 99.7% of iterations), and an exact 1 for an unmoved max did not pay either
  // (docs/performance.md, head dim 64 section). The branch stays because without it (or with the
  // exact 1) ptxas spills 68-72 bytes in the sm80 head-dim-128 tile.
  template <int kDAtoms>
  static CV_DEVICE void rescale(float (&acc_o)[kMAtoms][kDAtoms][4],
                                const float (&correction)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        if (__any_sync(0xffffffffu, correction[m][h] != 1.f)) {
#pragma unroll
          for (int d = 0; d < kDAtoms; ++d) {
            acc_o[m][d][2 * h] *= correction[m][h];
            acc_o[m][d][2 * h + 1] *= correction[m][h];
          }
        }
  }

  template <int kNAtoms, int kDAtoms>
  CV_DEVICE void update(float (&s)[kMAtoms][kNAtoms][4], float (&acc_o)[kMAtoms][kDAtoms][4],
                        float scale_log2) {
    float correction[kMAtoms][2];
    update_scores(s, scale_log2, correction);
    rescale(acc_o, correction);
  }

  // Divides the output by the row sums and returns the natural-log sum of exponentials of the
  // scaled scores. A row with no allowed key gets output 0 and lse -inf.
  template <int kDAtoms>
  CV_DEVICE void finalize(float (&acc_o)[kMAtoms][kDAtoms][4], float scale,
                          float (&lse)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[m][h]);
        const bool empty = !(sum > 0.f);
        const float inv = empty ? 0.f : 1.f / sum;
        lse[m][h] = empty ? neg_inf() : row_max[m][h] * scale + __logf(sum);
#pragma unroll
        for (int d = 0; d < kDAtoms; ++d) {
          acc_o[m][d][2 * h] *= inv;
          acc_o[m][d][2 * h + 1] *= inv;
        }
      }
  }

  // finalize with an attention sink per row (score_mod.cuh): `sink`, a scaled logit, joins the
  // row's denominator and adds no value. Both terms are taken relative to the larger of the sink
  // and the row's max, so neither overflows. A row with no allowed key gets output 0 and lse =
  // sink; a sink of -inf is no sink (finalize's results).
  template <int kDAtoms>
  CV_DEVICE void finalize_with_sink(float (&acc_o)[kMAtoms][kDAtoms][4], float scale,
                                    const float (&sink)[kMAtoms][2], float (&lse)[kMAtoms][2]) {
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[m][h]);
        const float keys_max = sum > 0.f ? row_max[m][h] * scale : neg_inf();
        const float top = fmaxf(keys_max, sink[m][h]);
        float inv = 0.f;
        lse[m][h] = neg_inf();
        if (top != neg_inf()) {
          const float keys_weight = __expf(keys_max - top);  // 0 for a row without keys
          const float denom = sum * keys_weight + __expf(sink[m][h] - top);
          inv = keys_weight / denom;
          lse[m][h] = top + __logf(denom);
        }
#pragma unroll
        for (int d = 0; d < kDAtoms; ++d) {
          acc_o[m][d][2 * h] *= inv;
          acc_o[m][d][2 * h + 1] *= inv;
        }
      }
  }
};

// Softmax backward on a transposed tile (rows = keys, columns = queries), whose row statistics
// therefore belong to the columns; lse_log2 and delta are per-query arrays in shared memory indexed
// by tile column. In two steps, so that a kernel can start the GEMM that needs P before dP is
// ready: probabilities_backward turns scores S into P = exp2(S * scale_log2 - lse_log2) in place
// (lse_log2 is +inf for a query with no allowed key, so its P is 0); scores_gradient turns dP into
// dS = P * (dP - delta) in place. Each takes its statistic as a ColumnStats, which a kernel can
// make before it waits for the GEMM whose result the step consumes: while wgmma reads its
// operands the shared-memory pipe is busy, and a load issued after the wait stalls the arithmetic.

// A per-query statistic of a transposed tile's columns (which start at query col0), read from the
// fp32 array `stats` in shared memory: a lane's two adjacent columns of an atom in one 8-byte load.
// The first kAhead atoms' are loaded when the object is made, ahead of their use; the rest where
// used (holding all of them would cost a wide tile two registers per atom).
template <int kNAtoms, int kAhead>
struct ColumnStats {
  static_assert(kAhead >= 0 && kAhead <= kNAtoms, "atoms loaded ahead");
  // This thread's first column's address; atom n's is 32 n bytes on, which ptxas folds into each
  // load's offset (an index summed before scaling became an OR of disjoint bits, a LOP3 per atom).
  u32 base;
  float2 ahead[kAhead > 0 ? kAhead : 1];

  CV_DEVICE ColumnStats(u32 stats, int col0, int lane) : base(stats + 4 * col0 + 8 * (lane & 3)) {
#pragma unroll
    for (int n = 0; n < kAhead; ++n) ahead[n] = load(n);
  }
  CV_DEVICE float2 load(int n) const { return ld_shared_f32x2(base + 32 * n); }
  CV_DEVICE float2 operator[](int n) const { return n < kAhead ? ahead[n] : load(n); }
};

// ColumnStats without a held address: each atom's is formed where it is loaded, from values the
// kernel keeps anyway. For the sm80 dK/dV kernel at head dim 96-128, at 255 registers, where the
// one held address spills 8-16 bytes.
struct ColumnStatsAt {
  u32 stats;
  int col0, lane;
  CV_DEVICE float2 operator[](int n) const {
    return ld_shared_f32x2(stats + 4 * (col0 + 8 * n + 2 * (lane & 3)));
  }
};

// Calls f(m, n, i, stat) for every element (m, n, i) of a transposed tile, with stat its column's.
template <int kMAtoms, int kNAtoms, class Stats, class F>
CV_DEVICE void for_each_with_column_stat(const Stats& stats, F f) {
#pragma unroll
  for (int n = 0; n < kNAtoms; ++n) {
    const float2 v = stats[n];
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        f(m, n, 2 * h, v.x);
        f(m, n, 2 * h + 1, v.y);
      }
  }
}

template <int kMAtoms, int kNAtoms, class Stats>
CV_DEVICE void probabilities_backward(float (&s)[kMAtoms][kNAtoms][4], const Stats& lse_log2,
                                      float scale_log2) {
  for_each_with_column_stat<kMAtoms, kNAtoms>(lse_log2, [&](int m, int n, int i, float l) {
    s[m][n][i] = fast_exp2(fmaf(s[m][n][i], scale_log2, -l));
  });
}

template <int kMAtoms, int kNAtoms, class Stats>
CV_DEVICE void scores_gradient(const float (&p)[kMAtoms][kNAtoms][4],
                               float (&dp)[kMAtoms][kNAtoms][4], const Stats& delta) {
  for_each_with_column_stat<kMAtoms, kNAtoms>(delta, [&](int m, int n, int i, float d) {
    dp[m][n][i] = p[m][n][i] * (dp[m][n][i] - d);
  });
}

// probabilities_backward for a one-row-block tile whose P is only needed as the 16-bit A operand of
// its GEMM: each pair of atoms is exponentiated and packed (pack_a_fragments' layout) in turn.
template <int kNAtoms, int kAhead>
CV_DEVICE void probabilities_backward_packed(float (&s)[1][kNAtoms][4],
                                             const ColumnStats<kNAtoms, kAhead>& lse_log2,
                                             float scale_log2, u32 (&p)[kNAtoms / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < kNAtoms / 2; ++kk)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int n = 2 * kk + j;
      const float2 l = lse_log2[n];
      float e[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) e[i] = fast_exp2(fmaf(s[0][n][i], scale_log2, (i & 1) ? -l.y : -l.x));
      p[kk][2 * j] = pack_float2(e[0], e[1]);
      p[kk][2 * j + 1] = pack_float2(e[2], e[3]);
    }
}

// scores_gradient with P as packed for its GEMM (pack_a_fragments of a one-row-block tile, 16-bit):
// the fp32 P need not stay in registers until dP is ready. dS is rounded to 16 bits for its GEMMs
// anyway; P's own rounding adds an error of the same size.
template <int kNAtoms, int kAhead>
CV_DEVICE void scores_gradient_packed(const u32 (&p)[kNAtoms / 2][4], float (&dp)[1][kNAtoms][4],
                                      const ColumnStats<kNAtoms, kAhead>& delta) {
#pragma unroll
  for (int n = 0; n < kNAtoms; ++n) {
    const float2 d = delta[n];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 pv = unpack_float2(p[n / 2][(n % 2) * 2 + h]);
      dp[0][n][2 * h] = pv.x * (dp[0][n][2 * h] - d.x);
      dp[0][n][2 * h + 1] = pv.y * (dp[0][n][2 * h + 1] - d.y);
    }
  }
}

template <int kMAtoms, int kNAtoms>
CV_DEVICE void softmax_backward(float (&s)[kMAtoms][kNAtoms][4], float (&dp)[kMAtoms][kNAtoms][4],
                                u32 lse_log2, u32 delta, int col0, float scale_log2, int lane) {
  probabilities_backward(s, ColumnStatsAt{lse_log2, col0, lane}, scale_log2);
  scores_gradient(s, dp, ColumnStatsAt{delta, col0, lane});
}
