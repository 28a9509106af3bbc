// Shared vocabulary of every cupy_varlen kernel: fixed-width types, the element type's conversions,
// and the PTX primitives that are not about a single concern (exp2, shuffles).
//
// NVRTC compiles this without the CUDA toolkit's headers (cuda_fp16.h / cuda_bf16.h need an include
// path the user may not have), so 16-bit elements travel as raw bit patterns and are converted with
// PTX `cvt`. The specialization arrives as -D macros from cupy_varlen/_spec.py:
//   CV_DTYPE_BF16 (1 = bfloat16, 0 = float16)
#pragma once

#define CV_DEVICE __device__ __forceinline__

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

#ifndef CV_DTYPE_BF16
#error "CV_DTYPE_BF16 must be defined by the kernel spec"
#endif

// Packs two fp32 values into one register of two 16-bit elements, `lo` in the low half: the layout
// mma.sync expects for consecutive columns of a fragment.
CV_DEVICE u32 pack_float2(float lo, float hi) {
  u32 packed;
#if CV_DTYPE_BF16
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
#endif
  return packed;
}

// The two 16-bit elements of a register as fp32 (inverse of pack_float2).
CV_DEVICE float2 unpack_float2(u32 packed) {
#if CV_DTYPE_BF16
  return make_float2(__uint_as_float(packed << 16), __uint_as_float(packed & 0xffff0000u));
#else
  float lo, hi;
  asm("{\n.reg .f16 l, h;\nmov.b32 {l, h}, %2;\ncvt.f32.f16 %0, l;\ncvt.f32.f16 %1, h;\n}\n"
      : "=f"(lo), "=f"(hi) : "r"(packed));
  return make_float2(lo, hi);
#endif
}

// Dot product of two registers of two 16-bit elements each, in fp32.
CV_DEVICE float dot_halves(u32 a, u32 b) {
  const float2 x = unpack_float2(a), y = unpack_float2(b);
  return fmaf(x.x, y.x, x.y * y.y);
}

// ex2.approx maps -inf to +0, which is what masked scores need; libm's exp2f adds range checks.
CV_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Hides a value's provenance from the optimizer. Loop-invariant address arithmetic that ptxas
// would otherwise hoist out of the main loop (and then spill, with 255 registers in use) is
// recomputed where it is used instead: a few integer ops per tile copy.
CV_DEVICE int opaque(int x) {
  asm volatile("mov.b32 %0, %0;\n" : "+r"(x));
  return x;
}

CV_DEVICE float neg_inf() { return __int_as_float(0xff800000); }

// offsetof, which NVRTC lacks (no <cstddef>, no __builtin_offsetof), in its classic form: the
// member's address in an object at address 0. The compiler folds it into a constant (plus the
// index arithmetic of an array element), where a generic pointer's conversion to the shared window
// would cost instructions per use.
#define CV_OFFSET_OF(type, member) \
  ((u32)(unsigned long long)&(reinterpret_cast<const type*>(0)->member))
// The offset of element `index` of array member `member`, in 32-bit arithmetic (indexing the
// array itself would multiply in 64 bits).
#define CV_OFFSET_OF_ELEMENT(type, member, index) \
  (CV_OFFSET_OF(type, member) + (u32)(index) * (u32)sizeof(reinterpret_cast<const type*>(0)->member[0]))

CV_DEVICE u32 smem_addr(const void* ptr) {
  return static_cast<u32>(__cvta_generic_to_shared(ptr));
}

CV_DEVICE void st_shared_u32(u32 addr, u32 v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v));
}

CV_DEVICE void st_shared_u128(u32 addr, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w));
}

CV_DEVICE uint4 ld_shared_u128(u32 addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr));
  return v;
}

CV_DEVICE float2 ld_shared_f32x2(u32 addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

template <int kA, int kB, int kC>
CV_DEVICE void zero_fragments(float (&x)[kA][kB][kC]) {
#pragma unroll
  for (int a = 0; a < kA; ++a)
#pragma unroll
    for (int b = 0; b < kB; ++b)
#pragma unroll
      for (int c = 0; c < kC; ++c) x[a][b][c] = 0.f;
}

// The four lanes that share an mma row (same lane / 4) hold its columns; these reduce over them.
CV_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

CV_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// std::conditional without <type_traits> (NVRTC compiles without the C++ standard library).
template <bool kFirst, class A, class B>
struct Choose {
  typedef A type;
};
template <class A, class B>
struct Choose<false, A, B> {
  typedef B type;
};
