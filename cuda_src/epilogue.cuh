// Writing O and lse. The fp32 accumulator is converted to 16-bit, staged through shared memory (the
// Q tile's space, free once the last QK^T is done) and written as 16-byte rows. Every store is
// predicated on the row belonging to this sequence: in a packed batch the next rows are another
// sequence's live output, and past the last sequence lies memory that is not ours.
#pragma once

#include "common.cuh"
#include "tiles.cuh"

// Converts a warp's accumulator fragments (rows row0 + 16m + ..., columns 8 * (chunk0 + n) + ...)
// times `mul` to 16-bit and writes them into a shared-memory tile laid out like the inputs.
template <class Tile, int kMAtoms, int kNAtoms>
CV_DEVICE void stage_fragments(const float (&acc)[kMAtoms][kNAtoms][4], u32 stage, int row0,
                               int chunk0, int lane, float mul = 1.f) {
  const int group = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * m + group + 8 * h;
#pragma unroll
      for (int n = 0; n < kNAtoms; ++n)
        // Atom n covers columns 8n..8n+7: exactly one chunk; this lane's pair is word `quad` of it.
        st_shared_u32(stage + Tile::offset(row, chunk0 + n) + 4 * quad,
                      pack_float2(acc[m][n][2 * h] * mul, acc[m][n][2 * h + 1] * mul));
    }
}

// Writes a warp's packed 16-bit A fragments (pack_a_fragments' layout: rows row0 + 0..15 of this
// warp, columns 8 (2kk + j) + ...) transposed into `Tile`: tile row c gets column c of the
// fragments, its 16 rows as two 16-byte chunks at chunks row0 / 8 and row0 / 8 + 1. One stmatrix.trans
// per k16 fragment (four 8 x 8 matrices: atoms 2kk and 2kk + 1, rows 0-7 and 8-15); lane l names
// the destination of row l % 8 of matrix l / 8.
template <class Tile, int kK>
CV_DEVICE void stage_a_fragments_transposed(const u32 (&a)[kK][4], u32 tile, int row0, int lane) {
  static_assert(Tile::kPanelChunks == 8, "128-byte panel rows");
  const int matrix = lane >> 3;
  // Tile rows 16kk + 8 (matrix / 2) + lane % 8: the swizzle key is lane % 8 for every kk, so one
  // address per lane and a compile-time step of 16 rows (hoisting a per-kk address each would
  // cost kK registers).
  const u32 lane_addr = tile + Tile::offset(8 * (matrix >> 1) + (lane & 7), row0 / 8 + (matrix & 1));
#pragma unroll
  for (int kk = 0; kk < kK; ++kk)
    asm volatile(
        "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(
            lane_addr + kk * 16 * 128),
        "r"(a[kk][0]), "r"(a[kk][1]), "r"(a[kk][2]), "r"(a[kk][3])
        : "memory");
}

// Copies a staged tile to global memory as 16-byte rows; rows at or past rows_valid and chunks at
// or past chunks_valid are not written.
template <class Tile, int kThreads>
CV_DEVICE void write_staged_tile(u32 stage, u16* dst, i64 row_stride, int rows_valid,
                                 int chunks_valid, int tid) {
  constexpr int kChunks = Tile::kRowCount * Tile::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    if (idx < kChunks && row < rows_valid && chunk < chunks_valid)
      *reinterpret_cast<uint4*>(dst + row * row_stride + chunk * 8) =
          ld_shared_u128(stage + Tile::offset(row, chunk));
  }
}

// O of a CTA whose warps each own whole rows: stage, then write.
template <int kMAtoms, int kDAtoms, int kRows, int kHeadDim, int kThreads>
CV_DEVICE void store_output(const float (&acc_o)[kMAtoms][kDAtoms][4], u32 stage, u16* out,
                            i64 out_row_stride, int rows_valid, int chunks_valid, int warp_row0,
                            int lane, int tid) {
  typedef SmemTile<kRows, kHeadDim> Tile;
  stage_fragments<Tile>(acc_o, stage, warp_row0, 0, lane);
  __syncthreads();
  write_staged_tile<Tile, kThreads>(stage, out, out_row_stride, rows_valid, chunks_valid, tid);
}

// Writes O straight from the accumulator fragments (4-byte stores): for kernels whose warps cannot
// share a block-wide barrier with a shared-memory staging step (warp-specialized CTAs).
template <int kMAtoms, int kDAtoms>
CV_DEVICE void store_output_fragments(const float (&acc_o)[kMAtoms][kDAtoms][4], u16* out,
                                      i64 out_row_stride, int rows_valid, int head_dim,
                                      int warp_row0, int lane) {
  const int group = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + group + 8 * h;
      if (row >= rows_valid) continue;
      u16* dst = out + row * out_row_stride + 2 * quad;
#pragma unroll
      for (int d = 0; d < kDAtoms; ++d)
        if (8 * d < head_dim)
          *reinterpret_cast<u32*>(dst + 8 * d) = pack_float2(acc_o[m][d][2 * h], acc_o[m][d][2 * h + 1]);
    }
}

// Writes a warp's fp32 accumulator to shared memory in fragment order: atom n of lane l (its four
// floats) at 16 (32 n + l), one 16-byte store per atom, the lanes on consecutive 16-byte words (no
// bank conflicts). Whoever reads it back knows the fragments' layout (bwd_sm90.cu's dq_convert).
template <int kNAtoms>
CV_DEVICE void stage_fragments_f32(const float (&acc)[1][kNAtoms][4], u32 base, int lane) {
#pragma unroll
  for (int n = 0; n < kNAtoms; ++n)
    asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(base + (n * 32 + lane) * 16),
                 "f"(acc[0][n][0]), "f"(acc[0][n][1]), "f"(acc[0][n][2]), "f"(acc[0][n][3])
                 : "memory");
}

// dst[0] += a, dst[1] += b (dst 8-byte aligned). Hopper reduces both in one vector instruction,
// halving the atomic traffic that dominates the backward's dQ.
CV_DEVICE void atomic_add_pair(float* dst, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

// Adds a warp's fp32 fragments to a row-major fp32 array (rows row0 + 16m + ..., columns col0 +
// 8n + ...) with atomics; rows at or past rows_valid and columns at or past cols_valid are skipped.
template <int kMAtoms, int kNAtoms>
CV_DEVICE void add_fragments_atomic(const float (&acc)[kMAtoms][kNAtoms][4], float* dst,
                                    i64 row_stride, int rows_valid, int cols_valid, int row0,
                                    int col0, int lane) {
  // Hand-unrolled rather than through a per-element lambda: the row's base pointer is formed
  // once per row, which keeps the d224 dK/dV kernel (sm_80) under 255 registers.
  const int group = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 16 * m + group + 8 * h;
      if (row >= rows_valid) continue;
      float* at = dst + row * row_stride + col0 + 2 * quad;
#pragma unroll
      for (int n = 0; n < kNAtoms; ++n)
        if (col0 + 8 * n < cols_valid)  // cols_valid is a multiple of 8: whole atoms
          atomic_add_pair(at + 8 * n, acc[m][n][2 * h], acc[m][n][2 * h + 1]);
    }
}

// lse has one value per row; the quad's lane 0 holds the reduced value.
template <int kMAtoms>
CV_DEVICE void store_lse(const float (&lse)[kMAtoms][2], float* lse_out, int rows_valid,
                         int warp_row0, int lane) {
  if ((lane & 3) != 0) return;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + (lane >> 2) + 8 * h;
      if (row < rows_valid) lse_out[row] = lse[m][h];
    }
}
