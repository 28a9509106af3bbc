// Writing O and lse. The fp32 accumulator is converted to 16-bit, staged through shared memory (the
// Q tile's space, free once the last QK^T is done) and written as 16-byte rows. Every store is
// predicated on the row belonging to this sequence: in a packed batch the next rows are another
// sequence's live output, and past the last sequence lies memory that is not ours.
#pragma once

template <int kMAtoms, int kDAtoms, int kRows, int kHeadDim, int kThreads>
CV_DEVICE void store_output(const float (&acc_o)[kMAtoms][kDAtoms][4], unsigned char* stage,
                            u16* out, i64 out_row_stride, int rows_valid, int chunks_valid,
                            int warp_row0, int lane, int tid) {
  typedef SmemTile<kRows, kHeadDim> Tile;
  const int group = lane >> 2, quad = lane & 3;
#pragma unroll
  for (int m = 0; m < kMAtoms; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp_row0 + 16 * m + group + 8 * h;
#pragma unroll
      for (int d = 0; d < kDAtoms; ++d) {
        // Atom d covers columns 8d..8d+7: exactly chunk d; this lane's pair is word `quad` of it.
        u32* dst = reinterpret_cast<u32*>(stage + Tile::offset(row, d) + 4 * quad);
        *dst = pack_float2(acc_o[m][d][2 * h], acc_o[m][d][2 * h + 1]);
      }
    }
  __syncthreads();
  constexpr int kChunks = kRows * Tile::kChunksPerRow;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int idx = tid + i * kThreads;
    const int row = idx / Tile::kChunksPerRow;
    const int chunk = idx % Tile::kChunksPerRow;
    if (idx < kChunks && row < rows_valid && chunk < chunks_valid) {
      const uint4 value = *reinterpret_cast<const uint4*>(stage + Tile::offset(row, chunk));
      *reinterpret_cast<uint4*>(out + row * out_row_stride + chunk * 8) = value;
    }
  }
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
