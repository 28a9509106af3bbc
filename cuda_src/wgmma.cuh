// Hopper warpgroup MMA (wgmma.mma_async, sm_90a): shared-memory matrix descriptors, the instruction
// wrappers, and whole products over shared-memory tiles, for the sm_90 forward and backward kernels.
//
// Operands in shared memory use the 128-byte swizzle: tiles.cuh's SmemTile stores every 64-element
// panel as rows of 128 bytes with the 16-byte chunk index XORed by row % 8, which is exactly the
// hardware's 128B-swizzle pattern (address bits [4,7) XOR bits [7,10)) when the panel starts on a
// 1024-byte boundary. So cp.async-filled tiles feed wgmma with no re-layout:
//  - K-major operands (Q as A, K as B of S = Q K^T: the reduction dim, head dim, is contiguous):
//    8-row core groups 1024 bytes apart (stride byte offset); one k16 step is 32 bytes along the
//    row, added to the start address (the swizzle is applied to the final address).
//  - MN-major operand (V as B of O = P V: the reduction dim, keys, runs down the rows): 8 key rows
//    per core group, 1024 bytes apart (stride byte offset); the next 64 output columns live in the
//    next panel (leading byte offset = panel size); one k16 step is 16 rows = 2048 bytes.
//
// The accumulator of m64nN: warp w of the warpgroup holds rows 16w..16w+15, and register 4j + e
// holds row lane/4 + 8(e/2), column 8j + 2(lane%4) + e%2: per warp, the mma.sync m16n8 C layout
// repeated over N/8 atoms. That layout, packed to 16 bits, is also the A-from-registers layout, so
// probabilities go from the score accumulator into P V without shuffles.
#pragma once

#include "common.cuh"

#if CV_DTYPE_BF16
#define CV_WGMMA_T "bf16"
#else
#define CV_WGMMA_T "f16"
#endif

constexpr u32 kSwizzleAtomBytes = 1024;  // 8 rows x 128 bytes

// Descriptor of a 128B-swizzled operand starting at shared address `addr` (1024-byte aligned panel,
// plus an in-row offset that is a multiple of 16).
CV_DEVICE u64 smem_desc_sw128(u32 addr, u32 leading_bytes, u32 stride_bytes) {
  u64 desc = (u64)((addr & 0x3FFFF) >> 4);
  desc |= (u64)((leading_bytes >> 4) & 0x3FFF) << 16;
  desc |= (u64)((stride_bytes >> 4) & 0x3FFF) << 32;
  desc |= (u64)1 << 62;  // layout type 1: 128-byte swizzle
  return desc;
}

