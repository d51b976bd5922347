// Argument checks of the raw kernel ops (selfboottok::*_kernel). They are defined in
// arg_checks.cpp, which only the host C++ compiler builds: no error message is ever formatted in
// nvcc-compiled code (a c10 stream formatting an int64 there crashed on an H200 machine).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace sbt {

constexpr int kMaxAttentionChunks = 4;

// selfboottok::sinkhorn_kernel: cost [B, N, M] float32/float64, a [B, N], b [B, M] alike.
void check_sinkhorn_args(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b,
                         double eps, int64_t max_iters);

// selfboottok::attention_fwd_kernel on tensors of `device` (CUDA, or CPU for the emulator).
void check_attention_fwd_args(c10::DeviceType device, const at::Tensor& q, at::TensorList k,
                              at::TensorList v, const std::optional<at::Tensor>& key_padding_mask,
                              double scale);

// selfboottok::attention_bwd_kernel: the forward's arguments plus out, dout [B, H, Lq, D] and
// the float32 rows lse, delta [B, H, Lq].
void check_attention_bwd_args(c10::DeviceType device, const at::Tensor& q, at::TensorList k,
                              at::TensorList v, const std::optional<at::Tensor>& key_padding_mask,
                              double scale, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& dout, const at::Tensor& delta);

// A launch of `blocks` blocks with `smem` bytes of dynamic shared memory each.
void check_launch(const char* op, int64_t blocks, int64_t smem, int64_t smem_limit);

[[noreturn]] void unsupported_dtype(const char* op, at::ScalarType dtype);

}  // namespace sbt
