// Argument checks of the raw kernel ops; see arg_checks.h. Every error is a c10::ValueError
// (Python ValueError) whose message names the op and the argument.
#include "arg_checks.h"

#include <c10/util/Exception.h>

#include <climits>
#include <cmath>
#include <string>

namespace sbt {
namespace {

// [B, H, L, D] with q's B, H, D (and L unless L < 0), dtype and device, unit stride along D.
void check_like_q(const char* op, const std::string& name, const at::Tensor& t,
                  const at::Tensor& q, int64_t L) {
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

// float32 [B, H, Lq] rows matching q, contiguous.
void check_rows(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == q.size(0) && t.size(1) == q.size(1) &&
                        t.size(2) == q.size(2),
                    op, ": ", name, " must be [B, H, Lq] matching q, got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                    t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_attention(const char* op, c10::DeviceType device, const at::Tensor& q,
                     at::TensorList ks, at::TensorList vs,
                     const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK_VALUE(q.device().type() == device, op, ": q must be a ",
                    c10::DeviceTypeName(device, /*lower_case=*/true), " tensor, got device ",
                    q.device());
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be [B, H, Lq, D], got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                    ": q must be float32, float16 or bfloat16, got ", dt);
  const int64_t D = q.size(3);
  TORCH_CHECK_VALUE(D >= 8 && D <= 128 && D % 8 == 0, op,
                    ": head dim D must be a multiple of 8 in [8, 128], got ", D);
  TORCH_CHECK_VALUE(q.stride(3) == 1, op, ": q must have stride 1 along D, got strides ",
                    q.strides());
  TORCH_CHECK_VALUE(!ks.empty() && ks.size() <= static_cast<size_t>(kMaxAttentionChunks), op,
                    ": k must be a list of 1 to ", kMaxAttentionChunks, " chunks, got ", ks.size());
  TORCH_CHECK_VALUE(vs.size() == ks.size(), op, ": k has ", ks.size(), " chunks but v has ",
                    vs.size());
  int64_t Lk = 0;
  for (size_t c = 0; c < ks.size(); ++c) {
    const std::string i = "[" + std::to_string(c) + "]";
    check_like_q(op, "k" + i, ks[c], q, -1);
    check_like_q(op, "v" + i, vs[c], q, ks[c].size(2));
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

}  // namespace

void check_sinkhorn_args(const at::Tensor& cost, const at::Tensor& a, const at::Tensor& b,
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
  TORCH_CHECK_VALUE(N > 0 && M > 0, "sinkhorn: cost must have N, M > 0, got ", cost.sizes());
  TORCH_CHECK_VALUE(N * M <= (int64_t(1) << 31), "sinkhorn: cost must have N * M <= 2^31, got ",
                    cost.sizes());
}

void check_attention_fwd_args(c10::DeviceType device, const at::Tensor& q, at::TensorList k,
                              at::TensorList v, const std::optional<at::Tensor>& key_padding_mask,
                              double scale) {
  check_attention("attention_fwd_kernel", device, q, k, v, key_padding_mask, scale);
}

void check_attention_bwd_args(c10::DeviceType device, const at::Tensor& q, at::TensorList k,
                              at::TensorList v, const std::optional<at::Tensor>& key_padding_mask,
                              double scale, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& dout, const at::Tensor& delta) {
  const char* op = "attention_bwd_kernel";
  check_attention(op, device, q, k, v, key_padding_mask, scale);
  check_like_q(op, "out", out, q, q.size(2));
  check_like_q(op, "dout", dout, q, q.size(2));
  check_rows(op, "lse", lse, q);
  check_rows(op, "delta", delta, q);
}

void check_launch(const char* op, int64_t blocks, int64_t smem, int64_t smem_limit) {
  TORCH_CHECK(blocks <= INT_MAX, op, ": too many thread blocks (", blocks, ")");
  TORCH_CHECK(smem <= smem_limit, op, ": the kernel needs ", smem,
              " bytes of shared memory per block, the device allows ", smem_limit);
}

void unsupported_dtype(const char* op, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(false, op, ": unsupported dtype ", dtype);
  __builtin_unreachable();
}

}  // namespace sbt
