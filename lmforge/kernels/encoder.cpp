// Fused CPU kernels for BERT-style encoder inference on packed tokens (no padding rows).
//
// The linear layers run without bias, as MKL GEMMs (torch.mm) or, on CPUs with AMX, as bf16x3 products
// on the tile unit (encoder_gemm.h); what torch would do around them in separate memory passes is
// fused here: the bias and exact GELU of the MLP's wide activation in one pass (or inside the split
// for the AMX down projection), bias + residual + LayerNorm in one pass per row, and attention over
// variable-length sequences (cu_seqlens, as FlashAttention's varlen API; encoder_attention.h) reading
// q/k/v straight from the fused QKV product with its bias, so no padding is ever computed and no mask
// is built.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "encoder_attention.h"
#include "encoder_gemm.h"
#include "vecmath.h"

namespace lmforge {
namespace {

#if defined(__AVX512F__)
// erf(x) by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the formula torch's vectorized erf uses,
// so GELU here rounds as torch's does: erf = sign(x) (1 - t (p1 + t (p2 + ...)) e^(-x^2)), t = 1 / (1 + p|x|).
inline __m512 erf16(__m512 x) {
  const __m512 sign = _mm512_and_ps(x, _mm512_set1_ps(-0.f));
  const __m512 a = _mm512_abs_ps(x);
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, _mm512_set1_ps(1.f)));
  __m512 r = _mm512_set1_ps(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(c));
  const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
  const __m512 y = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, _mm512_set1_ps(1.f));
  return _mm512_or_ps(y, sign);
}

// exact GELU: 0.5 x (1 + erf(x / sqrt 2))
inline __m512 gelu16(__m512 x) {
  const __m512 e = erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
#endif

inline float gelu1(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

// gelu(v + bias) on 16 lanes or one value at column j: what the MLP's down projection reads.
struct BiasGelu {
  const float* bias;
#if defined(__AVX512F__)
  __m512 operator()(__m512 v, int64_t j) const { return gelu16(_mm512_add_ps(v, _mm512_loadu_ps(bias + j))); }
#endif
  float operator()(float v, int64_t j) const { return gelu1(v + bias[j]); }
};

// sum of x[0..n) in 16 lane sums, then across lanes (a float reduction the compiler will not vectorize).
inline float sum(const float* x, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(x + i));
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += x[i];
  return total;
}

// sum of (x[i] - mean)^2, LayerNorm's variance times n (two passes over a row in L1, as torch does).
inline float centered_squares(const float* x, int64_t n, float mean) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  const __m512 m = _mm512_set1_ps(mean);
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 d = _mm512_sub_ps(_mm512_loadu_ps(x + i), m);
    acc = _mm512_fmadd_ps(d, d, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += (x[i] - mean) * (x[i] - mean);
  return total;
}

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.dim() == 2,
              name, " must be a contiguous 2-D float32 CPU tensor");
}

void check_vector(const torch::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous() && t.numel() == n,
              name, " must be a contiguous float32 CPU vector of ", n);
}

// h = gelu(h + b) in place, exact (erf) GELU: 0.5 x (1 + erf(x / sqrt 2)).
void bias_gelu_(torch::Tensor h, const torch::Tensor& b) {
  check_rows(h, "h");
  const int64_t n = h.size(1);
  check_vector(b, n, "bias");
  float* hp = h.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  at::parallel_for(0, h.size(0), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* row = hp + r * n;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(row + i, gelu16(_mm512_add_ps(_mm512_loadu_ps(row + i), _mm512_loadu_ps(bp + i))));
#endif
      for (; i < n; ++i) row[i] = gelu1(row[i] + bp[i]);
    }
  });
}

// x = LayerNorm(x + y + b) * w + beta, row by row, in place (the post-norm residual of a BERT block).
void add_layernorm_(torch::Tensor x, const torch::Tensor& y, const torch::Tensor& b, const torch::Tensor& w,
                    const torch::Tensor& beta, double eps) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y must have the same shape");
  const int64_t n = x.size(1);
  check_vector(b, n, "bias");
  check_vector(w, n, "weight");
  check_vector(beta, n, "norm bias");
  float* xp = x.data_ptr<float>();
  const float *yp = y.data_ptr<float>(), *bp = b.data_ptr<float>(), *wp = w.data_ptr<float>(), *betap = beta.data_ptr<float>();
  at::parallel_for(0, x.size(0), 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* row = xp + r * n;
      const float* other = yp + r * n;
      for (int64_t i = 0; i < n; ++i) row[i] += other[i] + bp[i];
      const float mean = sum(row, n) / n;
      const float rstd = 1.f / std::sqrt(centered_squares(row, n, mean) / n + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) row[i] = (row[i] - mean) * rstd * wp[i] + betap[i];
    }
  });
}

