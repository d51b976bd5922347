// Host side shared by the CPU and CUDA entry points of selfboottok::sinkhorn_kernel: the output
// tensors. The argument checks are sbt::check_sinkhorn_args (arg_checks.cpp).
#pragma once

#include <torch/types.h>

#include "arg_checks.h"

namespace sbt {
namespace sinkhorn {

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
