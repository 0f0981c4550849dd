// Dense matmul out[rows, n] = x[rows, k] · w[n, k]ᵀ (+ bias), a warp per output column and up
// to 8 activation rows per pass, so a decode batch reads each weight once per 8 rows.
// f32 accumulation, lanes stride over k, warp-shuffle reduction in a fixed order.
// grid.x = ceil(n / 4), block = 128 threads (4 warps).
#include "vellum.cuh"

#define MATMUL_ROWS 8

template <class T, class W>
__device__ void matmul(const T *x, const W *w, const float *bias, T *out, uint32_t rows,
                       uint32_t k, uint32_t n) {
  uint32_t lane = threadIdx.x % 32, col = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (col >= n) return;  // the whole warp leaves together
  const W *wrow = w + (size_t)col * k;
  for (uint32_t r0 = 0; r0 < rows; r0 += MATMUL_ROWS) {
    uint32_t rr = rows - r0 < MATMUL_ROWS ? rows - r0 : MATMUL_ROWS;
    float acc[MATMUL_ROWS];
    for (int r = 0; r < MATMUL_ROWS; ++r) acc[r] = 0.0f;
    for (uint32_t i = lane; i < k; i += 32) {
      float wv = to_f32(wrow[i]);
#pragma unroll
      for (int r = 0; r < MATMUL_ROWS; ++r)
        if (r < (int)rr) acc[r] += to_f32(x[(size_t)(r0 + r) * k + i]) * wv;
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
