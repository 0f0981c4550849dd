// Element-wise and row-copy kernels: embedding lookup, rotary, KV write by slot, SiLU·mul.
// Launch geometry lives in kernels/src/cuda/backend.rs.
#include "vellum.cuh"

// grid.x = tokens; out[t] = table[tokens[t]] (token ids are checked on the host).
template <class T, class W>
__device__ void embedding(const W *table, const uint32_t *tokens, T *out, uint32_t width) {
  const W *src = table + (size_t)tokens[blockIdx.x] * width;
  T *dst = out + (size_t)blockIdx.x * width;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) dst[i] = from_f32<T>(to_f32(src[i]));
}
#define EMBEDDING(name, T, W)                                                                 \
  extern "C" __global__ void name(const W *table, const uint32_t *tokens, T *out, uint32_t width) { \
    embedding<T, W>(table, tokens, out, width);                                              \
  }                                                                                          \
  VELLUM_EXPORT(name)
EMBEDDING(embedding_f32_f32, float, float)
EMBEDDING(embedding_f32_f16, float, f16)
EMBEDDING(embedding_f32_bf16, float, bf16)
EMBEDDING(embedding_f16_f16, f16, f16)
EMBEDDING(embedding_bf16_bf16, bf16, bf16)

// grid.x = tokens; rotates every head of x[t] (half-rotation layout) at positions[t].
template <class T>
__device__ void rotary(T *x, const uint32_t *positions, const float *inv_freq, uint32_t n_heads,
                       uint32_t head_dim) {
  uint32_t half = head_dim / 2;
  T *row = x + (size_t)blockIdx.x * n_heads * head_dim;
  float pos = (float)positions[blockIdx.x];
  for (uint32_t idx = threadIdx.x; idx < n_heads * half; idx += blockDim.x) {
    uint32_t h = idx / half, i = idx % half;
    float s, c;
    vsincos(pos * inv_freq[i], &s, &c);
    T *a = row + h * head_dim + i, *b = a + half;
    float x0 = to_f32(*a), x1 = to_f32(*b);
    *a = from_f32<T>(x0 * c - x1 * s);
    *b = from_f32<T>(x1 * c + x0 * s);
  }
}
#define ROTARY(name, T)                                                                      \
  extern "C" __global__ void name(T *x, const uint32_t *positions, const float *inv_freq,   \
                                  uint32_t n_heads, uint32_t head_dim) {                     \
    rotary<T>(x, positions, inv_freq, n_heads, head_dim);                                   \
  }                                                                                          \
  VELLUM_EXPORT(name)
ROTARY(rotary_f32, float)
ROTARY(rotary_f16, f16)
ROTARY(rotary_bf16, bf16)

// grid.x = rows; copies row t of src (row_bytes bytes) to row slots[t] of dst: a KV cache's
// new slots, in whatever form a device copy holds them (values, int8 codes, scales).
extern "C" __global__ void scatter_rows_u8(uint8_t *dst, const uint8_t *src,
                                           const uint32_t *slots, uint32_t row_bytes) {
  size_t from = (size_t)blockIdx.x * row_bytes, to = (size_t)slots[blockIdx.x] * row_bytes;
  for (uint32_t i = threadIdx.x; i < row_bytes; i += blockDim.x) dst[to + i] = src[from + i];
}
VELLUM_EXPORT(scatter_rows_u8)

// Grid-stride over n elements: gate = silu(gate) * up.
template <class T> __device__ void silu_mul(T *gate, const T *up, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float g = to_f32(gate[i]);
    gate[i] = from_f32<T>(g / (1.0f + expf(-g)) * to_f32(up[i]));
  }
}
#define SILU_MUL(name, T)                                                                    \
  extern "C" __global__ void name(T *gate, const T *up, uint32_t n) { silu_mul<T>(gate, up, n); } \
  VELLUM_EXPORT(name)
SILU_MUL(silu_mul_f32, float)
SILU_MUL(silu_mul_f16, f16)
SILU_MUL(silu_mul_bf16, bf16)

// Grid-stride conversions between f32 and the 16-bit storage types.
template <class To, class From> __device__ void cast(const From *in, To *out, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = from_f32<To>(to_f32(in[i]));
}
#define CAST(name, To, From)                                                                 \
  extern "C" __global__ void name(const From *in, To *out, uint32_t n) { cast<To, From>(in, out, n); } \
  VELLUM_EXPORT(name)
CAST(cast_f32_to_f16, f16, float)
CAST(cast_f32_to_bf16, bf16, float)
CAST(cast_f16_to_f32, float, f16)
CAST(cast_bf16_to_f32, float, bf16)

// Grid-stride copy of n floats: the device-to-device bandwidth kernel benchmarks compare with.
extern "C" __global__ void copy_f32(const float *in, float *out, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = in[i];
}
VELLUM_EXPORT(copy_f32)
