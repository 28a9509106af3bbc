"""Cycles of the sm90 forward's per-tile softmax work, in isolation: one 64 x 128 score tile per
warp in registers (a consumer warp's share at head dim 64), looped, timed with clock64, one CTA per
SM with 1 or 2 warps per scheduler (one or two consumer warpgroups). Variants separate the parts.

    python benchmarks/lab/softmax_cycles.py

Why: in the kernel the softmax of a tile takes ~1050 cycles per warp alone and ~1550 when both
consumer warpgroups are in it (clock-stamp timeline, docs/performance.md). This loop gives ~860 and ~1540 on
the H100 without any GEMM, so changes to cuda_src/softmax.cuh can be timed in seconds. The exp
unit's floor is 8 cycles per warp-wide ex2: 512 per tile, 1024 per two tiles on one scheduler.
"""

import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from cupy_varlen._build import assemble_files  # noqa: E402

src = "#define CV_DTYPE_BF16 1\n" + assemble_files("common.cuh", "tiles.cuh", "wgmma.cuh",
                                                  "softmax.cuh")
src += r'''
// variants of the per-tile work, all on s[1][16][4] -> pa[8][4]
template <int V>
__device__ __forceinline__ void tile(float (&s)[1][16][4], u32 (&pa)[8][4], float (&acc_o)[1][8][4],
                                     OnlineSoftmax<1>& sm, float scale_log2) {
  float correction[1][2];
  if (V == 0) {  // shipped: update_scores, rescale, pack
    sm.update_scores(s, scale_log2, correction);
    OnlineSoftmax<1>::rescale(acc_o, correction);
    pack_a_fragments(s, pa);
  } else if (V == 1) {  // exps + pack only, against a fixed max (the floor of the exp work)
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][n][e] = fast_exp2(fmaf(s[0][n][e], scale_log2, -1.f));
    pack_a_fragments(s, pa);
  } else if (V == 2) {  // exps + sums + pack, fixed max
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[0][n][e] = fast_exp2(fmaf(s[0][n][e], scale_log2, -1.f));
        if (e < 2) sum0 += s[0][n][e]; else sum1 += s[0][n][e];
      }
    sm.row_sum[0][0] += sum0; sm.row_sum[0][1] += sum1;
    pack_a_fragments(s, pa);
  } else if (V == 3) {  // max reduction only
    float m0 = sm.row_max[0][0], m1 = sm.row_max[0][1];
#pragma unroll
    for (int n = 0; n < 16; ++n) { m0 = fmaxf(m0, fmaxf(s[0][n][0], s[0][n][1])); m1 = fmaxf(m1, fmaxf(s[0][n][2], s[0][n][3])); }
    sm.row_max[0][0] = quad_max(m0); sm.row_max[0][1] = quad_max(m1);
    pa[0][0] = __float_as_uint(sm.row_max[0][0]); pa[0][1] = __float_as_uint(sm.row_max[0][1]);
  } else if (V == 4) {  // shipped without the rescale
    sm.update_scores(s, scale_log2, correction);
    pack_a_fragments(s, pa);
    pa[0][0] ^= __float_as_uint(correction[0][0] + correction[0][1]);
  }
}
template <int V>
__device__ void run(float* out, long long* cycles, int iters, float scale_log2) {
  float s[1][16][4];
  float acc_o[1][8][4];
  u32 pa[8][4];
  const int lane = threadIdx.x & 31;
  for (int n = 0; n < 16; ++n) for (int e = 0; e < 4; ++e) s[0][n][e] = 0.01f * ((lane * 7 + n * 13 + e * 5) % 97);
  for (int d = 0; d < 8; ++d) for (int e = 0; e < 4; ++e) acc_o[0][d][e] = 1.f;
  OnlineSoftmax<1> sm;
  long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    fence_registers(s);
    tile<V>(s, pa, acc_o, sm, scale_log2);
    fence_registers(pa);
  }
  long long t1 = clock64();
  float r = sm.row_sum[0][0] + sm.row_sum[0][1] + sm.row_max[0][0];
  for (int d = 0; d < 8; ++d) for (int e = 0; e < 4; ++e) r += acc_o[0][d][e] + __uint_as_float(pa[d][e] & 0x3fffffff);
  out[blockIdx.x * blockDim.x + threadIdx.x] = r;
  if (lane == 0) cycles[blockIdx.x * 32 + threadIdx.x / 32] = t1 - t0;
}
extern "C" __global__ void smx0(float* o, long long* c, int it, float sl) { run<0>(o, c, it, sl); }
extern "C" __global__ void smx1(float* o, long long* c, int it, float sl) { run<1>(o, c, it, sl); }
extern "C" __global__ void smx2(float* o, long long* c, int it, float sl) { run<2>(o, c, it, sl); }
extern "C" __global__ void smx3(float* o, long long* c, int it, float sl) { run<3>(o, c, it, sl); }
extern "C" __global__ void smx4(float* o, long long* c, int it, float sl) { run<4>(o, c, it, sl); }
'''
VARIANTS = {0: "shipped (max, exps, sums, rescale, pack)", 1: "exps + pack, fixed max",
            2: "exps + sums + pack, fixed max", 3: "row max + quad reduction only",
            4: "shipped without the O rescale"}


def main():
    m = cp.RawModule(code=src, options=("-arch=sm_90a", "-std=c++17"))
    iters = 2000
    print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    for v, label in VARIANTS.items():
        f = m.get_function(f"smx{v}")
        res = []
        for w in (1, 2):
            threads = 128 * w
            out = cp.zeros(132 * threads, cp.float32); cyc = cp.zeros(132 * 32, cp.int64)
            for _ in range(2):
                f((132,), (threads,), (out, cyc, np.int32(iters), np.float32(0.18)))
            cp.cuda.Device().synchronize()
            c = cyc.get().reshape(132, 32)[:, :4 * w]
            res.append(np.median(c) / iters)
        print(f"{label:45s} 1 warp/scheduler {res[0]:6.0f} cycles per tile, 2 warps {res[1]:6.0f}", flush=True)


if __name__ == "__main__":
    main()
