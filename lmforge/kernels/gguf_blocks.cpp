// Python bindings of gguf_blocks.h: products with GGUF's quantized blocks and their dequantization.
#include <torch/extension.h>

#include <string>

#include "gguf_dot.h"

namespace lmforge {

namespace {

// The ids of the block types with kernels, as text for error messages.
std::string type_list() {
  std::string names;
  for (int64_t t : kGGUFTypes) names += (names.empty() ? "" : ", ") + std::to_string(t);
  return names;
}

}  // namespace

// Checks blocks (N, bytes per row) against qtype and k; returns the block format (decode.cpp uses it too).
BlockFormat check_blocks(const torch::Tensor& blocks, int64_t qtype, int64_t k) {
  const BlockFormat f = block_format(qtype);
  TORCH_CHECK(f.values > 0, "GGML type ", qtype, " has no lmforge kernel; types with one: ", type_list(),
              " (Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K); dequantize the others with the gguf library");
  TORCH_CHECK(k > 0 && k % f.values == 0, "K=", k, " is not a positive multiple of the block size ", f.values,
              " of GGML type ", qtype, "; GGUF rows hold whole blocks");
  TORCH_CHECK(blocks.device().is_cpu() && blocks.scalar_type() == torch::kUInt8 && blocks.is_contiguous() &&
                  blocks.dim() == 2,
              "blocks must be a contiguous 2-D uint8 CPU tensor (N, bytes per row), the GGUF tensor's raw bytes");
  TORCH_CHECK(blocks.size(1) == k / f.values * f.bytes, "blocks have ", blocks.size(1), " bytes per row; K=", k,
              " of GGML type ", qtype, " takes ", k / f.values * f.bytes, " (", k / f.values, " blocks of ", f.bytes,
              " bytes)");
  return f;
}

namespace {

// y (M, N) = x (M, K) @ dequantize(blocks)^T for 1..64 rows of fp32 x; x stays fp32.
torch::Tensor gguf_linear_op(const torch::Tensor& x, const torch::Tensor& blocks, int64_t qtype, int64_t k) {
  check_blocks(blocks, qtype, k);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2,
              "x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " features, the weight expects ", k);
  TORCH_CHECK(1 <= x.size(0) && x.size(0) <= kGGUFMaxRows, "gguf_linear takes 1 to ", kGGUFMaxRows,
              " rows of x, got ", x.size(0), "; dequantize tiles of the weight for more");
  auto y = torch::empty({x.size(0), blocks.size(0)}, x.options());
  gguf_linear(x.data_ptr<float>(), x.size(0), k, blocks.data_ptr<uint8_t>(), qtype, blocks.size(0), y.data_ptr<float>());
  return y;
}

// The fp32 weight (N, K) of blocks (N, bytes per row), equal to the gguf library's dequantization.
torch::Tensor gguf_dequantize_op(const torch::Tensor& blocks, int64_t qtype, int64_t k) {
  check_blocks(blocks, qtype, k);
  auto out = torch::empty({blocks.size(0), k}, torch::dtype(torch::kFloat32));
  gguf_dequantize(blocks.data_ptr<uint8_t>(), qtype, blocks.size(0), k, out.data_ptr<float>());
  return out;
}

}  // namespace

void register_gguf(py::module_& m) {
  m.def("gguf_linear", &gguf_linear_op, "y = x @ dequantize(blocks)^T for 1 to 64 fp32 rows of x, GGUF blocks",
        py::arg("x"), py::arg("blocks"), py::arg("qtype"), py::arg("k"));
  m.def("gguf_dequantize", &gguf_dequantize_op, "GGUF blocks (N, bytes per row) -> fp32 (N, K)", py::arg("blocks"),
        py::arg("qtype"), py::arg("k"));
  m.attr("GGUF_MAX_ROWS") = kGGUFMaxRows;
  py::list types;
  for (int64_t t : kGGUFTypes) types.append(t);
  m.attr("GGUF_TYPES") = types;
}

}  // namespace lmforge
