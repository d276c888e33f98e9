// The fused decode step: every transformer block for one new token per sequence, in C++.
//
// At batch 1 the weights are small enough that an eager PyTorch block spends more time in Python
// and in launching ~40 tiny ops than in the matrix products (docs/benchmarks.md). This is the same
// block as lmforge/model (RMSNorm, grouped-query attention with RoPE, gated MLP, Gemma's QK-norm,
// sandwich norms and sliding windows) written as plain loops around the GEMV kernels, in the style
// of llama2.c, over either the static KV cache (generate) or the serving engine's paged one; the
// two differ only in where a row's keys live (LayerKV). lmforge/generation/fused_decode.py decides
// when it applies and falls back to the PyTorch modules otherwise; tests hold the two equal.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <optional>
#include <vector>

#include "attention.h"
#include "gemv.h"
#include "gguf_dot.h"

namespace lmforge {

BlockFormat check_blocks(const torch::Tensor& blocks, int64_t qtype, int64_t k);  // gguf_blocks.cpp

// The rows of x as one matrix's products read them: transposed for fp32 and GGUF blocks, int8-rounded
// for int4.
struct MatrixInput {
  F32Input f32;
  Int4Input int4;
};

// One linear layer as the step reads it: fp32 weight (N, K), int4 codes in gemv.h's layout, or GGUF
// blocks (N, bytes per row) of a type gguf_blocks.h decodes.
struct Matrix {
  torch::Tensor weight, packed, scale, zero, blocks, bias;  // kept alive here; the loops use the raw pointers
  const float *w = nullptr, *s = nullptr, *z = nullptr, *b = nullptr;
  const uint8_t *q = nullptr, *gb = nullptr;
  int64_t group = 0, qtype = 0, n = 0, k = 0;

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

  static Matrix gguf(torch::Tensor blocks, int64_t qtype, int64_t k, std::optional<torch::Tensor> bias) {
    check_blocks(blocks, qtype, k);
    Matrix m;
    m.blocks = blocks, m.qtype = qtype, m.n = blocks.size(0), m.k = k;
    m.gb = blocks.data_ptr<uint8_t>();
    m.set_bias(bias);
    return m;
  }

  bool is_int4() const { return q != nullptr; }

  void set_bias(const std::optional<torch::Tensor>& b) {
    if (b) {
      TORCH_CHECK(b->scalar_type() == torch::kFloat32 && b->is_contiguous() && b->numel() == n, "bias must be fp32 (N)");
      bias = *b;
      this->b = bias.data_ptr<float>();
    }
  }

  void prepare(const float* x, int64_t rows, MatrixInput& in) const {
    if (is_int4()) in.int4.prepare(x, rows, k, group);
    else in.f32.prepare(x, rows, k);
  }

  // Whether this matrix's products read x by dot products, as 4 streams (f32.h linear_f32_streams).
  bool streams(const MatrixInput& in) const { return w && in.f32.lanes == 0; }

  // Rows [n0, n0 + kRows) of y (rows, n) = x (rows, k) @ W^T for x prepared by prepare().
  void block(int64_t rows, int64_t n0, float* y, const MatrixInput& in) const {
    const int64_t count = std::min(kRows, n - n0);
    if (w) {
      linear_f32_block(in.f32, w, n, n0, y);
    } else if (gb) {
      gguf_block(in.f32, gb, qtype, n, n0, y);
    } else {
      const int64_t g_count = in.int4.g_count;
      for (int64_t r = n0; r < n0 + count; ++r)
        int4_row_any(q + r * (k / 2), s + r * g_count, z + r * g_count, in.int4, y + r, n);
    }
    add_bias(rows, n0, n0 + count, y);
  }

  // Rows [lo, hi) of y as 4 streams; for matrices where streams() holds.
  void rows_as_streams(int64_t rows, int64_t lo, int64_t hi, float* y, const MatrixInput& in) const {
    linear_f32_streams(in.f32, w, n, lo, hi, y);
    add_bias(rows, lo, hi, y);
  }

