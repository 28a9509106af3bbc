"""Do wgmma execution and exp2 (MUFU.EX2) overlap on one SM? One CTA per SM: warpgroup 0 issues
groups of 8 m64n128k16 wgmmas (shared-memory operands) and waits for each; warpgroup 1 (or 1 and 2)
runs 8 independent FFMA -> ex2 chains. Each side is timed alone and both together; the work is
balanced so that each alone takes about as long.

    python benchmarks/lab/wgmma_exp_overlap.py

Why: at head dim 64 the forward's exps take as long as its GEMMs, so how far the two can run at
once bounds the kernel (docs/performance.md, head dim 64 analysis).
"""

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from cupy_varlen._build import assemble_files  # noqa: E402

src = "#define CV_DTYPE_BF16 1\n" + assemble_files("common.cuh", "tiles.cuh", "wgmma.cuh")
src += r'''
extern "C" __global__ void __launch_bounds__(384, 1) mix(int mode, int gemm_iters, int exp_iters, float* out) {
  extern __shared__ __align__(1024) unsigned char sm[];
  const u32 smem = (smem_addr(sm) + 1023) & ~1023u;
  for (int i = threadIdx.x; i < 49152 / 4; i += blockDim.x) reinterpret_cast<u32*>(sm)[i] = 0x3c003c00u ^ (i * 2654435761u & 0x00ff00ffu);
  __syncthreads();
  const int wg = threadIdx.x / 128;
  float r = 0.f;
  if (wg == 0 && (mode & 1)) {
    float acc[64];
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    const u64 da = smem_desc_sw128(smem, 0, 1024), db = smem_desc_sw128(smem + 16384, 0, 1024);
    for (int it = 0; it < gemm_iters; ++it) {
      fence_registers(acc);
      wgmma_fence();
#pragma unroll
      for (int k = 0; k < 8; ++k) Wgmma<128>::ss(acc, desc_advance(da, (k % 4) * 32), desc_advance(db, (k % 4) * 32), 1);
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(acc);
    }
    for (int i = 0; i < 64; ++i) r += acc[i];
  } else if (wg >= 1 && (mode & 2)) {
    float a[8];
    for (int i = 0; i < 8; ++i) a[i] = -0.001f * (threadIdx.x + i);
    for (int it = 0; it < exp_iters; ++it)
#pragma unroll
      for (int i = 0; i < 8; ++i) { float x = fmaf(a[i], 0.5f, -0.25f); float e; asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x)); a[i] = e - 1.0f; }
    for (int i = 0; i < 8; ++i) r += a[i];
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}
'''


# Balance: one wgmma group is 8 x m64n128k16 = 512 cycles of tensor work at full rate; one exp
# round per warp is 8 ex2 = 64 cycles of one scheduler's exp unit, so 8 rounds are ~512 cycles.
GROUPS = 4000


def main():
    m = cp.RawModule(code=src, options=("-arch=sm_90a", "-std=c++17"))
    f = m.get_function("mix")
    f.max_dynamic_shared_size_bytes = 50 * 1024
    out = cp.zeros(132 * 384, cp.float32)
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    for exp_wgs in (1, 2):
        threads = 128 * (1 + exp_wgs)
        rounds = 8 * GROUPS // exp_wgs
        res = {}
        for mode, label in ((1, "wgmma alone"), (2, "exp alone"), (3, "both")):
            args = (np.int32(mode), np.int32(GROUPS), np.int32(rounds), out)
            f((132,), (threads,), args, shared_mem=50 * 1024)
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            f((132,), (threads,), args, shared_mem=50 * 1024)
            end.record()
            end.synchronize()
            res[label] = cp.cuda.get_elapsed_time(start, end)
        longer = max(res["wgmma alone"], res["exp alone"])
        print(f"{exp_wgs} exp warpgroup(s): " + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items())
              + f"; both / longer alone = {res['both'] / longer:.2f}"
              + f", both / sum = {res['both'] / (res['wgmma alone'] + res['exp alone']):.2f}")


if __name__ == "__main__":
    main()
