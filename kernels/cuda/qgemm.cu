// Weight-quantized matmul on tensor cores (W4A16 / W8A16), for decode batches and prefill
// alike: out[rows, n] = x[rows, k] · dequant(w)[n, k]ᵀ (+ bias), on the weight formats of
// qmatmul.cu, and on dense f16 / bf16 weights (the gemm_wf16_* / gemm_wbf16_* kernels). A block computes BM rows × 64 columns. For each 64-value step of k
// it stages x (rounded to f16) and its 64 weight columns (dequantized to f16) in shared
// memory; each of its 4 warps then multiplies all BM rows by its own 16 columns with
// m16n8k16 MMAs into f32 accumulators. The next step's global loads are issued before this
// step's MMAs (a register double buffer), so they are in flight while the tensor cores work.
//
// k is summed in chunks of `steps_per_chunk` steps: each chunk in its own accumulators, the
// chunks added in order to a running total. With grid.z = 1 a block does every chunk and
// writes out (+ bias). Split-K, for matrices too small to fill the GPU, has grid.z = the
// number of chunks: block z does chunk z and writes its f32 sums to out + z * rows * n, and
// the last block of each tile to finish adds them in order (+ bias) into sum_out
// (sum_splits_if_last). Both give the same bits, and the chunk
// size depends on k, n and the device only, never on the rows: a row's result does not
// depend on the other rows of the batch nor on the split (the Backend trait's promise).
//
// grid = (ceil(n / 64), ceil(rows / BM), splits), block = 128 threads; BM = 16 (the kernels
// named _m16, for decode batches) or 64 (_m64). The gemm3_* kernels take two or three
// matrices of one input side by side along grid.x (Q, K and V; gate and up), each with its
// own plan. The gemm_*_silu_* kernels read their rows as silu(gate) · up, computed as they
// load them (the MLP's down projection, without the silu_mul launch before it; the same
// bits). Host code: kernels/src/cuda/backend.rs.
#include "vellum.cuh"

#define GEMM_BN 64
#define GEMM_BK 64
#define GEMM_THREADS 128
// f16 values per shared-memory row: 8 of padding put the 8 rows one fragment load reads
// (row stride 36 words) on distinct banks.
#define GEMM_LD (GEMM_BK + 8)

#ifdef VELLUM_EMU
// The MMA instructions, written from the PTX ISA's fragment layout for f16 inputs and f32
// accumulators: gather the warp's registers and let each lane compute its four outputs in
// f32. K = 16 is mma.m16n8k16; K = 8 is mma.m16n8k8, whose fragments are the first two A
// registers and the first B register of the k16 layout below, restricted to k < 8.
template <int K>
__device__ void emulated_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Fragments {
    uint32_t a[4], b[2];
  };
  Fragments mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, all[32];
  emu::warp_gather(mine, all);
  auto half = [](uint32_t reg, int upper) {
    f16 h;
    h.bits = (uint16_t)(reg >> (16 * upper));
    return to_f32(h);
  };
  auto A = [&](int row, int kk) {
    return half(all[4 * (row % 8) + (kk % 8) / 2].a[row / 8 + 2 * (kk / 8)], kk % 2);
  };
  auto B = [&](int kk, int col) { return half(all[4 * col + (kk % 8) / 2].b[kk / 8], kk % 2); };
  int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float s = 0.0f;
    for (int kk = 0; kk < K; ++kk) s += A(row, kk) * B(kk, col);
    d[i] += s;
  }
}
#endif

// d += a · b for one 16×8×8 tile (sm_75+): a = {A[g][2t..2t+1], A[g+8][2t..2t+1]},
// b = B[2t..2t+1][g], d as for m16n8k16 below.
__device__ __forceinline__ void mma_1688(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
#ifdef VELLUM_EMU
  const uint32_t a[4] = {a0, a1, 0u, 0u}, b[2] = {b0, 0u};
  emulated_mma<8>(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(b0));
#endif
}