  void add_bias(int64_t rows, int64_t lo, int64_t hi, float* y) const {
    if (b)
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t r = lo; r < hi; ++r) y[m * n + r] += b[r];
  }
};

// y_i = x @ W_i^T for up to three matrices reading the same x (q/k/v, gate/up) in one parallel
// region: one thread wake-up instead of three. `in` holds the prepared inputs, one per matrix.
void apply(std::initializer_list<std::pair<const Matrix*, float*>> items, const float* x, int64_t rows,
           MatrixInput* in) {
  const Matrix* mats[3];
  float* outs[3];
  int64_t first[4] = {0, 0, 0, 0}, count = 0;
  for (const auto& [mat, out] : items) {
    mats[count] = mat, outs[count] = out;
    mat->prepare(x, rows, in[count]);
    first[count + 1] = first[count] + (mat->n + kRows - 1) / kRows;
    ++count;
  }
  bool streams = true;
  for (int64_t i = 0; i < count; ++i) streams = streams && mats[i]->streams(in[i]);
  if (streams) {  // few rows of fp32 x (batch-1 decode): each thread reads its share of each matrix as 4 streams
#pragma omp parallel num_threads(at::get_num_threads())
    for (int64_t i = 0; i < count; ++i) {
      const auto [lo, hi] = thread_share(mats[i]->n);
      mats[i]->rows_as_streams(rows, lo, hi, outs[i], in[i]);
    }
    return;
  }
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < first[count]; ++b) {
    int64_t i = 0;
    while (b >= first[i + 1]) ++i;
    mats[i]->block(rows, (b - first[i]) * kRows, outs[i], in[i]);
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
  torch::Tensor final_norm;  // with `head`: the step can end in logits (norm, then head), else undefined
  Matrix head;               // the output projection (n == 0: none)

  bool has_head() const { return final_norm.defined() && head.n > 0; }

  // Whether any matrix is int4: its products take at most kMaxRows rows of x (fp32 and GGUF blocks take
  // kPagedMaxRows).
  bool has_int4() const {
    for (const Layer& l : layers)
      for (const Matrix* m : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
        if (m->is_int4()) return true;
    return has_head() && head.is_int4();
  }
};

constexpr int64_t kPagedMaxRows = 64;  // gemv.PAGED_MAX_ROWS: the engine's default max_num_seqs

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

// Work buffers of one step, sized once for B rows and reused by every layer.
struct Scratch {
  std::vector<float> h, q, k, v, attn, out, gate, up;
  MatrixInput in[3];

  Scratch(const Plan& p, int64_t B)
      : h(B * p.n_embd), q(B * p.n_head * p.head_dim), k(B * p.n_kv_head * p.head_dim),
        v(B * p.n_kv_head * p.head_dim), attn(B * p.n_head * p.head_dim), out(B * p.n_embd),
        gate(B * p.intermediate), up(B * p.intermediate) {}
};

// One block for the B rows of x (updated in place); cos/sin (B, hd) at each row's position.
void layer_step(const Plan& plan, const Layer& layer, float* x, int64_t B, const LayerKV& kv, const float* cos,
                const float* sin, Scratch& s) {
  const int64_t D = plan.n_embd, H = plan.n_head, KV = plan.n_kv_head, hd = plan.head_dim;
  const int64_t F = plan.intermediate;
  rms_norm(x, B, D, layer.input_norm, plan.eps, plan.unit_offset, s.h.data());
  apply({{&layer.q, s.q.data()}, {&layer.k, s.k.data()}, {&layer.v, s.v.data()}}, s.h.data(), B, s.in);
  if (layer.q_norm.defined()) {
    rms_norm(s.q.data(), B * H, hd, layer.q_norm, plan.eps, plan.unit_offset, s.q.data());
    rms_norm(s.k.data(), B * KV, hd, layer.k_norm, plan.eps, plan.unit_offset, s.k.data());
  }
  for (int64_t b = 0; b < B; ++b) {
    rope(s.q.data() + b * H * hd, H, hd, cos + b * hd, sin + b * hd);
    rope(s.k.data() + b * KV * hd, KV, hd, cos + b * hd, sin + b * hd);
    for (int64_t g = 0; g < KV; ++g) {
      std::copy_n(s.k.data() + (b * KV + g) * hd, hd, kv.k + kv.at(b, kv.new_slots[b], g));
      std::copy_n(s.v.data() + (b * KV + g) * hd, hd, kv.v + kv.at(b, kv.new_slots[b], g));
    }
  }
  attend({B, H, KV, hd, float(plan.attn_scale)}, kv, s.q.data(), s.attn.data());
  apply({{&layer.o, s.out.data()}}, s.attn.data(), B, s.in);
  float* out = s.out.data();
  if (plan.sandwich) {
    rms_norm(out, B, D, layer.post_attention_norm, plan.eps, plan.unit_offset, out);
    for (int64_t i = 0; i < B * D; ++i) x[i] += out[i];
    rms_norm(x, B, D, layer.pre_feedforward_norm, plan.eps, plan.unit_offset, s.h.data());
  } else {
    for (int64_t i = 0; i < B * D; ++i) x[i] += out[i];
    rms_norm(x, B, D, layer.post_attention_norm, plan.eps, plan.unit_offset, s.h.data());
  }
  apply({{&layer.gate, s.gate.data()}, {&layer.up, s.up.data()}}, s.h.data(), B, s.in);
  gated_activation(s.gate.data(), s.up.data(), B * F, plan.geglu);
  apply({{&layer.down, out}}, s.gate.data(), B, s.in);
  if (plan.sandwich) rms_norm(out, B, D, layer.post_feedforward_norm, plan.eps, plan.unit_offset, out);
  for (int64_t i = 0; i < B * D; ++i) x[i] += out[i];
}

// Whether t is a contiguous int64 CPU tensor whose entries lie in [lo, hi] (indices the loops trust).
bool all_in(const torch::Tensor& t, int64_t lo, int64_t hi) {
  if (!t.device().is_cpu() || t.scalar_type() != torch::kInt64 || !t.is_contiguous()) return false;
  const int64_t* p = t.data_ptr<int64_t>();
  return std::all_of(p, p + t.numel(), [=](int64_t i) { return lo <= i && i <= hi; });
}

// The checks both entry points share: x (B, n_embd), one K and V cache per layer, cos/sin per rope kind.
void check_step(const Plan& plan, const torch::Tensor& x, const std::vector<torch::Tensor>& k_cache,
                const std::vector<torch::Tensor>& v_cache, const std::vector<torch::Tensor>& cos,
                const std::vector<torch::Tensor>& sin) {
  const int64_t B = x.size(0), hd = plan.head_dim;
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2 &&
                  x.size(1) == plan.n_embd,
              "x must be contiguous fp32 CPU (B, n_embd)");
  TORCH_CHECK(!plan.layers.empty() && k_cache.size() == plan.layers.size() && v_cache.size() == plan.layers.size(),
              "one key and one value cache per layer");
  for (const auto& c : k_cache) TORCH_CHECK(c.device().is_cpu(), "KV caches must be on the CPU");
  for (const auto& c : v_cache) TORCH_CHECK(c.device().is_cpu(), "KV caches must be on the CPU");
  TORCH_CHECK(cos.size() == sin.size(), "one cos and one sin table per rope kind");
  for (const Layer& layer : plan.layers)
    TORCH_CHECK(layer.rope >= 0 && layer.rope < int64_t(cos.size()), "no cos/sin for rope kind ", layer.rope);
  for (const auto* tables : {&cos, &sin})
    for (const auto& t : *tables)
      TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == 2 && t.size(0) == B &&
                      t.size(1) == hd,
                  "cos and sin must be contiguous fp32 (B, head_dim)");
}

}  // namespace

