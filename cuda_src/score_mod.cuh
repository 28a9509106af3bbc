// Score modifiers: logit softcap, ALiBi and attention sinks, each a compile-time flag of the kernel
// spec (CV_SOFTCAP, CV_ALIBI, CV_SINKS; cupy_varlen/_spec.py), so that a kernel without one is
// exactly the kernel without this file's code.
//
// The kernels hold scores in raw units, s = q . k, and apply the softmax scale inside exp2's FFMA
// (softmax.cuh). The modifiers are defined on the scaled score scale * s (FlashAttention's
// definitions), so their constants arrive divided by the scale:
//  - softcap c:  scale * s <- c tanh(scale * s / c), i.e. s <- (c / scale) tanh(s * scale / c);
//  - ALiBi slope m:  scale * s <- scale * s - m |i + Lk - Lq - j| for query row i and key j,
//    bottom-right aligned like the causal mask, i.e. s <- s - (m / scale) |i + Lk - Lq - j|;
//  - sinks: a logit per query head that joins every row's softmax denominator and contributes no
//    value (OnlineSoftmax::finalize_with_sink); the backward needs nothing of its own because the
//    forward's lse already holds the sink.
// Softcap and ALiBi apply before the mask, so masked scores stay -inf whatever they were.
#pragma once

#include "common.cuh"
#include "softmax.cuh"

// tanh of a score for the softcap. bf16: tanh.approx.f32, one MUFU op with a relative error of
// about 2^-11, below bf16's rounding of P (2^-9). fp16 rounds P to 2^-11, where that error would
// double the kernel's: there tanh comes from exp2 and a division (absolute error about 2^-22,
// which is what a logit needs), for a second MUFU op.
CV_DEVICE float fast_tanh(float x) {
#if CV_DTYPE_BF16
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
#else
  const float e = fast_exp2(-2.8853900817779268f * fabsf(x));  // exp(-2|x|), in (0, 1]
  return copysignf(__fdividef(1.f - e, 1.f + e), x);
#endif
}

// lg2.approx.ftz.f32: -inf for 0.
CV_DEVICE float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// scale / c and c / scale (host-computed): s <- out * tanh(s * in).
struct Softcap {
  float in, out;
};

template <int kMAtoms, int kNAtoms>
CV_DEVICE void apply_softcap(float (&s)[kMAtoms][kNAtoms][4], Softcap c) {
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[m][n][i] = fast_tanh(s[m][n][i] * c.in) * c.out;
}

// The derivative of the capped score with respect to the raw one, 1 - tanh^2, recovered from the
// capped score itself: tanh = capped / out = capped * in (in = 1 / out). A masked score (-inf)
// gives 0, not -inf, so that the zero P of a masked entry keeps its dS 0.
CV_DEVICE float softcap_slope(float capped, float in) {
  const float t = capped * in;
  return fmaxf(fmaf(-t, t, 1.f), 0.f);
}

// scores_gradient_packed (softmax.cuh) through a softcap: dS = P (dP - delta) softcap_slope, for
// the sm90 backward, which holds neither the scores nor their slopes until dP^T is done (either
// spills its 128- and 80-query tiles). The capped score comes back from the packed P itself:
// capped * scale_log2 = log2 P + lse_log2, so tanh = (log2 P + lse_log2) * softcap_log2 with
// softcap_log2 = 1 / (softcap log2 e). P's 16-bit rounding moves tanh by at most 2^-9 / softcap:
// below dS's own rounding for any cap >= 1. A zero P (masked, underflowed) gives dS 0.
template <int kNAtoms, int kAhead, int kLseAhead>
CV_DEVICE void softcap_scores_gradient_packed(const u32 (&p)[kNAtoms / 2][4],
                                              float (&dp)[1][kNAtoms][4],
                                              const ColumnStats<kNAtoms, kAhead>& delta,
                                              const ColumnStats<kNAtoms, kLseAhead>& lse_log2,
                                              float softcap_log2) {
#pragma unroll
  for (int n = 0; n < kNAtoms; ++n) {
    const float2 d = delta[n], l = lse_log2[n];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float2 pv = unpack_float2(p[n / 2][(n % 2) * 2 + h]);
      const float tx = (fast_log2(pv.x) + l.x) * softcap_log2;
      const float ty = (fast_log2(pv.y) + l.y) * softcap_log2;
      dp[0][n][2 * h] = pv.x * (dp[0][n][2 * h] - d.x) * fmaxf(fmaf(-tx, tx, 1.f), 0.f);
      dp[0][n][2 * h + 1] = pv.y * (dp[0][n][2 * h + 1] - d.y) * fmaxf(fmaf(-ty, ty, 1.f), 0.f);
    }
  }
}