// Moves a descriptor's start address by `bytes` (a multiple of 16) within the same tile. The
// address field (bits 0-13, address / 16) of an in-bounds shared address never carries into bit
// 14, so the add touches the low word alone: one integer add per wgmma instead of rebuilding the
// descriptor, which matters because the k16 steps are issued while the tensor-core turn is held.
CV_DEVICE u64 desc_advance(u64 desc, u32 bytes) {
  const u32 lo = (u32)desc + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

CV_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
CV_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
CV_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The compiler sees a wgmma's accumulators written when it is issued, not when it completes. Tying
// every register to an empty volatile asm after the wait (and before the issue) keeps reads and
// writes of the accumulators on the right side of the asynchronous window.
// The same for A operands read from registers: keeping them "used" until after the wait stops the
// compiler from reusing their registers while the tensor cores may still read them.
template <int kN>
CV_DEVICE void fence_registers(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
template <int kA, int kB, int kC>
CV_DEVICE void fence_registers(float (&d)[kA][kB][kC]) {
  fence_registers(reinterpret_cast<float(&)[kA * kB * kC]>(d));
}
template <int kA, int kB>
CV_DEVICE void fence_registers(u32 (&a)[kA][kB]) {
#pragma unroll
  for (int i = 0; i < kA; ++i)
#pragma unroll
    for (int j = 0; j < kB; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// Inline asm cannot count, so the accumulator operands of m64nN (N / 2 floats per thread) are
// spelled out once per N: CV_ACC_REGS<k> is the "{%0, ..., %k-1}" list in the instruction text,
// CV_ACC<k>(c) the matching operand list with constraint c ("+f" to accumulate, "=f" to write).
#define CV_D8(c, i) c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), \
  c(d[i + 6]), c(d[i + 7])
#define CV_ACC32(c) CV_D8(c, 0), CV_D8(c, 8), CV_D8(c, 16), CV_D8(c, 24)
#define CV_ACC64(c) CV_ACC32(c), CV_D8(c, 32), CV_D8(c, 40), CV_D8(c, 48), CV_D8(c, 56)
#define CV_ACC48(c) CV_ACC32(c), CV_D8(c, 32), CV_D8(c, 40)
#define CV_ACC40(c) CV_ACC32(c), CV_D8(c, 32)
#define CV_ACC_REGS40 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "\
  "%32, %33, %34, %35, %36, %37, %38, %39}"
#define CV_ACC_REGS48 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "\
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}"
#define CV_ACC_REGS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define CV_ACC_REGS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "\
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "\
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "\
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// The scale-d predicate (false: D = A B, ignoring D's old value) and the instruction name.
#define CV_WGMMA_HEAD(pred, n)                                    \
  "{\n.reg .pred p;\nsetp.ne.b32 p, " pred ", 0;\n"                \
  "wgmma.mma_async.sync.aligned.m64n" n "k16.f32." CV_WGMMA_T "." CV_WGMMA_T " "

template <int kN>
struct Wgmma;

// ss: A and B from shared memory (descriptors); kTransA / kTransB = 1 reads that operand MN-major
// (the reduction dim runs down its rows). ss_first: the first k16 step of a fresh product, with D
// written only (no stale inputs tied to it). rs: A from registers, B MN-major.
template <>
struct Wgmma<64> {
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss(float (&d)[32], u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%34", "64") CV_ACC_REGS32 ", %32, %33, p, 1, 1, %35, %36;\n}\n"
                 : CV_ACC32("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
  }
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss_first(float (&d)[32], u64 desc_a, u64 desc_b) {
    asm volatile(CV_WGMMA_HEAD("0", "64") CV_ACC_REGS32 ", %32, %33, p, 1, 1, %34, %35;\n}\n"
                 : CV_ACC32("=f") : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  }
  static CV_DEVICE void rs(float (&d)[32], const u32 (&a)[4], u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%37", "64") CV_ACC_REGS32
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
                 : CV_ACC32("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  }
};

// m64n80: the backward's 80-query tiles at head dim 128 (S^T, dP^T and, operands swapped, dQ^T),
// where 64 queries leave the operand reads of its shared-memory GEMMs at the pipe's whole rate.
template <>
struct Wgmma<80> {
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss(float (&d)[40], u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%42", "80") CV_ACC_REGS40 ", %40, %41, p, 1, 1, %43, %44;\n}\n"
                 : CV_ACC40("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
  }
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss_first(float (&d)[40], u64 desc_a, u64 desc_b) {
    asm volatile(CV_WGMMA_HEAD("0", "80") CV_ACC_REGS40 ", %40, %41, p, 1, 1, %42, %43;\n}\n"
                 : CV_ACC40("=f") : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  }
};

// m64n96: S of 96-key tiles (three consumer warpgroups at head dim 64, where 160 registers hold S,
// P and O only at this width).
template <>
struct Wgmma<96> {
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss(float (&d)[48], u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%50", "96") CV_ACC_REGS48 ", %48, %49, p, 1, 1, %51, %52;\n}\n"
                 : CV_ACC48("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
  }
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss_first(float (&d)[48], u64 desc_a, u64 desc_b) {
    asm volatile(CV_WGMMA_HEAD("0", "96") CV_ACC_REGS48 ", %48, %49, p, 1, 1, %50, %51;\n}\n"
                 : CV_ACC48("=f") : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  }
};

template <>
struct Wgmma<128> {
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss(float (&d)[64], u64 desc_a, u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%66", "128") CV_ACC_REGS64 ", %64, %65, p, 1, 1, %67, %68;\n}\n"
                 : CV_ACC64("+f")
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));
  }
  template <int kTransA = 0, int kTransB = 0>
  static CV_DEVICE void ss_first(float (&d)[64], u64 desc_a, u64 desc_b) {
    asm volatile(CV_WGMMA_HEAD("0", "128") CV_ACC_REGS64 ", %64, %65, p, 1, 1, %66, %67;\n}\n"
                 : CV_ACC64("=f") : "l"(desc_a), "l"(desc_b), "n"(kTransA), "n"(kTransB));
  }
  static CV_DEVICE void rs(float (&d)[64], const u32 (&a)[4], u64 desc_b, int accumulate) {
    asm volatile(CV_WGMMA_HEAD("%69", "128") CV_ACC_REGS64
                 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : CV_ACC64("+f")
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
  }
};

// ---------------------------------------------------------------------------------------------
// Whole products, each issued as one wgmma group (the caller commits nothing; it waits with
// wgmma_wait and reads the accumulator after fence_registers). Operands are SmemTile tiles:
// `*_panel_bytes` is the size of one 64-column panel of that tile (its rows x 128 bytes), and a
// tile address may point at a later row of the tile (a multiple of 8 rows: whole swizzle atoms).

// D (64 x kN) = A B^T over kDepth: A's 64 rows and B's kN rows both K-major (the reduction dim is
// the tiles' columns), e.g. S = Q K^T. One k16 step is 32 bytes along a row, 4 per panel.
template <int kN, int kDepth>
CV_DEVICE void wgmma_ss_kmajor(float (&acc)[kN / 2], u32 a, u32 a_panel_bytes, u32 b,
                               u32 b_panel_bytes) {
  const u64 da0 = smem_desc_sw128(a, 0, kSwizzleAtomBytes);
  const u64 db0 = smem_desc_sw128(b, 0, kSwizzleAtomBytes);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    const u32 panel = kk / 4, in_row = (kk % 4) * 32;
    const u64 da = desc_advance(da0, panel * a_panel_bytes + in_row);
    const u64 db = desc_advance(db0, panel * b_panel_bytes + in_row);
    if (kk == 0)
      Wgmma<kN>::ss_first(acc, da, db);
    else
      Wgmma<kN>::ss(acc, da, db, 1);
  }
  wgmma_commit();
}

// D (64 x kN) = A B over kDepth, both MN-major (the reduction dim runs down the tiles' rows), e.g.
// dQ = dS K from dS^T and K as stored: A is the 64-column panel at `a`, B's kN columns start at
// panel `b` (kN <= 128). One k16 step is 16 rows = 2048 bytes of both.
template <int kN, int kDepth>
CV_DEVICE void wgmma_ss_mnmajor(float (&acc)[kN / 2], u32 a, u32 b, u32 b_panel_bytes) {
  static_assert(kN <= 128, "one wgmma N per k16 step");
  const u64 da0 = smem_desc_sw128(a, kSwizzleAtomBytes, kSwizzleAtomBytes);
  const u64 db0 = smem_desc_sw128(b, b_panel_bytes, kSwizzleAtomBytes);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    const u32 rows = kk * 16 * 128;
    const u64 da = desc_advance(da0, rows);
    const u64 db = desc_advance(db0, rows);
    if (kk == 0)
      Wgmma<kN>::template ss_first<1, 1>(acc, da, db);
    else
      Wgmma<kN>::template ss<1, 1>(acc, da, db, 1);
  }
  wgmma_commit();
}

// D (64 x kN) = A B over kDepth, A MN-major and B K-major, e.g. dQ^T = K^T dS^T from K as stored
// (A: the 64-column panel at `a`, the reduction dim, keys, down its rows) and dS as stored (B: kN
// query rows of keys). One k16 step is 16 rows = 2048 bytes of A and 32 bytes along B's rows.
template <int kN, int kDepth>
CV_DEVICE void wgmma_ss_mn_k(float (&acc)[kN / 2], u32 a, u32 b, u32 b_panel_bytes) {
  const u64 da0 = smem_desc_sw128(a, kSwizzleAtomBytes, kSwizzleAtomBytes);
  const u64 db0 = smem_desc_sw128(b, 0, kSwizzleAtomBytes);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk) {
    const u64 da = desc_advance(da0, kk * 16 * 128);
    const u64 db = desc_advance(db0, (kk / 4) * b_panel_bytes + (kk % 4) * 32);
    if (kk == 0)
      Wgmma<kN>::template ss_first<1, 0>(acc, da, db);
    else
      Wgmma<kN>::template ss<1, 0>(acc, da, db, 1);
  }
  wgmma_commit();
}

// D (64 x kN) += A B over kDepth, A from registers (kDepth / 16 k16 fragments, see
// pack_a_fragments), B MN-major, e.g. O += P V. D's columns go in chunks of up to 128, each chunk
// two panels of B (leading byte offset = one panel).
template <int kN, int kDepth>
CV_DEVICE void wgmma_rs_mnmajor(float (&acc)[kN / 2], const u32 (&a)[kDepth / 16][4], u32 b,
                                u32 b_panel_bytes) {
  constexpr int kChunkN = kN < 128 ? kN : 128;
  constexpr int kChunks = kN / kChunkN;
  float(&chunk)[kChunks][kChunkN / 2] = reinterpret_cast<float(&)[kChunks][kChunkN / 2]>(acc);
  const u64 db0 = smem_desc_sw128(b, b_panel_bytes, kSwizzleAtomBytes);
  fence_registers(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kDepth / 16; ++kk)
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const u64 db = desc_advance(db0, c * (kChunkN / 64) * b_panel_bytes + kk * 16 * 128);
      Wgmma<kChunkN>::rs(chunk[c], a[kk], db, 1);
    }
  wgmma_commit();
}

// A warp's fp32 C fragments of a 64 x (8 kNAtoms) tile, rounded to 16 bits, as the A operand of a
// product over those columns (k16 fragment kk = atoms 2kk and 2kk + 1): the accumulator layout
// packed pairwise is the A-from-registers layout, so no shuffles.
template <int kNAtoms>
CV_DEVICE void pack_a_fragments(const float (&s)[1][kNAtoms][4], u32 (&a)[kNAtoms / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < kNAtoms / 2; ++kk) {
    a[kk][0] = pack_float2(s[0][2 * kk][0], s[0][2 * kk][1]);
    a[kk][1] = pack_float2(s[0][2 * kk][2], s[0][2 * kk][3]);
    a[kk][2] = pack_float2(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
    a[kk][3] = pack_float2(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
  }
}
