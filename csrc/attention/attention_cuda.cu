// CUDA entry points of selfboottok::attention_fwd_kernel / attention_bwd_kernel: argument checks,
// outputs, dispatch and launches. The kernels are in attention_kernels.cuh.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <climits>
#include <tuple>
#include <vector>

#include "attention_kernels.cuh"

namespace sbt {
namespace attention {
namespace {

// [B, H, L, D] with q's B, H, D (and L unless L < 0), dtype and device, unit stride along D.
void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* op, const std::string& name,
                  int64_t L) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                        t.size(3) == q.size(3) && (L < 0 || t.size(2) == L),
                    op, ": ", name, " must be [B, H, L, D] = [", q.size(0), ", ", q.size(1), ", ",
                    L < 0 ? std::string("L") : std::to_string(L), ", ", q.size(3), "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ",
                    t.scalar_type(), " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.stride(3) == 1, op, ": ", name, " must have stride 1 along D, got strides ",
                    t.strides());
}

void check_float_rows(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                        t.size(2) == q.size(2),
                    op, ": ", name, " must be [B, H, Lq] matching q, got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_inputs(const char* op, const at::Tensor& q, const std::vector<at::Tensor>& ks,
                  const std::vector<at::Tensor>& vs, const c10::optional<at::Tensor>& mask,
                  double scale) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, H, Lq, D], got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float16 or bfloat16, got ", dt);
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(D >= 8 && D <= 128 && D % 8 == 0, op,
                    ": head dim D must be a multiple of 8 in [8, 128], got ", D);
  TORCH_CHECK_VALUE(q.stride(3) == 1, op, ": q must have stride 1 along D, got strides ",
                    q.strides());
  TORCH_CHECK_VALUE(!ks.empty() && ks.size() <= static_cast<size_t>(kMaxChunks), op,
                    ": k must be a list of 1 to ", kMaxChunks, " chunks, got ", ks.size());
  TORCH_CHECK_VALUE(vs.size() == ks.size(), op, ": k has ", ks.size(), " chunks but v has ",
                    vs.size());
  int64_t Lk = 0;
  for (size_t c = 0; c < ks.size(); ++c) {
    const std::string i = "[" + std::to_string(c) + "]";
    check_like_q(ks[c], q, op, "k" + i, -1);
    check_like_q(vs[c], q, op, "v" + i, ks[c].size(2));
    Lk += ks[c].size(2);
  }
  TORCH_CHECK_VALUE(Lk >= 1, op, ": k must hold at least one key");
  TORCH_CHECK_VALUE(Lk < INT_MAX && q.size(2) < INT_MAX, op, ": sequence lengths must fit in int32");
  if (mask.has_value()) {
    const auto& m = *mask;
    TORCH_CHECK_VALUE(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                      m.scalar_type());
    TORCH_CHECK_VALUE(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == Lk, op,
                      ": key_padding_mask must be [B, Lk] = [", q.size(0), ", ", Lk, "], got ",
                      m.sizes());
    TORCH_CHECK_VALUE(m.device() == q.device(), op, ": key_padding_mask is on ", m.device(),
                      " but q is on ", q.device());
    TORCH_CHECK_VALUE(m.is_contiguous(), op, ": key_padding_mask must be contiguous");
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

struct CudaLaunch {
  cudaStream_t stream;
  int64_t smem_limit;

  template <typename T>
  void operator()(void (*kernel)(Params<T>), int64_t blocks, size_t smem,
                  const Params<T>& p) const {
    if (blocks == 0) return;
    TORCH_CHECK(blocks <= INT_MAX, "attention: too many thread blocks (", blocks, ")");
    TORCH_CHECK(static_cast<int64_t>(smem) <= smem_limit, "attention: the kernel needs ", smem,
                " bytes of shared memory per block, the device allows ", smem_limit);
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
  const char* op = "attention_fwd_kernel";
  const std::vector<at::Tensor> ks(k.begin(), k.end()), vs(v.begin(), v.end());
  check_inputs(op, q, ks, vs, key_padding_mask, scale);
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
  const char* op = "attention_bwd_kernel";
  const std::vector<at::Tensor> ks(k.begin(), k.end()), vs(v.begin(), v.end());
  check_inputs(op, q, ks, vs, key_padding_mask, scale);
  check_like_q(out, q, op, "out", q.size(2));
  check_like_q(dout, q, op, "dout", q.size(2));
  check_float_rows(lse, q, op, "lse");
  check_float_rows(delta, q, op, "delta");
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
