// CPU emulation of the CUDA subset Vellum's kernels use (DESIGN.md, "Testing kernels
// without a GPU"). The same .cu sources compile with g++ -std=c++20 -DVELLUM_EMU against
// this header and run through the same host code as on a GPU (kernels/src/cuda/emu.rs).
//
// Execution model: the blocks of a launch run one after another on the calling OS thread;
// the threads of a block run as fibers on that thread (a hand-written register switch on
// x86-64, ucontext elsewhere). A fiber runs until it
// reaches a barrier (__syncthreads, or the warp-level exchange behind shuffles, ballots and
// __syncwarp), then the next fiber runs. A barrier opens once every live participant has
// arrived: all live threads of the block for __syncthreads, all live lanes of the warp for
// warp operations. Threads that have returned no longer count (the rule for a partial last
// warp). A barrier that can never open (divergent __syncthreads) aborts with a message.
//
// Supported subset (kernels must stay inside it):
//   threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncwarp,
//   __shfl_sync/__shfl_xor_sync/__shfl_down_sync/__shfl_up_sync (any trivially copyable
//   type up to 16 bytes), emu::warp_gather (behind the emulated mma.sync),
//   __ballot_sync/__any_sync/__all_sync, static __shared__ (as
//   `static`, correct because blocks run one at a time), dynamic shared memory through
//   VELLUM_DYN_SHARED, atomicAdd/atomicMax on int and atomicAdd on float (plain ops: one
//   OS thread), __threadfence (a no-op: blocks run in turn), __ldg, __dp4a, __launch_bounds__, math: expf/logf/sqrtf/rsqrtf/fmaxf/
//   fminf/fabsf/__expf (vsincos in vellum.cuh). Half and bfloat16 are Vellum's own storage types defined in
//   vellum.cuh (round to nearest even, identical on both compilers).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <vector>

// CUDA's built-in 16-byte vector type (16-byte loads of packed weights).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace emu {

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
  ucontext_t ctx;  // used where there is no hand-written switch (not x86-64)
  void *sp = nullptr;  // saved stack pointer (x86-64 switch)
  dim3 tid;
  unsigned linear = 0;
  State state = RUNNABLE;
};

struct Launch {
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<char> stacks;
  std::vector<unsigned char> dyn_shared;
  // Warp exchange: one kSlot-byte slot per thread.
  std::vector<unsigned char> exchange;
  ucontext_t scheduler;
  void *scheduler_sp = nullptr;
  Fiber *current = nullptr;
  std::function<void()> body;
};

constexpr size_t kStackBytes = 128 * 1024;
// Bytes of one thread's warp-exchange slot: a shuffled value, or the registers an emulated
// warp-wide instruction (mma.sync) gathers.
constexpr size_t kSlot = 32;

inline Launch &L() {
  static Launch l;
  return l;
}

#if defined(__x86_64__)
// A user-space context switch without the signal-mask system call swapcontext makes:
// saves the callee-saved registers and the SSE/x87 control words on the current stack,
// stores the stack pointer to *save, and resumes the context whose stack pointer is `load`.
extern "C" void vellum_emu_switch(void **save, void *load);
asm(R"(
    .text
    .hidden vellum_emu_switch
    .globl vellum_emu_switch
    .type vellum_emu_switch, @function
vellum_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size vellum_emu_switch, .-vellum_emu_switch
)");
constexpr bool kFastSwitch = true;
#else
constexpr bool kFastSwitch = false;
inline void vellum_emu_switch(void **, void *) {}
#endif

inline void fiber_main() {
  Launch &l = L();
  l.body();
  l.current->state = DONE;
  if (kFastSwitch) {
    void *unused;
    vellum_emu_switch(&unused, l.scheduler_sp);  // never resumed
  }
  // ucontext: uc_link returns to the scheduler.
}

inline void wait(State at) {
  Launch &l = L();
  Fiber *f = l.current;
  f->state = at;
  if (kFastSwitch) {
    vellum_emu_switch(&f->sp, l.scheduler_sp);
  } else {
    swapcontext(&f->ctx, &l.scheduler);
  }
}

