// CPU Sinkhorn: problems split across threads; each runs stabilised-scaling iterations, one
// fused pass over its Gibbs kernel per iteration, with log-domain fallback on absorption.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define SBT_HAS_MXCSR 1
#endif

#include "sinkhorn_check.h"
#include "sinkhorn_math.h"

namespace sbt {
namespace sinkhorn {
namespace {

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SBT_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define SBT_CLONES
#endif

// Subnormal Gibbs entries are irrelevant to the plan but slow x86 down by ~100x.
struct FlushDenormals {
#ifdef SBT_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// One Sinkhorn iteration in the scaling domain, a single pass over K:
// s_i = (K (b v))_i, u_i' = 1 / s_i, t = K^T (a u'). Returns false if a scaling must be absorbed.
template <typename T>
__attribute__((always_inline)) inline bool scaling_pass_impl(const T* K, int N, int M,
                                                              const T* a, const T* bv,
                                                              const T* u, T* u_new, T* t,
                                                              T* err_out) {
  std::fill(t, t + M, T(0));
  T err = 0;
  bool ok = true;
  for (int i = 0; i < N; ++i) {
    if (!(a[i] > T(0))) {
      u_new[i] = T(0);
      continue;
    }
    const T* Ki = K + static_cast<int64_t>(i) * M;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < M; ++j) s += Ki[j] * bv[j];
    err += scaling_row_error(a[i], u[i], s);
    const T un = T(1) / s;
    ok = ok && scaling_ok(un);
    u_new[i] = un;
    const T w = a[i] * un;
#pragma omp simd
    for (int j = 0; j < M; ++j) t[j] += w * Ki[j];
  }
  *err_out = err;
  return ok;
}

SBT_CLONES bool scaling_pass(const float* K, int N, int M, const float* a, const float* bv,
                             const float* u, float* u_new, float* t, float* err) {
  return scaling_pass_impl(K, N, M, a, bv, u, u_new, t, err);
}

SBT_CLONES bool scaling_pass(const double* K, int N, int M, const double* a, const double* bv,
                             const double* u, double* u_new, double* t, double* err) {
  return scaling_pass_impl(K, N, M, a, bv, u, u_new, t, err);
}

template <typename T>
class Solver {
 public:
  Solver(const T* C, const T* a, const T* b, T* K, T* f, T* g, int N, int M, T eps)
      : C_(C), a_(a), b_(b), K_(K), f_(f), g_(g), N_(N), M_(M), eps_(eps), inv_eps_(T(1) / eps),
        log_a_(N), log_b_(M), u_(N), u_new_(N), v_(M), bv_(M), t_(M) {
    for (int i = 0; i < N; ++i) log_a_[i] = log_weight(a[i]);
    for (int j = 0; j < M; ++j) log_b_[j] = log_weight(b[j]);
    std::fill(f_, f_ + N, T(0));
    std::fill(g_, g_ + M, T(0));
  }

  // Runs up to max_iters iterations; stops before the first one whose starting plan has
  // row-marginal L1 error <= tol (tol < 0: never). Returns the iterations applied.
  int run(int max_iters, T tol) {
    bool kernel_valid = false;
    int it = 0;
    while (it < max_iters) {
      T err;
      if (!kernel_valid) {
        if (log_iteration(tol, &err)) break;
        build_kernel();
        kernel_valid = true;
        ++it;
        continue;
      }
      for (int j = 0; j < M_; ++j) bv_[j] = b_[j] * v_[j];
      const bool ok = scaling_pass(K_, N_, M_, a_, bv_.data(), u_.data(), u_new_.data(),
                                   t_.data(), &err);
      if (tol >= T(0) && err <= tol) break;
      bool v_ok = ok;
      for (int j = 0; j < M_ && v_ok; ++j) v_ok = !(b_[j] > T(0)) || scaling_ok(T(1) / t_[j]);
      if (!v_ok) {
        absorb_scalings();
        kernel_valid = false;
        continue;
      }
      std::swap(u_, u_new_);
      for (int j = 0; j < M_; ++j) v_[j] = b_[j] > T(0) ? T(1) / t_[j] : T(0);
      ++it;
    }
    if (!kernel_valid) build_kernel();
    return it;
  }

  // Writes the plan over K and the absorbed potentials; returns the row-marginal L1 error.
  T finish() {
    T err = 0;
    for (int i = 0; i < N_; ++i) {
      T* Ki = K_ + static_cast<int64_t>(i) * M_;
      const T wi = a_[i] * u_[i];
      T row = 0;
      for (int j = 0; j < M_; ++j) {
        Ki[j] *= wi * b_[j] * v_[j];
        row += Ki[j];
      }
      err += math_abs(row - a_[i]);
    }
    absorb_scalings();
    return err;
  }

