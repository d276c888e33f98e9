// Decode attention over a KV cache: each new query row attends to the keys its cache slots list.
//
// Split-K (flash-decoding): a row's keys are cut into parts so that both threads have work even
// at batch 1 with 3 KV heads, and each (row, KV head, part) is one pass of online softmax for all
// the query heads that share the KV head, reading each key and value once. The parts' (max, sum,
// weighted values) are merged per head at the end. Scores, exps and sums run 16 keys at a time.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "f32.h"
#include "vecmath.h"

namespace lmforge {

// The cache slots a layer attends to for each row: a padded slot table per row (the paged cache),
// or one run of consecutive slots shared by every row (the static cache).
struct KeySlots {
  const int64_t* table = nullptr;  // (B, width) row-major, or null: slots first, first + 1, ...
  const int64_t* lens = nullptr;   // (B,) valid keys of each row, or null: `count` for every row
  int64_t width = 0, first = 0, count = 0;

  int64_t slot(int64_t b, int64_t t) const { return table ? table[b * width + t] : first + t; }
  int64_t len(int64_t b) const { return lens ? lens[b] : count; }
};

// One layer's keys and values as the step addresses them: the key of (row b, head group g) at
// cache slot s starts at k + b * row_stride + s * slot_stride + g * head_stride (values alike in v).
struct LayerKV {
  float *k, *v;
  int64_t row_stride, slot_stride, head_stride;
  const int64_t* new_slots;  // (B,) the slot each row's new key and value go to
  KeySlots keys;

  int64_t at(int64_t b, int64_t s, int64_t g) const { return b * row_stride + s * slot_stride + g * head_stride; }
};

// The shape of one attention call: B rows of H query heads over G KV heads of width hd.
struct AttentionShape {
  int64_t B, H, G, hd;
  float scale;
};

constexpr int64_t kKeyBlock = 16;      // keys scored and exponentiated together
constexpr int64_t kMinPartKeys = 64;   // a part has at least this many keys (else the merge costs more)

#if defined(__AVX512F__)
// The lane sums of 16 vectors as one vector: lane j of the result is the sum of the lanes of v[j].
inline __m512 sum_lanes16(const __m512* v) {
  __m512 quads[4];  // 128-bit lane L of quads[i] holds the sums over lane L of v[4i .. 4i + 3]
  for (int i = 0; i < 4; ++i) {
    const __m512* w = v + 4 * i;
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    quads[i] = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE));
  }
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88),
                                   _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88),
                                   _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xDD));
}
#endif

// scores[j] = q . keys[j] * scale for `count` (<= 16) keys of width hd: 16 independent dot products
// reduced together (one horizontal sum per key cost more than the products).
inline void score_block(const float* q, const float* const* keys, int64_t count, int64_t hd, float scale,
                        float* scores) {
#if defined(__AVX512F__)
  if (hd % 16 == 0) {
    const float* rows[kKeyBlock];  // past `count`, repeat the first key (its extra scores are not read)
    for (int64_t j = 0; j < kKeyBlock; ++j) rows[j] = keys[j < count ? j : 0];
    __m512 acc[kKeyBlock];
#pragma GCC unroll 16
    for (int64_t j = 0; j < kKeyBlock; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < hd; i += 16) {  // the 16 sums stay in registers: 16 independent chains
      const __m512 qv = _mm512_loadu_ps(q + i);
#pragma GCC unroll 16
      for (int64_t j = 0; j < kKeyBlock; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows[j] + i), acc[j]);
    }
    _mm512_storeu_ps(scores, _mm512_mul_ps(sum_lanes16(acc), _mm512_set1_ps(scale)));
    return;
  }
#endif
  for (int64_t j = 0; j < count; ++j) scores[j] = dot(q, keys[j], hd) * scale;
}

// o += sum_j p[j] * values[j] over `count` value rows of width hd, summed in registers 64 columns at a
// time (adding each row into o in memory made every row wait for the store of the one before).
inline void add_weighted(const float* const* values, int64_t count, const float* p, float* o, int64_t hd) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 64 <= hd; i += 64) {
    __m512 acc[4];
    for (int c = 0; c < 4; ++c) acc[c] = _mm512_loadu_ps(o + i + 16 * c);
    for (int64_t j = 0; j < count; ++j) {
      const __m512 w = _mm512_set1_ps(p[j]);
      for (int c = 0; c < 4; ++c) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(values[j] + i + 16 * c), acc[c]);
    }
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(o + i + 16 * c, acc[c]);
  }
  for (; i + 16 <= hd; i += 16) {
    __m512 acc = _mm512_loadu_ps(o + i);
    for (int64_t j = 0; j < count; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(values[j] + i), acc);
    _mm512_storeu_ps(o + i, acc);
  }
#endif
  for (; i < hd; ++i)
    for (int64_t j = 0; j < count; ++j) o[i] += p[j] * values[j][i];
}

