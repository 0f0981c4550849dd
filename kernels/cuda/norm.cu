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

// Threads of a top_rows_f32 block at most (the launch's row_threads), its k at most
// (pick::MAX_RANKED; a unit test holds both to the host's), and the row elements each
// thread reads per tile.
#define TOP_ROWS_THREADS 256
#define TOP_ROWS_MAX_K 64
#define TOP_ROWS_PER_THREAD 4
#define TOP_ROWS_TILE (TOP_ROWS_THREADS * TOP_ROWS_PER_THREAD)

// For listed row i (row rows[i] of x): its k most likely tokens in pick::ranked's order
// (total_cmp, largest first, then index), into out[2k·i..]: (value, index as f32) pairs.
// A draw within top_k, or a greedy row's alternatives, then moves 8k bytes to the host
// instead of the row.
//
// One pass over the row, a tile at a time: the block keeps the best k keys so far (rank,
// then index: distinct, so the order is total) sorted in shared memory, appends the
// tile's keys that beat the k-th to a candidate list, and merges the two by counting each
// key's place among them. A row is read once, where ranking by repeated passes read it k
// times (on a T4, 64 rows of 49,152 logits do not stay in its 4 MB L2). Past the first
// tiles few keys beat the k-th of a row of logits: simulated on Gaussian rows of 49,152 at
// k 40 and 256 threads, ~590 candidates in all, against 7,680 loads a thread for k passes.
// The worst case, a row in ascending order, merges every candidate of every tile.
// k <= TOP_ROWS_MAX_K and k <= width (shapes::top_rows); blockDim.x <= TOP_ROWS_THREADS.
extern "C" __global__ void __launch_bounds__(TOP_ROWS_THREADS)
    top_rows_f32(const float *x, uint32_t width, const uint32_t *rows, uint32_t k, float *out) {
  __shared__ uint64_t best[TOP_ROWS_MAX_K], merged[TOP_ROWS_MAX_K], cand[TOP_ROWS_TILE];
  __shared__ unsigned count[2];
  const float *row = x + (size_t)rows[blockIdx.x] * width;
  float *o = out + 2 * (size_t)k * blockIdx.x;
  unsigned held = 0;  // keys in best[], the same in every thread
  if (threadIdx.x == 0) count[0] = 0;
  __syncthreads();
  // The first tile is an element per thread: all of its keys are candidates, and a merge
  // costs each thread a comparison per candidate.
  unsigned tile = 0, per = 1;
  for (uint32_t base = 0; base < width; base += blockDim.x * per, per = TOP_ROWS_PER_THREAD) {
    unsigned *n = &count[tile++ & 1];
    uint64_t bound = held == k ? best[k - 1] : ~0ull;  // every key is below ~0
    for (unsigned j = 0; j < per; ++j) {
      uint32_t i = base + j * blockDim.x + threadIdx.x;
      if (i < width) {
        uint64_t key = ((uint64_t)desc_rank(row[i]) << 32) | i;
        if (key < bound) cand[atomicAdd(n, 1u)] = key;
      }
    }
    __syncthreads();
    unsigned c = *n;
    // Everyone has read the other counter (last tile's) before this barrier: reset it for
    // the next tile, whose appends come after this tile's closing barrier.
    if (threadIdx.x == 0) count[tile & 1] = 0;
    if (c > 0) {
      // A key's place among best[] and cand[]: its own place in sorted best[] (or, for a
      // candidate, how many of best[] are below it), plus the candidates below it.
      for (unsigned e = threadIdx.x; e < held + c; e += blockDim.x) {
        uint64_t key = e < held ? best[e] : cand[e - held];
        unsigned place = e;
        if (e >= held) {
          unsigned lo = 0, hi = held;
          while (lo < hi) {
            unsigned mid = (lo + hi) / 2;
            if (best[mid] < key) lo = mid + 1; else hi = mid;
          }
          place = lo;
        }
        for (unsigned j = 0; j < c; ++j) place += cand[j] < key;
        if (place < k) merged[place] = key;
      }
      held = held + c < k ? held + c : k;
      __syncthreads();
      for (unsigned e = threadIdx.x; e < held; e += blockDim.x) best[e] = merged[e];
    }
    __syncthreads();
  }
  for (unsigned e = threadIdx.x; e < k; e += blockDim.x) {
    uint32_t idx = (uint32_t)best[e];
    o[2 * e] = row[idx];
    o[2 * e + 1] = (float)idx;
  }
}
VELLUM_EXPORT(top_rows_f32)
