"""Throughput of the exp2 instruction flavours on the current GPU: ex2.approx.ftz.f32, and the
packed ex2.approx.f16x2 and ex2.approx.ftz.bf16x2 (sm_90), in instructions and exponentials per
clock per SM.

    python benchmarks/exp2_throughput.py

The question it answers: would packed half-precision exponentials double the softmax's exp rate?
(On the H100, 2026-11-24: no. All three give 16 exponentials per clock per SM; a packed
instruction occupies the unit twice as long. See NOTES.md.) Eight independent chains per thread,
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
        fn = module.get_function(name)
        for _ in range(2):
            fn((blocks,), (THREADS,), (out, np.int32(ITERS)))
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn((blocks,), (THREADS,), (out, np.int32(ITERS)))
        end.record()
        end.synchronize()
        seconds = cp.cuda.get_elapsed_time(start, end) * 1e-3
        instructions = blocks * THREADS * CHAINS * ITERS
        per_clock = instructions / seconds / sms / clock
        print(f"{name:11s} {seconds * 1e3:7.3f} ms  {per_clock:5.1f} instructions/clock/SM  "
              f"{per_clock * per_instruction:5.1f} exponentials/clock/SM")


if __name__ == "__main__":
    main()
