// CPU Sinkhorn: problems split across threads; each runs stabilised-scaling iterations, one
// fused pass over its Gibbs kernel per iteration, with log-domain fallback on absorption.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#define SBT_HAS_MXCSR 1
#endif

#include "sinkhorn_host.h"
#include "sinkhorn_math.h"

namespace sbt {
namespace sinkhorn {
namespace {

#define SBT_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && defined(__x86_64__)
#define SBT_AVX2 __attribute__((target("avx2,fma")))
#endif

// Subnormal Gibbs entries are irrelevant to the plan but slow x86 down by ~100x.
struct FlushDenormals {
#ifdef SBT_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

// exp for the Gibbs kernel, vectorisable: 2^k * p(r) with |r| <= ln2/2, ~2 ulp in float.
// Inputs are clamped: below -87 gives ~1e-38 and callers mask absent entries with a 0 factor.
SBT_INLINE float gibbs_exp(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float k = (x * 1.44269504f + kRound) - kRound;
  const float r = (x - k * 0.693145751953125f) - k * 1.42860677e-6f;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = 1.0f + r + r * r * p;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(float));
  return p * two_k;
}
SBT_INLINE double gibbs_exp(double x) { return std::exp(std::min(x, 700.0)); }

// One Sinkhorn iteration in the scaling domain, a single pass over K:
// s_i = (K (b v))_i, u_i' = 1 / s_i, t = K^T (a u'). Rows go four at a time so that the
// dot products run as independent chains. Returns false if a scaling must be absorbed.
template <typename T>
SBT_INLINE bool scaling_pass(const T* K, int N, int M, const T* a, const T* bv, const T* u,
                             T* u_new, T* t, T* err_out, bool clear_t = true) {
  constexpr int R = 4;
  if (clear_t) std::fill(t, t + M, T(0));
  T err = 0;
  bool ok = true;
  // Inlined: an out-of-line call from AVX code would pay the SSE/AVX transition per row.
  auto finish_row = [&](int i, T s) __attribute__((always_inline)) -> T {
    if (!(a[i] > T(0))) {
      u_new[i] = T(0);
      return T(0);
    }
    err += scaling_row_error(a[i], u[i], s);
    const T un = T(1) / s;
    ok = ok && scaling_ok(un);
    u_new[i] = un;
    return a[i] * un;
  };
  int i = 0;
  for (; i + R <= N; i += R) {
    const T* K0 = K + static_cast<int64_t>(i) * M;
    const T* K1 = K0 + M;
    const T* K2 = K1 + M;
    const T* K3 = K2 + M;
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int j = 0; j < M; ++j) {
      s0 += K0[j] * bv[j];
      s1 += K1[j] * bv[j];
      s2 += K2[j] * bv[j];
      s3 += K3[j] * bv[j];
    }
    const T w0 = finish_row(i, s0), w1 = finish_row(i + 1, s1);
    const T w2 = finish_row(i + 2, s2), w3 = finish_row(i + 3, s3);
#pragma omp simd
    for (int j = 0; j < M; ++j) t[j] += w0 * K0[j] + w1 * K1[j] + w2 * K2[j] + w3 * K3[j];
  }
  for (; i < N; ++i) {
    const T* Ki = K + static_cast<int64_t>(i) * M;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int j = 0; j < M; ++j) s += Ki[j] * bv[j];
    const T w = finish_row(i, s);
#pragma omp simd
    for (int j = 0; j < M; ++j) t[j] += w * Ki[j];
  }
  *err_out = err;
  return ok;
}

#ifdef SBT_AVX2
// horizontal sums of eight vectors: lane r of the result is the sum of v[r].
SBT_AVX2 SBT_INLINE __m256 transpose_sum8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                       _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// scaling_pass for float with AVX2, eight rows at a time (M a multiple of 8): the row
// bookkeeping (division, error, range check) runs on one vector per eight rows.
SBT_AVX2 bool scaling_pass_avx2(const float* K, int N, int M, const float* a,
                                const float* bv, const float* u, float* u_new,
                                float* t, float* err_out) {
  constexpr int R = 8;
  const int N8 = N - N % R;
  std::fill(t, t + M, 0.0f);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 lo = _mm256_set1_ps(1.0f / Absorb<float>::tau);
  const __m256 hi = _mm256_set1_ps(Absorb<float>::tau);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 err = zero;
  int bad = 0;
  for (int i = 0; i < N8; i += R) {
    const float* Kr = K + static_cast<int64_t>(i) * M;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = zero;
    for (int j = 0; j < M; j += 8) {
      const __m256 x = _mm256_loadu_ps(bv + j);
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(Kr + static_cast<int64_t>(r) * M + j), x, acc[r]);
    }
    const __m256 s = transpose_sum8(acc);
    const __m256 av = _mm256_loadu_ps(a + i);
    const __m256 present = _mm256_cmp_ps(av, zero, _CMP_GT_OQ);
    const __m256 e = _mm256_mul_ps(av, _mm256_and_ps(abs_mask, _mm256_fmsub_ps(_mm256_loadu_ps(u + i), s, one)));
    err = _mm256_add_ps(err, _mm256_and_ps(present, e));
    const __m256 un = _mm256_div_ps(one, s);
    const __m256 in_range = _mm256_and_ps(_mm256_cmp_ps(un, lo, _CMP_GE_OQ), _mm256_cmp_ps(un, hi, _CMP_LE_OQ));
    bad |= _mm256_movemask_ps(_mm256_andnot_ps(in_range, present));
    const __m256 un_present = _mm256_and_ps(present, un);
    _mm256_storeu_ps(u_new + i, un_present);
    alignas(32) float w[R];
    _mm256_store_ps(w, _mm256_mul_ps(av, un_present));
    __m256 wr[R];
    for (int r = 0; r < R; ++r) wr[r] = _mm256_set1_ps(w[r]);
    for (int j = 0; j < M; j += 8) {
      __m256 tj = _mm256_loadu_ps(t + j);
      for (int r = 0; r < R; ++r)
        tj = _mm256_fmadd_ps(wr[r], _mm256_loadu_ps(Kr + static_cast<int64_t>(r) * M + j), tj);
      _mm256_storeu_ps(t + j, tj);
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, err);
  float total = 0.0f;
  for (float x : lanes) total += x;
  float tail_err = 0.0f;
  const bool tail_ok = scaling_pass(K + static_cast<int64_t>(N8) * M, N - N8, M, a + N8, bv,
                                    u + N8, u_new + N8, t, &tail_err, /*clear_t=*/false);
  *err_out = total + tail_err;
  return bad == 0 && tail_ok;
}
#endif

template <typename T, bool kAvx2>
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
  // With start_scaled, starts in the scaling domain from K = exp(-C/eps) (worth it when the
  // cost range is a modest multiple of eps); a pass that under- or overflows falls back to a
  // log-domain iteration like any other absorption.
  SBT_INLINE int run(int max_iters, T tol, bool start_scaled) {
    bool kernel_valid = start_scaled;
    if (start_scaled) build_kernel();
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
      const bool ok = pass(&err);
      if (tol >= T(0) && err <= tol) break;
      bool v_ok = ok;
      for (int j = 0; j < M_; ++j) {  // t_ becomes the candidate v
        t_[j] = b_[j] > T(0) ? T(1) / t_[j] : T(0);
        v_ok = v_ok && (!(b_[j] > T(0)) || scaling_ok(t_[j]));
      }
      if (!v_ok) {
        absorb_scalings();
        kernel_valid = false;
        continue;
      }
      std::swap(u_, u_new_);
      std::swap(v_, t_);
      ++it;
    }
    if (!kernel_valid) build_kernel();
    return it;
  }

  SBT_INLINE bool pass(T* err) {
#ifdef SBT_AVX2
    if constexpr (kAvx2 && std::is_same_v<T, float>) {
      if (M_ % 8 == 0)
        return scaling_pass_avx2(K_, N_, M_, a_, bv_.data(), u_.data(), u_new_.data(), t_.data(),
                                 err);
    }
#endif
    return scaling_pass(K_, N_, M_, a_, bv_.data(), u_.data(), u_new_.data(), t_.data(), err);
  }

  // Writes the plan over K and the absorbed potentials. Returns the row-marginal L1 error and
  // sets the entropic value <P,C> + eps KL(P || a b) and the linear value <P,C>.
  SBT_INLINE T finish(T* value, T* value_linear) {
    absorb_scalings_into_potentials();
    std::vector<T>& col = t_;
    std::fill(col.begin(), col.end(), T(0));
    T err = 0, linear = 0, dual = 0, mass = 0, mass_a = 0, mass_b = 0;
    for (int i = 0; i < N_; ++i) {
      T* Ki = K_ + static_cast<int64_t>(i) * M_;
      const T* Ci = C_ + static_cast<int64_t>(i) * M_;
      const T wi = a_[i] * u_[i];
      T row = 0, lin = 0;
#pragma omp simd reduction(+ : row, lin)
      for (int j = 0; j < M_; ++j) {
        Ki[j] *= wi * bv_[j];
        row += Ki[j];
        lin += Ki[j] * Ci[j];
        col[j] += Ki[j];
      }
      err += math_abs(row - a_[i]);
      linear += lin;
      dual += f_[i] * row;
      mass += row;
      mass_a += a_[i];
    }
    for (int j = 0; j < M_; ++j) {
      dual += g_[j] * col[j];
      mass_b += b_[j];
    }
    *value_linear = linear;
    *value = dual - eps_ * (mass - mass_a * mass_b);
    return err;
  }

 private:
  // f-update then g-update in the log domain; true if it stopped on tol before applying.
  // Two passes (max, then sum of exp) keep the loops branch-free and vectorisable.
  SBT_INLINE bool log_iteration(T tol, T* err_out) {
    const int M = M_;
    const T inv_eps = inv_eps_;
    T* __restrict f_new = u_new_.data();  // scratch
    T* __restrict x = t_.data();
    T* __restrict col_max = bv_.data();
    const T* __restrict log_a = log_a_.data();
    const T* __restrict log_b = log_b_.data();
    T* __restrict f = f_;
    T* __restrict g = g_;
    T err = 0;
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* __restrict Ci = C_ + static_cast<int64_t>(i) * M;
      T m = neg_inf<T>();
#pragma omp simd reduction(max : m)
      for (int j = 0; j < M; ++j) {
        x[j] = row_exponent(log_b[j], g[j], Ci[j], inv_eps);
        m = std::max(m, x[j]);
      }
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < M; ++j) sum += gibbs_exp(x[j] - m);
      f_new[i] = -eps_ * (m + math_log(sum));
      err += log_row_error(a_[i], f[i], f_new[i], inv_eps);
    }
    *err_out = err;
    if (tol >= T(0) && err <= tol) return true;
    for (int i = 0; i < N_; ++i)
      if (a_[i] > T(0)) f[i] = f_new[i];
    T* __restrict col_sum = x;
    std::fill(col_max, col_max + M, neg_inf<T>());
    std::fill(col_sum, col_sum + M, T(0));
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* __restrict Ci = C_ + static_cast<int64_t>(i) * M;
      const T fi = f[i], la = log_a[i];
