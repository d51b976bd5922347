// Host side shared by the CPU and CUDA entry points of selfboottok::sinkhorn_kernel: argument
// checks and the output tensors.
#pragma once

#include <torch/types.h>

namespace sbt {
namespace sinkhorn {

inline void check_inputs(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b,
                         double eps, int64_t max_iters) {
  TORCH_CHECK_VALUE(cost.dim() == 3, "sinkhorn: cost must be [B, N, M], got ", cost.sizes());
  TORCH_CHECK_VALUE(cost.scalar_type() == at::kFloat || cost.scalar_type() == at::kDouble,
                    "sinkhorn: cost must be float32 or float64, got ", cost.scalar_type());
  const int64_t B = cost.size(0), N = cost.size(1), M = cost.size(2);
  TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == B && a.size(1) == N,
                    "sinkhorn: a must be [B, N] = [", B, ", ", N, "], got ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2 && b.size(0) == B && b.size(1) == M,
                    "sinkhorn: b must be [B, M] = [", B, ", ", M, "], got ", b.sizes());
  TORCH_CHECK_VALUE(a.scalar_type() == cost.scalar_type() && b.scalar_type() == cost.scalar_type(),
                    "sinkhorn: a and b must have the dtype of cost (", cost.scalar_type(), ")");
  TORCH_CHECK_VALUE(a.device() == cost.device() && b.device() == cost.device(),
                    "sinkhorn: a and b must be on the device of cost (", cost.device(), ")");
  TORCH_CHECK_VALUE(eps > 0, "sinkhorn: eps must be > 0, got ", eps);
  TORCH_CHECK_VALUE(max_iters >= 0, "sinkhorn: max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK_VALUE(N > 0 && M > 0, "sinkhorn: N and M must be > 0");
  TORCH_CHECK_VALUE(N * M <= (int64_t(1) << 31), "sinkhorn: N * M must fit in int32");
}

using Outputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// plan, f, g, value, value_linear, n_iters (int32), err, allocated for a contiguous cost.
struct OutputTensors {
  at::Tensor plan, f, g, value, value_linear, iters, err;
  explicit OutputTensors(const at::Tensor& C) {
    const int64_t B = C.size(0), N = C.size(1), M = C.size(2);
    plan = at::empty_like(C);
    f = at::empty({B, N}, C.options());
    g = at::empty({B, M}, C.options());
    value = at::empty({B}, C.options());
    value_linear = at::empty({B}, C.options());
    iters = at::empty({B}, C.options().dtype(at::kInt));
    err = at::empty({B}, C.options());
  }
  Outputs as_tuple() const { return {plan, f, g, value, value_linear, iters, err}; }
};

}  // namespace sinkhorn
}  // namespace sbt