// Online softmax of the queries q (Q, hd) of one KV head over keys [t0, t1) of row b: running max
// m (Q), sum l (Q) and unnormalized output o (Q, hd).
inline void attend_part(const AttentionShape& a, const LayerKV& kv, int64_t b, int64_t g, int64_t t0, int64_t t1,
                        const float* q, float* m, float* l, float* o) {
  const int64_t Q = a.H / a.G, hd = a.hd;
  std::fill_n(m, Q, -INFINITY);
  std::fill_n(l, Q, 0.f);
  std::fill_n(o, Q * hd, 0.f);
  alignas(64) float p[kKeyBlock];
  std::vector<float> scores(Q * kKeyBlock);
  for (int64_t t = t0; t < t1; t += kKeyBlock) {
    const int64_t count = std::min(kKeyBlock, t1 - t);
    const float* keys[kKeyBlock];
    for (int64_t j = 0; j < count; ++j) keys[j] = kv.k + kv.at(b, kv.keys.slot(b, t + j), g);
    for (int64_t h = 0; h < Q; ++h) score_block(q + h * hd, keys, count, hd, a.scale, scores.data() + h * kKeyBlock);
    for (int64_t h = 0; h < Q; ++h) {
      const float* sc = scores.data() + h * kKeyBlock;
      const float top = std::max(m[h], *std::max_element(sc, sc + count));
      const float keep = std::exp(m[h] - top);  // rescales what the earlier keys contributed
      float total = 0.f;
#if defined(__AVX512F__)
      const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(valid, sc), _mm512_set1_ps(top)));
      _mm512_store_ps(p, _mm512_maskz_mov_ps(valid, e));
      total = _mm512_reduce_add_ps(_mm512_load_ps(p));
#else
      for (int64_t j = 0; j < count; ++j) total += (p[j] = std::exp(sc[j] - top));
#endif
      l[h] = l[h] * keep + total;
      m[h] = top;
      float* oh = o + h * hd;
      if (keep != 1.f)
        for (int64_t i = 0; i < hd; ++i) oh[i] *= keep;
      std::copy_n(p, count, scores.data() + h * kKeyBlock);  // the weights replace the scores
    }
    const float* values[kKeyBlock];
    for (int64_t j = 0; j < count; ++j) values[j] = kv.v + kv.at(b, kv.keys.slot(b, t + j), g);
    for (int64_t h = 0; h < Q; ++h) add_weighted(values, count, scores.data() + h * kKeyBlock, o + h * hd, hd);
  }
}

// How many parts each row's keys are cut into for `pairs` (row, KV head) pairs: the fewest that give
// every thread the same number of items (each part costs a pass setup and a merge; 2 parts for SmolLM2's
// 3 KV heads at batch 1 ran 1.14-1.35x faster than 5), else ~8 items per thread; never under 64 keys a part.
inline int64_t part_count(int64_t pairs, int64_t threads, int64_t longest) {
  const int64_t most = std::max<int64_t>(1, longest / kMinPartKeys);
  for (int64_t parts = 1; parts <= most; ++parts)
    if (pairs * parts % threads == 0) return parts;
  return std::min(most, (8 * threads + pairs - 1) / pairs);
}

// softmax(q k^T * scale) v for every (row, head) of q (B, H, hd) into out (B, H, hd), over the keys kv lists.
inline void attend(const AttentionShape& a, const LayerKV& kv, const float* q, float* out) {
  const int64_t Q = a.H / a.G, hd = a.hd, threads = at::get_num_threads();
  int64_t longest = 1;
  for (int64_t b = 0; b < a.B; ++b) longest = std::max(longest, kv.keys.len(b));
  const int64_t parts = part_count(a.B * a.G, threads, longest);
  const int64_t items = a.B * a.G * parts;
  std::vector<float> m(items * Q), l(items * Q), o(items * Q * hd);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < items; ++item) {  // item = (b * G + g) * parts + part
      const int64_t bg = item / parts, part = item % parts, b = bg / a.G, g = bg % a.G, n = kv.keys.len(b);
      attend_part(a, kv, b, g, n * part / parts, n * (part + 1) / parts, q + (b * a.H + g * Q) * hd, &m[item * Q],
                  &l[item * Q], &o[item * Q * hd]);
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < a.B * a.H; ++bh) {  // merge the parts of (row, head)
      const int64_t b = bh / a.H, g = (bh % a.H) / Q, h = bh % Q, first = (b * a.G + g) * parts;
      float top = -INFINITY, total = 0.f;
      for (int64_t p = 0; p < parts; ++p) top = std::max(top, m[(first + p) * Q + h]);
      float* dst = out + bh * hd;
      std::fill_n(dst, hd, 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = (first + p) * Q + h;
        if (l[i] == 0.f) continue;  // an empty part (fewer keys than parts)
        const float w = std::exp(m[i] - top);
        total += l[i] * w;
        axpy(w, &o[i * hd], dst, hd);
      }
      for (int64_t i = 0; i < hd; ++i) dst[i] /= total;
    }
  }
}

}  // namespace lmforge
