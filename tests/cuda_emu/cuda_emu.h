// Host emulation of the CUDA subset used by csrc/attention/attention_kernels.cuh, so that the
// same device source can run on the CPU in the tests.
//
// Each thread block runs on one OS thread; its CUDA threads are ucontext fibers switched at
// barriers (__syncthreads, __syncwarp, shuffles), visiting the fibers in a fresh random order
// each round so a missing barrier tends to show up as a wrong result. Barriers check that all
// participants wait at the same source line and report deadlocks. Shared memory starts filled
// with NaN bytes. WMMA: a matrix_a / matrix_b fragment holds the whole 16x16 tile in every lane;
// an accumulator lane owns 8 elements (element e of the tile belongs to lane e % 32), so loads,
// stores and mma_sync of accumulators only touch the calling lane's elements, as on hardware.
// Pointer alignment and ldm requirements of load/store_matrix_sync are checked.
//
// Not emulated: real fragment layouts, warp-divergent execution, memory ordering between
// blocks, shared-memory size limits, bank conflicts, timing.
#pragma once

#define SBT_CUDA_EMULATION 1

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __restrict__ __restrict

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return __half(x); }  // round to nearest even
inline float __bfloat162float(__nv_bfloat16 x) { return static_cast<float>(x); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) { return __nv_bfloat16(x); }

namespace sbt_emu {

struct Barrier {
  int count = 0;
  unsigned gen = 0;
  const char* file = nullptr;
  int line = 0;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  dim3 tid;
  int linear = 0;
  bool done = false;
  bool progressed = false;
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  dim3 block_idx, block_dim, grid_dim;
  int nthreads = 0;
  std::vector<unsigned char> smem_buf;
  unsigned char* smem = nullptr;
  Barrier block_bar;
  std::vector<Barrier> warp_bar;
  std::vector<uint64_t> exchange;  // one slot per thread, for shuffles
  std::vector<Fiber> fibers;
  Fiber* cur = nullptr;
  ucontext_t sched;
  const std::function<void()>* body = nullptr;
  std::string error;
  uint64_t rng = 0x9e3779b97f4a7c15ull;
};

inline thread_local Block* t_block = nullptr;
inline thread_local dim3 t_thread_idx, t_block_idx, t_block_dim, t_grid_dim;

inline Block& block() { return *t_block; }
inline int linear_tid() { return block().cur->linear; }
inline int lane_id() { return linear_tid() & 31; }

inline void yield() {
  Block& b = block();
  Fiber* f = b.cur;
  swapcontext(&f->ctx, &b.sched);
}

// Records the first error and abandons the fiber; the launch then throws it.
[[noreturn]] inline void fail(const std::string& msg) {
  Block& b = block();
  if (b.error.empty()) b.error = msg;
  for (;;) yield();
}

inline void arrive(Barrier& bar, int n, const char* what, const char* file, int line) {
  block().cur->progressed = true;
  if (bar.count == 0) {
    bar.file = file;
    bar.line = line;
  } else if (bar.line != line || std::strcmp(bar.file, file) != 0) {
    fail(std::string(what) + " reached at " + file + ":" + std::to_string(line) +
         " while other threads wait at " + bar.file + ":" + std::to_string(bar.line));
  }
  const unsigned gen = bar.gen;
  if (++bar.count == n) {
    bar.count = 0;
    ++bar.gen;
    return;
  }
  do yield();
  while (bar.gen == gen && block().error.empty());
  if (!block().error.empty()) for (;;) yield();
}

inline void syncthreads(const char* file, int line) {
  arrive(block().block_bar, block().nthreads, "__syncthreads", file, line);
}

inline void syncwarp(unsigned mask, const char* file, int line) {
  if (mask != 0xffffffffu) fail("__syncwarp: only full-warp masks are emulated");
  arrive(block().warp_bar[linear_tid() >> 5], 32, "__syncwarp", file, line);
}

template <typename V>
V shfl_xor(unsigned mask, V v, int lane_mask, const char* file, int line) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a wide type");
  if (mask != 0xffffffffu) fail("__shfl_xor_sync: only full-warp masks are emulated");
  Block& b = block();
  const int t = linear_tid();
  std::memcpy(&b.exchange[t], &v, sizeof(V));
  syncwarp(mask, file, line);
  V out;
  std::memcpy(&out, &b.exchange[(t & ~31) | ((t & 31) ^ lane_mask)], sizeof(V));
  syncwarp(mask, file, line);
  return out;
}

inline unsigned char* dynamic_smem() { return block().smem; }

inline void fiber_entry() {
  Block& b = block();
  (*b.body)();
  b.cur->done = true;
  b.cur->progressed = true;
}

inline uint64_t next_random(Block& b) {
  b.rng ^= b.rng << 13;
  b.rng ^= b.rng >> 7;
  b.rng ^= b.rng << 17;
  return b.rng;
}