// d += a · b for one 16×8×16 tile: f16 inputs, f32 accumulators, the PTX ISA's fragment
// layout for mma.m16n8k16 .row.col. With lane = 4 g + t (each register two f16, the lower
// k in the low half):
//   a = {A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]}
//   b = {B[2t..2t+1][g], B[2t+8..2t+9][g]}
//   d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}
// sm_75 has no k16 shape: there it is two m16n8k8 over the halves of k, whose fragments
// are the k16 registers taken two (A) and one (B) at a time. The emulator runs whichever
// path its VELLUM_ARCH selects.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
#if VELLUM_ARCH >= 800
#ifdef VELLUM_EMU
  emulated_mma<16>(d, a, b);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
#else
  mma_1688(d, a[0], a[1], b[0]);
  mma_1688(d, a[2], a[3], b[1]);
#endif
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  return (uint32_t)f16_bits(lo) | ((uint32_t)f16_bits(hi) << 16);
}

// One step's operands in shared memory, as f16 bits: x rows, and weight columns with k
// contiguous (the "col" operand of the MMA). Read and written as 32-bit pairs, hence the
// alignment.
template <int BM> struct alignas(16) GemmStage {
  uint16_t a[BM][GEMM_LD];
  uint16_t b[GEMM_BN][GEMM_LD];
};

// Where the GEMM reads its rows' values: a matrix, or silu(gate) · up of two.
struct Rows {
  const float *x;
  __device__ float at(size_t i) const { return x[i]; }
};
struct SiluRows {
  const float *gate, *up;
  __device__ float at(size_t i) const { return silu_times(gate[i], up[i]); }
};

// x's part of a step: thread tid holds column tid % 64 of rows tid / 64 + 2 i, so that a warp
// reads 32 consecutive floats of a row. Zero past the last row or past k.
template <class X, int BM> struct XLoader {
  static constexpr int PER_THREAD = BM * GEMM_BK / GEMM_THREADS;
  float v[PER_THREAD];

  __device__ void load(const X &x, uint32_t rows, uint32_t k, uint32_t row0, uint32_t k0) {
    uint32_t col = k0 + threadIdx.x % GEMM_BK;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      uint32_t row = row0 + threadIdx.x / GEMM_BK + 2 * i;
      v[i] = row < rows && col < k ? x.at((size_t)row * k + col) : 0.0f;
    }
  }
  __device__ void store(GemmStage<BM> &s) const {
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i)
      s.a[threadIdx.x / GEMM_BK + 2 * i][threadIdx.x % GEMM_BK] = f16_bits(v[i]);
  }
};

// Planar int4 (see qmatmul.cu): thread tid holds one 32-value chunk, values 32 (tid % 2) ..
// of the step for column tid / 2: 16 bytes and their group's f16 scale and offset.
// Dequantized in packed f16 pairs (about 2.5 operations a value, where f32 math and a
// conversion per value took about 6): a nibble q or'ed into the f16 bits of 1024 is exactly
// 1024 + q; subtracting 1024 (asymmetric) or 1032 (symmetric, q - 8) is exact, and
// (q - c) · d + m is rounded once.
struct W4Loader {
  const uint8_t *packed;
  const f16 *scales, *mins;
  uint32_t k, n, group;
  uint4 raw;
  uint32_t d2, m2;  // the group's scale and offset, each in both halves

