// Causal attention of a ragged batch of queries over the paged KV cache, prefill chunks and
// decodes alike (a decode is a chunk of one token). Online softmax: keys are visited in
// chunks of blockDim.x; each thread scores one key of the chunk, then each thread
// accumulates its own output dimensions over the chunk's probabilities. One pass for short
// contexts (attention_*); for long ones the context is split across blocks, and the last
// block of each (token, head) merges the splits (attention_split_*, flash-decoding), so
// that a small decode batch still fills the GPU.
//
// grid = (tokens, n_heads[, splits]), block = 128 threads, dynamic shared memory:
// (head_dim + blockDim.x) floats. head_dim <= 2 * blockDim.x.
// Layouts: q/out [tokens, n_heads, head_dim]; caches [slots, n_kv_heads, head_dim];
// block_tables [seqs, max_blocks]; seq_of_token[t] = t's sequence. A cache is read through
// a KvPlain (stored as f32, f16 or bf16) or a KvInt8 (int8 codes with an f32 scale per
// 2^shift values, kernels/src/attention.rs's KvData::Int8): each gives element e as f32,
// the value the CPU backend reads.
#include "vellum.cuh"

template <class S> struct KvPlain {
  const S *p;
  __device__ __forceinline__ float operator()(size_t e) const { return to_f32(p[e]); }
};

struct KvInt8 {
  const int8_t *codes;
  const float *scales;
  uint32_t shift;
  __device__ __forceinline__ float operator()(size_t e) const {
    return (float)codes[e] * scales[e >> shift];
  }
};

// Online softmax over keys [begin, end) of one (token, head): on return m is the running
// max, l the sum of exp(score - m), acc[k] the unnormalised output at dims
// threadIdx.x + k * blockDim.x. qs holds the scaled-free query in shared memory, probs
// blockDim.x floats of shared memory. Every thread of the block must call it (barriers).
template <class Kv>
__device__ void attend_range(const float *qs, float *probs, float *scratch, Kv k_cache,
                             Kv v_cache, const uint32_t *table, uint32_t begin,
                             uint32_t end, uint32_t kvh, uint32_t n_kv_heads, uint32_t head_dim,
                             uint32_t block_size, float scale, float &m, float &l,
                             float acc[2]) {
  m = V_NEG_INF;
  l = 0.0f;
  acc[0] = acc[1] = 0.0f;
  for (uint32_t c0 = begin; c0 < end; c0 += blockDim.x) {
    uint32_t j = c0 + threadIdx.x;
    float s = V_NEG_INF;
    if (j < end) {
      size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
      size_t krow = (slot * n_kv_heads + kvh) * head_dim;
      float dot = 0.0f;
      for (uint32_t d = 0; d < head_dim; ++d) dot += qs[d] * k_cache(krow + d);
      s = dot * scale;
    }
    float m_new = fmaxf(m, block_max(s, scratch));
    float p = j < end ? expf(s - m_new) : 0.0f;
    probs[threadIdx.x] = p;
    float correction = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    l = l * correction + block_sum(p, scratch);  // its barrier publishes probs
    uint32_t n = end - c0 < blockDim.x ? end - c0 : blockDim.x;
    for (uint32_t k = 0; k < 2; ++k) {
      uint32_t d = threadIdx.x + k * blockDim.x;
      if (d >= head_dim) break;
      float a = acc[k] * correction;
      for (uint32_t jj = 0; jj < n; ++jj) {
        uint32_t key = c0 + jj;
        size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
        a += probs[jj] * v_cache((slot * n_kv_heads + kvh) * head_dim + d);
      }
      acc[k] = a;
    }
    m = m_new;
    // No barrier needed here: the next chunk writes probs only after block_max, whose
    // barriers every thread reaches after finishing this chunk's reads.
  }
}

// Loads the query of (token blockIdx.x, head blockIdx.y) into shared memory as f32.
template <class T>
__device__ void load_query(const T *q, float *qs, uint32_t n_heads, uint32_t head_dim) {
  const T *qrow = q + ((size_t)blockIdx.x * n_heads + blockIdx.y) * head_dim;
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = to_f32(qrow[d]);
  __syncthreads();
}

