// Shared-memory tiles of 16-bit elements and the asynchronous copies that fill them.
//
// A tile holds kRows rows of kHeadDim elements. Rows are cut into 16-byte chunks (8 elements), the
// unit of cp.async and of one ldmatrix row. The head dimension is split into panels of 64 elements
// (32 when kHeadDim is not a multiple of 64), each panel stored as its own rows x panel block, and
// within a panel the chunk index is XORed with a function of the row. ldmatrix reads 8 rows at the
// same chunk; the XOR sends those 8 reads to 8 different 16-byte bank groups, so neither ldmatrix
// nor the cp.async writes (8 consecutive chunks of one row per quarter-warp) conflict.
#pragma once

#include "common.cuh"

template <int kRows, int kHeadDim>
struct SmemTile {
  static_assert(kHeadDim % 32 == 0, "head-dim tile must be a multiple of 32");
  static constexpr int kRowCount = kRows;
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kPanelChunks = (kHeadDim % 64 == 0) ? 8 : 4;
  static constexpr int kBytes = kRows * kHeadDim * 2;

  // Row bits that scramble the chunk index: row % 8 for 128-byte panel rows; for 64-byte rows two
  // rows share a 128-byte line, so (row / 2) % 4.
  static CV_DEVICE int swizzle_key(int row) {
    return (kPanelChunks == 8) ? (row & 7) : ((row >> 1) & 3);
  }

  // Byte offset of chunk `chunk` of row `row`.
  static CV_DEVICE int offset(int row, int chunk) {
    const int panel = chunk / kPanelChunks;
    const int in_panel = chunk % kPanelChunks;
    return ((panel * kRows + row) * kPanelChunks + (in_panel ^ swizzle_key(row))) * 16;
  }

  // ldmatrix address for lane-dependent (lane_row, lane_chunk_bit) plus compile-time (row0, chunk0)
  // with row0 a multiple of 8 and chunk0 even: the swizzle key then depends on the lane alone and
  // the chunk bit never carries, so the unrolled loops fold everything but one XOR and one add.
  static CV_DEVICE u32 ldmatrix_addr(u32 base, int row0, int chunk0, int lane_row, int lane_chunk_bit) {
    const int panel = chunk0 / kPanelChunks;
    const int in_panel = (chunk0 % kPanelChunks) ^ lane_chunk_bit ^ swizzle_key(lane_row);
    return base + ((panel * kRows + row0 + lane_row) * kPanelChunks + in_panel) * 16;
  }
};