// The ALiBi slope of (batch, head) in raw units: slopes are float32 (B, H) with row stride
// `batch_stride` (0: one (H,) row for every sequence).
CV_DEVICE float alibi_slope(const float* slopes, i64 batch_stride, int batch, int head,
                            float scale) {
  return __ldg(slopes + batch * batch_stride + head) / scale;
}

// Subtracts slope * |c - r - offset| from the score of fragment row r and column c, where fragment
// (m, n, e) holds row row0 + 16m + lane / 4 + 8(e / 2) and column col0 + 8n + 2(lane % 4) + e % 2.
// Rows are queries and columns keys with offset = Lk - Lq; the backward's transposed tiles (rows
// keys, columns queries) pass offset = Lq - Lk. The distance is formed in fp32 from one per-lane
// base plus compile-time constants (exact below 2^24; beyond, the bias is already astronomical).
template <int kMAtoms, int kNAtoms>
CV_DEVICE void apply_alibi(float (&s)[kMAtoms][kNAtoms][4], int row0, int col0, int offset,
                           float slope, int lane) {
  const float base = (float)(col0 + 2 * (lane & 3) - row0 - (lane >> 2)) - (float)offset;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float d = base + (float)(8 * n + (i & 1) - 16 * m - 8 * (i >> 1));
        s[m][n][i] = fmaf(-slope, fabsf(d), s[m][n][i]);
      }
}

// apply_alibi for tiles whose rows carry their own query position and slope (the decode tiles'
// packed GQA rows: row (m, h) of this lane is a (token, head) pair): columns are keys.
template <int kMAtoms, int kNAtoms>
CV_DEVICE void apply_alibi_rows(float (&s)[kMAtoms][kNAtoms][4], const float (&pos)[kMAtoms][2],
                                const float (&slope)[kMAtoms][2], int col0, int lane) {
  const float key0 = (float)(col0 + 2 * (lane & 3));
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float d = key0 + (float)(8 * n + j) - pos[m][h];
          s[m][n][2 * h + j] = fmaf(-slope[m][h], fabsf(d), s[m][n][2 * h + j]);
        }
}

// softmax_backward (softmax.cuh) through a softcap: dS = P (dP - delta) softcap_slope, the slope
// taken from the capped scores before P replaces them in place (dP - delta first, then P).
template <int kMAtoms, int kNAtoms>
CV_DEVICE void softmax_backward_softcap(float (&s)[kMAtoms][kNAtoms][4],
                                        float (&dp)[kMAtoms][kNAtoms][4], u32 lse_log2, u32 delta,
                                        int col0, float scale_log2, float softcap_in, int lane) {
  for_each_with_column_stat<kMAtoms, kNAtoms>(
      ColumnStatsAt{delta, col0, lane}, [&](int m, int n, int i, float d) {
        dp[m][n][i] = (dp[m][n][i] - d) * softcap_slope(s[m][n][i], softcap_in);
      });
  probabilities_backward(s, ColumnStatsAt{lse_log2, col0, lane}, scale_log2);
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int n = 0; n < kNAtoms; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) dp[m][n][i] *= s[m][n][i];
}
