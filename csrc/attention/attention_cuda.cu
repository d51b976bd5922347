// CUDA entry points of selfboottok::attention_fwd_kernel / attention_bwd_kernel: outputs, dispatch
// and launches. The kernels are in attention_kernels.cuh; the argument checks in arg_checks.cpp.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <climits>
#include <tuple>
#include <vector>

#include "arg_checks.h"
#include "attention_kernels.cuh"

namespace sbt {
namespace attention {
namespace {

struct CudaLaunch {
  cudaStream_t stream;
  int64_t smem_limit;

  template <typename T>
  void operator()(void (*kernel)(Params<T>), int64_t blocks, size_t smem,
                  const Params<T>& p) const {
    if (blocks == 0) return;
    check_launch("attention", blocks, static_cast<int64_t>(smem), smem_limit);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLaunch current_launcher() {
  return {at::cuda::getCurrentCUDAStream(),
          static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin)};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, at::TensorList k, at::TensorList v,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  check_attention_fwd_args(c10::DeviceType::CUDA, q, k, v, key_padding_mask, scale);
  const std::vector<at::Tensor> ks(k.begin(), k.end()), vs(v.begin(), v.end());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dmax) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(q, ks, vs, key_padding_mask, causal, scale);
    set_forward_outputs(p, out, lse);
    run_fwd<T, decltype(dmax)::value>(p, B * H, current_launcher());
  });
  return {out, lse};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> attention_bwd_cuda(
    const at::Tensor& q, at::TensorList k, at::TensorList v,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta) {
  check_attention_bwd_args(c10::DeviceType::CUDA, q, k, v, key_padding_mask, scale, out, lse,
                           dout, delta);
  const std::vector<at::Tensor> ks(k.begin(), k.end()), vs(v.begin(), v.end());
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1);
  const auto contiguous = q.options().memory_format(at::MemoryFormat::Contiguous);
  auto dq = at::empty(q.sizes(), contiguous);
  std::vector<at::Tensor> dks, dvs;
  for (const auto& c : ks) {
    dks.push_back(at::empty(c.sizes(), contiguous));
    dvs.push_back(at::empty(c.sizes(), contiguous));
  }
  if (dq.numel() == 0) {
    for (auto& t : dks) t.zero_();
    for (auto& t : dvs) t.zero_();
    return {dq, dks, dvs};
  }
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dmax) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(q, ks, vs, key_padding_mask, causal, scale);
    set_backward_args(p, lse, dout, delta, dq, dks, dvs);
    run_bwd<T, decltype(dmax)::value>(p, B * H, current_launcher());
  });
  return {dq, dks, dvs};
}

}  // namespace

TORCH_LIBRARY_IMPL(selfboottok, CUDA, m) {
  m.impl("attention_fwd_kernel", &attention_fwd_cuda);
  m.impl("attention_bwd_kernel", &attention_bwd_cuda);
}

}  // namespace attention
}  // namespace sbt