  __device__ void load(uint32_t col0, uint32_t k0) {
    uint32_t col = col0 + threadIdx.x / 2, kk = k0 + 32 * (threadIdx.x % 2);
    raw = uint4{0, 0, 0, 0};
    d2 = 0;  // a missing chunk dequantizes to zeros in both symmetries
    m2 = 0;
    if (col >= n || kk >= k) return;
    raw = *reinterpret_cast<const uint4 *>(packed + (size_t)col * (k / 2) + kk / 2);
    size_t g = (size_t)col * ((k + group - 1) / group) + kk / group;
    d2 = scales[g].bits * 0x10001u;
    m2 = mins ? mins[g].bits * 0x10001u : 0u;
  }
  template <int BM> __device__ void store(GemmStage<BM> &s) const {
    const uint32_t magic = 0x64006400u;                       // 1024 in both halves
    const uint32_t offset = mins ? 0x64006400u : 0x64086408u;  // 1024, or 1032 = 1024 + 8
    uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    // byte j holds value j (low nibble) and value j + 16 (high nibble)
    uint32_t *row = reinterpret_cast<uint32_t *>(&s.b[threadIdx.x / 2][32 * (threadIdx.x % 2)]);
#pragma unroll
    for (int j = 0; j < 16; j += 2) {
      // bytes j and j + 1 spread to the two halves: {byte j, 0, byte j + 1, 0}
      uint32_t spread = prmt(words[j / 4], 0u, j % 4 == 0 ? 0x4140u : 0x4342u);
      uint32_t lo = (spread & 0x000f000fu) | magic, hi = ((spread >> 4) & 0x000f000fu) | magic;
      row[j / 2] = h2_fma(h2_sub(lo, offset), d2, m2);
      row[8 + j / 2] = h2_fma(h2_sub(hi, offset), d2, m2);
    }
  }
};

// int8 with one f32 scale per `group` values (see qmatmul.cu): thread tid holds values
// 32 (tid % 2) .. of the step for column tid / 2, as two 16-byte pieces (k is a multiple of 16).
struct W8Loader {
  const int8_t *q;
  const float *scales;
  uint32_t k, n, group;
  uint4 raw[2];
  float d[2];

  __device__ void load(uint32_t col0, uint32_t k0) {
    uint32_t col = col0 + threadIdx.x / 2;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      uint32_t kk = k0 + 32 * (threadIdx.x % 2) + 16 * p;
      raw[p] = uint4{0, 0, 0, 0};
      d[p] = 0.0f;
      if (col >= n || kk >= k) continue;
      raw[p] = *reinterpret_cast<const uint4 *>(q + (size_t)col * k + kk);
      d[p] = scales[(size_t)col * ((k + group - 1) / group) + kk / group];
    }
  }
  template <int BM> __device__ void store(GemmStage<BM> &s) const {
    uint32_t *row = reinterpret_cast<uint32_t *>(&s.b[threadIdx.x / 2][32 * (threadIdx.x % 2)]);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      uint32_t words[4] = {raw[p].x, raw[p].y, raw[p].z, raw[p].w};
#pragma unroll
      for (int j = 0; j < 16; j += 2) {
        float lo = (float)(int8_t)((words[j / 4] >> (8 * (j % 4))) & 0xffu);
        float hi = (float)(int8_t)((words[j / 4] >> (8 * (j % 4 + 1))) & 0xffu);
        row[8 * p + j / 2] = pack_f16x2(lo * d[p], hi * d[p]);
      }
    }
  }
};

// Dense f16 or bf16 weights (k a multiple of 8, rows 16-byte aligned): thread tid holds
// values 32 (tid % 2) .. of the step for column tid / 2, as four 16-byte pieces, and stores
// them as f16 (bf16 rounded to nearest even, saturated to f16's range: weights are far
// inside it, and an infinity would poison whole rows). A prefill or scoring step through a
// dense layer or a tied LM head then runs on tensor cores, not through the warp-per-column
// kernel that reads the weights once per 8 rows.
template <class W> struct DenseLoader {
  const W *w;
  uint32_t k, n;
  uint4 raw[4];

  __device__ void load(uint32_t col0, uint32_t k0) {
    uint32_t col = col0 + threadIdx.x / 2;
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      uint32_t kk = k0 + 32 * (threadIdx.x % 2) + 8 * p;
      raw[p] = uint4{0, 0, 0, 0};
      if (col < n && kk < k) raw[p] = *reinterpret_cast<const uint4 *>(w + (size_t)col * k + kk);
    }
  }
  template <int BM> __device__ void store(GemmStage<BM> &s) const {
    uint32_t *row = reinterpret_cast<uint32_t *>(&s.b[threadIdx.x / 2][32 * (threadIdx.x % 2)]);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      uint32_t words[4] = {raw[p].x, raw[p].y, raw[p].z, raw[p].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) row[4 * p + j] = f16_pair(words[j], (W *)nullptr);
    }
  }
  // Two f16 values already: as they are.
  __device__ static uint32_t f16_pair(uint32_t pair, f16 *) { return pair; }
  // Two bf16 values: each to f16.
  __device__ static uint32_t f16_pair(uint32_t pair, bf16 *) {
    bf16 lo, hi;
    lo.bits = (uint16_t)(pair & 0xffffu);
    hi.bits = (uint16_t)(pair >> 16);
    return pack_f16x2(fminf(fmaxf(to_f32(lo), -65504.0f), 65504.0f),
                      fminf(fmaxf(to_f32(hi), -65504.0f), 65504.0f));
  }
};

