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

// Rotates every head of one token's row (half-rotation layout) at position pos.
template <class T>
__device__ void rotary_row(T *row, float pos, const float *inv_freq, uint32_t n_heads,
                           uint32_t head_dim) {
  uint32_t half = head_dim / 2;
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

// grid.x = tokens; rotates every head of x[t] at positions[t].
template <class T>
__device__ void rotary(T *x, const uint32_t *positions, const float *inv_freq, uint32_t n_heads,
                       uint32_t head_dim) {
  T *row = x + (size_t)blockIdx.x * n_heads * head_dim;
  rotary_row(row, (float)positions[blockIdx.x], inv_freq, n_heads, head_dim);
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

// A K/V value as a pool of T stores it, rounded as the host stores it (KvData::write in
// attention.rs), so that a GPU's cache holds the CPU's bits: f32 as is; f16 to nearest even,
// with finite values beyond its range saturated to +-65504 rather than made infinite.
__device__ __forceinline__ float kv_value(float x, float *) { return x; }
__device__ __forceinline__ f16 kv_value(float x, f16 *) {
  f16 h = from_f32<f16>(x);
  bool finite = (vf_bits(x) & 0x7f800000u) != 0x7f800000u;
  if ((h.bits & 0x7fffu) == 0x7c00u && finite) h.bits = (uint16_t)((h.bits & 0x8000u) | 0x7bffu);
  return h;
}

// The slot of a sequence that only pads a recorded decode batch (graph::PAD_SLOT in Rust):
// its K and V are written nowhere.
#define PAD_SLOT 0xffffffffu

// grid.x = tokens; stores token t's K and V rows (width values each) in slot slots[t] of
// the pools.
template <class T>
__device__ void write_kv(const float *k, const float *v, T *k_pool, T *v_pool,
                         const uint32_t *slots, uint32_t width) {
  if (slots[blockIdx.x] == PAD_SLOT) return;
  size_t from = (size_t)blockIdx.x * width, to = (size_t)slots[blockIdx.x] * width;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) {
    k_pool[to + i] = kv_value(k[from + i], k_pool);
    v_pool[to + i] = kv_value(v[from + i], v_pool);
  }
}
#define WRITE_KV(name, T)                                                                    \
  extern "C" __global__ void name(const float *k, const float *v, T *k_pool, T *v_pool,      \
                                  const uint32_t *slots, uint32_t width) {                   \
    write_kv<T>(k, v, k_pool, v_pool, slots, width);                                         \
  }                                                                                          \
  VELLUM_EXPORT(name)
WRITE_KV(write_kv_f32, float)
WRITE_KV(write_kv_f16, f16)

// One group of an int8 pool, as quantize_group in attention.rs: codes round(x * 127 / max|x|)
// (ties away from zero), returns the scale max|x| / 127; an all-zero group has scale 0, one
// with a NaN or an infinity a NaN scale and zero codes.
__device__ float quantize_kv_group(const float *x, int8_t *codes, uint32_t group) {
  float m = 0.0f;
  for (uint32_t i = 0; i < group; ++i) {
    float a = fabsf(x[i]);
    if (a > m || a != a) m = a;  // a NaN, once met, stays
  }
  if (m == 0.0f || !(m <= 3.40282347e38f)) {
    for (uint32_t i = 0; i < group; ++i) codes[i] = 0;
    return m == 0.0f ? 0.0f : vf_from_bits(0x7fc00000u);
  }
  float inv = 127.0f / m;
  for (uint32_t i = 0; i < group; ++i)
    codes[i] = (int8_t)fminf(fmaxf(roundf(x[i] * inv), -127.0f), 127.0f);
  return m / 127.0f;
}

// grid.x = tokens; int8 pools: each thread quantizes one group of `group` values (of K, then
// of V) of token t's rows into slot slots[t]: codes, and the group's scale.
__device__ void write_kv_int8_token(const float *k, const float *v, int8_t *k_codes,
                                    float *k_scales, int8_t *v_codes, float *v_scales,
                                    const uint32_t *slots, uint32_t width, uint32_t group) {
  if (slots[blockIdx.x] == PAD_SLOT) return;
  size_t from = (size_t)blockIdx.x * width, to = (size_t)slots[blockIdx.x] * width;
  uint32_t groups = width / group;
  for (uint32_t i = threadIdx.x; i < 2 * groups; i += blockDim.x) {
    bool is_v = i >= groups;
    size_t at = (size_t)(is_v ? i - groups : i) * group;
    int8_t *codes = (is_v ? v_codes : k_codes) + to + at;
    float *scale = (is_v ? v_scales : k_scales) + (to + at) / group;
    *scale = quantize_kv_group((is_v ? v : k) + from + at, codes, group);
  }
}
extern "C" __global__ void write_kv_int8(const float *k, const float *v, int8_t *k_codes,
                                         float *k_scales, int8_t *v_codes, float *v_scales,
                                         const uint32_t *slots, uint32_t width, uint32_t group) {
  write_kv_int8_token(k, v, k_codes, k_scales, v_codes, v_scales, slots, width, group);
}
VELLUM_EXPORT(write_kv_int8)

// grid.x = tokens: rotary_f32 on token t's q and k rows (in place), then write_kv_* of its k
// and v rows: the three ops between a layer's QKV matmul and its attention as one launch,
// with the same arithmetic (so the same bits).
__device__ void rotary_qk(float *q, float *k, const uint32_t *positions, const float *inv_freq,
                          uint32_t n_heads, uint32_t n_kv, uint32_t head_dim) {
  float pos = (float)positions[blockIdx.x];
  rotary_row(q + (size_t)blockIdx.x * n_heads * head_dim, pos, inv_freq, n_heads, head_dim);
  rotary_row(k + (size_t)blockIdx.x * n_kv * head_dim, pos, inv_freq, n_kv, head_dim);
  __syncthreads();  // the rotated k, which other threads of the block store
}
#define ROTARY_WRITE_KV(name, T)                                                              \
  extern "C" __global__ void name(float *q, float *k, const float *v, T *k_pool, T *v_pool,    \
                                  const uint32_t *positions, const float *inv_freq,            \
                                  const uint32_t *slots, uint32_t n_heads, uint32_t n_kv,      \
                                  uint32_t head_dim) {                                         \
    rotary_qk(q, k, positions, inv_freq, n_heads, n_kv, head_dim);                             \
    write_kv<T>(k, v, k_pool, v_pool, slots, n_kv * head_dim);                                 \
  }                                                                                            \
  VELLUM_EXPORT(name)
ROTARY_WRITE_KV(rotary_write_kv_f32, float)
ROTARY_WRITE_KV(rotary_write_kv_f16, f16)
extern "C" __global__ void rotary_write_kv_int8(float *q, float *k, const float *v,
                                                int8_t *k_codes, float *k_scales,
                                                int8_t *v_codes, float *v_scales,
                                                const uint32_t *positions, const float *inv_freq,
                                                const uint32_t *slots, uint32_t n_heads,
                                                uint32_t n_kv, uint32_t head_dim,
                                                uint32_t group) {
  rotary_qk(q, k, positions, inv_freq, n_heads, n_kv, head_dim);
  write_kv_int8_token(k, v, k_codes, k_scales, v_codes, v_scales, slots, n_kv * head_dim, group);
}
VELLUM_EXPORT(rotary_write_kv_int8)

// Grid-stride over n elements: gate = silu(gate) * up.
template <class T> __device__ void silu_mul(T *gate, const T *up, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    gate[i] = from_f32<T>(silu_times(to_f32(gate[i]), to_f32(up[i])));
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

// Grid-stride copy of n bytes between ranges that do not overlap: a KV block's slots copied
// on the device (copy-on-write).
extern "C" __global__ void copy_u8(const uint8_t *in, uint8_t *out, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = in[i];
}
VELLUM_EXPORT(copy_u8)

// Grid-stride copy of n floats: the device-to-device bandwidth kernel benchmarks compare with.
extern "C" __global__ void copy_f32(const float *in, float *out, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    out[i] = in[i];
}
VELLUM_EXPORT(copy_f32)
