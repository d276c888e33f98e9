// fp32 matrix products for a few rows of x: y (M, N) = x (M, K) @ W (N, K)^T, W row-major (nn.Linear's).
//
// Two loop shapes, by M. Up to 4 rows the product is bound by reading W: dot products of 4 weight
// rows with each row of x, the 4 rows taken from 4 quarters of the range a thread reads (4 streams
// keep more memory requests in flight than 1), prefetching 8 KB ahead in each into L2. From 5 rows on it
// becomes bound by arithmetic, and dot products waste it on horizontal sums; there the rows of x are transposed once
// per call so that they lie across the lanes of a vector (8 lanes up to 8 rows, 16 per vector
// above), and each weight is broadcast and multiplied into all of them: 8 weight rows at a time
// keep 8 (or 16) accumulators busy with no reductions (docs/benchmarks.md, kernels section).
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lmforge {

constexpr int64_t kRows = 8;       // weight rows per block: the unit the threads split
constexpr int64_t kLaneChunk = 32;  // rows of x per transposed pass (two 16-lane vectors per weight row)
constexpr int64_t kDotRows = 4;    // at most this many rows of x use dot products
constexpr int64_t kSumChunk = 64;  // lane products sum this many columns apart, then add the partial sums:
                                   // one running sum over all of K would round more than a BLAS does
constexpr int64_t kAhead = 8192;   // prefetch distance in floats (32 KB) along the stream of weights
constexpr int64_t kStreamAhead = 2048;  // the same in each of the 4 streams of the dot products (8 KB:
                                        // 1.02-1.07x over 32 KB, which with 4 streams asked for too much at once)

// sum_i a[i] * b[i] (attention scores).
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  total = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// y[i] += p * x[i] (attention's weighted sum of values).
inline void axpy(float p, const float* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#endif
  for (; i < n; ++i) y[i] += p * x[i];
}

// The rows of x as the products read them, prepared once per call and shared by every block.
struct F32Input {
  const float* x = nullptr;
  int64_t rows = 0, k = 0;
  int64_t lanes = 0;      // 0: dot products; 8: one 8-lane vector; 16: 16-lane vectors per chunk of rows
  std::vector<float> xt;  // per chunk of kLaneChunk rows: (k, width) columns of x, zero past the last row

  // Lanes used by chunk c (16 or 32 with 16-lane vectors).
  int64_t width(int64_t c) const {
    if (lanes != 16) return lanes;
    return std::min<int64_t>(rows - c * kLaneChunk, kLaneChunk) > 16 ? 32 : 16;
  }

  void prepare(const float* xp, int64_t m_rows, int64_t width_k) {
    x = xp, rows = m_rows, k = width_k;
#if defined(__AVX512F__)
    lanes = rows <= kDotRows ? 0 : rows <= 8 ? 8 : 16;
#else
    lanes = 0;
#endif
    if (!lanes) return;
    const int64_t chunks = (rows + kLaneChunk - 1) / kLaneChunk;
    xt.assign(chunks * k * (lanes == 8 ? 8 : kLaneChunk), 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t w = width(c), first = c * kLaneChunk, count = std::min(rows - first, kLaneChunk);
      float* t = xt.data() + c * k * kLaneChunk;
      for (int64_t m = 0; m < count; ++m)
        for (int64_t i = 0; i < k; ++i) t[i * w + m] = x[(first + m) * k + i];
    }
  }

  const float* chunk(int64_t c) const { return xt.data() + c * k * kLaneChunk; }
};

#if defined(__AVX512F__)
// Ask for the weights `distance` floats past p into L2: the hardware prefetcher alone leaves the memory bus
// idle part of the time (at 1 row of x a pass over SmolLM2's weights ran ~30 % faster with this).
template <int64_t distance = kAhead>
inline void prefetch_ahead(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + distance), _MM_HINT_T1);
}

