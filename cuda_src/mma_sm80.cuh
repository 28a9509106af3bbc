// Tensor-core warp GEMMs for sm_80+ (mma.sync m16n8k16, fp32 accumulate), fed by ldmatrix.
//
// Fragment layout of m16n8k16 (lane = 4 * group + quad):
//   A (16x16): a0 = (group, 2quad..+1), a1 = (group+8, 2quad..), a2 = (group, 8+2quad..), a3 = (group+8, 8+2quad..)
//   B (16x8):  b0 = (k 2quad..+1, n group), b1 = (k 8+2quad..+1, n group)
//   C (16x8):  c0,c1 = (group, 2quad..+1), c2,c3 = (group+8, 2quad..+1)
// Two neighbouring C atoms of a row block are exactly one A fragment, which is how P = softmax(S)
// feeds O += P V straight from registers.
#pragma once

#include "common.cuh"
#include "tiles.cuh"

CV_DEVICE void ldmatrix_x4(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

CV_DEVICE void ldmatrix_x4_trans(u32 (&r)[4], u32 addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

CV_DEVICE void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if CV_DTYPE_BF16
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
#endif
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Per-lane ldmatrix coordinates. An x4 load reads four 8x8 matrices; lanes 8i..8i+7 give the row
// addresses of matrix i.
struct LaneCoords {
  int a_row, a_chunk;   // A operand (Q) and the transposed B operand (V): matrices go rows, then k
  int bt_row, bt_chunk; // B operand stored n-major (K): matrices go k, then rows
  CV_DEVICE explicit LaneCoords(int lane)
      : a_row((lane & 7) + ((lane >> 3) & 1) * 8), a_chunk(lane >> 4),
        bt_row((lane & 7) + (lane >> 4) * 8), bt_chunk((lane >> 3) & 1) {}
};

// acc[m][n] += Q[warp rows] * K[key rows]^T over the whole head-dim tile.
// Q is kMAtoms row blocks of 16 starting at q_row0; K is kNAtoms blocks of 8 keys from k_row0.
// kUnroll < kHeadDim / 16 keeps the head-dim loop rolled in part: at 32 rows per warp the fully
// unrolled loop lets ptxas hoist fragment loads until it spills.
template <int kMAtoms, int kNAtoms, int kHeadDim, int kQRows, int kKRows, int kUnroll>
CV_DEVICE void gemm_qk(float (&acc)[kMAtoms][kNAtoms][4], u32 q_smem, u32 k_smem, int q_row0,
                       int k_row0, const LaneCoords& lc) {
  typedef SmemTile<kQRows, kHeadDim> QTile;
  typedef SmemTile<kKRows, kHeadDim> KTile;
  static_assert(kNAtoms % 2 == 0, "key tile must be a multiple of 16");
#pragma unroll kUnroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks) {
    u32 a[kMAtoms][4];
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m)
      ldmatrix_x4(a[m], QTile::ldmatrix_addr(q_smem, q_row0 + m * 16, ks * 2, lc.a_row, lc.a_chunk));
#pragma unroll
    for (int np = 0; np < kNAtoms / 2; ++np) {
      u32 b[4];
      ldmatrix_x4(b, KTile::ldmatrix_addr(k_smem, k_row0 + np * 16, ks * 2, lc.bt_row, lc.bt_chunk));
#pragma unroll
      for (int m = 0; m < kMAtoms; ++m) {
        mma_16816(acc[m][2 * np], a[m], b[0], b[1]);
        mma_16816(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc_o[m][d] += P[m] * V[v_row0 ...]: P is the softmaxed score tile still in C-fragment form.
template <int kMAtoms, int kNAtoms, int kDAtoms, int kHeadDim, int kVRows>
CV_DEVICE void gemm_pv(float (&acc_o)[kMAtoms][kDAtoms][4], const float (&p)[kMAtoms][kNAtoms][4],
                       u32 v_smem, int v_row0, const LaneCoords& lc) {
  typedef SmemTile<kVRows, kHeadDim> VTile;
  static_assert(kDAtoms % 2 == 0, "head-dim tile must be a multiple of 16");
#pragma unroll
  for (int ks = 0; ks < kNAtoms / 2; ++ks) {
    u32 a[kMAtoms][4];
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m) {
      a[m][0] = pack_float2(p[m][2 * ks][0], p[m][2 * ks][1]);
      a[m][1] = pack_float2(p[m][2 * ks][2], p[m][2 * ks][3]);
      a[m][2] = pack_float2(p[m][2 * ks + 1][0], p[m][2 * ks + 1][1]);
      a[m][3] = pack_float2(p[m][2 * ks + 1][2], p[m][2 * ks + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < kDAtoms / 2; ++dp) {
      u32 b[4];
      ldmatrix_x4_trans(b, VTile::ldmatrix_addr(v_smem, v_row0 + ks * 16, dp * 2, lc.a_row,
                                                lc.a_chunk));
#pragma unroll
      for (int m = 0; m < kMAtoms; ++m) {
        mma_16816(acc_o[m][2 * dp], a[m], b[0], b[1]);
        mma_16816(acc_o[m][2 * dp + 1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc[m][n] += A[a_row0 + 16m .., :] * B[:, b_col0 + 8n ..] over kK, both operands in shared memory.
// Each operand is stored either with its reduction index along the row (A as (m, k), B as (n, k):
// ldmatrix as is) or down the rows (A as (k, m), B as (k, n): ldmatrix .trans), so one tile serves
// a GEMM and its transpose: the backward pass reads K, Q, dO and dS both ways.
template <int kMAtoms, int kNAtoms, int kK, class ATile, bool kATrans, class BTile, bool kBTrans,
          int kUnroll = kK / 16>
CV_DEVICE void gemm_ss(float (&acc)[kMAtoms][kNAtoms][4], u32 a_smem, int a_row0, u32 b_smem,
                       int b_col0, const LaneCoords& lc) {
  static_assert(kNAtoms % 2 == 0, "B is read 16 columns at a time");
  static_assert(kK % 16 == 0, "reduction in steps of 16");
#pragma unroll kUnroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    u32 a[kMAtoms][4];
#pragma unroll
    for (int m = 0; m < kMAtoms; ++m) {
      if (kATrans)
        ldmatrix_x4_trans(a[m], ATile::ldmatrix_addr(a_smem, ks * 16, (a_row0 + 16 * m) / 8,
                                                     lc.bt_row, lc.bt_chunk));
      else
        ldmatrix_x4(a[m], ATile::ldmatrix_addr(a_smem, a_row0 + 16 * m, ks * 2, lc.a_row,
                                               lc.a_chunk));
    }
#pragma unroll
    for (int np = 0; np < kNAtoms / 2; ++np) {
      u32 b[4];
      if (kBTrans)
        ldmatrix_x4_trans(b, BTile::ldmatrix_addr(b_smem, ks * 16, (b_col0 + 16 * np) / 8,
                                                  lc.a_row, lc.a_chunk));
      else
        ldmatrix_x4(b, BTile::ldmatrix_addr(b_smem, b_col0 + 16 * np, ks * 2, lc.bt_row,
                                            lc.bt_chunk));
#pragma unroll
      for (int m = 0; m < kMAtoms; ++m) {
        mma_16816(acc[m][2 * np], a[m], b[0], b[1]);
        mma_16816(acc[m][2 * np + 1], a[m], b[2], b[3]);
      }
    }
  }
}
