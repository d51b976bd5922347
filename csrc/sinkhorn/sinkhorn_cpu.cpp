// CPU Sinkhorn: problems split across threads; each runs stabilised-scaling iterations, one
// fused pass over its Gibbs kernel per iteration, with log-domain fallback on absorption. The
// solver (sinkhorn_cpu_solver.inc) is compiled once per instruction set (generic x86-64, AVX2,
// AVX-512) and the op picks one at run time, so the extension runs on any x86-64 CPU.
#include "sinkhorn_cpu.h"

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#define SBT_HAS_MXCSR 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SBT_X86_ISAS 1  // GCC's target pragmas build the AVX2 and AVX-512 solvers
#endif

#include "sinkhorn_host.h"
#include "sinkhorn_math.h"

#define SBT_INLINE inline __attribute__((always_inline))

namespace sbt {
namespace sinkhorn {
namespace {

struct ProblemArgs {
  int N, M, max_iters;
};

namespace generic {
#define SBT_SIMD_WIDTH 1
#include "sinkhorn_cpu_solver.inc"
#undef SBT_SIMD_WIDTH
}  // namespace generic

#ifdef SBT_X86_ISAS
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define SBT_SIMD_WIDTH 8
#include "sinkhorn_cpu_solver.inc"
#undef SBT_SIMD_WIDTH
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,prefer-vector-width=512")
#pragma GCC diagnostic push
// GCC 12 flags the deliberately undefined pass-through operand of AVX-512 intrinsics (PR 105593)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {
#define SBT_SIMD_WIDTH 16
#include "sinkhorn_cpu_solver.inc"
#undef SBT_SIMD_WIDTH
}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

enum class Isa { kGeneric, kAvx2, kAvx512 };
constexpr const char* kIsaNames[] = {"generic", "avx2", "avx512"};
constexpr const char* kIsaEnv = "SELFBOOTTOK_CPU_ISA";

bool runs_here(Isa isa) {
  switch (isa) {
    case Isa::kGeneric:
      return true;
#ifdef SBT_X86_ISAS
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512:
      return runs_here(Isa::kAvx2) && __builtin_cpu_supports("avx512f");
#endif
    default:
      return false;
  }
}

Isa active_isa() {
  const char* env = std::getenv(kIsaEnv);
  const std::string name = env ? env : "";
  if (name.empty() || name == "auto") {
    for (Isa isa : {Isa::kAvx512, Isa::kAvx2})
      if (runs_here(isa)) return isa;
    return Isa::kGeneric;
  }
  for (int i = 0; i < 3; ++i) {
    if (name != kIsaNames[i]) continue;
    TORCH_CHECK(runs_here(static_cast<Isa>(i)), kIsaEnv, "=", name,
                " but this CPU (or this build of selfboottok._C) has no ", name, " code path");
    return static_cast<Isa>(i);
  }
  TORCH_CHECK_VALUE(false, kIsaEnv, " must be generic, avx2, avx512 or auto, got '", name, "'");
  return Isa::kGeneric;
}

template <typename T>
using SolveFn = bool (*)(const T*, const T*, const T*, T*, T*, T*, int*, T*, T*, T*,
                         const ProblemArgs&, T, T);

template <typename T>
SolveFn<T> solver_for(Isa isa) {
#ifdef SBT_X86_ISAS
  if (isa == Isa::kAvx512) return &avx512::solve<T>;
  if (isa == Isa::kAvx2) return &avx2::solve<T>;
#endif
  return &generic::solve<T>;
}

// Subnormal Gibbs entries are irrelevant to the plan but slow x86 down by ~100x.
struct FlushDenormals {
#ifdef SBT_HAS_MXCSR
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

Outputs sinkhorn_cpu(
    const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b, double eps,
    int64_t max_iters, double tol) {
  check_sinkhorn_args(cost, a, b, eps, max_iters);
  const Isa isa = active_isa();
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
    const auto solve = solver_for<scalar_t>(isa);
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

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < 3; ++i)
    if (runs_here(static_cast<Isa>(i))) out.emplace_back(kIsaNames[i]);
  return out;
}

std::string cpu_isa() { return kIsaNames[static_cast<int>(active_isa())]; }

TORCH_LIBRARY_IMPL(selfboottok, CPU, m) { m.impl("sinkhorn_kernel", &sinkhorn_cpu); }

}  // namespace sinkhorn
}  // namespace sbt
