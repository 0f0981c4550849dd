// Causal attention of a ragged batch of queries over the paged KV cache, prefill chunks and
// decodes alike (a decode is a chunk of one token). Single pass with online softmax: keys are
// visited in chunks of blockDim.x; each thread scores one key of the chunk, then each thread
// accumulates its own output dimensions over the chunk's probabilities.
//
// grid = (tokens, n_heads), block = 128 threads, dynamic shared memory:
// (head_dim + blockDim.x) floats. head_dim <= 2 * blockDim.x.
// Layouts: q/out [tokens, n_heads, head_dim]; caches [slots, n_kv_heads, head_dim];
// block_tables [seqs, max_blocks]; seq_of_token[t] = t's sequence.
#include "vellum.cuh"

template <class T>
__device__ void attention(const T *q, const T *k_cache, const T *v_cache, T *out,
                          const uint32_t *positions, const uint32_t *seq_of_token,
                          const uint32_t *block_tables, uint32_t max_blocks, uint32_t n_heads,
                          uint32_t n_kv_heads, uint32_t head_dim, uint32_t block_size,
                          float scale) {
  VELLUM_DYN_SHARED(float, shared);
  __shared__ float scratch[32];
  float *qs = shared, *probs = shared + head_dim;
  uint32_t t = blockIdx.x, h = blockIdx.y, kvh = h / (n_heads / n_kv_heads);
  uint32_t visible = positions[t] + 1;
  const uint32_t *table = block_tables + (size_t)seq_of_token[t] * max_blocks;
  const T *qrow = q + ((size_t)t * n_heads + h) * head_dim;
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = to_f32(qrow[d]);
  __syncthreads();

  float m = V_NEG_INF, l = 0.0f, acc[2] = {0.0f, 0.0f};
  for (uint32_t c0 = 0; c0 < visible; c0 += blockDim.x) {
    uint32_t j = c0 + threadIdx.x;
    float s = V_NEG_INF;
    if (j < visible) {
      size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
      const T *krow = k_cache + (slot * n_kv_heads + kvh) * head_dim;
      float dot = 0.0f;
      for (uint32_t d = 0; d < head_dim; ++d) dot += qs[d] * to_f32(krow[d]);
      s = dot * scale;
    }
    float m_new = fmaxf(m, block_max(s, scratch));
    float p = j < visible ? expf(s - m_new) : 0.0f;
    probs[threadIdx.x] = p;
    float correction = expf(m - m_new);  // 0 on the first chunk (m = -inf)
    l = l * correction + block_sum(p, scratch);  // its barrier publishes probs
    uint32_t n = visible - c0 < blockDim.x ? visible - c0 : blockDim.x;
    for (uint32_t k = 0; k < 2; ++k) {
      uint32_t d = threadIdx.x + k * blockDim.x;
      if (d >= head_dim) break;
      float a = acc[k] * correction;
      for (uint32_t jj = 0; jj < n; ++jj) {
        uint32_t key = c0 + jj;
        size_t slot = (size_t)table[key / block_size] * block_size + key % block_size;
        a += probs[jj] * to_f32(v_cache[(slot * n_kv_heads + kvh) * head_dim + d]);
      }
      acc[k] = a;
    }
    m = m_new;
    // No barrier needed here: the next chunk writes probs only after block_max, whose
    // barriers every thread reaches after finishing this chunk's reads.
  }
  T *orow = out + ((size_t)t * n_heads + h) * head_dim;
  for (uint32_t k = 0; k < 2; ++k) {
    uint32_t d = threadIdx.x + k * blockDim.x;
    if (d < head_dim) orow[d] = from_f32<T>(acc[k] / l);
  }
}
#define ATTENTION(name, T)                                                                   \
  extern "C" __global__ void name(const T *q, const T *k_cache, const T *v_cache, T *out,   \
                                  const uint32_t *positions, const uint32_t *seq_of_token,   \
                                  const uint32_t *block_tables, uint32_t max_blocks,         \
                                  uint32_t n_heads, uint32_t n_kv_heads, uint32_t head_dim,  \
                                  uint32_t block_size, float scale) {                        \
    attention<T>(q, k_cache, v_cache, out, positions, seq_of_token, block_tables, max_blocks, \
                 n_heads, n_kv_heads, head_dim, block_size, scale);                          \
  }                                                                                          \
  VELLUM_EXPORT(name)
ATTENTION(attention_f32, float)
ATTENTION(attention_f16, f16)
ATTENTION(attention_bf16, bf16)
