// Math shared by the CPU and CUDA Sinkhorn kernels.
//
// Convention: plan_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). One iteration updates f (rows
// exact), then g (columns exact). The fast path keeps a Gibbs kernel K_ij = exp((f_i + g_j -
// C_ij) / eps) for fixed absorbed potentials and iterates scalings u, v with
// plan_ij = a_i b_j K_ij u_i v_j; scalings leaving [1/tau, tau] are absorbed back into f, g
// and that iteration is redone in the log domain.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SBT_HD __host__ __device__ __forceinline__
#else
#define SBT_HD inline __attribute__((always_inline))
#endif

namespace sbt {
namespace sinkhorn {

template <typename T>
struct Absorb;
template <>
struct Absorb<float> {
  static constexpr float tau = 1e6f;
};
template <>
struct Absorb<double> {
  static constexpr double tau = 1e50;
};

SBT_HD float math_exp(float x) { return expf(x); }
SBT_HD double math_exp(double x) { return exp(x); }
SBT_HD float math_log(float x) { return logf(x); }
SBT_HD double math_log(double x) { return log(x); }
SBT_HD float math_abs(float x) { return fabsf(x); }
SBT_HD double math_abs(double x) { return fabs(x); }

template <typename T>
SBT_HD T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// False for 0, inf, NaN and anything outside [1/tau, tau].
template <typename T>
SBT_HD bool scaling_ok(T x) {
  return x >= T(1) / Absorb<T>::tau && x <= Absorb<T>::tau;
}

// Streaming log-sum-exp.
template <typename T>
struct LogSumExp {
  T m;
  T s;
  SBT_HD LogSumExp() : m(neg_inf<T>()), s(T(0)) {}
  SBT_HD void add(T x) {
    if (x == neg_inf<T>()) return;
    if (x > m) {
      s = s * math_exp(m - x) + T(1);
      m = x;
    } else {
      s += math_exp(x - m);
    }
  }
  SBT_HD void merge(const LogSumExp& o) {
    if (o.m == neg_inf<T>()) return;
    if (o.m > m) {
      s = s * math_exp(m - o.m) + o.s;
      m = o.m;
    } else {
      s += o.s * math_exp(o.m - m);
    }
  }
  SBT_HD T value() const { return m + math_log(s); }
};

template <typename T>
struct Sum {
  T s;
  SBT_HD Sum() : s(T(0)) {}
  SBT_HD void add(T x) { s += x; }
  SBT_HD void merge(const Sum& o) { s += o.s; }
  SBT_HD T value() const { return s; }
};

template <typename T>
SBT_HD T log_weight(T w) {
  return w > T(0) ? math_log(w) : neg_inf<T>();
}

// Exponent of one row term of the f-update: log b_j + (g_j - C_ij) / eps.
template <typename T>
SBT_HD T row_exponent(T log_b, T g, T c, T inv_eps) {
  return log_b + (g - c) * inv_eps;
}

// Exponent of one column term of the g-update: log a_i + (f_i - C_ij) / eps.
template <typename T>
SBT_HD T col_exponent(T log_a, T f, T c, T inv_eps) {
  return log_a + (f - c) * inv_eps;
}

// Row-marginal error term of the current plan, given the f the next update would set:
// row_i / a_i = exp((f_i - f_new_i) / eps).
template <typename T>
SBT_HD T log_row_error(T a, T f, T f_new, T inv_eps) {
  return a * math_abs(math_exp((f - f_new) * inv_eps) - T(1));
}

// Same term in the scaling domain: row_i / a_i = u_i * (K (b v))_i.
template <typename T>
SBT_HD T scaling_row_error(T a, T u, T s) {
  return a * math_abs(u * s - T(1));
}

template <typename T>
SBT_HD T gibbs(T f, T g, T c, T inv_eps) {
  return math_exp((f + g - c) * inv_eps);
}

// Potential after absorbing a scaling: f + eps log u (absent entries stay 0).
template <typename T>
SBT_HD T absorb(T f, T u, T eps) {
  return u > T(0) ? f + eps * math_log(u) : T(0);
}

}  // namespace sinkhorn
}  // namespace sbt