 private:
  // f-update then g-update in the log domain; true if it stopped on tol before applying.
  bool log_iteration(T tol, T* err_out) {
    T err = 0;
    std::vector<T>& f_new = u_new_;  // scratch
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* Ci = C_ + static_cast<int64_t>(i) * M_;
      LogSumExp<T> lse;
      for (int j = 0; j < M_; ++j) lse.add(row_exponent(log_b_[j], g_[j], Ci[j], inv_eps_));
      f_new[i] = -eps_ * lse.value();
      err += log_row_error(a_[i], f_[i], f_new[i], inv_eps_);
    }
    *err_out = err;
    if (tol >= T(0) && err <= tol) return true;
    for (int i = 0; i < N_; ++i)
      if (a_[i] > T(0)) f_[i] = f_new[i];
    std::vector<T> col_max(M_, neg_inf<T>()), col_sum(M_, T(0));
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* Ci = C_ + static_cast<int64_t>(i) * M_;
      for (int j = 0; j < M_; ++j)
        col_max[j] = std::max(col_max[j], col_exponent(log_a_[i], f_[i], Ci[j], inv_eps_));
    }
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* Ci = C_ + static_cast<int64_t>(i) * M_;
      for (int j = 0; j < M_; ++j)
        col_sum[j] += math_exp(col_exponent(log_a_[i], f_[i], Ci[j], inv_eps_) - col_max[j]);
    }
    for (int j = 0; j < M_; ++j)
      if (b_[j] > T(0)) g_[j] = -eps_ * (col_max[j] + math_log(col_sum[j]));
    return false;
  }

  void build_kernel() {
    for (int i = 0; i < N_; ++i) {
      const T* Ci = C_ + static_cast<int64_t>(i) * M_;
      T* Ki = K_ + static_cast<int64_t>(i) * M_;
      const bool row = a_[i] > T(0);
      for (int j = 0; j < M_; ++j)
        Ki[j] = (row && b_[j] > T(0)) ? gibbs(f_[i], g_[j], Ci[j], inv_eps_) : T(0);
    }
    for (int i = 0; i < N_; ++i) u_[i] = a_[i] > T(0) ? T(1) : T(0);
    for (int j = 0; j < M_; ++j) v_[j] = b_[j] > T(0) ? T(1) : T(0);
  }

  void absorb_scalings() {
    for (int i = 0; i < N_; ++i) f_[i] = absorb(f_[i], u_[i], eps_);
    for (int j = 0; j < M_; ++j) g_[j] = absorb(g_[j], v_[j], eps_);
    std::fill(u_.begin(), u_.end(), T(1));
    std::fill(v_.begin(), v_.end(), T(1));
  }

  const T* C_;
  const T* a_;
  const T* b_;
  T* K_;
  T* f_;
  T* g_;
  int N_, M_;
  T eps_, inv_eps_;
  std::vector<T> log_a_, log_b_, u_, u_new_, v_, bv_, t_;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps,
    int64_t max_iters, double tol) {
  check_inputs(cost, a, b, eps, max_iters);
  const auto C = cost.contiguous();
  const auto ac = a.contiguous();
  const auto bc = b.contiguous();
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  auto plan = at::empty_like(C);
  auto f = at::empty({B, N}, C.options());
  auto g = at::empty({B, M}, C.options());
  auto iters = at::empty({B}, C.options().dtype(at::kInt));
  auto err = at::empty({B}, C.options());
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* Cp = C.data_ptr<scalar_t>();
    const scalar_t* ap = ac.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* Pp = plan.data_ptr<scalar_t>();
    scalar_t* fp = f.data_ptr<scalar_t>();
    scalar_t* gp = g.data_ptr<scalar_t>();
    int* ip = iters.data_ptr<int>();
    scalar_t* ep = err.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      for (int64_t p = begin; p < end; ++p) {
        Solver<scalar_t> solver(Cp + p * N * M, ap + p * N, bp + p * M, Pp + p * N * M,
                                fp + p * N, gp + p * M, static_cast<int>(N),
                                static_cast<int>(M), static_cast<scalar_t>(eps));
        ip[p] = solver.run(static_cast<int>(max_iters), static_cast<scalar_t>(tol));
        ep[p] = solver.finish();
      }
    });
  });
  return {plan, f, g, iters, err};
}

}  // namespace

TORCH_LIBRARY_IMPL(selfboottok, CPU, m) { m.impl("sinkhorn_kernel", &sinkhorn_cpu); }

}  // namespace sinkhorn
}  // namespace sbt