// Bidirectional attention of packed sequences: qkv (N, 3 D) = x @ [Wq; Wk; Wv]^T without bias, bias (3 D),
// cu_seqlens (B + 1) row offsets of each sequence; returns (N, D), heads side by side.
torch::Tensor varlen_attention(const torch::Tensor& qkv, const torch::Tensor& bias, const torch::Tensor& cu_seqlens,
                               int64_t n_head, double scale) {
  check_rows(qkv, "qkv");
  const int64_t width = qkv.size(1), d_model = width / 3;
  TORCH_CHECK(width % 3 == 0 && d_model % n_head == 0, "qkv width ", width, " is not 3 * n_head * head_dim");
  check_vector(bias, width, "qkv bias");
  TORCH_CHECK(cu_seqlens.scalar_type() == torch::kInt64 && cu_seqlens.is_contiguous() && cu_seqlens.dim() == 1 &&
                  cu_seqlens.numel() >= 1, "cu_seqlens must be a contiguous int64 vector (B + 1)");
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  const int64_t batch = cu_seqlens.numel() - 1, hd = d_model / n_head;
  TORCH_CHECK(cu[0] == 0 && cu[batch] == qkv.size(0), "cu_seqlens must run from 0 to the ", qkv.size(0), " rows");
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(cu[b + 1] > cu[b], "sequence ", b, " is empty");
  auto out = torch::empty({qkv.size(0), d_model}, qkv.options());
  const float *qp = qkv.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, batch * n_head, 1, [&](int64_t lo, int64_t hi) {
    HeadScratch scratch;
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t b = unit / n_head, q_off = unit % n_head * hd;
      const HeadView view{qp, bp, width, cu[b], cu[b + 1] - cu[b], q_off, d_model + q_off, 2 * d_model + q_off, hd};
      attend_head(view, sc, scratch, op, d_model);
    }
  });
  return out;
}

// W (N, K) fp32 -> its bf16x3 tiles for linear_bf16x3 (N and K multiples of 32).
torch::Tensor pack_bf16x3(const torch::Tensor& w) {
  check_rows(w, "weight");
  const int64_t n = w.size(0), k = w.size(1);
  TORCH_CHECK(amx_available(), "this CPU (or kernel) offers no AMX-BF16 tiles; use torch.mm");
  TORCH_CHECK(n % 32 == 0 && k % 32 == 0, "weight ", n, "x", k, ": both sides must be multiples of 32");
  auto out = torch::empty({n / 16, 3 * k / 32, 16, 32}, torch::kInt16);
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  pack_weight_bf16x3(w.data_ptr<float>(), n, k, reinterpret_cast<uint16_t*>(out.data_ptr<int16_t>()));
#endif
  return out;
}

// y (M, N) = f(x) (M, K) @ W^T on AMX, W packed by pack_bf16x3, f applied while x is split into bf16 pairs.
template <class F>
torch::Tensor run_bf16x3(const torch::Tensor& x, const torch::Tensor& packed, int64_t n, F f) {
  check_rows(x, "x");
  const int64_t m = x.size(0), k = x.size(1), mp = (m + 31) / 32 * 32;
  TORCH_CHECK(amx_available(), "this CPU (or kernel) offers no AMX-BF16 tiles; use torch.mm");
  TORCH_CHECK(packed.scalar_type() == torch::kInt16 && packed.is_contiguous() && packed.dim() == 4 &&
                  packed.size(0) * 16 == n && packed.size(1) * 32 == 3 * k,
              "packed weight does not match x's ", k, " features and ", n, " outputs; pack it with pack_bf16x3");
  auto y = torch::empty({mp, n}, x.options());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
  auto a = torch::empty({mp, split_stride(k)}, torch::kInt16);
  auto* ap = reinterpret_cast<uint16_t*>(a.data_ptr<int16_t>());
  split_rows(x.data_ptr<float>(), m, k, mp, ap, f);
  gemm_bf16x3(ap, mp, k, reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>()), n, y.data_ptr<float>());
#endif
  return y.narrow(0, 0, m);
}

// y = x @ W^T in fp32 as three bf16 products on AMX.
torch::Tensor linear_bf16x3(const torch::Tensor& x, const torch::Tensor& packed, int64_t n) {
  return run_bf16x3(x, packed, n, Identity{});
}

// y = gelu(h + bias) @ W^T: the MLP's activation computed while h is split, so it is never written back.
torch::Tensor gelu_linear_bf16x3(const torch::Tensor& h, const torch::Tensor& bias, const torch::Tensor& packed,
                                 int64_t n) {
  check_vector(bias, h.size(1), "bias");
  return run_bf16x3(h, packed, n, BiasGelu{bias.data_ptr<float>()});
}

}  // namespace
}  // namespace lmforge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bias_gelu_", &lmforge::bias_gelu_, "h = gelu(h + b) in place (exact erf GELU)");
  m.def("add_layernorm_", &lmforge::add_layernorm_, "x = LayerNorm(x + y + b) in place, row by row");
  m.def("varlen_attention", &lmforge::varlen_attention, "bidirectional attention over packed sequences");
  m.def("amx_available", &lmforge::amx_available, "whether AMX-BF16 tiles can run here");
  m.def("pack_bf16x3", &lmforge::pack_bf16x3, "a linear weight as bf16x3 tiles for linear_bf16x3");
  m.def("linear_bf16x3", &lmforge::linear_bf16x3, "x @ W^T in fp32 as three bf16 products on AMX");
  m.def("gelu_linear_bf16x3", &lmforge::gelu_linear_bf16x3, "gelu(h + bias) @ W^T, the GELU fused into the split");
}
