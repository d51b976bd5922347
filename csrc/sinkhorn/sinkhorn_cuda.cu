// CUDA Sinkhorn: one thread block per problem runs the whole iteration loop. The update rules
// are those of sinkhorn_math.h (shared with the CPU kernel); this file adds the schedule:
// a warp per row for row reductions, row-group partials merged in shared memory for columns.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "sinkhorn_host.h"
#include "sinkhorn_math.h"

namespace sbt {
namespace sinkhorn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T>
__device__ __forceinline__ void warp_merge(Sum<T>& acc) {
  for (int o = 16; o > 0; o >>= 1) acc.s += __shfl_xor_sync(0xffffffffu, acc.s, o);
}

template <typename T>
__device__ __forceinline__ void warp_merge(LogSumExp<T>& acc) {
  for (int o = 16; o > 0; o >>= 1) {
    LogSumExp<T> other;
    other.m = __shfl_xor_sync(0xffffffffu, acc.m, o);
    other.s = __shfl_xor_sync(0xffffffffu, acc.s, o);
    acc.merge(other);
  }
}

// Reduces term(i, j) over j for every present row i, one warp per row; calls done(i, value) on
// lane 0. Ends with a barrier.
template <typename Acc, typename Term, typename Done>
__device__ void row_reduce(int N, int M, Term term, Done done,
                           const bool* row_present) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = warp; i < N; i += kWarps) {
    if (!row_present[i]) continue;
    Acc acc;
    for (int j = lane; j < M; j += 32) acc.add(term(i, j));
    warp_merge(acc);
    if (lane == 0) done(i, acc.value());
  }
  __syncthreads();
}

// Reduces term(i, j) over present rows i for every column j; calls done(j, value) once per
// column. Threads split rows into groups when M < kThreads. Ends with a barrier.
template <typename Acc, typename Term, typename Done>
__device__ void col_reduce(int N, int M, Acc* scratch, Term term, Done done,
                           const bool* row_present) {
  const int tid = threadIdx.x;
  if (M >= kThreads) {
    for (int j = tid; j < M; j += kThreads) {
      Acc acc;
      for (int i = 0; i < N; ++i)
        if (row_present[i]) acc.add(term(i, j));
      done(j, acc.value());
    }
  } else {
    const int groups = kThreads / M;
    if (tid < groups * M) {
      const int j = tid % M, grp = tid / M;
      Acc acc;
      for (int i = grp; i < N; i += groups)
        if (row_present[i]) acc.add(term(i, j));
      scratch[tid] = acc;
    }
    __syncthreads();
    if (tid < M) {
      Acc acc = scratch[tid];
      for (int gidx = 1; gidx < groups; ++gidx) acc.merge(scratch[gidx * M + tid]);
      done(tid, acc.value());
    }
  }
  __syncthreads();
}

