// The fused decode step: every transformer block for one new token per sequence, in C++.
//
// At batch 1 the weights are small enough that an eager PyTorch block spends more time in Python
// and in launching ~40 tiny ops than in the matrix products (docs/benchmarks.md). This is the same
// block as lmforge/model (RMSNorm, grouped-query attention with RoPE over the static KV cache,
// gated MLP, Gemma's QK-norm, sandwich norms and sliding windows) written as plain loops around the
// GEMV kernels, in the style of llama2.c. lmforge/generation/fused_decode.py decides when it
// applies and falls back to the PyTorch modules otherwise; tests hold the two equal.
#include <torch/extension.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <vector>

#include "gemv.h"

namespace lmforge {

// One linear layer as the step reads it: fp32 weight (N, K), or int4 codes in gemv.h's layout.
struct Matrix {
  torch::Tensor weight, packed, scale, zero, bias;  // kept alive here; the loops use the raw pointers
  const float *w = nullptr, *s = nullptr, *z = nullptr, *b = nullptr;
  const uint8_t* q = nullptr;
  int64_t group = 0, n = 0, k = 0;

  static Matrix f32(torch::Tensor weight, std::optional<torch::Tensor> bias) {
    TORCH_CHECK(weight.scalar_type() == torch::kFloat32 && weight.is_contiguous() && weight.dim() == 2,
                "fp32 weight must be contiguous (N, K)");
    Matrix m;
    m.weight = weight, m.n = weight.size(0), m.k = weight.size(1);
    m.w = weight.data_ptr<float>();
    m.set_bias(bias);
    return m;
  }

  static Matrix int4(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t group,
                     std::optional<torch::Tensor> bias) {
    TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.is_contiguous() && int4_group_ok(group) &&
                    scale.is_contiguous() && zero.is_contiguous() && scale.scalar_type() == torch::kFloat32,
                "int4 matrix needs contiguous packed codes and fp32 scale/zero");
    Matrix m;
    m.packed = packed, m.scale = scale, m.zero = zero, m.group = group;
    m.n = packed.size(0), m.k = packed.size(1) * 2;
    m.q = packed.data_ptr<uint8_t>(), m.s = scale.data_ptr<float>(), m.z = zero.data_ptr<float>();
    TORCH_CHECK(scale.size(0) == m.n && scale.size(1) == (m.k + group - 1) / group && zero.sizes() == scale.sizes(),
                "scale and zero must be (N, ceil(K / group))");
    m.set_bias(bias);
    return m;
  }

  void set_bias(const std::optional<torch::Tensor>& b) {
    if (b) {
      TORCH_CHECK(b->scalar_type() == torch::kFloat32 && b->is_contiguous() && b->numel() == n, "bias must be fp32 (N)");
      bias = *b;
      this->b = bias.data_ptr<float>();
    }
  }

  // Rows [n0, n0 + kRows) of y (rows, n) = x (rows, k) @ W^T; in: x prepared for int4 (int4 only).
  void block(const float* x, int64_t rows, int64_t n0, float* y, const Int4Input& in) const {
    const int64_t count = std::min(kRows, n - n0);
    if (w) {
      linear_f32_block(x, rows, k, w, n, n0, y);
    } else {
      const int64_t g_count = in.g_count;
      for (int64_t r = n0; r < n0 + count; ++r) int4_row_any(q + r * (k / 2), s + r * g_count, z + r * g_count, in, y + r, n);
    }
    if (b) {
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t r = n0; r < n0 + count; ++r) y[m * n + r] += b[r];
    }
  }
};

// y_i = x @ W_i^T for up to three matrices reading the same x (q/k/v, gate/up) in one parallel
// region: one thread wake-up instead of three. `in` holds the int4-prepared inputs, one per matrix.
void apply(std::initializer_list<std::pair<const Matrix*, float*>> items, const float* x, int64_t rows,
           Int4Input* in) {
  const Matrix* mats[3];
  float* outs[3];
  int64_t first[4] = {0, 0, 0, 0}, count = 0;
  for (const auto& [mat, out] : items) {
    mats[count] = mat, outs[count] = out;
    if (!mat->w) in[count].prepare(x, rows, mat->k, mat->group);
    first[count + 1] = first[count] + (mat->n + kRows - 1) / kRows;
    ++count;
  }
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < first[count]; ++b) {
    int64_t i = 0;
    while (b >= first[i + 1]) ++i;
    mats[i]->block(x, rows, (b - first[i]) * kRows, outs[i], in[i]);
  }
}

// One block's weights; optional norms are undefined tensors when the architecture has none.
struct Layer {
  Matrix q, k, v, o, gate, up, down;
  torch::Tensor input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm, q_norm, k_norm;
  int64_t window = 0;  // sliding-window width, 0 for a global layer
  int64_t rope = 0;    // which cos/sin table (layer kind) this layer rotates with
};