// Prepares fiber i to start in fiber_main on its own stack.
inline void start_fiber(Launch &l, Fiber &f, unsigned i) {
  char *base = l.stacks.data() + (size_t)i * kStackBytes;
  if (kFastSwitch) {
    // The frame vellum_emu_switch pops: control words, r15..rbp, then the return address
    // (fiber_main), above it a null return address for fiber_main itself, so that its
    // stack is aligned as after a call.
    uintptr_t top = ((uintptr_t)(base + kStackBytes)) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)top;
    *--sp = 0;
    *--sp = (uint64_t)(uintptr_t)&fiber_main;
    for (int r = 0; r < 6; ++r) *--sp = 0;
    uint32_t csr[2];
    asm volatile("stmxcsr %0" : "=m"(csr[0]));
    asm volatile("fnstcw %0" : "=m"(csr[1]));
    *--sp = (uint64_t)csr[0] | ((uint64_t)(csr[1] & 0xffff) << 32);
    f.sp = sp;
  } else {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = base;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &l.scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
}

inline void resume(Launch &l, Fiber &f) {
  l.current = &f;
  if (kFastSwitch) {
    vellum_emu_switch(&l.scheduler_sp, f.sp);
  } else {
    swapcontext(&l.scheduler, &f.ctx);
  }
}

// Runs one block's threads to completion.
inline void run_block() {
  Launch &l = L();
  unsigned n = l.block.x * l.block.y * l.block.z;
  for (unsigned i = 0; i < n; ++i) {
    Fiber &f = l.fibers[i];
    f.linear = i;
    f.tid = {i % l.block.x, (i / l.block.x) % l.block.y, i / (l.block.x * l.block.y)};
    f.state = RUNNABLE;
    start_fiber(l, f, i);
  }
  unsigned warps = (n + 31) / 32;
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      if (l.fibers[i].state == RUNNABLE) resume(l, l.fibers[i]);
    }
    bool any_live = false, released = false;
    for (unsigned w = 0; w < warps; ++w) {
      unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
      bool all_at_warp = true, live = false;
      for (unsigned i = lo; i < hi; ++i) {
        State s = l.fibers[i].state;
        if (s == DONE) continue;
        live = true;
        if (s != AT_WARP_BARRIER) all_at_warp = false;
      }
      any_live |= live;
      if (live && all_at_warp) {
        for (unsigned i = lo; i < hi; ++i)
          if (l.fibers[i].state == AT_WARP_BARRIER) l.fibers[i].state = RUNNABLE;
        released = true;
      }
    }
    if (!any_live) return;
    if (released) continue;
    bool all_at_block = true;
    for (unsigned i = 0; i < n; ++i) {
      State s = l.fibers[i].state;
      if (s != DONE && s != AT_BLOCK_BARRIER) all_at_block = false;
    }
    if (!all_at_block) {
      std::fprintf(stderr,
                   "vellum emu: deadlock in block (%u,%u,%u): threads wait at different "
                   "barriers (divergent __syncthreads or a shuffle across diverged lanes)\n",
                   l.block_idx.x, l.block_idx.y, l.block_idx.z);
      std::abort();
    }
    for (unsigned i = 0; i < n; ++i)
      if (l.fibers[i].state == AT_BLOCK_BARRIER) l.fibers[i].state = RUNNABLE;
  }
}

template <class... A, size_t... I>
std::tuple<A...> unpack(void **args, std::index_sequence<I...>) {
  return std::tuple<A...>(*static_cast<A *>(args[I])...);
}

// The launch entry every exported kernel gets: same argument array as cuLaunchKernel.
template <class... A>
int launch(void (*kernel)(A...), dim3 grid, dim3 block, unsigned shared_bytes, void **args) {
  unsigned n = block.x * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return 1;
  Launch &l = L();
  l.grid = grid;
  l.block = block;
  if (l.fibers.size() < n) l.fibers.resize(n);
  if (l.stacks.size() < n * kStackBytes) l.stacks.resize(n * kStackBytes);
  l.dyn_shared.assign(shared_bytes + 16, 0);
  l.exchange.assign(n * kSlot, 0);
  auto params = unpack<A...>(args, std::index_sequence_for<A...>{});
  l.body = [&] { std::apply(kernel, params); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        l.block_idx = {x, y, z};
        run_block();
      }
  return 0;
}

inline unsigned lane() { return L().current->linear % 32; }