// Sum over all threads of the block, broadcast to every thread.
template <typename T>
__device__ T block_sum(T value, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(0xffffffffu, value, o);
  if (lane == 0) red[warp] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

template <typename T>
struct Workspace {
  T* u;
  T* u_new;
  T* log_a;
  T* v;
  T* bv;
  T* log_b;
  bool* row_present;
  bool* col_present;
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    sinkhorn_block_kernel(const T* __restrict__ C_all, const T* __restrict__ a_all,
                          const T* __restrict__ b_all, T* K_all, T* f_all, T* g_all,
                          T* value_out, T* linear_out, int* iters_out, T* err_out, T* ws_all,
                          bool* mask_all, int N, int M, T eps, int max_iters, T tol) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  LogSumExp<T>* scratch = reinterpret_cast<LogSumExp<T>*>(smem_raw);
  __shared__ T red[kWarps];

  const int p = blockIdx.x, tid = threadIdx.x;
  const int64_t NM = static_cast<int64_t>(N) * M;
  const T* C = C_all + p * NM;
  const T* a = a_all + static_cast<int64_t>(p) * N;
  const T* b = b_all + static_cast<int64_t>(p) * M;
  T* K = K_all + p * NM;
  T* f = f_all + static_cast<int64_t>(p) * N;
  T* g = g_all + static_cast<int64_t>(p) * M;
  T* ws = ws_all + static_cast<int64_t>(p) * (3 * N + 3 * M);
  Workspace<T> w{ws, ws + N, ws + 2 * N, ws + 3 * N, ws + 3 * N + M, ws + 3 * N + 2 * M,
                 mask_all + static_cast<int64_t>(p) * (N + M),
                 mask_all + static_cast<int64_t>(p) * (N + M) + N};
  Sum<T>* sum_scratch = reinterpret_cast<Sum<T>*>(smem_raw);
  const T inv_eps = T(1) / eps;

  for (int i = tid; i < N; i += kThreads) {
    f[i] = 0;
    w.row_present[i] = a[i] > T(0);
    w.log_a[i] = log_weight(a[i]);
  }
  for (int j = tid; j < M; j += kThreads) {
    g[j] = 0;
    w.col_present[j] = b[j] > T(0);
    w.log_b[j] = log_weight(b[j]);
  }
  __syncthreads();

  auto build_kernel = [&]() {
    for (int64_t e = tid; e < NM; e += kThreads) {
      const int i = static_cast<int>(e / M), j = static_cast<int>(e % M);
      K[e] = (w.row_present[i] && w.col_present[j]) ? gibbs(f[i], g[j], C[e], inv_eps) : T(0);
    }
    for (int i = tid; i < N; i += kThreads) w.u[i] = w.row_present[i] ? T(1) : T(0);
    for (int j = tid; j < M; j += kThreads) w.v[j] = w.col_present[j] ? T(1) : T(0);
    __syncthreads();
  };
  auto absorb_scalings = [&]() {
    for (int i = tid; i < N; i += kThreads) f[i] = absorb(f[i], w.u[i], eps);
    for (int j = tid; j < M; j += kThreads) g[j] = absorb(g[j], w.v[j], eps);
    __syncthreads();
    for (int i = tid; i < N; i += kThreads) w.u[i] = T(1);
    for (int j = tid; j < M; j += kThreads) w.v[j] = T(1);
    __syncthreads();
  };

  int it = 0;
  bool kernel_valid = false;
  while (it < max_iters) {
    T err_part = 0;  // lane 0 of each warp accumulates its rows
    if (!kernel_valid) {
      // Log-domain f-update (into u_new as scratch), then g-update.
      row_reduce<LogSumExp<T>>(
          N, M,
          [&](int i, int j) {
            return w.col_present[j]
                       ? row_exponent(w.log_b[j], g[j], C[static_cast<int64_t>(i) * M + j], inv_eps)
                       : neg_inf<T>();
          },
          [&](int i, T lse) {
            const T fn = -eps * lse;
            w.u_new[i] = fn;
            err_part += log_row_error(a[i], f[i], fn, inv_eps);
          },
          w.row_present);
      const T err = block_sum(err_part, red);
      if (tol >= T(0) && err <= tol) break;
      for (int i = tid; i < N; i += kThreads)
        if (w.row_present[i]) f[i] = w.u_new[i];
      __syncthreads();
      col_reduce<LogSumExp<T>>(
          N, M, scratch,
          [&](int i, int j) {
            return col_exponent(w.log_a[i], f[i], C[static_cast<int64_t>(i) * M + j], inv_eps);
          },
          [&](int j, T lse) {
            if (w.col_present[j]) g[j] = -eps * lse;
          },
          w.row_present);
      build_kernel();
      kernel_valid = true;
      ++it;
      continue;
    }
    for (int j = tid; j < M; j += kThreads) w.bv[j] = b[j] * w.v[j];
    __syncthreads();
    bool ok = true;
    row_reduce<Sum<T>>(
        N, M,
        [&](int i, int j) { return K[static_cast<int64_t>(i) * M + j] * w.bv[j]; },
        [&](int i, T s) {
          err_part += scaling_row_error(a[i], w.u[i], s);
          const T un = T(1) / s;
          ok = ok && scaling_ok(un);
          w.u_new[i] = un;
        },
        w.row_present);
    const T err = block_sum(err_part, red);
    if (tol >= T(0) && err <= tol) break;
    ok = __syncthreads_and(ok);
    if (ok) {
      col_reduce<Sum<T>>(
          N, M, sum_scratch,
          [&](int i, int j) { return K[static_cast<int64_t>(i) * M + j] * a[i] * w.u_new[i]; },
          [&](int j, T t) {
            // bv is free until the next pass: it stages the new v.
            w.bv[j] = w.col_present[j] ? T(1) / t : T(0);
            ok = ok && (!w.col_present[j] || scaling_ok(w.bv[j]));
          },
          w.row_present);
      ok = __syncthreads_and(ok);
    }
    if (!ok) {
      absorb_scalings();
      kernel_valid = false;
      continue;
    }
    for (int i = tid; i < N; i += kThreads) w.u[i] = w.row_present[i] ? w.u_new[i] : T(0);
    for (int j = tid; j < M; j += kThreads) w.v[j] = w.bv[j];
    __syncthreads();
    ++it;
  }
  if (!kernel_valid) build_kernel();

  for (int64_t e = tid; e < NM; e += kThreads) {
    const int i = static_cast<int>(e / M), j = static_cast<int>(e % M);
    K[e] *= a[i] * w.u[i] * b[j] * w.v[j];
  }
  __syncthreads();
  absorb_scalings();
  T err_part = 0, dual_part = 0, mass_part = 0, lin_part = 0, mass_a = 0, mass_b = 0;
  row_reduce<Sum<T>>(
      N, M, [&](int i, int j) { return K[static_cast<int64_t>(i) * M + j]; },
      [&](int i, T row) {
        err_part += math_abs(row - a[i]);
        dual_part += f[i] * row;
        mass_part += row;
      },
      w.row_present);
  row_reduce<Sum<T>>(
      N, M,
      [&](int i, int j) {
        const int64_t e = static_cast<int64_t>(i) * M + j;
        return K[e] * C[e];
      },
      [&](int, T lin) { lin_part += lin; }, w.row_present);
  col_reduce<Sum<T>>(
      N, M, sum_scratch, [&](int i, int j) { return K[static_cast<int64_t>(i) * M + j]; },
      [&](int j, T col) { dual_part += g[j] * col; }, w.row_present);
  for (int i = tid; i < N; i += kThreads) mass_a += a[i];
  for (int j = tid; j < M; j += kThreads) mass_b += b[j];
  const T err = block_sum(err_part, red);
  const T dual = block_sum(dual_part, red);
  const T mass = block_sum(mass_part, red);
  const T linear = block_sum(lin_part, red);
  const T ma = block_sum(mass_a, red);
  const T mb = block_sum(mass_b, red);
  if (tid == 0) {
    iters_out[p] = it;
    err_out[p] = err;
    linear_out[p] = linear;
    value_out[p] = dual - eps * (mass - ma * mb);
  }
}

template <typename T>
void launch(const at::Tensor& C, const at::Tensor& a, const at::Tensor& b, const OutputTensors& out,
            const at::Tensor& ws, const at::Tensor& mask, double eps, int64_t max_iters, double tol) {
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  const size_t smem = kThreads * sizeof(LogSumExp<T>);
  sinkhorn_block_kernel<T><<<static_cast<unsigned>(B), kThreads, smem,
                             at::cuda::getCurrentCUDAStream()>>>(
      C.data_ptr<T>(), a.data_ptr<T>(), b.data_ptr<T>(), out.plan.data_ptr<T>(),
      out.f.data_ptr<T>(), out.g.data_ptr<T>(), out.value.data_ptr<T>(),
      out.value_linear.data_ptr<T>(), out.iters.data_ptr<int>(), out.err.data_ptr<T>(),
      ws.data_ptr<T>(), mask.data_ptr<bool>(), static_cast<int>(N), static_cast<int>(M),
      static_cast<T>(eps), static_cast<int>(max_iters), static_cast<T>(tol));
}

Outputs sinkhorn_cuda(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps,
    int64_t max_iters, double tol) {
  check_sinkhorn_args(cost, a, b, eps, max_iters);
  const c10::cuda::CUDAGuard guard(cost.device());
  const auto C = cost.contiguous();
  const auto ac = a.contiguous();
  const auto bc = b.contiguous();
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  OutputTensors out(C);
  auto ws = at::empty({B, 3 * N + 3 * M}, C.options());
  auto mask = at::empty({B, N + M}, C.options().dtype(at::kBool));
  if (B == 0) return out.as_tuple();
  // float32 or float64 (checked above); no AT_DISPATCH, which would format its error here
  if (C.scalar_type() == at::kFloat)
    launch<float>(C, ac, bc, out, ws, mask, eps, max_iters, tol);
  else
    launch<double>(C, ac, bc, out, ws, mask, eps, max_iters, tol);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(selfboottok, CUDA, m) { m.impl("sinkhorn_kernel", &sinkhorn_cuda); }

}  // namespace sinkhorn
}  // namespace sbt