// A float from global memory through L2 only: values other blocks wrote in this launch
// (the emulator has no caches to bypass).
__device__ __forceinline__ float load_l2(const float *p) {
#ifdef VELLUM_EMU
  return *p;
#else
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
#endif
}

// The end of a split-K launch, in the block that finishes its tile last: out = the sum of
// the splits' partial tiles (z in order, as one block would have summed its chunks) plus
// bias. Each block counts itself in `counters` (one per tile, zero between launches: the
// last block resets its own) after its partials are visible device-wide; the block that
// counts last reads them all. This saves the launch of a separate sum kernel per matmul.
// Where a block works: its column tile (of its matrix), its split of k and the number of
// splits, and its tile's counter. Read from the grid by a plain launch, worked out from the
// parts by a grouped one.
struct GemmTile {
  uint32_t x, z, splits, counter;
};

template <int BM>
__device__ void sum_splits_if_last(const float *partials, float *out, const float *bias,
                                   uint32_t *counters, uint32_t rows, uint32_t n,
                                   uint32_t col0, uint32_t row0, GemmTile tile) {
  __shared__ uint32_t last;
  __threadfence();  // this thread's partials, before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&counters[tile.counter], 1u) == tile.splits - 1;
    if (last) counters[tile.counter] = 0;  // every split has counted: ready for the next launch
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (uint32_t e = threadIdx.x; e < BM * GEMM_BN; e += blockDim.x) {
    uint32_t row = row0 + e / GEMM_BN, col = col0 + e % GEMM_BN;
    if (row >= rows || col >= n) continue;
    size_t at = (size_t)row * n + col;
    float s = 0.0f;
    for (uint32_t z = 0; z < tile.splits; ++z) s += load_l2(partials + (size_t)z * rows * n + at);
    out[at] = s + (bias ? bias[col] : 0.0f);
  }
}