struct Plan {
  int64_t n_embd = 0, n_head = 0, n_kv_head = 0, head_dim = 0, intermediate = 0;
  double eps = 1e-6, attn_scale = 1.0;
  bool unit_offset = false, geglu = false, sandwich = false;
  std::vector<Layer> layers;
};

namespace {

// y = x / rms(x) * w (or * (1 + w)) over rows of width d, in place when y == x.
void rms_norm(const float* x, int64_t rows, int64_t d, const torch::Tensor& weight, double eps, bool unit_offset,
              float* y) {
  const float* w = weight.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(x[r * d + i]) * x[r * d + i];
    const float inv = 1.f / std::sqrt(float(ss / d) + float(eps));
    for (int64_t i = 0; i < d; ++i) y[r * d + i] = x[r * d + i] * inv * (unit_offset ? 1.f + w[i] : w[i]);
  }
}

// Rotate each head of x (heads, hd) by the half-split RoPE angles in cos/sin (hd).
void rope(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    for (int64_t i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = a * cos[i] - b * sin[i];
      v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
  }
}

float activation(float g, bool geglu) {
  if (!geglu) return g / (1.f + std::exp(-g));  // SiLU
  const float c = 0.7978845608028654f;          // sqrt(2 / pi): tanh-approximated GELU
  return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
}

}  // namespace

// Run every block for one new token per row: x (B, n_embd), the output of the embedding, is
// updated in place; keys/values are written at cache slot `slot` and attention reads slots
// [max(0, slot + 1 - window), slot]. cos/sin: per rope kind, (B, head_dim) at each row's position.
torch::Tensor decode_layers(const Plan& plan, torch::Tensor x, const std::vector<torch::Tensor>& k_cache,
                            const std::vector<torch::Tensor>& v_cache, int64_t slot, const std::vector<torch::Tensor>& cos,
                            const std::vector<torch::Tensor>& sin) {
  const int64_t B = x.size(0), D = plan.n_embd, H = plan.n_head, KV = plan.n_kv_head, hd = plan.head_dim;
  const int64_t F = plan.intermediate, n_layers = static_cast<int64_t>(plan.layers.size());
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 && x.size(1) == D,
              "x must be contiguous fp32 (B, n_embd)");
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "the fused decode step takes 1 to ", kMaxRows, " rows, got ", B);
  TORCH_CHECK(static_cast<int64_t>(k_cache.size()) == n_layers && static_cast<int64_t>(v_cache.size()) == n_layers,
              "one key and one value cache per layer");
  const int64_t L = k_cache[0].size(2);
  TORCH_CHECK(slot >= 0 && slot < L, "cache slot ", slot, " is outside the cache of ", L, " slots");
  for (int64_t i = 0; i < n_layers; ++i)
    for (const auto* c : {&k_cache[i], &v_cache[i]})
      TORCH_CHECK(c->scalar_type() == torch::kFloat32 && c->is_contiguous() && c->size(0) == B && c->size(1) == KV &&
                      c->size(2) == L && c->size(3) == hd,
                  "KV caches must be contiguous fp32 (B, n_kv_head, max_len, head_dim)");
  for (const auto& t : cos) TORCH_CHECK(t.is_contiguous() && t.size(0) == B && t.size(1) == hd, "cos must be (B, hd)");
  for (const auto& t : sin) TORCH_CHECK(t.is_contiguous() && t.size(0) == B && t.size(1) == hd, "sin must be (B, hd)");

  std::vector<float> h(B * D), q(B * H * hd), k(B * KV * hd), v(B * KV * hd), attn(B * H * hd), out(B * D);
  std::vector<float> gate(B * F), up(B * F);
  Int4Input scratch[3];
  std::vector<float> scores(B * H * L);
  float* xp = x.data_ptr<float>();
  const int64_t group_heads = H / KV;

  for (int64_t li = 0; li < n_layers; ++li) {
    const Layer& layer = plan.layers[li];
    rms_norm(xp, B, D, layer.input_norm, plan.eps, plan.unit_offset, h.data());
    apply({{&layer.q, q.data()}, {&layer.k, k.data()}, {&layer.v, v.data()}}, h.data(), B, scratch);
    if (layer.q_norm.defined()) {
      rms_norm(q.data(), B * H, hd, layer.q_norm, plan.eps, plan.unit_offset, q.data());
      rms_norm(k.data(), B * KV, hd, layer.k_norm, plan.eps, plan.unit_offset, k.data());
    }
    float* kc = k_cache[li].data_ptr<float>();
    float* vc = v_cache[li].data_ptr<float>();
    const int64_t lo = layer.window ? std::max<int64_t>(0, slot + 1 - layer.window) : 0;
    for (int64_t b = 0; b < B; ++b) {
      const float* c = cos[layer.rope].data_ptr<float>() + b * hd;
      const float* s = sin[layer.rope].data_ptr<float>() + b * hd;
      rope(q.data() + b * H * hd, H, hd, c, s);
      rope(k.data() + b * KV * hd, KV, hd, c, s);
      for (int64_t g = 0; g < KV; ++g) {
        std::copy_n(k.data() + (b * KV + g) * hd, hd, kc + ((b * KV + g) * L + slot) * hd);
        std::copy_n(v.data() + (b * KV + g) * hd, hd, vc + ((b * KV + g) * L + slot) * hd);
      }
    }
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
    for (int64_t bh = 0; bh < B * H; ++bh) {  // softmax(q k^T * scale) v for one (row, head)
      const int64_t b = bh / H, g = (bh % H) / group_heads;
      const float* qh = q.data() + bh * hd;
      const float* keys = kc + (b * KV + g) * L * hd;
      const float* values = vc + (b * KV + g) * L * hd;
      float* sc = scores.data() + bh * L;
      float top = -INFINITY;
      for (int64_t t = lo; t <= slot; ++t) {
        sc[t] = dot(qh, keys + t * hd, hd) * float(plan.attn_scale);
        top = std::max(top, sc[t]);
      }
      float total = 0;
      for (int64_t t = lo; t <= slot; ++t) total += (sc[t] = std::exp(sc[t] - top));
      float* oh = attn.data() + bh * hd;
      std::fill_n(oh, hd, 0.f);
      for (int64_t t = lo; t <= slot; ++t) axpy(sc[t] / total, values + t * hd, oh, hd);
    }
    apply({{&layer.o, out.data()}}, attn.data(), B, scratch);
    if (plan.sandwich) {
      rms_norm(out.data(), B, D, layer.post_attention_norm, plan.eps, plan.unit_offset, out.data());
      for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
      rms_norm(xp, B, D, layer.pre_feedforward_norm, plan.eps, plan.unit_offset, h.data());
    } else {
      for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
      rms_norm(xp, B, D, layer.post_attention_norm, plan.eps, plan.unit_offset, h.data());
    }
    apply({{&layer.gate, gate.data()}, {&layer.up, up.data()}}, h.data(), B, scratch);
    for (int64_t i = 0; i < B * F; ++i) gate[i] = activation(gate[i], plan.geglu) * up[i];
    apply({{&layer.down, out.data()}}, gate.data(), B, scratch);
    if (plan.sandwich) rms_norm(out.data(), B, D, layer.post_feedforward_norm, plan.eps, plan.unit_offset, out.data());
    for (int64_t i = 0; i < B * D; ++i) xp[i] += out[i];
  }
  return x;
}

