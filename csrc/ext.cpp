// The selfboottok._C extension: op schemas and the Python module.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(selfboottok, m) {
  // -> plan, f, g, value, value_linear, n_iters (int32), row-marginal L1 error.
  // tol < 0 disables early stopping. Semantics: selfboottok/ops/_torch_impl.py.
  m.def(
      "sinkhorn_kernel(Tensor cost, Tensor a, Tensor b, float eps, int max_iters, float tol)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The kernel op is not differentiable itself; selfboottok::sinkhorn (Python) owns the autograd.
TORCH_LIBRARY_IMPL(selfboottok, Autograd, m) {
  m.impl("sinkhorn_kernel", torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_compiled", []() {
#ifdef SELFBOOTTOK_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