template <class T, class Kv>
__device__ void attention(const T *q, Kv k_cache, Kv v_cache, T *out,
                          const uint32_t *positions, const uint32_t *seq_of_token,
                          const uint32_t *block_tables, uint32_t max_blocks, uint32_t n_heads,
                          uint32_t n_kv_heads, uint32_t head_dim, uint32_t block_size,
                          float scale) {
  VELLUM_DYN_SHARED(float, shared);
  __shared__ float scratch[32];
  float *qs = shared, *probs = shared + head_dim;
  uint32_t t = blockIdx.x, h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
  const uint32_t *table = block_tables + (size_t)seq_of_token[t] * max_blocks;
  load_query(q, qs, n_heads, head_dim);
  float m, l, acc[2];
  attend_range(qs, probs, scratch, k_cache, v_cache, table, 0, positions[t] + 1, kvh,
               n_kv_heads, head_dim, block_size, scale, m, l, acc);
  T *orow = out + ((size_t)t * n_heads + h) * head_dim;
  for (uint32_t k = 0; k < 2; ++k) {
    uint32_t d = threadIdx.x + k * blockDim.x;
    if (d < head_dim) orow[d] = from_f32<T>(acc[k] / l);
  }
}

// Flash-decoding, in one launch: grid = (tokens, n_heads, splits); block z attends to keys
// [z * split_keys, (z + 1) * split_keys) of its token's visible context and writes its
// partial (m, l, unnormalised acc) to the f32 workspace `part`: part_ml [tokens, n_heads,
// splits, 2], then part_acc [tokens, n_heads, splits, head_dim]. A split past the context
// writes l = 0, so the workspace needs no clearing. The last of a (token, head)'s splits to
// finish (counters[token * n_heads + head], zero between launches: that block resets it)
// merges them into out, where a second kernel used to: a launch less per layer.
template <class T, class O, class Kv>
__device__ void attention_split(const T *q, Kv k_cache, Kv v_cache, float *part,
                                unsigned *counters, O *out, const uint32_t *positions,
                                const uint32_t *seq_of_token, const uint32_t *block_tables,
                                uint32_t max_blocks, uint32_t n_heads, uint32_t n_kv_heads,
                                uint32_t head_dim, uint32_t block_size, float scale,
                                uint32_t split_keys) {
  VELLUM_DYN_SHARED(float, shared);
  __shared__ float scratch[32];
  __shared__ bool last;
  float *qs = shared, *probs = shared + head_dim;
  uint32_t t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, kvh = h / (n_heads / n_kv_heads);
  uint32_t visible = positions[t] + 1, begin = z * split_keys;
  uint32_t end = begin + split_keys < visible ? begin + split_keys : visible;
  const uint32_t *table = block_tables + (size_t)seq_of_token[t] * max_blocks;
  load_query(q, qs, n_heads, head_dim);
  float m = V_NEG_INF, l = 0.0f, acc[2] = {0.0f, 0.0f};
  if (begin < end)  // uniform across the block: barriers inside stay convergent
    attend_range(qs, probs, scratch, k_cache, v_cache, table, begin, end, kvh, n_kv_heads,
                 head_dim, block_size, scale, m, l, acc);
  uint32_t splits = gridDim.z;
  float *part_ml = part, *part_acc = part + 2 * (size_t)gridDim.x * n_heads * splits;
  size_t head = (size_t)t * n_heads + h, first = head * splits;
  if (threadIdx.x == 0) {
    part_ml[(first + z) * 2] = m;
    part_ml[(first + z) * 2 + 1] = l;
  }
  for (uint32_t k = 0; k < 2; ++k) {
    uint32_t d = threadIdx.x + k * blockDim.x;
    if (d < head_dim) part_acc[(first + z) * head_dim + d] = acc[k];
  }
  // The partials out to where every block sees them before this split is counted.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&counters[head], 1u) == splits - 1;
    if (last) counters[head] = 0;
  }
  __syncthreads();
  if (!last) return;
  // The merge, in split order (a fixed order, so results do not depend on which split
  // finished last, nor on the batch). Volatile reads: the other splits' partials come from
  // L2, never from a stale line of this multiprocessor's L1.
  const volatile float *vml = part_ml, *vacc = part_acc;
  m = V_NEG_INF;
  for (uint32_t s = 0; s < splits; ++s)
    if (vml[(first + s) * 2 + 1] > 0.0f) m = fmaxf(m, vml[(first + s) * 2]);
  O *orow = out + head * head_dim;
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float ls = 0.0f, a = 0.0f;
    for (uint32_t s = 0; s < splits; ++s) {
      float lz = vml[(first + s) * 2 + 1];
      if (lz == 0.0f) continue;
      float w = expf(vml[(first + s) * 2] - m);
      ls += lz * w;
      a += vacc[(first + s) * head_dim + d] * w;
    }
    orow[d] = from_f32<O>(a / ls);
  }
}