// Dot products of J weight rows r[j] (anywhere in memory) with MR rows of x (stride k): y[j][m * y_stride].
// Each row's sum runs in the same order whatever J, so a row's result does not depend on its group.
// With `ahead`, the weights further on are prefetched on the way.
template <int J, int MR>
inline void dot_rows(const float* const* r, int64_t k, const float* x, float* const* y, int64_t y_stride, bool ahead) {
  __m512 acc[MR][J];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) acc[m][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    if (ahead)
      for (int j = 0; j < J; ++j) prefetch_ahead<kStreamAhead>(r[j] + i);
    __m512 w[J];
    for (int j = 0; j < J; ++j) w[j] = _mm512_loadu_ps(r[j] + i);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * k + i);
      for (int j = 0; j < J; ++j) acc[m][j] = _mm512_fmadd_ps(w[j], xv, acc[m][j]);
    }
  }
  if (i < k) {  // tail: masked loads read only the valid columns
    const __mmask16 mask = static_cast<__mmask16>((1u << (k - i)) - 1);
    __m512 w[J];
    for (int j = 0; j < J; ++j) w[j] = _mm512_maskz_loadu_ps(mask, r[j] + i);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + m * k + i);
      for (int j = 0; j < J; ++j) acc[m][j] = _mm512_fmadd_ps(w[j], xv, acc[m][j]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < J; ++j) y[j][m * y_stride] = _mm512_reduce_add_ps(acc[m][j]);
}

// J weight rows times every row of x (up to kDotRows), 4, 2 or 1 rows of x per pass; y (rows, n).
template <int J>
inline void dot_rows_all(const F32Input& in, const float* const* r, float* const* y, int64_t n) {
  float* out[J];
  int64_t m = 0;
  auto pass = [&](auto rows_of_x) {
    constexpr int MR = decltype(rows_of_x)::value;
    for (int j = 0; j < J; ++j) out[j] = y[j] + m * n;
    dot_rows<J, MR>(r, in.k, in.x + m * in.k, out, n, m == 0);
    m += MR;
  };
  while (m + 4 <= in.rows) pass(std::integral_constant<int, 4>{});
  while (m + 2 <= in.rows) pass(std::integral_constant<int, 2>{});
  while (m < in.rows) pass(std::integral_constant<int, 1>{});
}

// kRows weight rows w (stride k) times the transposed rows xt (k, 8) of up to 8 rows of x.
inline void lanes8_block(const float* xt, int64_t k, const float* w, int64_t rows, float* y, int64_t y_stride) {
  __m256 total[kRows];
  for (int r = 0; r < kRows; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t i0 = 0; i0 < k; i0 += kSumChunk) {
    for (int r = 0; r < kRows; ++r)
      for (int64_t i = i0; i < i0 + kSumChunk; i += 16) prefetch_ahead(w + r * k + i);
    __m256 acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t i = i0; i < std::min(k, i0 + kSumChunk); ++i) {
      const __m256 xv = _mm256_loadu_ps(xt + i * 8);
      for (int r = 0; r < kRows; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(w[r * k + i]), xv, acc[r]);
    }
    for (int r = 0; r < kRows; ++r) total[r] = _mm256_add_ps(total[r], acc[r]);
  }
  alignas(32) float lane[8];
  for (int r = 0; r < kRows; ++r) {
    _mm256_store_ps(lane, total[r]);
    for (int64_t m = 0; m < rows; ++m) y[m * y_stride + r] = lane[m];
  }
}

// kRows weight rows w (stride k) times the transposed rows xt (k, 16 V) of up to 16 V rows of x.
template <int V>
inline void lanes16_block(const float* xt, int64_t k, const float* w, int64_t rows, float* y, int64_t y_stride) {
  __m512 total[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < V; ++v) total[r][v] = _mm512_setzero_ps();
  for (int64_t i0 = 0; i0 < k; i0 += kSumChunk) {
    for (int r = 0; r < kRows; ++r)
      for (int64_t i = i0; i < i0 + kSumChunk; i += 16) prefetch_ahead(w + r * k + i);
    __m512 acc[kRows][V];
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    for (int64_t i = i0; i < std::min(k, i0 + kSumChunk); ++i) {
      __m512 xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xt + (i * V + v) * 16);
      for (int r = 0; r < kRows; ++r) {
        const __m512 wb = _mm512_set1_ps(w[r * k + i]);
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(wb, xv[v], acc[r][v]);
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) total[r][v] = _mm512_add_ps(total[r][v], acc[r][v]);
  }
  alignas(64) float lane[16 * V];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < V; ++v) _mm512_store_ps(lane + 16 * v, total[r][v]);
    for (int64_t m = 0; m < rows; ++m) y[m * y_stride + r] = lane[m];
  }
}
#endif