template <class T> T exchange(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable_v<T>);
  Launch &l = L();
  unsigned me = l.current->linear, base = me - me % 32;
  std::memcpy(&l.exchange[me * kSlot], &v, sizeof(T));
  wait(AT_WARP_BARRIER);
  T r;
  std::memcpy(&r, &l.exchange[(base + src_lane) * kSlot], sizeof(T));
  wait(AT_WARP_BARRIER);  // nobody overwrites a slot before every lane has read it
  return r;
}

// Bit i set when live lane i voted true (returned lanes do not vote).
inline unsigned ballot(bool pred) {
  Launch &l = L();
  unsigned me = l.current->linear, base = me - me % 32;
  unsigned n = l.block.x * l.block.y * l.block.z;
  l.exchange[me * kSlot] = pred;
  wait(AT_WARP_BARRIER);
  unsigned bits = 0;
  for (unsigned i = 0; i < 32 && base + i < n; ++i)
    if (l.fibers[base + i].state != DONE && l.exchange[(base + i) * kSlot]) bits |= 1u << i;
  wait(AT_WARP_BARRIER);
  return bits;
}

// Every lane's `mine`, by lane: how an emulated warp-wide instruction (mma.sync) sees the
// registers of the whole warp. Lanes that have returned (or lie past the block) read as zero.
template <class T> void warp_gather(const T &mine, T (&all)[32]) {
  static_assert(sizeof(T) <= kSlot && std::is_trivially_copyable_v<T>);
  Launch &l = L();
  unsigned me = l.current->linear, base = me - me % 32;
  unsigned n = l.block.x * l.block.y * l.block.z;
  std::memcpy(&l.exchange[me * kSlot], &mine, sizeof(T));
  wait(AT_WARP_BARRIER);
  for (unsigned i = 0; i < 32; ++i) {
    std::memset(&all[i], 0, sizeof(T));
    if (base + i < n && l.fibers[base + i].state != DONE)
      std::memcpy(&all[i], &l.exchange[(base + i) * kSlot], sizeof(T));
  }
  wait(AT_WARP_BARRIER);
}

}  // namespace emu

#define threadIdx (emu::L().current->tid)
#define blockIdx (emu::L().block_idx)
#define blockDim (emu::L().block)
#define gridDim (emu::L().grid)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define VELLUM_DYN_SHARED(type, name) type *name = reinterpret_cast<type *>(emu::L().dyn_shared.data())

// Exported launch entry, called by the emulator runtime as vellum_emu_<kernel>.
#define VELLUM_EXPORT(kernel)                                                                  \
  extern "C" __attribute__((visibility("default"))) int vellum_emu_##kernel(dim3 grid, dim3 block, unsigned shared, void **args) {   \
    return emu::launch(kernel, grid, block, shared, args);                                     \
  }

inline void __syncthreads() { emu::wait(emu::AT_BLOCK_BARRIER); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::AT_WARP_BARRIER); }

template <class T> T __shfl_sync(unsigned, T v, int src, int width = 32) {
  unsigned l = emu::lane();
  return emu::exchange(v, (l / width) * width + (unsigned)src % width);
}
template <class T> T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  unsigned l = emu::lane(), s = l ^ (unsigned)mask;
  if (s / width != l / width) s = l;
  return emu::exchange(v, s);
}
template <class T> T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  unsigned l = emu::lane(), s = l + d;
  if (s / width != l / width) s = l;
  return emu::exchange(v, s);
}
template <class T> T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  unsigned l = emu::lane();
  unsigned s = (l % width) >= d ? l - d : l;
  return emu::exchange(v, s);
}
inline unsigned __ballot_sync(unsigned, int pred) { return emu::ballot(pred != 0); }
inline int __any_sync(unsigned, int p) { return emu::ballot(p != 0) != 0; }
inline int __all_sync(unsigned, int p) { return emu::ballot(p == 0) == 0; }

template <class T> inline T __ldg(const T *p) { return *p; }
// Blocks run one after another on one OS thread: every write is already visible.
inline void __threadfence() {}
inline int atomicAdd(int *p, int v) { int o = *p; *p += v; return o; }
inline unsigned atomicAdd(unsigned *p, unsigned v) { unsigned o = *p; *p += v; return o; }
inline float atomicAdd(float *p, float v) { float o = *p; *p += v; return o; }
inline int atomicMax(int *p, int v) { int o = *p; if (v > o) *p = v; return o; }
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
