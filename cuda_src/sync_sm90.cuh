// Synchronization between the producer and consumer warpgroups of a warp-specialized sm_90 kernel:
// shared-memory mbarriers, the cp.async completion hook, proxy fences, named barriers and register
// reallocation.
//
// Phases: a barrier initialized with count n completes a phase when n arrivals are in, and its
// phase parity flips. A waiter passes `parity` once the phase with that parity has completed; a
// fresh barrier counts as having completed the phase before it (parity 1), so producers start
// waiting on "slot free" barriers with parity 1 and pass at once.
#pragma once

#include "common.cuh"

CV_DEVICE void mbarrier_init(u32 bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

CV_DEVICE void mbarrier_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives on `bar` and adds `bytes` to the transactions its current phase waits for (the TMA
// copies that complete them may land before or after).
CV_DEVICE void mbarrier_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Adds `bytes` to the transactions the current phase of `bar` waits for, without arriving: for a
// thread that arrives later through mbarrier_arrive_on_copies.
CV_DEVICE void mbarrier_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Arrives on `bar` once every cp.async this thread has issued so far has landed, without waiting
// for it here. noinc: the arrival is one of the barrier's initial count.
CV_DEVICE void mbarrier_arrive_on_copies(u32 bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

CV_DEVICE void mbarrier_wait(u32 bar, int parity) {
  u32 done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// cp.async writes shared memory through the generic proxy; wgmma reads it through the async proxy.
// A consumer that has observed the copies (through an mbarrier wait) orders them before its own
// following wgmma reads with this fence. TMA copies write through the async proxy: none needed.
CV_DEVICE void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Barrier among `threads` threads (whole warps) on hardware barrier `id` (0 is __syncthreads').
CV_DEVICE void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Arrives on named barrier `id` without waiting (the other party syncs on it).
CV_DEVICE void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The calling thread's warpgroup, broadcast from lane 0: the compiler then knows it is the same
// across the warp and keeps what derives from it (a consumer's operand addresses, hence its wgmma
// descriptors) in uniform registers. From threadIdx.x alone it moved every descriptor to uniform
// registers before each wgmma (R2UR: 1.7 per HGMMA in the backward, none in FA4's; ncu, H200,
// 2026-12-02).
CV_DEVICE int warpgroup_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 128, 0); }

// Register reallocation between warpgroups (every thread of the warpgroup executes it).
template <int kRegs>
CV_DEVICE void warpgroup_reg_alloc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
CV_DEVICE void warpgroup_reg_dealloc() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

CV_DEVICE int ld_shared_s32(u32 addr) {
  int v;
  asm volatile("ld.shared.s32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
CV_DEVICE void st_shared_s32(u32 addr, int v) {
  asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// Global-memory flag operations across CTAs (the ordered dQ additions): an acquire load and a
// release increment at GPU scope.
CV_DEVICE int ld_acquire_gpu(const int* addr) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(addr) : "memory");
  return v;
}

CV_DEVICE void red_release_gpu_add(int* addr, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(addr), "r"(v) : "memory");
}