// The step's result: x after the blocks, or with `logits` (and a head in the plan) head(norm(x)) (B, vocab).
torch::Tensor finish(const Plan& plan, torch::Tensor x, bool logits, Scratch& s) {
  if (!logits || !plan.has_head()) return x;
  const int64_t B = x.size(0);
  rms_norm(x.data_ptr<float>(), B, plan.n_embd, plan.final_norm, plan.eps, plan.unit_offset, s.h.data());
  torch::Tensor out = torch::empty({B, plan.head.n}, x.options());
  apply({{&plan.head, out.data_ptr<float>()}}, s.h.data(), B, s.in);
  return out;
}

// Run every block for one new token per row: x (B, n_embd), the output of the embedding, is
// updated in place; keys/values are written at cache slot `slot` and attention reads slots
// [max(0, slot + 1 - window), slot]. cos/sin: per rope kind, (B, head_dim) at each row's position.
// With `logits` and a head in the plan, returns the logits (B, vocab) instead of x.
torch::Tensor decode_layers(const Plan& plan, torch::Tensor x, const std::vector<torch::Tensor>& k_cache,
                            const std::vector<torch::Tensor>& v_cache, int64_t slot, const std::vector<torch::Tensor>& cos,
                            const std::vector<torch::Tensor>& sin, bool logits) {
  check_step(plan, x, k_cache, v_cache, cos, sin);
  const int64_t B = x.size(0), KV = plan.n_kv_head, hd = plan.head_dim;
  TORCH_CHECK(B >= 1 && B <= kMaxRows, "the fused decode step takes 1 to ", kMaxRows, " rows, got ", B);
  const int64_t L = k_cache[0].size(2);
  TORCH_CHECK(slot >= 0 && slot < L, "cache slot ", slot, " is outside the cache of ", L, " slots");
  for (const auto* caches : {&k_cache, &v_cache})
    for (const auto& c : *caches)
      TORCH_CHECK(c.scalar_type() == torch::kFloat32 && c.is_contiguous() && c.dim() == 4 && c.size(0) == B &&
                      c.size(1) == KV && c.size(2) == L && c.size(3) == hd,
                  "KV caches must be contiguous fp32 (B, n_kv_head, max_len, head_dim)");
  const std::vector<int64_t> new_slots(B, slot);
  Scratch s(plan, B);
  for (size_t li = 0; li < plan.layers.size(); ++li) {  // (B, n_kv_head, L, hd): row b reads slots lo..slot
    const Layer& layer = plan.layers[li];
    const int64_t lo = layer.window ? std::max<int64_t>(0, slot + 1 - layer.window) : 0;
    const LayerKV kv{k_cache[li].data_ptr<float>(), v_cache[li].data_ptr<float>(), KV * L * hd, hd, L * hd,
                     new_slots.data(), {nullptr, nullptr, 0, lo, slot + 1 - lo}};
    layer_step(plan, layer, x.data_ptr<float>(), B, kv, cos[layer.rope].data_ptr<float>(),
               sin[layer.rope].data_ptr<float>(), s);
  }
  return finish(plan, x, logits, s);
}

