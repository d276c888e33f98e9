// Decode-time int4 matrix products for the CPU: y (M, N) = x (M, K) @ dequant(W)^T for a few rows of x.
//
// At batch 1 a decode step is a chain of matrix-vector products whose cost is reading the weights
// once. BLAS libraries tune for large matrices; these loops stream each row of 4-bit codes once for
// all M rows of x and split the output rows across OpenMP threads, which keeps the memory bus busy.
// With AVX-512 the inner loops are intrinsics; without it they are plain loops the compiler
// vectorizes as it can. Raw pointers, row-major: gemv.cpp and decode.cpp share them, with the fp32
// products of f32.h.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "f32.h"

namespace lmforge {

constexpr int64_t kBlock = 32;    // int4: columns per packed block of 16 bytes
constexpr int64_t kMaxRows = 8;   // int4: rows of x per call (the Python side routes more to a GEMM)

// One output row of the int4 product for M rows of x (M a compile-time constant, so the
// accumulators stay in registers). Per group, sum_k w x = scale * sum_k q x + (zero - 8 * scale) *
// sum_k x: the codes are used as they are, and the group sums of x come precomputed in xs.
// Byte j of each 32-column block holds column j (low nibble) and column j + 16 (high nibble).
template <int M>
inline void int4_row(const uint8_t* codes, const float* scale, const float* zero, const float* x, const float* xs,
                     int64_t k, int64_t group, int64_t g_count, float* y, int64_t y_stride) {
  float offset[M] = {};
#if defined(__AVX512F__)
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  const __m128i low_bits = _mm_set1_epi8(15);
  for (int64_t g = 0; g < g_count; ++g) {
    __m512 acc_low[M], acc_high[M];  // two chains per row of x, so the FMAs overlap
    for (int m = 0; m < M; ++m) acc_low[m] = acc_high[m] = _mm512_setzero_ps();
    for (int64_t i = g * group; i < std::min(k, (g + 1) * group); i += kBlock) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2));
      const __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low_bits)));
      const __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits)));
      for (int m = 0; m < M; ++m) {
        acc_low[m] = _mm512_fmadd_ps(low, _mm512_loadu_ps(x + m * k + i), acc_low[m]);
        acc_high[m] = _mm512_fmadd_ps(high, _mm512_loadu_ps(x + m * k + i + 16), acc_high[m]);
      }
    }
    const __m512 s = _mm512_set1_ps(scale[g]);
    for (int m = 0; m < M; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc_low[m], acc_high[m]), s, total[m]);
      offset[m] += (zero[g] - 8.f * scale[g]) * xs[m * g_count + g];
    }
  }
  for (int m = 0; m < M; ++m) y[m * y_stride] = _mm512_reduce_add_ps(total[m]) + offset[m];
#else
  float total[M] = {};
  for (int64_t g = 0; g < g_count; ++g) {
    float acc[M] = {};
    for (int64_t i = g * group; i < std::min(k, (g + 1) * group); i += kBlock)
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        const uint8_t byte = codes[i / 2 + j];
        for (int m = 0; m < M; ++m)
          acc[m] += float(byte & 15) * x[m * k + i + j] + float(byte >> 4) * x[m * k + i + 16 + j];
      }
    for (int m = 0; m < M; ++m) {
      total[m] += scale[g] * acc[m];
      offset[m] += (zero[g] - 8.f * scale[g]) * xs[m * g_count + g];
    }
  }
  for (int m = 0; m < M; ++m) y[m * y_stride] = total[m] + offset[m];
#endif
}