// The block's tile: 64 columns (tile.x), BM rows (grid.y), a range of k (tile.z of
// tile.splits). Unsplit, it writes out = x·wᵀ + bias. Split, it writes its partial tile to
// partials[z] (`out`), and the last split of each tile sums them into `sum_out`.
template <class X, int BM, class W>
__device__ void gemm(X x, W w, const float *bias, float *out, uint32_t rows, uint32_t k,
                     uint32_t n, uint32_t steps_per_chunk, float *sum_out,
                     uint32_t *counters, GemmTile tile) {
  constexpr int MT = BM / 16;
  __shared__ GemmStage<BM> stage;
  uint32_t col0 = tile.x * GEMM_BN, row0 = blockIdx.y * BM;
  uint32_t steps = (k + GEMM_BK - 1) / GEMM_BK;
  uint32_t first = tile.splits == 1 ? 0 : tile.z * steps_per_chunk;
  uint32_t last = tile.splits == 1 || first + steps_per_chunk > steps ? steps
                                                                       : first + steps_per_chunk;
  uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;

  float acc[MT][2][4], total[MT][2][4];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 2; ++j)
      for (int c = 0; c < 4; ++c) acc[i][j][c] = total[i][j][c] = 0.0f;

  XLoader<X, BM> xs;
  if (first < last) {
    xs.load(x, rows, k, row0, first * GEMM_BK);
    w.load(col0, first * GEMM_BK);
  }
  for (uint32_t s = first; s < last; ++s) {
    xs.store(stage);
    w.store(stage);
    __syncthreads();
    if (s + 1 < last) {
      xs.load(x, rows, k, row0, (s + 1) * GEMM_BK);
      w.load(col0, (s + 1) * GEMM_BK);
    }
#pragma unroll
    for (int kk = 0; kk < GEMM_BK; kk += 16) {
      uint32_t b[2][2];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const uint16_t *col = stage.b[warp * 16 + j * 8 + g] + kk + 2 * t;
        b[j][0] = *reinterpret_cast<const uint32_t *>(col);
        b[j][1] = *reinterpret_cast<const uint32_t *>(col + 8);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const uint16_t *r0 = stage.a[i * 16 + g] + kk + 2 * t, *r8 = r0 + 8 * GEMM_LD;
        uint32_t a[4] = {*reinterpret_cast<const uint32_t *>(r0),
                         *reinterpret_cast<const uint32_t *>(r8),
                         *reinterpret_cast<const uint32_t *>(r0 + 8),
                         *reinterpret_cast<const uint32_t *>(r8 + 8)};
#pragma unroll
        for (int j = 0; j < 2; ++j) mma_16816(acc[i][j], a, b[j]);
      }
    }
    __syncthreads();  // the stage is rewritten by the next step
    if ((s + 1 - first) % steps_per_chunk == 0 || s + 1 == last) {
      for (int i = 0; i < MT; ++i)
        for (int j = 0; j < 2; ++j)
          for (int c = 0; c < 4; ++c) {
            total[i][j][c] += acc[i][j][c];
            acc[i][j][c] = 0.0f;
          }
    }
  }

  bool split = tile.splits > 1;
  float *dst = out + (size_t)tile.z * rows * n;
  const float *tile_bias = split ? nullptr : bias;
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t row = row0 + i * 16 + g + 8 * (c / 2);
        uint32_t col = col0 + warp * 16 + j * 8 + 2 * t + c % 2;
        if (row < rows && col < n)
          dst[(size_t)row * n + col] = total[i][j][c] + (tile_bias ? tile_bias[col] : 0.0f);
      }
  if (split) sum_splits_if_last<BM>(out, sum_out, bias, counters, rows, n, col0, row0, tile);
}

// A plain launch: the tile from the grid.
__device__ __forceinline__ GemmTile grid_tile() {
  return GemmTile{blockIdx.x, blockIdx.z, gridDim.z, blockIdx.y * gridDim.x + blockIdx.x};
}

// A grouped launch: up to three matrices of the same input and format side by side along
// grid.x (Q, K and V; gate and up), each with its own column tiles, its own split of k (grid.z
// is the largest; blocks past a part's splits leave at once) and its own slice of the
// partials: the same tiles, chunks and sums as three plain launches, so the same bits.
struct GroupPart {
  uint32_t index, tile_x, splits;
  size_t partials;  // floats before this part's partials
};
__device__ GroupPart group_part(const uint32_t n[3], const uint32_t splits[3], uint32_t rows) {
  GroupPart p{0, blockIdx.x, splits[0], 0};
  for (uint32_t i = 0; i < 2; ++i) {
    uint32_t tiles = (n[i] + GEMM_BN - 1) / GEMM_BN;
    if (p.tile_x < tiles) break;
    p.tile_x -= tiles;
    p.partials += (size_t)splits[i] * rows * n[i];
    p.index = i + 1;
    p.splits = splits[i + 1];
  }
  return p;
}

// One part of a grouped launch: its output is written directly, or through its slice of
// the partials when it is split.
template <int BM, class W>
__device__ void gemm_part(const float *x, W w, GroupPart p, const float *bias, float *out,
                          float *partials, uint32_t *counters, uint32_t rows, uint32_t k,
                          uint32_t n, uint32_t per_chunk) {
  float *dst = p.splits > 1 ? partials + p.partials : out;
  GemmTile tile{p.tile_x, blockIdx.z, p.splits, blockIdx.x};
  gemm<Rows, BM>(Rows{x}, w, bias, dst, rows, k, n, per_chunk, out, counters, tile);
}