// The same step over the serving engine's paged cache, k_cache/v_cache (S, n_kv_head, head_dim) per
// layer: row b's new key and value go to slot new_slots[b]; with the rope kind r of a layer, it
// attends to the first key_lens[r][b] slots of key_slots[r][b] (padded tables, the window applied).
torch::Tensor decode_layers_paged(const Plan& plan, torch::Tensor x, const std::vector<torch::Tensor>& k_cache,
                                  const std::vector<torch::Tensor>& v_cache, const torch::Tensor& new_slots,
                                  const std::vector<torch::Tensor>& key_slots,
                                  const std::vector<torch::Tensor>& key_lens, const std::vector<torch::Tensor>& cos,
                                  const std::vector<torch::Tensor>& sin, bool logits) {
  check_step(plan, x, k_cache, v_cache, cos, sin);
  const int64_t B = x.size(0), KV = plan.n_kv_head, hd = plan.head_dim;
  const bool int4 = plan.has_int4();
  TORCH_CHECK(B >= 1 && B <= (int4 ? kMaxRows : kPagedMaxRows), "the paged fused decode step takes 1 to ",
              int4 ? kMaxRows : kPagedMaxRows, " rows", int4 ? " with int4 weights" : "", ", got ", B);
  const int64_t S = k_cache[0].size(0);
  for (const auto* caches : {&k_cache, &v_cache})
    for (const auto& c : *caches)
      TORCH_CHECK(c.scalar_type() == torch::kFloat32 && c.is_contiguous() && c.dim() == 3 && c.size(0) == S &&
                      c.size(1) == KV && c.size(2) == hd,
                  "paged KV caches must be contiguous fp32 (slots, n_kv_head, head_dim)");
  TORCH_CHECK(new_slots.dim() == 1 && new_slots.size(0) == B && all_in(new_slots, 0, S - 1),
              "new_slots must be contiguous int64 CPU (B,) slots of the cache");
  TORCH_CHECK(key_slots.size() == cos.size() && key_lens.size() == cos.size(), "one key table per rope kind");
  for (size_t r = 0; r < key_slots.size(); ++r) {
    const auto &table = key_slots[r], &lens = key_lens[r];
    TORCH_CHECK(table.dim() == 2 && table.size(0) == B && all_in(table, 0, S - 1),
                "key_slots must be contiguous int64 CPU (B, L) slots of the cache");
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B && all_in(lens, 1, table.size(1)),
                "key_lens must be contiguous int64 CPU (B,) counts in [1, L]");
  }
  Scratch s(plan, B);
  for (size_t li = 0; li < plan.layers.size(); ++li) {  // (S, n_kv_head, hd): rows share one pool of slots
    const Layer& layer = plan.layers[li];
    const auto& table = key_slots[layer.rope];
    const LayerKV kv{k_cache[li].data_ptr<float>(), v_cache[li].data_ptr<float>(), 0, KV * hd, hd,
                     new_slots.data_ptr<int64_t>(),
                     {table.data_ptr<int64_t>(), key_lens[layer.rope].data_ptr<int64_t>(), table.size(1), 0, 0}};
    layer_step(plan, layer, x.data_ptr<float>(), B, kv, cos[layer.rope].data_ptr<float>(),
               sin[layer.rope].data_ptr<float>(), s);
  }
  return finish(plan, x, logits, s);
}

