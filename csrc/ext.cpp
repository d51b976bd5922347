// The selfboottok._C extension: op schemas and the Python module.
#include <torch/extension.h>
#include <torch/library.h>

#include "sinkhorn/sinkhorn_cpu.h"

TORCH_LIBRARY(selfboottok, m) {
  // -> plan, f, g, value, value_linear, n_iters (int32), row-marginal L1 error.
  // tol < 0 disables early stopping. Semantics: selfboottok/ops/_torch_impl.py.
  m.def(
      "sinkhorn_kernel(Tensor cost, Tensor a, Tensor b, float eps, int max_iters, float tol)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Flash attention over key chunks read in place; -> out, float32 lse. Backward -> dq, dk and
  // dv per chunk, with delta = rowsum(dout * out) - grad_lse from the caller. Semantics:
  // selfboottok/ops/attention.py.
  m.def(
      "attention_fwd_kernel(Tensor q, Tensor[] k, Tensor[] v, Tensor? key_padding_mask,"
      " bool causal, float scale) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_kernel(Tensor q, Tensor[] k, Tensor[] v, Tensor? key_padding_mask,"
      " bool causal, float scale, Tensor out, Tensor lse, Tensor dout, Tensor delta)"
      " -> (Tensor, Tensor[], Tensor[])");
}

// The kernel op is not differentiable itself; selfboottok::sinkhorn (Python) owns the autograd.
TORCH_LIBRARY_IMPL(selfboottok, Autograd, m) {
  m.impl("sinkhorn_kernel", torch::CppFunction::makeFallthrough());
  // Likewise for attention: selfboottok::attention owns the autograd.
  m.impl("attention_fwd_kernel", torch::CppFunction::makeFallthrough());
  m.impl("attention_bwd_kernel", torch::CppFunction::makeFallthrough());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cuda_compiled", []() {
#ifdef SELFBOOTTOK_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cpu_isa", &sbt::sinkhorn::cpu_isa,
        "Instruction set the CPU Sinkhorn kernel uses now (SELFBOOTTOK_CPU_ISA or the best)");
  m.def("cpu_isas", &sbt::sinkhorn::cpu_isas,
        "Instruction sets the CPU Sinkhorn kernel has code for and this CPU runs, best last");
}