#pragma omp simd
      for (int j = 0; j < M; ++j) col_max[j] = std::max(col_max[j], col_exponent(la, fi, Ci[j], inv_eps));
    }
    for (int i = 0; i < N_; ++i) {
      if (!(a_[i] > T(0))) continue;
      const T* __restrict Ci = C_ + static_cast<int64_t>(i) * M;
      const T fi = f[i], la = log_a[i];
#pragma omp simd
      for (int j = 0; j < M; ++j)
        col_sum[j] += gibbs_exp(col_exponent(la, fi, Ci[j], inv_eps) - col_max[j]);
    }
    for (int j = 0; j < M; ++j)
      if (b_[j] > T(0)) g[j] = -eps_ * (col_max[j] + math_log(col_sum[j]));
    return false;
  }

  // K_ij = exp((f_i + g_j - C_ij) / eps) on the support, 0 elsewhere; scalings reset to 1.
  SBT_INLINE void build_kernel() {
    const int M = M_;
    const T inv_eps = inv_eps_;
    T* __restrict col_on = t_.data();  // scratch: 1 on present columns, else 0
    const T* __restrict g = g_;
    for (int j = 0; j < M; ++j) col_on[j] = b_[j] > T(0) ? T(1) : T(0);
    for (int i = 0; i < N_; ++i) {
      T* __restrict Ki = K_ + static_cast<int64_t>(i) * M;
      if (!(a_[i] > T(0))) {
        std::fill(Ki, Ki + M, T(0));
        continue;
      }
      const T* __restrict Ci = C_ + static_cast<int64_t>(i) * M;
      const T fi = f_[i];
#pragma omp simd
      for (int j = 0; j < M; ++j) Ki[j] = gibbs_exp((fi + g[j] - Ci[j]) * inv_eps) * col_on[j];
    }
    for (int i = 0; i < N_; ++i) u_[i] = a_[i] > T(0) ? T(1) : T(0);
    for (int j = 0; j < M; ++j) v_[j] = b_[j] > T(0) ? T(1) : T(0);
  }

  // Final potentials; keeps u and b v for the plan.
  SBT_INLINE void absorb_scalings_into_potentials() {
    for (int i = 0; i < N_; ++i) f_[i] = absorb(f_[i], u_[i], eps_);
    for (int j = 0; j < M_; ++j) {
      g_[j] = absorb(g_[j], v_[j], eps_);
      bv_[j] = b_[j] * v_[j];
    }
  }

  SBT_INLINE void absorb_scalings() {
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

struct ProblemArgs {
  int N, M, max_iters;
};

// Returns false (and solves nothing) if the cost has a NaN or Inf.
template <typename T, bool kAvx2>
SBT_INLINE bool solve_one(const T* C, const T* a, const T* b, T* plan, T* f, T* g, int* iters,
                          T* err, T* value, T* value_linear, ProblemArgs args, T eps, T tol) {
  const int64_t NM = static_cast<int64_t>(args.N) * args.M;
  T probe = 0;  // 0 * x is NaN exactly when x is NaN or Inf
  T lo = C[0], hi = C[0];
#pragma omp simd reduction(+ : probe) reduction(min : lo) reduction(max : hi)
  for (int64_t e = 0; e < NM; ++e) {
    probe += C[e] * T(0);
    lo = std::min(lo, C[e]);
    hi = std::max(hi, C[e]);
  }
  if (probe != T(0)) return false;
  constexpr T kScaledStartRange = 50;  // in units of eps; exp(-50) is far from underflow
  Solver<T, kAvx2> solver(C, a, b, plan, f, g, args.N, args.M, eps);
  *iters = solver.run(args.max_iters, tol, (hi - lo) <= kScaledStartRange * eps);
  *err = solver.finish(value, value_linear);
  return true;
}

template <typename T>
bool solve_generic(const T* C, const T* a, const T* b, T* plan, T* f, T* g, int* iters, T* err,
                   T* value, T* value_linear, ProblemArgs args, T eps, T tol) {
  return solve_one<T, false>(C, a, b, plan, f, g, iters, err, value, value_linear, args, eps, tol);
}

#ifdef SBT_AVX2
template <typename T>
SBT_AVX2 bool solve_avx2(const T* C, const T* a, const T* b, T* plan, T* f, T* g, int* iters,
                         T* err, T* value, T* value_linear, ProblemArgs args, T eps, T tol) {
  return solve_one<T, true>(C, a, b, plan, f, g, iters, err, value, value_linear, args, eps, tol);
}
#endif

template <typename T>
auto pick_solver() {
#ifdef SBT_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &solve_avx2<T>;
#endif
  return &solve_generic<T>;
}

Outputs sinkhorn_cpu(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps,
    int64_t max_iters, double tol) {
  check_inputs(cost, a, b, eps, max_iters);
  const auto C = cost.contiguous();
  const auto ac = a.contiguous();
  const auto bc = b.contiguous();
  const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
  OutputTensors out(C);
  std::atomic<int64_t> bad_problem{-1};
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "sinkhorn_cpu", [&] {
    const scalar_t* Cp = C.data_ptr<scalar_t>();
    const scalar_t* ap = ac.data_ptr<scalar_t>();
    const scalar_t* bp = bc.data_ptr<scalar_t>();
    scalar_t* Pp = out.plan.data_ptr<scalar_t>();
    scalar_t* fp = out.f.data_ptr<scalar_t>();
    scalar_t* gp = out.g.data_ptr<scalar_t>();
    int* ip = out.iters.data_ptr<int>();
    scalar_t* ep = out.err.data_ptr<scalar_t>();
    scalar_t* vp = out.value.data_ptr<scalar_t>();
    scalar_t* lp = out.value_linear.data_ptr<scalar_t>();
    const auto solve = pick_solver<scalar_t>();
    const ProblemArgs args{static_cast<int>(N), static_cast<int>(M), static_cast<int>(max_iters)};
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      FlushDenormals ftz;
      for (int64_t p = begin; p < end; ++p)
        if (!solve(Cp + p * N * M, ap + p * N, bp + p * M, Pp + p * N * M, fp + p * N, gp + p * M,
              ip + p, ep + p, vp + p, lp + p, args, static_cast<scalar_t>(eps),
              static_cast<scalar_t>(tol)))
          bad_problem.store(p);
    });
  });
  TORCH_CHECK_VALUE(bad_problem.load() < 0, "sinkhorn: cost contains NaN or Inf (problem ",
                    bad_problem.load(), ")");
  return out.as_tuple();
}

}  // namespace

TORCH_LIBRARY_IMPL(selfboottok, CPU, m) { m.impl("sinkhorn_kernel", &sinkhorn_cpu); }

}  // namespace sinkhorn
}  // namespace sbt
