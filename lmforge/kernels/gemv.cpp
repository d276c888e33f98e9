// Python bindings of the decode kernels: the GEMVs of gemv.h on tensors, and the fused decode step.
#include <torch/extension.h>

#include "gemv.h"

namespace lmforge {

void register_decode(py::module_& m);  // decode.cpp
void register_gguf(py::module_& m);    // gguf_blocks.cpp

namespace {

void check_input(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2,
              "x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight expects ", k);
}

// y (M, N) = x (M, K) @ w (N, K)^T with w row-major (nn.Linear's layout).
torch::Tensor linear_f32_op(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.dim() == 2,
              "weight must be a contiguous 2-D float32 CPU tensor");
  check_input(x, w.size(1));
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  linear_f32(x.data_ptr<float>(), x.size(0), w.size(1), w.data_ptr<float>(), w.size(0), y.data_ptr<float>());
  return y;
}

// Codes q (N, K) in 0..15 -> (N, K / 2) bytes in the block layout int4_linear reads.
torch::Tensor int4_pack(const torch::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.dim() == 2 && q.size(1) % kBlock == 0,
              "int4 codes must be uint8 (N, K) with K a multiple of ", kBlock);
  auto b = q.contiguous().view({q.size(0), q.size(1) / kBlock, 2, kBlock / 2});
  auto low = b.select(2, 0), high = b.select(2, 1);
  return low.bitwise_or(high.bitwise_left_shift(4)).reshape({q.size(0), q.size(1) / 2}).contiguous();
}

// y (M, N) = x (M, K) @ dequant(w)^T for packed int4 codes with per-(row, group) scale and zero.
torch::Tensor int4_linear_op(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                             const torch::Tensor& zero, int64_t group) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && packed.dim() == 2,
              "packed codes must be contiguous uint8 (N, K / 2), from int4_pack");
  TORCH_CHECK(int4_group_ok(group), "int4 group size must be 32, 64 or a multiple of 128, got ", group);
  const int64_t m_rows = x.size(0), k = packed.size(1) * 2, n = packed.size(0), g_count = (k + group - 1) / group;
  check_input(x, k);
  TORCH_CHECK(1 <= m_rows && m_rows <= kMaxRows, "int4_linear takes 1 to ", kMaxRows, " rows of x, got ", m_rows);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && zero.scalar_type() == torch::kFloat32 &&
                  scale.is_contiguous() && zero.is_contiguous() && scale.size(0) == n && scale.size(1) == g_count &&
                  zero.sizes() == scale.sizes(),
              "scale and zero must be contiguous float32 (N, ceil(K / group))");
  auto y = torch::empty({m_rows, n}, x.options());
  Int4Input in;
  in.prepare(x.data_ptr<float>(), m_rows, k, group);
  int4_linear(in, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero.data_ptr<float>(), n, y.data_ptr<float>());
  return y;
}

}  // namespace
}  // namespace lmforge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_f32", &lmforge::linear_f32_op, "y = x @ w^T for a few rows of x (fp32, row-major w)");
  m.def("int4_pack", &lmforge::int4_pack, "int4 codes (N, K) -> the block nibble layout int4_linear reads");
  m.def("int4_linear", &lmforge::int4_linear_op, "y = x @ dequant(w)^T for up to 8 rows of x, packed int4 w");
  m.attr("MAX_ROWS") = lmforge::kMaxRows;
#if defined(LMFORGE_INT4_VNNI)
  m.attr("INT4_INT8_INPUTS") = true;  // int4 products quantize their inputs to int8 per 32 columns
#else
  m.attr("INT4_INT8_INPUTS") = false;
#endif
  lmforge::register_decode(m);
  lmforge::register_gguf(m);
}