#define ATTENTION(name, T)                                                                   \
  extern "C" __global__ void name(const T *q, const T *k_cache, const T *v_cache, T *out,   \
                                  const uint32_t *positions, const uint32_t *seq_of_token,   \
                                  const uint32_t *block_tables, uint32_t max_blocks,         \
                                  uint32_t n_heads, uint32_t n_kv_heads, uint32_t head_dim,  \
                                  uint32_t block_size, float scale) {                        \
    attention(q, KvPlain<T>{k_cache}, KvPlain<T>{v_cache}, out, positions, seq_of_token,     \
              block_tables, max_blocks, n_heads, n_kv_heads, head_dim, block_size, scale);   \
  }                                                                                          \
  VELLUM_EXPORT(name)
ATTENTION(attention_f32, float)
ATTENTION(attention_f16, f16)
ATTENTION(attention_bf16, bf16)

#define ATTENTION_SPLIT(name, T)                                                             \
  extern "C" __global__ void name(const T *q, const T *k_cache, const T *v_cache, float *part, \
                                  unsigned *counters, T *out, const uint32_t *positions,     \
                                  const uint32_t *seq_of_token, const uint32_t *block_tables, \
                                  uint32_t max_blocks, uint32_t n_heads, uint32_t n_kv_heads, \
                                  uint32_t head_dim, uint32_t block_size, float scale,       \
                                  uint32_t split_keys) {                                     \
    attention_split(q, KvPlain<T>{k_cache}, KvPlain<T>{v_cache}, part, counters, out,       \
                    positions, seq_of_token, block_tables, max_blocks, n_heads, n_kv_heads,  \
                    head_dim, block_size, scale, split_keys);                                \
  }                                                                                          \
  VELLUM_EXPORT(name)
ATTENTION_SPLIT(attention_split_f32, float)
ATTENTION_SPLIT(attention_split_f16, f16)
ATTENTION_SPLIT(attention_split_bf16, bf16)

// f32 queries and outputs over a cache stored narrower (the CUDA backend's device copy of an
// f16 or int8 KvLayer): the cache arguments come first, K's then V's, then the int8 shift.
#define KV_LAYOUT                                                                            \
  const uint32_t *positions, const uint32_t *seq_of_token, const uint32_t *block_tables,     \
      uint32_t max_blocks, uint32_t n_heads, uint32_t n_kv_heads, uint32_t head_dim,          \
      uint32_t block_size, float scale
#define KV_LAYOUT_ARGS                                                                       \
  positions, seq_of_token, block_tables, max_blocks, n_heads, n_kv_heads, head_dim,          \
      block_size, scale

extern "C" __global__ void attention_f32_kv_f16(const float *q, const f16 *k, const f16 *v,
                                                float *out, KV_LAYOUT) {
  attention(q, KvPlain<f16>{k}, KvPlain<f16>{v}, out, KV_LAYOUT_ARGS);
}
VELLUM_EXPORT(attention_f32_kv_f16)
extern "C" __global__ void attention_split_f32_kv_f16(const float *q, const f16 *k,
                                                      const f16 *v, float *part,
                                                      unsigned *counters, float *out,
                                                      KV_LAYOUT, uint32_t split_keys) {
  attention_split(q, KvPlain<f16>{k}, KvPlain<f16>{v}, part, counters, out, KV_LAYOUT_ARGS,
                  split_keys);
}
VELLUM_EXPORT(attention_split_f32_kv_f16)
extern "C" __global__ void attention_f32_kv_int8(const float *q, const int8_t *kc,
                                                 const float *ks, const int8_t *vc,
                                                 const float *vs, uint32_t shift, float *out,
                                                 KV_LAYOUT) {
  attention(q, KvInt8{kc, ks, shift}, KvInt8{vc, vs, shift}, out, KV_LAYOUT_ARGS);
}
VELLUM_EXPORT(attention_f32_kv_int8)
extern "C" __global__ void attention_split_f32_kv_int8(const float *q, const int8_t *kc,
                                                       const float *ks, const int8_t *vc,
                                                       const float *vs, uint32_t shift,
                                                       float *part, unsigned *counters,
                                                       float *out, KV_LAYOUT,
                                                       uint32_t split_keys) {
  attention_split(q, KvInt8{kc, ks, shift}, KvInt8{vc, vs, shift}, part, counters, out,
                  KV_LAYOUT_ARGS, split_keys);
}
VELLUM_EXPORT(attention_split_f32_kv_int8)