// Runs every CUDA thread of the current block (t_block set up) to completion.
inline void run_block(Block& b) {
  const int n = b.nthreads;
  if (b.fibers.size() != static_cast<size_t>(n)) {
    b.fibers = std::vector<Fiber>(n);
    for (auto& f : b.fibers) f.stack.reset(new char[kStackBytes]);
  }
  for (int t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    f.linear = t;
    f.tid = dim3(t % b.block_dim.x, (t / b.block_dim.x) % b.block_dim.y,
                 t / (b.block_dim.x * b.block_dim.y));
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  b.block_bar = Barrier();
  b.warp_bar.assign((n + 31) / 32, Barrier());
  b.exchange.assign(n, 0);
  std::memset(b.smem, 0xff, b.smem_buf.size() - 128);
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = t;
  for (;;) {
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(b) % (i + 1)]);
    int alive = 0;
    bool progress = false;
    for (int t : order) {
      Fiber& f = b.fibers[t];
      if (f.done) continue;
      ++alive;
      b.cur = &f;
      t_thread_idx = f.tid;
      f.progressed = false;
      swapcontext(&b.sched, &f.ctx);
      progress = progress || f.progressed;
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) break;
    if (alive == 0) return;
    if (!progress) {
      b.error = "deadlock: every live thread waits at a barrier that cannot complete";
      break;
    }
  }
  throw std::runtime_error("cuda_emu: block (" + std::to_string(b.block_idx.x) + ", " +
                           std::to_string(b.block_idx.y) + "): " + b.error);
}

inline int& worker_count() {
  static int n = 2;
  return n;
}

// kernel<<<grid, block, smem>>>(...) with body() as the kernel call; blocks run in parallel
// on worker_count() OS threads.
inline void launch(dim3 grid, dim3 block_dim, size_t smem_bytes, const std::function<void()>& body) {
  const long total = static_cast<long>(grid.x) * grid.y * grid.z;
  const int nthreads = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  if (nthreads % 32 != 0) throw std::runtime_error("cuda_emu: block size must be a multiple of 32");
  std::atomic<long> next(0);
  std::exception_ptr error;
  std::mutex error_mutex;
  auto worker = [&]() {
    Block b;
    b.nthreads = nthreads;
    b.block_dim = block_dim;
    b.grid_dim = grid;
    b.body = &body;
    b.smem_buf.assign(smem_bytes + 128, 0);
    b.smem = b.smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(b.smem_buf.data()) % 128);
    b.rng ^= reinterpret_cast<uintptr_t>(&b);
    t_block = &b;
    t_block_dim = block_dim;
    t_grid_dim = grid;
    try {
      for (long i; (i = next.fetch_add(1)) < total;) {
        b.block_idx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (static_cast<long>(grid.x) * grid.y));
        t_block_idx = b.block_idx;
        run_block(b);
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error) break;
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
      next.store(total);
    }
    t_block = nullptr;
  };
  const int nw = static_cast<int>(std::min<long>(worker_count(), total));
  std::vector<std::thread> pool;
  for (int w = 1; w < nw; ++w) pool.emplace_back(worker);
  if (nw > 0) worker();
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace sbt_emu

#define threadIdx (::sbt_emu::t_thread_idx)
#define blockIdx (::sbt_emu::t_block_idx)
#define blockDim (::sbt_emu::t_block_dim)
#define gridDim (::sbt_emu::t_grid_dim)
#define __syncthreads() ::sbt_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::sbt_emu::syncwarp(0xffffffffu, __FILE__, __LINE__)
#define __shfl_xor_sync(mask, v, lane_mask) ::sbt_emu::shfl_xor((mask), (v), (lane_mask), __FILE__, __LINE__)

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment;

// Whole 16x16 operand tile (a: [m][k], b: [k][n]) in every lane.
template <typename Use, typename T, typename Layout>
class operand_fragment {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "cuda_emu: WMMA operands must be half or bfloat16");

 public:
  float v[16][16];
};

template <typename T, typename Layout>
class fragment<matrix_a, 16, 16, 16, T, Layout> : public operand_fragment<matrix_a, T, Layout> {};
template <typename T, typename Layout>
class fragment<matrix_b, 16, 16, 16, T, Layout> : public operand_fragment<matrix_b, T, Layout> {};

// Lane l owns tile elements l, l + 32, ..., l + 224 (row-major element index).
template <>
class fragment<accumulator, 16, 16, 16, float, void> {
 public:
  static constexpr int num_elements = 8;
  float x[num_elements];
};

inline void check_ptr(const void* p, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    sbt_emu::fail(std::string(what) + ": pointer not 256-bit aligned");
  if ((ldm * elem) % 16 != 0) sbt_emu::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

// Operand tiles: v[i][j] is element (i, j) of the tile ([m][k] for a, [k][n] for b), stored
// row by row, or column by column for col_major.
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(T),
            std::is_same<Use, matrix_a>::value ? "load_matrix_sync(matrix_a)" : "load_matrix_sync(matrix_b)");
  constexpr bool col = std::is_same<Layout, col_major>::value;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) f.v[i][j] = static_cast<float>(col ? p[j * ldm + i] : p[i * ldm + j]);
}

inline size_t acc_offset(int i, unsigned ldm, layout_t layout) {
  const int e = sbt_emu::lane_id() + 32 * i, m = e / 16, n = e % 16;
  return layout == mem_row_major ? m * ldm + n : n * ldm + m;
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, sizeof(float), "load_matrix_sync(accumulator)");
  for (int i = 0; i < 8; ++i) f.x[i] = p[acc_offset(i, ldm, layout)];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_ptr(p, ldm, sizeof(float), "store_matrix_sync");
  for (int i = 0; i < 8; ++i) p[acc_offset(i, ldm, layout)] = f.x[i];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (int i = 0; i < 8; ++i) f.x[i] = value;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  const int lane = sbt_emu::lane_id();
  for (int i = 0; i < 8; ++i) {
    const int e = lane + 32 * i, m = e / 16, n = e % 16;
    float s = c.x[i];
    for (int k = 0; k < 16; ++k) s = std::fma(a.v[m][k], b.v[k][n], s);
    d.x[i] = s;
  }
}

}  // namespace wmma
}  // namespace nvcuda