// Group sums of x (m_rows, k) into xs (m_rows, ceil(k / group)), the int4 zero-point term.
inline void group_sums(const float* x, int64_t m_rows, int64_t k, int64_t group, float* xs) {
  const int64_t g_count = (k + group - 1) / group;
  std::fill(xs, xs + m_rows * g_count, 0.f);
  for (int64_t m = 0; m < m_rows; ++m)
    for (int64_t i = 0; i < k; ++i) xs[m * g_count + i / group] += x[m * k + i];
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define LMFORGE_INT4_VNNI 1
#endif
constexpr int64_t kStep = 4 * kBlock;  // VNNI: columns per 64-byte load of codes

// Group sizes whose boundaries fall on 128-column steps or split them evenly (32, 64, 128, 256, ...).
inline bool int4_group_ok(int64_t group) {
  return group % kBlock == 0 && (4 % (group / kBlock) == 0 || (group / kBlock) % 4 == 0);
}

// The input rows of an int4 product, prepared once per call. With VNNI they are also quantized to
// int8 per 32 columns (llama.cpp's Q8_0 activations), so each 64-byte load of codes (128 weights)
// meets them in two VPDPBUSD instructions: a quarter of the work of unpacking codes to floats.
struct Int4Input {
  const float* x = nullptr;
  int64_t rows = 0, k = 0, group = 0, g_count = 0, steps = 0;
  std::vector<float> sums;        // group sums of the inputs as the codes meet them, for the zero-point term
  std::vector<int8_t> low, high;  // VNNI, per step: the 4 x 16 inputs the low / high nibbles meet
  std::vector<float> dscale;      // VNNI, per step and lane: the int8 scale of the 32 columns it sums

  void prepare(const float* xp, int64_t m_rows, int64_t width, int64_t grp) {
    x = xp, rows = m_rows, k = width, group = grp, g_count = (k + group - 1) / group, steps = (k + kStep - 1) / kStep;
    sums.resize(rows * g_count);
    group_sums(x, rows, k, group, sums.data());
#if defined(LMFORGE_INT4_VNNI)
    low.assign(rows * steps * 64, 0), high.assign(rows * steps * 64, 0), dscale.assign(rows * steps * 16, 0.f);
    std::vector<float> unit_sums(k / kBlock);
    for (int64_t m = 0; m < rows; ++m) {
      for (int64_t u = 0; u < k / kBlock; ++u) {  // unit u: columns [32u, 32u + 32)
        const float* v = x + m * k + u * kBlock;
        float top = 0.f;
        for (int64_t i = 0; i < kBlock; ++i) top = std::max(top, std::fabs(v[i]));
        const float d = top / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int8_t* lo = low.data() + m * steps * 64 + u * 16;
        int8_t* hi = high.data() + m * steps * 64 + u * 16;
        int32_t rounded_sum = 0;
        for (int64_t i = 0; i < 16; ++i) {
          lo[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
          hi[i] = static_cast<int8_t>(std::nearbyint(v[i + 16] * inv));
          rounded_sum += lo[i] + hi[i];
        }
        std::fill_n(dscale.data() + m * steps * 16 + u * 4, 4, d);  // unit u fills 4 lanes of its step
        // the zero-point term must see the same rounded inputs: with exact sums, the rounding error
        // times the codes' mean (7.5) would shift every output of this row the same way
        unit_sums[u] = d * static_cast<float>(rounded_sum);
      }
      std::fill_n(sums.data() + m * g_count, g_count, 0.f);
      for (int64_t u = 0; u < k / kBlock; ++u) sums[m * g_count + u * kBlock / group] += unit_sums[u];
    }
#endif
  }

  float offset(const float* scale, const float* zero, int64_t m) const {
    float total = 0.f;
    for (int64_t g = 0; g < g_count; ++g) total += (zero[g] - 8.f * scale[g]) * sums[m * g_count + g];
    return total;
  }
};

#if defined(LMFORGE_INT4_VNNI)
// One output row for M rows of input: per step, int32 dot products of the codes with the int8
// inputs, scaled per lane by (the weight scale of the lane's group) x (the input's int8 scale).
template <int M>
inline void int4_row_vnni(const uint8_t* codes, const float* scale, const float* zero, const Int4Input& in,
                          float* y, int64_t y_stride) {
  const int64_t units = in.k / kBlock, per_group = in.group / kBlock;
  alignas(64) int32_t lane_group[16];  // which of the step's scales each lane uses
  for (int j = 0; j < 16; ++j) lane_group[j] = static_cast<int32_t>((j / 4) / per_group);
  const __m512i lane_index = _mm512_load_si512(lane_group);
  const __m512i nibble = _mm512_set1_epi8(15);
  __m512 total[M];
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t t = 0; t < in.steps; ++t) {
    const int64_t left = std::min<int64_t>(4, units - 4 * t);  // units in this step (a tail has fewer)
    const __mmask64 bytes = left == 4 ? ~__mmask64(0) : ((__mmask64(1) << (16 * left)) - 1);
    const __m512i packed = _mm512_maskz_loadu_epi8(bytes, codes + t * 64);
    const __m512i low = _mm512_and_si512(packed, nibble);
    const __m512i high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
    const int64_t groups = (left + per_group - 1) / per_group;
    const __m512 ws = _mm512_permutexvar_ps(
        lane_index, _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << groups) - 1), scale + (4 * t) / per_group));
    for (int m = 0; m < M; ++m) {
      const int64_t at = (m * in.steps + t) * 64;
      __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), low, _mm512_loadu_si512(in.low.data() + at));
      dot = _mm512_dpbusd_epi32(dot, high, _mm512_loadu_si512(in.high.data() + at));
      const __m512 d = _mm512_loadu_ps(in.dscale.data() + (m * in.steps + t) * 16);
      total[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, d), total[m]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * y_stride] = _mm512_reduce_add_ps(total[m]) + in.offset(scale, zero, m);
}
#endif

template <int M>
inline void int4_row_m(const uint8_t* codes, const float* scale, const float* zero, const Int4Input& in, float* y,
                       int64_t y_stride) {
#if defined(LMFORGE_INT4_VNNI)
  int4_row_vnni<M>(codes, scale, zero, in, y, y_stride);
#else
  int4_row<M>(codes, scale, zero, in.x, in.sums.data(), in.k, in.group, in.g_count, y, y_stride);
#endif
}

// One output row (codes, scale and zero of that row) for every prepared input row.
inline void int4_row_any(const uint8_t* codes, const float* scale, const float* zero, const Int4Input& in, float* y,
                         int64_t y_stride) {
  switch (in.rows) {
    case 1: int4_row_m<1>(codes, scale, zero, in, y, y_stride); break;
    case 2: int4_row_m<2>(codes, scale, zero, in, y, y_stride); break;
    case 3: int4_row_m<3>(codes, scale, zero, in, y, y_stride); break;
    case 4: int4_row_m<4>(codes, scale, zero, in, y, y_stride); break;
    case 5: int4_row_m<5>(codes, scale, zero, in, y, y_stride); break;
    case 6: int4_row_m<6>(codes, scale, zero, in, y, y_stride); break;
    case 7: int4_row_m<7>(codes, scale, zero, in, y, y_stride); break;
    default: int4_row_m<8>(codes, scale, zero, in, y, y_stride); break;
  }
}

// y (rows, n) = x @ w^T, w = (q - 8) * scale + zero per (row, group of `group` columns; the last
// group may be narrower), for input prepared by Int4Input::prepare.
inline void int4_linear(const Int4Input& in, const uint8_t* q, const float* scale, const float* zero, int64_t n,
                        float* y) {
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t row = 0; row < n; ++row)
    int4_row_any(q + row * (in.k / 2), scale + row * in.g_count, zero + row * in.g_count, in, y + row, n);
}

}  // namespace lmforge
