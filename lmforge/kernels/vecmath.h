// exp and the MLP activations, 16 lanes at a time: scalar std::exp took ~1 ms of a 20 ms SmolLM2
// decode step in the softmax and the SiLU (docs/benchmarks.md), the vector form a few percent of that.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lmforge {

#if defined(__AVX512F__)
// e^x to ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 Taylor polynomial for e^r, scaled by 2^n.
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));  // past these: 0 and inf
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 in two parts (Cody-Waite)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}
#endif

// SiLU(g) = g / (1 + e^-g), or tanh-approximated GELU, of g[i], times u[i], into g (the gated MLP's product).
inline void gated_activation(float* g, const float* u, int64_t n, bool geglu) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(g + i);
    __m512 a;
    if (!geglu) {
      a = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
    } else {  // 0.5 x (1 + tanh(z)) = x - x / (e^(2z) + 1), z = sqrt(2 / pi) (x + 0.044715 x^3)
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 z2 = _mm512_mul_ps(_mm512_set1_ps(2 * 0.7978845608028654f),
                                      _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
      a = _mm512_sub_ps(x, _mm512_div_ps(x, _mm512_add_ps(exp16(z2), one)));
    }
    _mm512_storeu_ps(g + i, _mm512_mul_ps(a, _mm512_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) {
    const float x = g[i];
    float a;
    if (!geglu) {
      a = x / (1.f + std::exp(-x));
    } else {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      a = 0.5f * x * (1.f + std::tanh(c * (x + 0.044715f * x * x * x)));
    }
    g[i] = a * u[i];
  }
}

}  // namespace lmforge
