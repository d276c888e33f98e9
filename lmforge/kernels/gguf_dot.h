// Products with GGUF's quantized blocks: y (M, N) = x (M, K) @ W^T for 1 to 64 rows of fp32 x, W in its blocks.
//
// Up to 4 rows of x (decode) each 32-weight slice of 4 rows of W is decoded into registers (gguf_blocks.h's
// slice32) and multiplied into every row of x, so the weights are never written out. Q4_1 reads 20 bytes
// per 32 weights where fp32 reads 128; decoding costs about what an fp32 product from cache does (0.15
// TSC ticks per Q4_1 weight against 0.13 on the 2-core Zen 4 here), so from memory, as in a decode step,
// a Q4_1 product takes half the time of fp32 on one thread. From 5 rows on the product is bound by
// arithmetic: 8 rows of W are decoded once into a per-thread buffer and multiplied with f32.h's
// transposed-lanes loops, as an fp32 weight would be. x is never rounded to int8 (llama.cpp's way), so
// results equal x @ dequantize(W)^T to fp32 rounding.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "f32.h"
#include "gguf_blocks.h"

#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")  // as in gguf_blocks.h, so its decoders inline here

namespace lmforge {

constexpr int64_t kGGUFMaxRows = 64;  // rows of x per product (the fused step's batch); more go to a GEMM
constexpr int64_t kGGUFAhead = 2;     // blocks of kRows rows of W prefetched ahead of the one being read

// Ask for the blocks of rows [r0, r0 + count) of W on their way (they are read a block or two later).
inline void prefetch_rows(const uint8_t* blocks, int64_t row_bytes, int64_t r0, int64_t count) {
  const uint8_t* p = blocks + r0 * row_bytes;
  for (int64_t off = 0; off < count * row_bytes; off += 64) __builtin_prefetch(p + off, 0, 2);
}

#if defined(__AVX512F__)
// y[j][m * y_stride] = W row j . x row m for J rows of W (blocks at r[j]) and MR rows of x (stride k),
// each 32-weight slice decoded into registers once and used for all MR rows.
template <int64_t T, int J, int MR>
inline void slice_dots(const uint8_t* const* r, int64_t k, const float* x, float* const* y, int64_t y_stride) {
  constexpr int values = T == kQ4_K || T == kQ6_K ? 256 : 32;
  const int64_t bytes = block_format(T).bytes;
  __m512 acc[MR][J];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / values; ++b)
    for (int s = 0; s < values / 32; ++s) {
      const float* xs = x + b * values + 32 * s;
      for (int j = 0; j < J; ++j) {
        __m512 w[2];
        slice32<T, false>(r[j] + b * bytes, s, w);
        for (int m = 0; m < MR; ++m) {
          acc[m][j] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xs + m * k), acc[m][j]);
          acc[m][j] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xs + m * k + 16), acc[m][j]);
        }
      }
    }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) y[j][m * y_stride] = _mm512_reduce_add_ps(acc[m][j]);
}

// Columns c0 .. c0 + J of y (rows, n) for J rows of W and every row of x (at most 4).
template <int64_t T, int J>
inline void slice_group(const F32Input& in, const uint8_t* blocks, int64_t row_bytes, int64_t n, int64_t c0, float* y) {
  const uint8_t* r[J];
  float* out[J];
  for (int j = 0; j < J; ++j) r[j] = blocks + (c0 + j) * row_bytes, out[j] = y + c0 + j;
  switch (in.rows) {
    case 1: return slice_dots<T, J, 1>(r, in.k, in.x, out, n);
    case 2: return slice_dots<T, J, 2>(r, in.k, in.x, out, n);
    case 3: return slice_dots<T, J, 3>(r, in.k, in.x, out, n);
    default: return slice_dots<T, J, 4>(r, in.k, in.x, out, n);
  }
}

// Columns [lo, hi) of y for at most 4 rows of x: 4 rows of W at a time, the rest one by one.
template <int64_t T>
inline void slice_columns(const F32Input& in, const uint8_t* blocks, int64_t row_bytes, int64_t n, int64_t lo,
                          int64_t hi, float* y) {
  int64_t c = lo;
  for (; c + 4 <= hi; c += 4) slice_group<T, 4>(in, blocks, row_bytes, n, c, y);
  for (; c < hi; ++c) slice_group<T, 1>(in, blocks, row_bytes, n, c, y);
}
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// f32.h's dot_rows with 8-lane vectors: J decoded rows r[j] times MR rows of x, k a multiple of 8.
template <int J, int MR>
inline void dot_rows8(const float* const* r, int64_t k, const float* x, float* const* y, int64_t y_stride) {
  __m256 acc[MR][J];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    __m256 w[J];
    for (int j = 0; j < J; ++j) w[j] = _mm256_loadu_ps(r[j] + i);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * k + i);
      for (int j = 0; j < J; ++j) acc[m][j] = _mm256_fmadd_ps(w[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) y[j][m * y_stride] = hsum8(acc[m][j]);
}
#endif