// The part a block of a grouped launch works on (p, and its index i), the arrays of the
// parts' common arguments, and the early exit of blocks past the part's splits.
#define GROUP_PART()                                                                         \
  const uint32_t n[3] = {n0, n1, n2}, splits[3] = {splits0, splits1, splits2};               \
  const uint32_t per_chunk[3] = {chunk0, chunk1, chunk2};                                    \
  const float *bias[3] = {bias0, bias1, bias2};                                              \
  float *out[3] = {out0, out1, out2};                                                        \
  GroupPart p = group_part(n, splits, rows);                                                 \
  if (blockIdx.z >= p.splits) return;                                                        \
  uint32_t i = p.index

// One part's arguments in a grouped launch (a missing third part has n = 0 and no tiles).
#define W4_PART_ARGS(i)                                                                      \
  const uint8_t *packed##i, const f16 *scales##i, const f16 *mins##i, const float *bias##i,  \
      float *out##i, uint32_t n##i, uint32_t chunk##i, uint32_t splits##i
#define W8_PART_ARGS(i)                                                                      \
  const int8_t *q##i, const float *scales##i, const float *bias##i, float *out##i,           \
      uint32_t n##i, uint32_t chunk##i, uint32_t splits##i

// A dense GEMM's kernel, `gemm_w{f16,bf16}...`: the quantized ones' parameters, without
// scales (`group` is unused).
#define QGEMM_DENSE(BM, NAME, ROWS_ARGS, ROWS, W)                                            \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_w##W##NAME##_m##BM##_f32( \
      ROWS_ARGS, const W *wd, const float *bias, float *out, uint32_t rows, uint32_t k,      \
      uint32_t n, uint32_t group, uint32_t steps_per_chunk, float *sum_out,                  \
      uint32_t *counters) {                                                                  \
    DenseLoader<W> w{wd, k, n, {}};                                                          \
    gemm<decltype(ROWS), BM>(ROWS, w, bias, out, rows, k, n, steps_per_chunk, sum_out,      \
                             counters, grid_tile());                                         \
  }                                                                                          \
  VELLUM_EXPORT(gemm_w##W##NAME##_m##BM##_f32)

// A grouped launch of dense rows (`gemm3_w{f16,bf16}_*`): as the quantized ones.
#define DENSE_PART_ARGS(i, W)                                                                \
  const W *w##i, const float *bias##i, float *out##i, uint32_t n##i, uint32_t chunk##i,      \
      uint32_t splits##i
#define QGEMM3_DENSE(BM, W)                                                                  \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm3_w##W##_m##BM##_f32(      \
      const float *x, uint32_t rows, uint32_t k, uint32_t group, float *partials,            \
      uint32_t *counters, DENSE_PART_ARGS(0, W), DENSE_PART_ARGS(1, W),                      \
      DENSE_PART_ARGS(2, W)) {                                                               \
    GROUP_PART();                                                                            \
    const W *rows_of[3] = {w0, w1, w2};                                                      \
    DenseLoader<W> w{rows_of[i], k, n[i], {}};                                               \
    gemm_part<BM>(x, w, p, bias[i], out[i], partials, counters, rows, k, n[i], per_chunk[i]); \
  }                                                                                          \
  VELLUM_EXPORT(gemm3_w##W##_m##BM##_f32)

// A comma inside one macro argument (a kernel's leading parameters).
#define QGEMM_COMMA ,
// A plain GEMM's kernels: `NAME` reads rows given by `ROWS_ARGS` as `ROWS`.
#define QGEMM_PLAIN(BM, NAME, ROWS_ARGS, ROWS)                                               \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_w4##NAME##_m##BM##_f32(   \
      ROWS_ARGS, const uint8_t *packed, const f16 *scales, const f16 *mins,                  \
      const float *bias, float *out, uint32_t rows, uint32_t k, uint32_t n, uint32_t group,  \
      uint32_t steps_per_chunk, float *sum_out, uint32_t *counters) {                        \
    W4Loader w{packed, scales, mins, k, n, group, {}, 0u, 0u};                               \
    gemm<decltype(ROWS), BM>(ROWS, w, bias, out, rows, k, n, steps_per_chunk, sum_out,      \
                             counters, grid_tile());                                         \
  }                                                                                          \
  VELLUM_EXPORT(gemm_w4##NAME##_m##BM##_f32)                                                 \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm_w8##NAME##_m##BM##_f32(   \
      ROWS_ARGS, const int8_t *q, const float *scales, const float *bias, float *out,        \
      uint32_t rows, uint32_t k, uint32_t n, uint32_t group, uint32_t steps_per_chunk,       \
      float *sum_out, uint32_t *counters) {                                                  \
    W8Loader w{q, scales, k, n, group, {}, {}};                                              \
    gemm<decltype(ROWS), BM>(ROWS, w, bias, out, rows, k, n, steps_per_chunk, sum_out,      \
                             counters, grid_tile());                                         \
  }                                                                                          \
  VELLUM_EXPORT(gemm_w8##NAME##_m##BM##_f32)

#define QGEMM(BM)                                                                            \
  QGEMM_PLAIN(BM, , const float *x, (Rows{x}))                                               \
  QGEMM_PLAIN(BM, _silu, const float *gate QGEMM_COMMA const float *up, (SiluRows{gate, up})) \
  QGEMM_DENSE(BM, , const float *x, (Rows{x}), f16)                                          \
  QGEMM_DENSE(BM, , const float *x, (Rows{x}), bf16)                                         \
  QGEMM_DENSE(BM, _silu, const float *gate QGEMM_COMMA const float *up, (SiluRows{gate, up}), \
              f16)                                                                           \
  QGEMM_DENSE(BM, _silu, const float *gate QGEMM_COMMA const float *up, (SiluRows{gate, up}), \
              bf16)                                                                          \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm3_w4_m##BM##_f32(          \
      const float *x, uint32_t rows, uint32_t k, uint32_t group, float *partials,            \
      uint32_t *counters, W4_PART_ARGS(0), W4_PART_ARGS(1), W4_PART_ARGS(2)) {               \
    GROUP_PART();                                                                            \
    const uint8_t *packed[3] = {packed0, packed1, packed2};                                  \
    const f16 *scales[3] = {scales0, scales1, scales2}, *mins[3] = {mins0, mins1, mins2};    \
    W4Loader w{packed[i], scales[i], mins[i], k, n[i], group, {}, 0u, 0u};                   \
    gemm_part<BM>(x, w, p, bias[i], out[i], partials, counters, rows, k, n[i], per_chunk[i]); \
  }                                                                                          \
  VELLUM_EXPORT(gemm3_w4_m##BM##_f32)                                                        \
  extern "C" __global__ void __launch_bounds__(GEMM_THREADS) gemm3_w8_m##BM##_f32(          \
      const float *x, uint32_t rows, uint32_t k, uint32_t group, float *partials,            \
      uint32_t *counters, W8_PART_ARGS(0), W8_PART_ARGS(1), W8_PART_ARGS(2)) {               \
    GROUP_PART();                                                                            \
    const int8_t *q[3] = {q0, q1, q2};                                                       \
    const float *scales[3] = {scales0, scales1, scales2};                                    \
    W8Loader w{q[i], scales[i], k, n[i], group, {}, {}};                                     \
    gemm_part<BM>(x, w, p, bias[i], out[i], partials, counters, rows, k, n[i], per_chunk[i]); \
  }                                                                                          \
  VELLUM_EXPORT(gemm3_w8_m##BM##_f32)                                                        \
  QGEMM3_DENSE(BM, f16)                                                                      \
  QGEMM3_DENSE(BM, bf16)
QGEMM(16)
QGEMM(64)