void register_decode(py::module_& m) {
  py::class_<Matrix>(m, "Matrix")
      .def_static("f32", &Matrix::f32, py::arg("weight"), py::arg("bias") = py::none())
      .def_static("int4", &Matrix::int4, py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("group"),
                  py::arg("bias") = py::none())
      .def_readonly("n", &Matrix::n)
      .def_readonly("k", &Matrix::k);
  py::class_<Layer>(m, "Layer")
      .def(py::init<>())
      .def_readwrite("q", &Layer::q).def_readwrite("k", &Layer::k).def_readwrite("v", &Layer::v)
      .def_readwrite("o", &Layer::o).def_readwrite("gate", &Layer::gate).def_readwrite("up", &Layer::up)
      .def_readwrite("down", &Layer::down)
      .def_readwrite("input_norm", &Layer::input_norm)
      .def_readwrite("post_attention_norm", &Layer::post_attention_norm)
      .def_readwrite("pre_feedforward_norm", &Layer::pre_feedforward_norm)
      .def_readwrite("post_feedforward_norm", &Layer::post_feedforward_norm)
      .def_readwrite("q_norm", &Layer::q_norm).def_readwrite("k_norm", &Layer::k_norm)
      .def_readwrite("window", &Layer::window).def_readwrite("rope", &Layer::rope);
  py::class_<Plan>(m, "Plan")
      .def(py::init<>())
      .def_readwrite("n_embd", &Plan::n_embd).def_readwrite("n_head", &Plan::n_head)
      .def_readwrite("n_kv_head", &Plan::n_kv_head).def_readwrite("head_dim", &Plan::head_dim)
      .def_readwrite("intermediate", &Plan::intermediate).def_readwrite("eps", &Plan::eps)
      .def_readwrite("attn_scale", &Plan::attn_scale).def_readwrite("unit_offset", &Plan::unit_offset)
      .def_readwrite("geglu", &Plan::geglu).def_readwrite("sandwich", &Plan::sandwich)
      .def_readwrite("layers", &Plan::layers);
  m.def("decode_layers", &decode_layers, "every block for one new token per row, over the static KV cache",
        py::arg("plan"), py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot"), py::arg("cos"),
        py::arg("sin"));
}

}  // namespace lmforge
