// Row reductions: fused residual add + RMSNorm, log-softmax, and picked rows (argmax and a
// target's value) of log-probabilities.
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

// For row r: out[2r] = its value at targets[r] (at its argmax when targets[r] is NO_TARGET),
// out[2r + 1] = its argmax as a float: the first index of its largest value, NaN never
// winning, 0 when no value is above -inf (pick::argmax in Rust). A greedy or scored row
// then moves 8 bytes to the host instead of a row of the vocabulary.
#define NO_TARGET 0xffffffffu
extern "C" __global__ void pick_rows_f32(const float *x, uint32_t width, const uint32_t *targets,
                                         float *out) {
  __shared__ float best_v[32];
  __shared__ uint32_t best_i[32];
  const float *row = x + (size_t)blockIdx.x * width;
  // Each thread's first largest (strictly greater: NaN never wins), then the block's:
  // the larger value, the lower index among equals.
  float v = V_NEG_INF;
  uint32_t idx = 0xffffffffu;
  for (uint32_t i = threadIdx.x; i < width; i += blockDim.x)
    if (row[i] > v) {
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
    if (v == V_NEG_INF) idx = 0;
    uint32_t target = targets[blockIdx.x];
    out[2 * (size_t)blockIdx.x] = row[target == NO_TARGET ? idx : target];
    out[2 * (size_t)blockIdx.x + 1] = (float)idx;
  }
}
VELLUM_EXPORT(pick_rows_f32)

// A value's place in f32::total_cmp's order, reversed: smaller ranks are larger values
// (pick::descending_rank in Rust).
__device__ __forceinline__ uint32_t desc_rank(float v) {
  uint32_t b = vf_bits(v);
  uint32_t ascending = (b >> 31) ? ~b : (b | 0x80000000u);
  return ~ascending;
}

// The smallest of the block's values, to every thread. blockDim.x a multiple of 32.
__device__ __forceinline__ uint64_t block_min_u64(uint64_t v, uint64_t *scratch) {
  unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int o = 16; o > 0; o >>= 1) {
    uint64_t w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  uint64_t t = lane < warps ? scratch[lane] : ~0ull;
  for (int o = 16; o > 0; o >>= 1) {
    uint64_t w = __shfl_xor_sync(0xffffffffu, t, o);
    t = w < t ? w : t;
  }
  __syncthreads();
  return t;
}

// For listed row i (row rows[i] of x): its k most likely tokens in pick::ranked's order
// (total_cmp, largest first, then index), into out[2k·i..]: (value, index as f32) pairs.
// A draw within top_k, or a greedy row's alternatives, then moves 8k bytes to the host
// instead of the row. One pass over the row per candidate, each finding the smallest key
// (rank, then index) above the last one found: k is small (pick::MAX_RANKED) and the row
// stays in L2 between passes. Keys are distinct, and k <= width, so every pass finds one.
extern "C" __global__ void top_rows_f32(const float *x, uint32_t width, const uint32_t *rows,
                                        uint32_t k, float *out) {
  __shared__ uint64_t scratch[32];
  const float *row = x + (size_t)rows[blockIdx.x] * width;
  float *o = out + 2 * (size_t)k * blockIdx.x;
  uint64_t floor = 0;  // keys below it were found already
  for (uint32_t c = 0; c < k; ++c) {
    uint64_t best = ~0ull;
    for (uint32_t i = threadIdx.x; i < width; i += blockDim.x) {
      uint64_t key = ((uint64_t)desc_rank(row[i]) << 32) | i;
      if (key >= floor && key < best) best = key;
    }
    best = block_min_u64(best, scratch);
    if (threadIdx.x == 0) {
      uint32_t idx = (uint32_t)best;
      o[2 * c] = row[idx];
      o[2 * c + 1] = (float)idx;
    }
    floor = best + 1;
  }
}
VELLUM_EXPORT(top_rows_f32)
