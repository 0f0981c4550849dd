// Weight-quantized matmul for decode batches (W4A16 / W8A16 GEMV, up to 16 activation rows per
// pass): out[rows, n] = x[rows, k] · dequant(w)[n, k]ᵀ (+ bias). A warp per output column;
// each lane reads 16 bytes of codes per load (32 int4 or 16 int8 values), dequantizes in
// registers and accumulates in f32; a warp-shuffle reduction in a fixed order ends it.
// grid.x = ceil(n / 4), block = 128 threads (4 warps). Geometry in kernels/src/cuda/backend.rs.
#include "vellum.cuh"

// 16 activation rows a pass: a decode batch of up to 16 streams the weights once.
#define QROWS 16

// acc[r] += wv · x[r * k .. r * k + W] for the first `rows` activation rows of the pass: one
// decoded weight chunk meets every row.
template <class T, int W>
__device__ __forceinline__ void accumulate_rows(const float (&wv)[W], const T *x, uint32_t k,
                                                uint32_t rows, float (&acc)[QROWS]) {
#pragma unroll
  for (int r = 0; r < QROWS; ++r) {
    if (r >= (int)rows) break;
    const T *xr = x + (size_t)r * k;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < W; ++j) s += wv[j] * to_f32(xr[j]);
    acc[r] += s;
  }
}

// Planar int4 (vellum_quant::int4): packed [n, k/2] (32-value chunks of 16 bytes: byte j =
// value j | value j+16 << 4), scales [n, groups] f16, mins [n, groups] f16 or null when
// symmetric (x = (q - 8) * d; else x = q * d + m). k is a multiple of 32.
template <class T>
__device__ void matmul_w4(const T *x, const uint8_t *packed, const f16 *scales, const f16 *mins,
                          const float *bias, T *out, uint32_t rows, uint32_t k, uint32_t n,
                          uint32_t group) {
  uint32_t lane = threadIdx.x % 32, col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (col >= n) return;  // the whole warp leaves together
  uint32_t groups = (k + group - 1) / group;
  const uint4 *wrow = reinterpret_cast<const uint4 *>(packed + (size_t)col * (k / 2));
  const f16 *srow = scales + (size_t)col * groups;
  const f16 *mrow = mins ? mins + (size_t)col * groups : nullptr;
  for (uint32_t r0 = 0; r0 < rows; r0 += QROWS) {
    uint32_t rr = rows - r0 < QROWS ? rows - r0 : QROWS;
    float acc[QROWS];
    for (int r = 0; r < QROWS; ++r) acc[r] = 0.0f;
    // The next chunk's load is issued before this one is decoded: two loads in flight.
    uint32_t chunks = k / 32;
    uint4 next = lane < chunks ? wrow[lane] : uint4{0, 0, 0, 0};
    for (uint32_t c = lane; c < chunks; c += 32) {
      uint4 w = next;
      if (c + 32 < chunks) next = wrow[c + 32];
      uint32_t words[4] = {w.x, w.y, w.z, w.w};
      uint32_t g = c * 32 / group;
      float d = to_f32(srow[g]);
      float wv[32];
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        uint32_t byte = (words[j / 4] >> (8 * (j % 4))) & 0xffu;
        uint32_t lo = byte & 0xfu, hi = byte >> 4;
        if (mrow) {
          float m = to_f32(mrow[g]);
          wv[j] = (float)lo * d + m;
          wv[j + 16] = (float)hi * d + m;
        } else {
          wv[j] = (float)((int)lo - 8) * d;
          wv[j + 16] = (float)((int)hi - 8) * d;
        }
      }
      accumulate_rows<T, 32>(wv, x + (size_t)r0 * k + c * 32, k, rr, acc);
    }
    store_warp_rows(acc, rr, r0, n, col, bias, out);
  }
}

// int8 with one f32 scale per group of `group` values (group = k: per output channel; 32: the
// GGUF Q8_0 layout, repacked): q [n, k] i8, scales [n, groups]. k is a multiple of 16.
template <class T>
__device__ void matmul_w8(const T *x, const int8_t *q, const float *scales, const float *bias,
                          T *out, uint32_t rows, uint32_t k, uint32_t n, uint32_t group) {
  uint32_t lane = threadIdx.x % 32, col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (col >= n) return;
  uint32_t groups = (k + group - 1) / group;
  const uint4 *wrow = reinterpret_cast<const uint4 *>(q + (size_t)col * k);
  const float *srow = scales + (size_t)col * groups;
  for (uint32_t r0 = 0; r0 < rows; r0 += QROWS) {
    uint32_t rr = rows - r0 < QROWS ? rows - r0 : QROWS;
    float acc[QROWS];
    for (int r = 0; r < QROWS; ++r) acc[r] = 0.0f;
    uint32_t chunks = k / 16;
    uint4 next = lane < chunks ? wrow[lane] : uint4{0, 0, 0, 0};
    for (uint32_t c = lane; c < chunks; c += 32) {
      uint4 w = next;
      if (c + 32 < chunks) next = wrow[c + 32];
      uint32_t words[4] = {w.x, w.y, w.z, w.w};
      float d = srow[c * 16 / group];
      float wv[16];
#pragma unroll
      for (int j = 0; j < 16; ++j)
        wv[j] = (float)(int8_t)((words[j / 4] >> (8 * (j % 4))) & 0xffu) * d;
      accumulate_rows<T, 16>(wv, x + (size_t)r0 * k + c * 16, k, rr, acc);
    }
    store_warp_rows(acc, rr, r0, n, col, bias, out);
  }
}

#define QMATMUL(T, SUFFIX)                                                                   \
  extern "C" __global__ void matmul_w4_##SUFFIX(const T *x, const uint8_t *packed,          \
                                                const f16 *scales, const f16 *mins,          \
                                                const float *bias, T *out, uint32_t rows,    \
                                                uint32_t k, uint32_t n, uint32_t group) {    \
    matmul_w4<T>(x, packed, scales, mins, bias, out, rows, k, n, group);                     \
  }                                                                                          \
  VELLUM_EXPORT(matmul_w4_##SUFFIX)                                                          \
  extern "C" __global__ void matmul_w8_##SUFFIX(const T *x, const int8_t *q,                \
                                                const float *scales, const float *bias,      \
                                                T *out, uint32_t rows, uint32_t k,           \
                                                uint32_t n, uint32_t group) {                \
    matmul_w8<T>(x, q, scales, bias, out, rows, k, n, group);                                \
  }                                                                                          \
  VELLUM_EXPORT(matmul_w8_##SUFFIX)
QMATMUL(float, f32)
QMATMUL(f16, f16)
QMATMUL(bf16, bf16)