// Several consecutive tokens of one sequence over generate's static cache (1, n_kv_head, max_len, head_dim)
// per layer: token b goes to slot new_slots[b] and, with the rope kind r of a layer, attends to the first
// key_lens[r][b] slots of key_slots[r][b]. Every token's key is written before any token attends, so a
// table that ends at a token's own slot gives causal attention: speculative decoding verifies its drafts so.
torch::Tensor decode_layers_chunk(const Plan& plan, torch::Tensor x, const std::vector<torch::Tensor>& k_cache,
                                  const std::vector<torch::Tensor>& v_cache, const torch::Tensor& new_slots,
                                  const std::vector<torch::Tensor>& key_slots,
                                  const std::vector<torch::Tensor>& key_lens, const std::vector<torch::Tensor>& cos,
                                  const std::vector<torch::Tensor>& sin, bool logits) {
  check_step(plan, x, k_cache, v_cache, cos, sin);
  const int64_t B = x.size(0), KV = plan.n_kv_head, hd = plan.head_dim;
  const bool int4 = plan.has_int4();
  TORCH_CHECK(B >= 1 && B <= (int4 ? kMaxRows : kPagedMaxRows), "the fused chunk step takes 1 to ",
              int4 ? kMaxRows : kPagedMaxRows, " tokens", int4 ? " with int4 weights" : "", ", got ", B);
  const int64_t L = k_cache[0].size(2);
  for (const auto* caches : {&k_cache, &v_cache})
    for (const auto& c : *caches)
      TORCH_CHECK(c.scalar_type() == torch::kFloat32 && c.is_contiguous() && c.dim() == 4 && c.size(0) == 1 &&
                      c.size(1) == KV && c.size(2) == L && c.size(3) == hd,
                  "KV caches must be contiguous fp32 (1, n_kv_head, max_len, head_dim)");
  TORCH_CHECK(new_slots.dim() == 1 && new_slots.size(0) == B && all_in(new_slots, 0, L - 1),
              "new_slots must be contiguous int64 CPU (B,) slots of the cache");
  TORCH_CHECK(key_slots.size() == cos.size() && key_lens.size() == cos.size(), "one key table per rope kind");
  for (size_t r = 0; r < key_slots.size(); ++r) {
    const auto &table = key_slots[r], &lens = key_lens[r];
    TORCH_CHECK(table.dim() == 2 && table.size(0) == B && all_in(table, 0, L - 1),
                "key_slots must be contiguous int64 CPU (B, W) slots of the cache");
    TORCH_CHECK(lens.dim() == 1 && lens.size(0) == B && all_in(lens, 1, table.size(1)),
                "key_lens must be contiguous int64 CPU (B,) counts in [1, W]");
  }
  Scratch s(plan, B);
  for (size_t li = 0; li < plan.layers.size(); ++li) {  // every token lies in cache row 0
    const Layer& layer = plan.layers[li];
    const auto& table = key_slots[layer.rope];
    const LayerKV kv{k_cache[li].data_ptr<float>(), v_cache[li].data_ptr<float>(), 0, hd, L * hd,
                     new_slots.data_ptr<int64_t>(),
                     {table.data_ptr<int64_t>(), key_lens[layer.rope].data_ptr<int64_t>(), table.size(1), 0, 0}};
    layer_step(plan, layer, x.data_ptr<float>(), B, kv, cos[layer.rope].data_ptr<float>(),
               sin[layer.rope].data_ptr<float>(), s);
  }
  return finish(plan, x, logits, s);
}

