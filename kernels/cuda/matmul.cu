// Dense matmul out[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias), a warp per output column and up
// to 8 activation rows per pass, so a decode batch reads each weight once per 8 rows.
// Each lane reads 16 bytes of weights per load (8 f16/bf16 or 4 f32 values) where the rows
// allow it, as the quantized GEMV does: a decode step reading a large dense matrix (a tied
// LM head) is bound by those loads. f32 accumulation, warp-shuffle reduction in a fixed order.
// grid.x = ceil(n / 4), block = 128 threads (4 warps).
#include "vellum.cuh"

#define MATMUL_ROWS 8

// acc[r] += Σ_j w[j] · x[r * k + j] over the first `rows` rows, for the N weights w.
template <class T, int N>
__device__ __forceinline__ void accumulate_dense(const float (&w)[N], const T *x, uint32_t k,
                                                 uint32_t rows, float (&acc)[MATMUL_ROWS]) {
#pragma unroll
  for (int r = 0; r < MATMUL_ROWS; ++r) {
    if (r >= (int)rows) break;
#pragma unroll
    for (int j = 0; j < N; ++j) acc[r] += to_f32(x[(size_t)r * k + j]) * w[j];
  }
}

template <class T, class W>
__device__ void matmul(const T *x, const W *w, const float *bias, T *out, uint32_t rows,
                       uint32_t k, uint32_t n) {
  const uint32_t N = 16 / sizeof(W);  // weights per 16-byte load
  uint32_t lane = threadIdx.x % 32, col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (col >= n) return;  // the whole warp leaves together
  const W *wrow = w + (size_t)col * k;
  // 16-byte loads need every row to start 16-byte aligned; else one value a load.
  uint32_t k16 = (k % N == 0 && (size_t)w % 16 == 0) ? k : 0;
  for (uint32_t r0 = 0; r0 < rows; r0 += MATMUL_ROWS) {
    uint32_t rr = rows - r0 < MATMUL_ROWS ? rows - r0 : MATMUL_ROWS;
    const T *xr = x + (size_t)r0 * k;
    float acc[MATMUL_ROWS];
    for (int r = 0; r < MATMUL_ROWS; ++r) acc[r] = 0.0f;
    for (uint32_t i = lane * N; i < k16; i += 32 * N) {
      union {
        uint4 raw;
        W v[16 / sizeof(W)];
      } chunk;
      chunk.raw = *reinterpret_cast<const uint4 *>(wrow + i);
      float wv[16 / sizeof(W)];
#pragma unroll
      for (int j = 0; j < (int)N; ++j) wv[j] = to_f32(chunk.v[j]);
      accumulate_dense<T, 16 / sizeof(W)>(wv, xr + i, k, rr, acc);
    }
    for (uint32_t i = k16 + lane; i < k; i += 32) {
      float wv[1] = {to_f32(wrow[i])};
      accumulate_dense<T, 1>(wv, xr + i, k, rr, acc);
    }
    store_warp_rows(acc, rr, r0, n, col, bias, out);
  }
}
#define MATMUL(name, T, W)                                                                   \
  extern "C" __global__ void name(const T *x, const W *w, const float *bias, T *out,        \
                                  uint32_t rows, uint32_t k, uint32_t n) {                   \
    matmul<T, W>(x, w, bias, out, rows, k, n);                                               \
  }                                                                                          \
  VELLUM_EXPORT(name)
MATMUL(matmul_f32_f32, float, float)
MATMUL(matmul_f32_f16, float, f16)
MATMUL(matmul_f32_bf16, float, bf16)
MATMUL(matmul_f16_f16, f16, f16)
MATMUL(matmul_bf16_bf16, bf16, bf16)
