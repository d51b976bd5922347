// Runs csrc/attention/attention_kernels.cuh on CPU tensors through the CUDA emulator, with the
// contract of selfboottok::attention_{fwd,bwd}_kernel. Outputs start as NaN so that an element
// the kernels never write shows up in the tests.
#include <torch/extension.h>

#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_emu.h"
// (the emulator must come first)
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

void check(const at::Tensor& q, const std::vector<at::Tensor>& ks, const std::vector<at::Tensor>& vs) {
  TORCH_CHECK(q.dim() == 4 && q.size(3) % 8 == 0 && q.size(3) <= 128 && q.stride(3) == 1);
  TORCH_CHECK(!ks.empty() && ks.size() <= kMaxChunks && ks.size() == vs.size());
  for (size_t c = 0; c < ks.size(); ++c) {
    TORCH_CHECK(ks[c].scalar_type() == q.scalar_type() && vs[c].scalar_type() == q.scalar_type());
    TORCH_CHECK(ks[c].stride(3) == 1 && vs[c].stride(3) == 1 && ks[c].sizes() == vs[c].sizes());
  }
}

at::Tensor nan_like(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const std::vector<at::Tensor>& ks,
                                       const std::vector<at::Tensor>& vs,
                                       const c10::optional<at::Tensor>& mask, bool causal,
                                       double scale) {
  check(q, ks, vs);
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
  check(q, ks, vs);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes() && dout.stride(3) == 1 &&
              dout.scalar_type() == q.scalar_type());
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous() && lse.scalar_type() == at::kFloat &&
              delta.scalar_type() == at::kFloat);
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
