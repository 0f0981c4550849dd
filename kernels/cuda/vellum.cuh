// Shared by every Vellum kernel file. Compiles under NVRTC (for the GPU) and under g++
// with -DVELLUM_EMU (the CPU emulator, emu.h). Kernels use only what is defined here and the
// subset documented in emu.h. Arch-specific code tests VELLUM_ARCH (750, 800, ..., like
// __CUDA_ARCH__), which the emulator defines too, so each path runs under it.
#pragma once

#ifdef VELLUM_EMU
#include "emu.h"
// The architecture the emulator compiles for (emu.rs sets it), in __CUDA_ARCH__'s numbering.
#ifndef VELLUM_EMU_ARCH
#define VELLUM_EMU_ARCH 900
#endif
#define VELLUM_ARCH VELLUM_EMU_ARCH
#else
#define VELLUM_ARCH __CUDA_ARCH__
// Under NVRTC nothing is exported by name mangling tricks: kernels are extern "C".
#define VELLUM_EXPORT(kernel)
#define VELLUM_DYN_SHARED(type, name) extern __shared__ type name[]
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned short uint16_t;
typedef unsigned long long uint64_t;
typedef signed char int8_t;
typedef unsigned char uint8_t;
#endif

// 16-bit float storage types. Vellum's own rather than cuda_fp16.h / cuda_bf16.h so that
// the GPU and the emulator share one definition, bit for bit (round to nearest even), and
// NVRTC needs no CUDA headers at run time.
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

__device__ __forceinline__ uint32_t vf_bits(float f) {
  union {
    float f;
    uint32_t u;
  } c;
  c.f = f;
  return c.u;
}
__device__ __forceinline__ float vf_from_bits(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } c;
  c.u = u;
  return c.f;
}

// The MLP's activation, silu(gate) · up, in f32: one definition for the silu_mul kernels and
// the GEMM that computes it as it loads its rows (qgemm.cu), so both give the same bits.
__device__ __forceinline__ float silu_times(float gate, float up) {
  return gate / (1.0f + expf(-gate)) * up;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return vf_from_bits((uint32_t)x.bits << 16); }
__device__ __forceinline__ float to_f32(f16 x) {
  uint32_t h = x.bits, sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    float v = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return vf_from_bits(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));  // NaN stays quiet
  return vf_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

template <class T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  uint32_t u = vf_bits(x);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.bits = (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  } else {
    r.bits = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return r;
}
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) {
  uint32_t u = vf_bits(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  f16 r;
  if (a > 0x7f800000u) {
    r.bits = (uint16_t)(sign | 0x7e00u);
  } else if (a >= 0x477ff000u) {  // rounds to 65520 or more: infinity
    r.bits = (uint16_t)(sign | 0x7c00u);
  } else if (a < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    uint32_t e = a >> 23, s = 126 - e;
    if (s > 24) {
      r.bits = (uint16_t)sign;
    } else {
      uint32_t m = (a & 0x7fffffu) | 0x800000u, q = m >> s, rem = m & ((1u << s) - 1);
      uint32_t half = 1u << (s - 1);
      if (rem > half || (rem == half && (q & 1u))) ++q;
      r.bits = (uint16_t)(sign | q);
    }
  } else {
    uint32_t v = a - 0x38000000u;  // rebias the exponent from 127 to 15
    v += 0xfffu + ((v >> 13) & 1u);
    r.bits = (uint16_t)(sign | (v >> 13));
  }
  return r;
}

// The bits of x rounded to f16 (nearest even): the hardware conversion on the GPU, the same
// rounding in software under the emulator.
__device__ __forceinline__ uint16_t f16_bits(float x) {
#ifdef VELLUM_EMU
  return from_f32<f16>(x).bits;
#else
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return h;
#endif
}

// Packed pairs of f16 in one 32-bit register (the lower half is the first value), the
// arithmetic of the GEMM's int4 dequantization: one PTX instruction per pair on the GPU, the
// same results under the emulator (each half rounded once, to nearest even).
#ifdef VELLUM_EMU
// f16 bits of a double, rounded once: round to odd at float precision (enough bits that the
// second rounding cannot meet a false tie), then to nearest even at f16.
__device__ __forceinline__ uint16_t f16_bits_of_double(double r) {
  float t = (float)r;
  if ((double)t != r) {
    if (std::fabs((double)t) > std::fabs(r)) t = std::nextafterf(t, 0.0f);
    t = vf_from_bits(vf_bits(t) | 1u);
  }
  return from_f32<f16>(t).bits;
}
__device__ __forceinline__ double h2_half(uint32_t v, int upper) {
  f16 h;
  h.bits = (uint16_t)(v >> (16 * upper));
  return to_f32(h);
}
#endif
// a - b, per half.
__device__ __forceinline__ uint32_t h2_sub(uint32_t a, uint32_t b) {
#ifdef VELLUM_EMU
  uint32_t r = 0;
  for (int u = 0; u < 2; ++u)
    r |= (uint32_t)f16_bits_of_double(h2_half(a, u) - h2_half(b, u)) << (16 * u);
  return r;
#else
  uint32_t r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#endif
}
// a · b + c, per half, rounded once.
__device__ __forceinline__ uint32_t h2_fma(uint32_t a, uint32_t b, uint32_t c) {
#ifdef VELLUM_EMU
  uint32_t r = 0;
  for (int u = 0; u < 2; ++u) {
    // exact in double while the terms lie within 2^30 of each other, as the GEMM's do
    double v = h2_half(a, u) * h2_half(b, u) + h2_half(c, u);
    r |= (uint32_t)f16_bits_of_double(v) << (16 * u);
  }
  return r;
#else
  uint32_t r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#endif
}
// Byte permute (PTX prmt.b32, default mode, selectors 0-7 only: no sign replication): byte
// i of the result is byte sel[4i..4i+3] of the 8 bytes {a, b} (a's bytes are 0-3).
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef VELLUM_EMU
  uint64_t bytes = (uint64_t)a | ((uint64_t)b << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i)
    r |= (uint32_t)((bytes >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#else
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
#endif
}

#define V_NEG_INF vf_from_bits(0xff800000u)

// sin and cos of a float angle computed in double, as the CPU backend's rotary does.
__device__ __forceinline__ void vsincos(float angle, float *s, float *c) {
  *s = (float)sin((double)angle);
  *c = (float)cos((double)angle);
}

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum/max for blockDim.x a multiple of 32 (at most 1024); `scratch` holds 32
// floats of shared memory. Every thread gets the result. Ends with a barrier so scratch
// can be reused at once.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.0f;
  t = warp_sum(t);
  __syncthreads();
  return t;
}
__device__ __forceinline__ float block_max(float v, float *scratch) {
  unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : V_NEG_INF;
  t = warp_max(t);
  __syncthreads();
  return t;
}

// The end of one pass of a warp-per-column matmul: each of the first `rows` partial sums is
// reduced across the warp and lane 0 writes out[(r0 + r) * n + col] (+ bias[col]).
template <class T, int R>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[R], uint32_t rows, uint32_t r0,
                                                uint32_t n, uint32_t col, const float *bias,
                                                T *out) {
  uint32_t lane = threadIdx.x % 32;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = warp_sum(acc[r]);
    if (lane == 0 && r < (int)rows)
      out[(size_t)(r0 + r) * n + col] = from_f32<T>(s + (bias ? bias[col] : 0.0f));
  }
}
