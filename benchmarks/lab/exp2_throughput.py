"""Throughput of the exp2 instruction flavours on the current GPU: ex2.approx.ftz.f32, and the
packed ex2.approx.f16x2 and ex2.approx.ftz.bf16x2 (sm_90), in instructions and exponentials per
clock per SM; then the f32 rate reached by 1, 2, 4 and 8 warps per scheduler, alone and with an FFMA
feeding and an FADD consuming every exp (the softmax's pattern).

    python benchmarks/lab/exp2_throughput.py

The question it answers: would packed half-precision exponentials double the softmax's exp rate?
(On the H100, 2026-11-24: no. All three give 16 exponentials per clock per SM; a packed
instruction occupies the unit twice as long. And one warp per scheduler already reaches ~85% of
that rate. See docs/performance.md.) Eight independent chains per thread,
132 x 8 blocks of 1024 threads, timed with CUDA events; the SM clock is read from NVML through
torch when available, else taken as the H100 SXM's 1.98 GHz boost clock.
"""

from __future__ import annotations

import cupy as cp
import numpy as np

_SOURCE = r"""
#define CHAINS 8
extern "C" __global__ void ex2_f32(float* out, int iters) {
  float a[CHAINS];
  for (int i = 0; i < CHAINS; ++i) a[i] = -0.001f * (threadIdx.x + i);
  for (int it = 0; it < iters; ++it)
#pragma unroll
    for (int i = 0; i < CHAINS; ++i) {
      float r;
      asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a[i]));
      a[i] = r - 1.0f;  // stays in (-1, 0]: no overflow, a dependent chain per slot
    }
  float s = 0.f;
  for (int i = 0; i < CHAINS; ++i) s += a[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
#define PACKED(name, op, seed)                                                  \
extern "C" __global__ void name(float* out, int iters) {                        \
  unsigned a[CHAINS];                                                           \
  for (int i = 0; i < CHAINS; ++i) a[i] = seed + threadIdx.x + i;               \
  for (int it = 0; it < iters; ++it)                                            \
    _Pragma("unroll") for (int i = 0; i < CHAINS; ++i) {                        \
      unsigned r;                                                               \
      asm volatile(op " %0, %1;" : "=r"(r) : "r"(a[i]));                        \
      a[i] = r | 0x80008000u; /* negative inputs again: results stay in (0, 1] */ \
    }                                                                           \
  unsigned s = 0;                                                               \
  for (int i = 0; i < CHAINS; ++i) s ^= a[i];                                   \
  out[blockIdx.x * blockDim.x + threadIdx.x] = (float)s;                        \
}
// The softmax's pattern: an FFMA forms each exponent, an FADD accumulates each result.
extern "C" __global__ void ex2_f32_fma_add(float* out, int iters) {
  float a[CHAINS], sum = 0.f;
  for (int i = 0; i < CHAINS; ++i) a[i] = -0.001f * (threadIdx.x + i);
  for (int it = 0; it < iters; ++it)
#pragma unroll
    for (int i = 0; i < CHAINS; ++i) {
      const float x = fmaf(a[i], 0.5f, -0.25f);
      float r;
      asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
      sum += r;
      a[i] = r - 1.0f;
    }
  float s = sum;
  for (int i = 0; i < CHAINS; ++i) s += a[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
}
PACKED(ex2_f16x2, "ex2.approx.f16x2", 0xb800b800u)
PACKED(ex2_bf16x2, "ex2.approx.ftz.bf16x2", 0xbf00bf00u)
"""

KERNELS = (("ex2_f32", 1), ("ex2_f16x2", 2), ("ex2_bf16x2", 2))
CHAINS = 8
THREADS = 1024
ITERS = 4096


def sm_clock_hz() -> float:
    try:
        import torch

        return torch.cuda.clock_rate() * 1e6
    except Exception:
        return 1.98e9


def time_kernel(fn, blocks, threads, out) -> float:
    for _ in range(2):
        fn((blocks,), (threads,), (out, np.int32(ITERS)))
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn((blocks,), (threads,), (out, np.int32(ITERS)))
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1e-3


def main():
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    major, minor = dev.compute_capability[0], dev.compute_capability[1:]
    module = cp.RawModule(code=_SOURCE, options=(f"-arch=sm_{major}{minor}a", "-std=c++17"))
    blocks = sms * 8
    out = cp.zeros(blocks * THREADS, cp.float32)
    clock = sm_clock_hz()
    print(f"{cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, {sms} SMs, "
          f"SM clock {clock / 1e9:.2f} GHz")
    for name, per_instruction in KERNELS:
        seconds = time_kernel(module.get_function(name), blocks, THREADS, out)
        instructions = blocks * THREADS * CHAINS * ITERS
        per_clock = instructions / seconds / sms / clock
        print(f"{name:11s} {seconds * 1e3:7.3f} ms  {per_clock:5.1f} instructions/clock/SM  "
              f"{per_clock * per_instruction:5.1f} exponentials/clock/SM")
    # One CTA per SM of `warps` warps per scheduler: how much of the unit a few warps reach.
    for name in ("ex2_f32", "ex2_f32_fma_add"):
        for warps in (1, 2, 4, 8):
            threads = 4 * 32 * warps
            seconds = time_kernel(module.get_function(name), sms, threads, out)
            per_clock = sms * threads * CHAINS * ITERS / seconds / sms / clock
            cycles = seconds * clock / (CHAINS * ITERS)
            print(f"{name:15s} {warps} warp(s) per scheduler: {per_clock:5.1f} exponentials/clock/SM,"
                  f" {cycles:5.1f} cycles per warp-wide instruction per warp")


if __name__ == "__main__":
    main()