void register_decode(py::module_& m) {
  py::class_<Matrix>(m, "Matrix")
      .def_static("f32", &Matrix::f32, py::arg("weight"), py::arg("bias") = py::none())
      .def_static("int4", &Matrix::int4, py::arg("packed"), py::arg("scale"), py::arg("zero"), py::arg("group"),
                  py::arg("bias") = py::none())
      .def_static("gguf", &Matrix::gguf, py::arg("blocks"), py::arg("qtype"), py::arg("k"), py::arg("bias") = py::none())
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
      .def_readwrite("layers", &Plan::layers)
      .def_readwrite("final_norm", &Plan::final_norm).def_readwrite("head", &Plan::head)
      .def_property_readonly("has_head", &Plan::has_head)
      .def_property_readonly("has_int4", &Plan::has_int4);
  m.def("decode_layers", &decode_layers, "every block for one new token per row, over the static KV cache",
        py::arg("plan"), py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot"), py::arg("cos"),
        py::arg("sin"), py::arg("logits") = false);
  m.def("decode_layers_chunk", &decode_layers_chunk, "several tokens of one sequence, over the static KV cache",
        py::arg("plan"), py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("new_slots"),
        py::arg("key_slots"), py::arg("key_lens"), py::arg("cos"), py::arg("sin"), py::arg("logits") = false);
  m.def("decode_layers_paged", &decode_layers_paged, "every block for one new token per row, over the paged KV cache",
        py::arg("plan"), py::arg("x"), py::arg("k_cache"), py::arg("v_cache"), py::arg("new_slots"),
        py::arg("key_slots"), py::arg("key_lens"), py::arg("cos"), py::arg("sin"), py::arg("logits") = false);
}

}  // namespace lmforge