CV_DEVICE void cp_async_16(u32 dst, const void* src, bool valid) {
  // src-size 0 zero-fills the destination without reading: rows past a sequence's end and columns
  // past the real head dim become zeros, never another sequence's data.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

CV_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
CV_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Which part of a kRows x kHeadDim tile a thread copies with 16-byte cp.async: each row is served by
// a power-of-two group of lanes (idle lanes where the row has fewer chunks), so a thread keeps one
// chunk column and steps down the tile by a fixed row count: its addresses are one base plus
// compile-time multiples, and nothing per-copy is held in registers across the main loop.
template <int kRows, int kHeadDim, int kThreads>
struct TileCopyLane {
  typedef SmemTile<kRows, kHeadDim> Tile;
  static constexpr int kChunks = Tile::kChunksPerRow;
  static constexpr int kLanesPerRow =
      kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  static constexpr int kRowStep = kThreads / kLanesPerRow;
  static constexpr int kSteps = kRows / kRowStep;  // rows per thread
  static_assert(kRows % kRowStep == 0, "tile rows must divide evenly among threads");
  int chunk, row0;
  CV_DEVICE explicit TileCopyLane(int tid) {
    tid = opaque(tid);  // recomputed where used, not hoisted out of the caller's loop
    chunk = tid % kLanesPerRow;
    row0 = tid / kLanesPerRow;
  }
  CV_DEVICE bool idle() const { return kChunks != kLanesPerRow && chunk >= kChunks; }
  CV_DEVICE int row(int i) const { return row0 + i * kRowStep; }
};

// Starts the copy of a kRows x kHeadDim tile whose row r lives at gmem + r * row_stride. Rows at or
// past rows_valid and chunks at or past chunks_valid are zero-filled.
template <int kRows, int kHeadDim, int kThreads>
CV_DEVICE void load_tile_async(u32 smem_base, const u16* gmem, i64 row_stride, int rows_valid,
                               int chunks_valid, int tid) {
  typedef TileCopyLane<kRows, kHeadDim, kThreads> Lane;
  const Lane lane(tid);
  if (lane.idle()) return;
  const u16* src = gmem + lane.row0 * row_stride + lane.chunk * 8;
  const i64 step = Lane::kRowStep * row_stride;
#pragma unroll
  for (int i = 0; i < Lane::kSteps; ++i, src += step) {
    const int row = lane.row(i);
    const bool valid = row < rows_valid && lane.chunk < chunks_valid;
    cp_async_16(smem_base + Lane::Tile::offset(row, lane.chunk), valid ? src : gmem, valid);
  }
}

// Starts the copy of a kRows x kHeadDim tile whose rows lie anywhere: row r at row_ptr(r). Rows at
// or past rows_valid and chunks at or past chunks_valid are zero-filled without calling row_ptr, so
// a row that names nothing (past a sequence's count) is never formed. For tiles gathered once per
// CTA or whose rows are not evenly spaced; load_tile_async keeps the evenly spaced hot path to one
// base pointer.
template <int kRows, int kHeadDim, int kThreads, class RowPtr>
CV_DEVICE void load_rows_async(u32 smem_base, RowPtr row_ptr, const u16* any_valid_address,
                               int rows_valid, int chunks_valid, int tid) {
  typedef TileCopyLane<kRows, kHeadDim, kThreads> Lane;
  const Lane lane(tid);
  if (lane.idle()) return;
#pragma unroll
  for (int i = 0; i < Lane::kSteps; ++i) {
    const int row = lane.row(i);
    const bool valid = row < rows_valid && lane.chunk < chunks_valid;
    const u16* src = valid ? row_ptr(row) + lane.chunk * 8 : any_valid_address;
    cp_async_16(smem_base + Lane::Tile::offset(row, lane.chunk), src, valid);
  }
}

// load_tile_async for keys that live in the pages of a paged cache: tile row r is the sequence's key
// key0 + r, row (key0 + r) % page_size of page table[(key0 + r) / page_size]; `pool` points at the
// head's elements of page 0, row 0; key0 is a multiple of kRows (a tile's start). Rows at or past
// rows_valid are zero-filled without reading the table or the pool, so no page past the sequence's
// count is touched. Where pages hold whole tiles, one lookup serves the tile and its rows are
// evenly spaced (load_tile_async); otherwise a lookup per row, by shift and mask for power-of-two
// page sizes (a division per row costs more issue slots than the rest of the decode loop).
template <int kRows, int kHeadDim, int kThreads>
CV_DEVICE void load_tile_paged_async(u32 smem_base, const u16* pool, i64 page_stride,
                                     i64 row_stride, const int* table, int page_size, int key0,
                                     int rows_valid, int chunks_valid, int tid) {
  if (page_size % kRows == 0) {
    const int page = __ldg(table + key0 / page_size);
    load_tile_async<kRows, kHeadDim, kThreads>(
        smem_base, pool + page * page_stride + (key0 % page_size) * row_stride, row_stride,
        rows_valid, chunks_valid, tid);
    return;
  }
  if ((page_size & (page_size - 1)) == 0) {
    const int shift = __ffs(page_size) - 1, mask = page_size - 1;
    load_rows_async<kRows, kHeadDim, kThreads>(
        smem_base,
        [&](int row) {
          const int key = key0 + row;
          return pool + __ldg(table + (key >> shift)) * page_stride + (key & mask) * row_stride;
        },
        pool, rows_valid, chunks_valid, tid);
    return;
  }
  load_rows_async<kRows, kHeadDim, kThreads>(
      smem_base,
      [&](int row) {
        const int key = key0 + row;
        return pool + __ldg(table + key / page_size) * page_stride + (key % page_size) * row_stride;
      },
      pool, rows_valid, chunks_valid, tid);
}

// A CUtensorMap built on the host (cupy_varlen/_tma.py) and passed inside the kernel's
// __grid_constant__ parameters: 128 opaque bytes the TMA unit reads, 64-byte aligned.
struct alignas(64) TensorMap {
  unsigned char bytes[128];
};

// Adds `bytes` of fp32 staged in shared memory to the same layout in global memory with one bulk
// reduction (cp.reduce.async.bulk .add.f32, no tensor map): both addresses 16-byte aligned, bytes a
// multiple of 16. The adds are atomic per element and asynchronous: the issuing thread commits them
// as one bulk group, and must wait for its reads (bulk_wait_group_read) before the staging buffer
// is written again.
CV_DEVICE void reduce_add_bulk(float* dst, u32 src, u32 bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               ::"l"(dst), "r"(src), "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Waits until at most kPending of this thread's bulk groups still read shared memory.
template <int kPending>
CV_DEVICE void bulk_wait_group_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}

// Waits until at most kPending of this thread's bulk groups are incomplete (their writes done).
template <int kPending>
CV_DEVICE void bulk_wait_group() {
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Starts the TMA copy of rows [row0, row0 + kRows) of head `head` into a SmemTile<kRows, kHeadDim>:
// one copy per 64-element panel, the map's box being kRows rows x 64 elements of one head with the
// 128-byte swizzle, which is SmemTile's layout on 1024-byte aligned panels. Columns past the map's
// head dim read as zeros; rows past its last row too, but rows of the next sequence are real data,
// so the caller sends only tiles that lie wholly inside their sequence. The copies complete
// kRows * kHeadDim * 2 bytes of transactions on `bar` (see mbarrier_arrive_expect_tx).
template <int kRows, int kHeadDim>
CV_DEVICE void load_tile_bulk(u32 smem_base, const TensorMap& map, int head, int row0, u32 bar) {
  static_assert(kHeadDim % 64 == 0, "whole 64-element panels");
  const u64 desc = reinterpret_cast<u64>(&map);
#pragma unroll
  for (int panel = 0; panel < kHeadDim / 64; ++panel)
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4}], [%5];\n"
        ::"r"(smem_base + panel * kRows * 128), "l"(desc), "r"(panel * 64), "r"(head), "r"(row0),
        "r"(bar)
        : "memory");
}
