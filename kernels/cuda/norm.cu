// Row reductions: fused residual add + RMSNorm, log-softmax and argmax over logits.
// One block per row; blockDim.x a multiple of 32. Geometry in kernels/src/cuda/backend.rs.
#include "vellum.cuh"

// residual += delta (when delta is not null); out = residual * rsqrt(mean(residual²) + eps) * weight.
template <class T>
__device__ void add_rms_norm(T *residual, const T *delta, const float *weight, float eps, T *out,
                             uint32_t width) {
  __shared__ float scratch[32];
  size_t row = (size_t)blockIdx.x * width;
  float ss = 0.0f;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) {
    float r = to_f32(residual[row + i]);
    if (delta) {
      T stored = from_f32<T>(r + to_f32(delta[row + i]));
      residual[row + i] = stored;
      r = to_f32(stored);
    }
    ss += r * r;
  }
  float inv = 1.0f / sqrtf(block_sum(ss, scratch) / (float)width + eps);
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x)
    out[row + i] = from_f32<T>(to_f32(residual[row + i]) * inv * weight[i]);
}
#define ADD_RMS_NORM(name, T)                                                                \
  extern "C" __global__ void name(T *residual, const T *delta, const float *weight, float eps, \
                                  T *out, uint32_t width) {                                  \
    add_rms_norm<T>(residual, delta, weight, eps, out, width);                               \
  }                                                                                          \
  VELLUM_EXPORT(name)
ADD_RMS_NORM(add_rms_norm_f32, float)
ADD_RMS_NORM(add_rms_norm_f16, f16)
ADD_RMS_NORM(add_rms_norm_bf16, bf16)

// In place: x = x - logsumexp(x), row by row (logits are f32).
extern "C" __global__ void log_softmax_f32(float *x, uint32_t width) {
  __shared__ float scratch[32];
  float *row = x + (size_t)blockIdx.x * width;
  float m = V_NEG_INF;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) m = fmaxf(m, row[i]);
  m = block_max(m, scratch);
  float s = 0.0f;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) s += expf(row[i] - m);
  float lse = m + logf(block_sum(s, scratch));
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) row[i] -= lse;
}
VELLUM_EXPORT(log_softmax_f32)

// out[row] = index of the largest value (the lowest index among ties), so greedy decoding
// moves one u32 per sequence to the host instead of a row of logits.
extern "C" __global__ void argmax_f32(const float *x, uint32_t width, uint32_t *out) {
  __shared__ float best_v[32];
  __shared__ uint32_t best_i[32];
  const float *row = x + (size_t)blockIdx.x * width;
  float v = V_NEG_INF;
  uint32_t idx = 0xffffffffu;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x)
    if (row[i] > v || idx == 0xffffffffu) {
      v = row[i];
      idx = i;
    }
  for (int o = 16; o > 0; o >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, o);
    uint32_t oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ov > v || (ov == v && oi < idx)) {
      v = ov;
      idx = oi;
    }
  }
  unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    best_v[warp] = v;
    best_i[warp] = idx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (unsigned w = 1; w < blockDim.x / 32; ++w)
      if (best_v[w] > v || (best_v[w] == v && best_i[w] < idx)) {
        v = best_v[w];
        idx = best_i[w];
      }
    out[blockIdx.x] = idx;
  }
}
VELLUM_EXPORT(argmax_f32)