// y[j][m * y_stride] = r[j] . x[m] for J decoded rows and MR rows of x (stride k).
template <int J, int MR>
inline void decoded_dots(const float* const* r, int64_t k, const float* x, float* const* y, int64_t y_stride) {
#if defined(__AVX512F__)
  dot_rows<J, MR>(r, k, x, y, y_stride, false);
#elif defined(__AVX2__)
  dot_rows8<J, MR>(r, k, x, y, y_stride);
#else
  for (int j = 0; j < J; ++j)
    for (int m = 0; m < MR; ++m) y[j][m * y_stride] = dot(r[j], x + m * k, k);
#endif
}

// J decoded rows w (stride k) times every row of x (rows, k) into columns col .. col + J of y (rows, n).
template <int J>
inline void decoded_times_x(const float* w, const float* x, int64_t rows, int64_t k, float* y, int64_t n, int64_t col) {
  const float* r[J];
  float* out[J];
  for (int j = 0; j < J; ++j) r[j] = w + j * k;
  int64_t m = 0;
  auto pass = [&](auto rows_of_x) {
    constexpr int MR = decltype(rows_of_x)::value;
    for (int j = 0; j < J; ++j) out[j] = y + m * n + col + j;
    decoded_dots<J, MR>(r, k, x + m * k, out, n);
    m += MR;
  };
  while (m + 4 <= rows) pass(std::integral_constant<int, 4>{});
  while (m + 2 <= rows) pass(std::integral_constant<int, 2>{});
  while (m < rows) pass(std::integral_constant<int, 1>{});
}

// Columns [n0, n0 + count) of y (rows, n) from those rows of W decoded into w (count, k): f32.h's
// transposed lanes for a full block of kRows (5 or more rows of x, AVX-512), dot products otherwise.
inline void decoded_block(const F32Input& in, const float* w, int64_t count, int64_t n, int64_t n0, float* y) {
#if defined(__AVX512F__)
  if (count == kRows && in.lanes == 8) return lanes8_block(in.xt.data(), in.k, w, in.rows, y + n0, n);
  if (count == kRows && in.lanes == 16) {
    for (int64_t c = 0; c * kLaneChunk < in.rows; ++c) {
      const int64_t first = c * kLaneChunk, rows = std::min(in.rows - first, kLaneChunk);
      float* out = y + first * n + n0;
      if (in.width(c) == 32) lanes16_block<2>(in.chunk(c), in.k, w, rows, out, n);
      else lanes16_block<1>(in.chunk(c), in.k, w, rows, out, n);
    }
    return;
  }
#endif
  int64_t j = 0;
  for (; j + 4 <= count; j += 4) decoded_times_x<4>(w + j * in.k, in.x, in.rows, in.k, y, n, n0 + j);
  for (; j < count; ++j) decoded_times_x<1>(w + j * in.k, in.x, in.rows, in.k, y, n, n0 + j);
}

// This thread's buffer for kRows decoded rows of k weights (kept between calls).
inline float* gguf_scratch(int64_t k) {
  thread_local std::vector<float> scratch;
  if (int64_t(scratch.size()) < kRows * k) scratch.resize(kRows * k);
  return scratch.data();
}

// Columns [n0, n0 + kRows) of y (rows, n) = x @ W^T (fewer at the end of W), for W's blocks (n rows of
// qtype) and x prepared by F32Input::prepare.
inline void gguf_block(const F32Input& in, const uint8_t* blocks, int64_t qtype, int64_t n, int64_t n0, float* y) {
  const int64_t row_bytes = row_bytes_of(qtype, in.k), count = std::min(kRows, n - n0);
  const int64_t ahead = n0 + kGGUFAhead * kRows;
  if (ahead < n) prefetch_rows(blocks, row_bytes, ahead, std::min(kRows, n - ahead));
#if defined(__AVX512F__)
  if (in.lanes == 0) {
    switch (qtype) {
      case kQ4_0: return slice_columns<kQ4_0>(in, blocks, row_bytes, n, n0, n0 + count, y);
      case kQ4_1: return slice_columns<kQ4_1>(in, blocks, row_bytes, n, n0, n0 + count, y);
      case kQ5_0: return slice_columns<kQ5_0>(in, blocks, row_bytes, n, n0, n0 + count, y);
      case kQ8_0: return slice_columns<kQ8_0>(in, blocks, row_bytes, n, n0, n0 + count, y);
      case kQ4_K: return slice_columns<kQ4_K>(in, blocks, row_bytes, n, n0, n0 + count, y);
      case kQ6_K: return slice_columns<kQ6_K>(in, blocks, row_bytes, n, n0, n0 + count, y);
      default: return;  // callers check the type first (gguf_blocks.cpp, decode.cpp)
    }
  }
#endif
  float* w = gguf_scratch(in.k);
  decode_rows(blocks, qtype, in.k, row_bytes, n0, count, w);
  decoded_block(in, w, count, n, n0, y);
}

// y (rows, n) = x (rows, k) @ W^T for W's blocks (n rows of qtype), blocks of kRows rows of W split over
// the threads in order, so that each thread reads one stream.
inline void gguf_linear(const float* x, int64_t rows, int64_t k, const uint8_t* blocks, int64_t qtype, int64_t n,
                        float* y) {
  F32Input in;
  in.prepare(x, rows, k);
  const int64_t count = (n + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < count; ++b) gguf_block(in, blocks, qtype, n, b * kRows, y);
}

}  // namespace lmforge
#pragma GCC pop_options