// Weight rows [lo, hi) of y (rows, n) = x @ w^T for input prepared with dot products (lanes == 0): the
// range is cut into 4 quarters read in lockstep, one row of each per pass. Four streams far apart keep
// more memory requests in flight than one: 1.1-1.25x the bandwidth of reading the rows in order over
// SmolLM2's matrices on this 2-core machine (docs/benchmarks.md). The last hi - lo mod 4 rows come after.
inline void linear_f32_streams(const F32Input& in, const float* w, int64_t n, int64_t lo, int64_t hi, float* y) {
  const int64_t quarter = (hi - lo) / 4, k = in.k;
#if defined(__AVX512F__)
  for (int64_t i = 0; i < quarter; ++i) {
    const float* r[4];
    float* out[4];
    for (int s = 0; s < 4; ++s) {
      const int64_t row = lo + s * quarter + i;
      r[s] = w + row * k, out[s] = y + row;
    }
    dot_rows_all<4>(in, r, out, n);
  }
  for (int64_t row = lo + 4 * quarter; row < hi; ++row) {
    const float* r[1] = {w + row * k};
    float* out[1] = {y + row};
    dot_rows_all<1>(in, r, out, n);
  }
#else
  for (int64_t row = lo; row < hi; ++row)
    for (int64_t m = 0; m < in.rows; ++m) y[m * n + row] = dot(w + row * k, in.x + m * k, k);
  (void)quarter;
#endif
}

// Columns [n0, n0 + kRows) of y (rows, n) = x @ w^T (fewer at the end of w) for prepared input `in`.
inline void linear_f32_block(const F32Input& in, const float* w, int64_t n, int64_t n0, float* y) {
  const int64_t count = std::min(kRows, n - n0), k = in.k;
  const float* r = w + n0 * k;
  if (in.lanes == 0) return linear_f32_streams(in, w, n, n0, n0 + count, y);  // beside int4 matrices in apply()
#if defined(__AVX512F__)
  if (count == kRows && in.lanes == 8) return lanes8_block(in.xt.data(), k, r, in.rows, y + n0, n);
  if (count == kRows) {
    for (int64_t c = 0; c * kLaneChunk < in.rows; ++c) {
      const int64_t first = c * kLaneChunk, rows = std::min(in.rows - first, kLaneChunk);
      float* out = y + first * n + n0;
      if (in.width(c) == 32) lanes16_block<2>(in.chunk(c), k, r, rows, out, n);
      else lanes16_block<1>(in.chunk(c), k, r, rows, out, n);
    }
    return;
  }
#endif
  for (int64_t m = 0; m < in.rows; ++m)  // the last rows of a matrix whose height is not a multiple of 8
    for (int64_t j = 0; j < count; ++j) y[m * n + n0 + j] = dot(r + j * k, in.x + m * k, k);
}

// This thread's share [lo, hi) of n rows split evenly over the threads of the enclosing parallel region.
inline std::pair<int64_t, int64_t> thread_share(int64_t n) {
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
  return {n * t / threads, n * (t + 1) / threads};
}

// y (m_rows, n) = x (m_rows, k) @ w (n, k)^T, w row-major fp32.
inline void linear_f32(const float* x, int64_t m_rows, int64_t k, const float* w, int64_t n, float* y) {
  F32Input in;
  in.prepare(x, m_rows, k);
  if (in.lanes == 0) {
#pragma omp parallel num_threads(at::get_num_threads())
    {
      const auto [lo, hi] = thread_share(n);
      linear_f32_streams(in, w, n, lo, hi, y);
    }
    return;
  }
  const int64_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t b = 0; b < blocks; ++b) linear_f32_block(in, w, n, b * kRows, y);
}

}  // namespace lmforge
