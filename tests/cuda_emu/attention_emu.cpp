// Runs csrc/attention/attention_kernels.cuh on CPU tensors through the CUDA emulator, with the
// contract of selfboottok::attention_{fwd,bwd}_kernel, argument checks (csrc/arg_checks.cpp)
// included. Outputs start as NaN so that an element the kernels never write shows up in the tests.
#include <torch/extension.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emu.h"
// (the emulator must come first)
#include "arg_checks.h"
#include "attention/attention_kernels.cuh"

namespace {

using namespace sbt::attention;

struct EmuLaunch {
  template <typename T>
  void operator()(void (*kernel)(Params<T>), int64_t blocks, size_t smem, const Params<T>& p) const {
    if (blocks == 0) return;
    const std::function<void()> body = [kernel, &p]() { kernel(p); };
    sbt_emu::launch(dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem, body);
  }
};

at::Tensor nan_like(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const std::vector<at::Tensor>& ks,
                                       const std::vector<at::Tensor>& vs,
                                       const c10::optional<at::Tensor>& mask, bool causal,
                                       double scale) {
  sbt::check_attention_fwd_args(c10::DeviceType::CPU, q, ks, vs, mask, scale);
  auto out = nan_like(q.sizes(), q.options());
  auto lse = nan_like({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dmax) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(q, ks, vs, mask, causal, scale);
    set_forward_outputs(p, out, lse);
    run_fwd<T, decltype(dmax)::value>(p, q.size(0) * q.size(1), EmuLaunch{});
  });
  return {out, lse};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> bwd(
    const at::Tensor& q, const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs,
    const c10::optional<at::Tensor>& mask, bool causal, double scale, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta) {
  sbt::check_attention_bwd_args(c10::DeviceType::CPU, q, ks, vs, mask, scale, out, lse, dout,
                                delta);
  auto dq = nan_like(q.sizes(), q.options());
  std::vector<at::Tensor> dks, dvs;
  for (const auto& c : ks) {
    dks.push_back(nan_like(c.sizes(), q.options()));
    dvs.push_back(nan_like(c.sizes(), q.options()));
  }
  dispatch(q.scalar_type(), q.size(3), [&](auto tag, auto dmax) {
    using T = typename decltype(tag)::type;
    auto p = make_params<T>(q, ks, vs, mask, causal, scale);
    set_backward_args(p, lse, dout, delta, dq, dks, dvs);
    run_bwd<T, decltype(dmax)::value>(p, q.size(0) * q.size(1), EmuLaunch{});
  });
  return {dq, dks, dvs};
}

// Dynamic shared memory of every kernel instantiation, for the size-limit test.
std::vector<std::tuple<std::string, int64_t>> smem_bytes() {
  std::vector<std::tuple<std::string, int64_t>> out;
  for (auto dtype : {at::kFloat, at::kHalf, at::kBFloat16}) {
    for (int64_t D : {64, 128}) {
      dispatch(dtype, D, [&](auto tag, auto dmax) {
        using T = typename decltype(tag)::type;
        constexpr int DM = decltype(dmax)::value;
        const std::string name = std::string(c10::toString(dtype)) + "/" + std::to_string(DM);
        out.emplace_back("fwd/" + name, FwdSmem<T, DM>::bytes);
        out.emplace_back("dq/" + name, DqSmem<T, DM>::bytes);
        out.emplace_back("dkdv/" + name, DkvSmem<T, DM>::bytes);
      });
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fwd);
  m.def("bwd", &bwd);
  m.def("smem_bytes", &smem_bytes);
  m.def("set_workers", [](int n) { sbt_emu::worker_count() = n < 1 ? 1 : n; });
}
