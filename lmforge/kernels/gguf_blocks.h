// GGUF's quantized blocks (ggml's layouts) decoded to fp32: whole rows (dequantize, and the products of
// gguf_dot.h at more than 4 rows of x), or 32 weights at a time into AVX-512 registers (the products
// at up to 4 rows, which never write the weights out).
//
// A row of W is K / values blocks of `bytes` bytes (BlockFormat). Decoding computes each weight as the
// gguf library's numpy reference does, a * q and then + b with no fused multiply-add, so dequantized
// rows equal its values bit for bit (tests/kernels/test_gguf_blocks.py). Three paths: AVX-512 (code
// tables and vpermps for the 4- and 5-bit types), AVX2 (codes widened and scaled 16 at a time), and
// plain loops for any other CPU.
#pragma once

#include <ATen/Parallel.h>
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace lmforge {

// ggml's type ids (enum ggml_type in ggml.h) of the block types with kernels here.
enum GGUFType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14 };
constexpr int64_t kGGUFTypes[] = {kQ4_0, kQ4_1, kQ5_0, kQ8_0, kQ4_K, kQ6_K};

// Weights per block and bytes per block (ggml's block_q4_0 ... block_q6_K); {0, 0} for other types.
struct BlockFormat {
  int64_t values = 0, bytes = 0;
};

inline BlockFormat block_format(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return {32, 18};   // fp16 d, 16 bytes of nibbles
    case kQ4_1: return {32, 20};   // fp16 d, fp16 m, 16 bytes of nibbles
    case kQ5_0: return {32, 22};   // fp16 d, 32 high bits, 16 bytes of nibbles
    case kQ8_0: return {32, 34};   // fp16 d, 32 int8
    case kQ4_K: return {256, 144}; // fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    case kQ6_K: return {256, 210}; // 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales, fp16 d
    default: return {};
  }
}

// No contraction of a * q + b into one fused multiply-add in the GGUF kernels (here and gguf_dot.h):
// dequantized values must equal the reference's; products use explicit FMA intrinsics. The same options
// in both files, because GCC does not inline across functions with different ones.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

// The IEEE half at p (little-endian) as a float, exactly.
inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 31, mant = h & 1023;
  float value;
  if (exp == 0) value = std::ldexp(float(mant), -24);  // zero and subnormals
  else if (exp == 31) value = mant ? NAN : INFINITY;
  else {
    const uint32_t bits = ((exp + 112) << 23) | (mant << 13);
    std::memcpy(&value, &bits, 4);
  }
  return sign ? -value : value;
#endif
}

// One block as integer codes (one per weight) and per-16-weight factors: weight = a * code (+ b).
struct BlockCodes {
  int8_t q[256];
  float a[16], b[16];
};

// Q4_0: weight j is (nibble - 8) * d; byte j holds weight j (low nibble) and j + 16 (high).
inline void codes_q4_0(const uint8_t* blk, BlockCodes& c) {
  const float d = half_at(blk);
  for (int j = 0; j < 16; ++j) {
    c.q[j] = int8_t((blk[2 + j] & 15) - 8);
    c.q[j + 16] = int8_t((blk[2 + j] >> 4) - 8);
  }
  c.a[0] = c.a[1] = d;
}

// Q4_1: weight = d * nibble + m.
inline void codes_q4_1(const uint8_t* blk, BlockCodes& c) {
  for (int j = 0; j < 16; ++j) {
    c.q[j] = int8_t(blk[4 + j] & 15);
    c.q[j + 16] = int8_t(blk[4 + j] >> 4);
  }
  c.a[0] = c.a[1] = half_at(blk);
  c.b[0] = c.b[1] = half_at(blk + 2);
}

// Q5_0: (nibble | fifth bit << 4) - 16, times d; bit j of the 32-bit qh is weight j's fifth bit.
inline void codes_q5_0(const uint8_t* blk, BlockCodes& c) {
  uint32_t qh;
  std::memcpy(&qh, blk + 2, 4);
  const uint8_t* qs = blk + 6;
  for (int j = 0; j < 16; ++j) {
    c.q[j] = int8_t(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
    c.q[j + 16] = int8_t(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
  }
  c.a[0] = c.a[1] = half_at(blk);
}

// Q8_0: int8 code times d.
inline void codes_q8_0(const uint8_t* blk, BlockCodes& c) {
  std::memcpy(c.q, blk + 2, 32);
  c.a[0] = c.a[1] = half_at(blk);
}

// Q4_K's 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes s (ggml's get_scale_min_k4).
inline void q4_k_scale_min(const uint8_t* s, int j, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63, min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K: 8 sub-blocks of 32; weight = (d * scale) * nibble - dmin * min. Bytes 32c..32c+31 hold
// sub-block 2c in their low nibbles and 2c + 1 in their high nibbles.
inline void codes_q4_k(const uint8_t* blk, BlockCodes& c) {
  const float d = half_at(blk), dmin = half_at(blk + 2);
  const uint8_t* qs = blk + 16;
  for (int chunk = 0; chunk < 4; ++chunk)
    for (int l = 0; l < 32; ++l) {
      c.q[64 * chunk + l] = int8_t(qs[32 * chunk + l] & 15);
      c.q[64 * chunk + 32 + l] = int8_t(qs[32 * chunk + l] >> 4);
    }
  for (int j = 0; j < 8; ++j) {
    int scale, min;
    q4_k_scale_min(blk + 4, j, scale, min);
    c.a[2 * j] = c.a[2 * j + 1] = d * float(scale);
    c.b[2 * j] = c.b[2 * j + 1] = -(dmin * float(min));  // x - y is x + (-y) exactly
  }
}

// Q6_K: two halves of 128; in half h, byte i of ql (64) gives weight i (low nibble) and 64 + i (high),
// byte i % 32 of qh (32) the top 2 bits at shift 2 * (weight / 32); weight = (d * scale) * (q - 32).
inline void codes_q6_k(const uint8_t* blk, BlockCodes& c) {
  const float d = half_at(blk + 208);
  for (int h = 0; h < 2; ++h) {
    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
    int8_t* q = c.q + 128 * h;
    for (int i = 0; i < 32; ++i) {
      q[i] = int8_t(((ql[i] & 15) | ((qh[i] & 3) << 4)) - 32);
      q[32 + i] = int8_t(((ql[32 + i] & 15) | (((qh[i] >> 2) & 3) << 4)) - 32);
      q[64 + i] = int8_t(((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32);
      q[96 + i] = int8_t(((ql[32 + i] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32);
    }
  }
  for (int g = 0; g < 16; ++g) c.a[g] = d * float(int8_t(blk[192 + g]));
}

// The weights of one block from its codes: a * q, then + b (no fused multiply-add, see above).
template <int Groups, bool Offset>
void scale_codes(const BlockCodes& c, float* out) {
  for (int g = 0; g < Groups; ++g)
    for (int i = 0; i < 16; ++i) {
      const float w = c.a[g] * float(c.q[16 * g + i]);
      out[16 * g + i] = Offset ? w + c.b[g] : w;
    }
}

#if defined(__AVX2__)
// Codes 16 at a time as int8 lanes of an SSE register (both vector paths).
inline __m128i load16(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
inline __m128i low_nibbles(__m128i v) { return _mm_and_si128(v, _mm_set1_epi8(15)); }
inline __m128i high_nibbles(__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 4), _mm_set1_epi8(15)); }
// Bits shift..shift + 1 of each byte, moved to bits 4..5 (Q6_K's top two bits of a code).
inline __m128i two_bits(__m128i v, int shift) {
  return _mm_and_si128(_mm_slli_epi16(_mm_srli_epi16(v, shift), 4), _mm_set1_epi8(0x30));
}

// Byte j = 16 where bit j of the low 16 bits of `bits` is set, else 0 (Q5_0's fifth bits).
inline __m128i fifth_bits(uint32_t bits) {
  const __m128i spread = _mm_shuffle_epi8(_mm_cvtsi32_si128(int(bits)), _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1,
                                                                                      1, 1, 1, 1, 1));
  const __m128i bit = _mm_set1_epi64x(int64_t(0x8040201008040201ull));
  return _mm_and_si128(_mm_cmpeq_epi8(_mm_and_si128(spread, bit), bit), _mm_set1_epi8(16));
}

#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// 16 int8 codes times a (then plus b) as fp32 into out.
template <bool Offset>
inline void store16(float* out, __m128i codes, float a, float b = 0.f) {
  for (int half = 0; half < 2; ++half) {
    const __m128i part = half ? _mm_unpackhi_epi64(codes, codes) : codes;
    __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), _mm256_set1_ps(a));
    if (Offset) w = _mm256_add_ps(w, _mm256_set1_ps(b));
    _mm256_storeu_ps(out + 8 * half, w);
  }
}

// One block's weights into out, 16 codes at a time (AVX2).
template <int64_t T>
inline void decode_block_vec(const uint8_t* blk, float* out) {
  if constexpr (T == kQ4_0 || T == kQ4_1) {
    const __m128i q = load16(blk + (T == kQ4_0 ? 2 : 4)), bias = _mm_set1_epi8(T == kQ4_0 ? 8 : 0);
    const float d = half_at(blk), m = T == kQ4_1 ? half_at(blk + 2) : 0.f;
    store16<T == kQ4_1>(out, _mm_sub_epi8(low_nibbles(q), bias), d, m);
    store16<T == kQ4_1>(out + 16, _mm_sub_epi8(high_nibbles(q), bias), d, m);
  } else if constexpr (T == kQ5_0) {
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const __m128i q = load16(blk + 6), sixteen = _mm_set1_epi8(16);
    const float d = half_at(blk);
    store16<false>(out, _mm_sub_epi8(_mm_or_si128(low_nibbles(q), fifth_bits(qh)), sixteen), d);
    store16<false>(out + 16, _mm_sub_epi8(_mm_or_si128(high_nibbles(q), fifth_bits(qh >> 16)), sixteen), d);
  } else if constexpr (T == kQ8_0) {
    const float d = half_at(blk);
    store16<false>(out, load16(blk + 2), d);
    store16<false>(out + 16, load16(blk + 18), d);
  } else if constexpr (T == kQ4_K) {
    const float d = half_at(blk), dmin = half_at(blk + 2);
    for (int chunk = 0; chunk < 4; ++chunk) {  // sub-blocks 2 chunk (low nibbles) and 2 chunk + 1 (high)
      int s0, m0, s1, m1;
      q4_k_scale_min(blk + 4, 2 * chunk, s0, m0);
      q4_k_scale_min(blk + 4, 2 * chunk + 1, s1, m1);
      const float a0 = d * float(s0), b0 = -(dmin * float(m0)), a1 = d * float(s1), b1 = -(dmin * float(m1));
      for (int half = 0; half < 2; ++half) {
        const __m128i q = load16(blk + 16 + 32 * chunk + 16 * half);
        store16<true>(out + 64 * chunk + 16 * half, low_nibbles(q), a0, b0);
        store16<true>(out + 64 * chunk + 32 + 16 * half, high_nibbles(q), a1, b1);
      }
    }
  } else if constexpr (T == kQ6_K) {
    const float d = half_at(blk + 208);
    const __m128i bias = _mm_set1_epi8(32);
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 32; i += 16) {  // weights i.., 32 + i.., 64 + i.., 96 + i.. of half h
        const __m128i l0 = load16(blk + 64 * h + i), l1 = load16(blk + 64 * h + 32 + i);
        const __m128i qh = load16(blk + 128 + 32 * h + i);
        const __m128i q[4] = {_mm_or_si128(low_nibbles(l0), two_bits(qh, 0)),
                              _mm_or_si128(low_nibbles(l1), two_bits(qh, 2)),
                              _mm_or_si128(high_nibbles(l0), two_bits(qh, 4)),
                              _mm_or_si128(high_nibbles(l1), two_bits(qh, 6))};
        for (int part = 0; part < 4; ++part) {
          const int at = 128 * h + 32 * part + i;
          store16<false>(out + at, _mm_sub_epi8(q[part], bias), d * float(int8_t(blk[192 + at / 16])));
        }
      }
  }
}
#endif


#if defined(__AVX512F__)
// The 16 weights (i - offset) * a (+ b), i = 0..15: a block's (or sub-block's) weight for each code,
// so that one lookup (vpermps) replaces widening a code to fp32, multiplying and adding. Exact: as the
// reference rounds (multiply, then add); else one fused multiply-add (products, within an ulp).
template <bool Offset, bool Exact>
inline __m512 code_table(int offset, float a, float b = 0.f) {
  const __m512 codes = _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_ps(float(offset)));
  if (Offset && !Exact) return _mm512_fmadd_ps(codes, _mm512_set1_ps(a), _mm512_set1_ps(b));
  const __m512 w = _mm512_mul_ps(codes, _mm512_set1_ps(a));
  return Offset ? _mm512_add_ps(w, _mm512_set1_ps(b)) : w;
}

// The two IEEE halves at p (Q4_1's d and m, Q4_K's d and dmin) as floats, in one conversion.
inline void halves_at(const uint8_t* p, float& first, float& second) {
  int32_t bits;
  std::memcpy(&bits, p, 4);
  const __m128 both = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  first = _mm_cvtss_f32(both), second = _mm_cvtss_f32(_mm_movehdup_ps(both));
}

// The 16 bytes at p in 32-bit lanes: a lane indexes a code_table by its low nibble, and shifted right
// by 4 by its high nibble (vpermps reads only the low 4 bits of an index).
inline __m512i widen16(const uint8_t* p) { return _mm512_cvtepu8_epi32(load16(p)); }

// 16 int8 codes times a, in fp32.
inline __m512 scaled16(__m128i codes, float a) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(codes)), _mm512_set1_ps(a));
}

// Weights 32 s .. 32 s + 31 of one block into w[0] (the first 16) and w[1]; Exact as the reference
// computes them (dequantize), else possibly an ulp apart (products: one fused multiply-add fewer).
template <int64_t T, bool Exact = true>
inline void slice32(const uint8_t* blk, int s, __m512 w[2]) {
  if constexpr (T == kQ4_0 || T == kQ4_1) {
    float d, m;
    halves_at(blk, d, m);  // Q4_0: m is its first code byte, unused
    const __m512 table = T == kQ4_0 ? code_table<false, Exact>(8, d) : code_table<true, Exact>(0, d, m);
    const __m512i q = widen16(blk + (T == kQ4_0 ? 2 : 4));
    w[0] = _mm512_permutexvar_ps(q, table), w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  } else if constexpr (T == kQ5_0) {  // codes 0..15 and 16..31: the fifth bit picks the table
    uint32_t qh;
    std::memcpy(&qh, blk + 2, 4);
    const float d = half_at(blk);
    const __m512 low = code_table<false, Exact>(16, d), high = code_table<false, Exact>(0, d);
    const __m512i q[2] = {widen16(blk + 6), _mm512_srli_epi32(widen16(blk + 6), 4)};
    for (int i = 0; i < 2; ++i)
      w[i] = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q[i], low), __mmask16(qh >> (16 * i)), q[i], high);
  } else if constexpr (T == kQ8_0) {
    const float d = half_at(blk);
    w[0] = scaled16(load16(blk + 2), d), w[1] = scaled16(load16(blk + 18), d);
  } else if constexpr (T == kQ4_K) {  // sub-block s: bytes 32 (s / 2).., low nibbles for even s, high for odd
    int scale, min;
    float d, dmin;
    q4_k_scale_min(blk + 4, s, scale, min);
    halves_at(blk, d, dmin);
    const __m512 table = code_table<true, Exact>(0, d * float(scale), -(dmin * float(min)));
    for (int i = 0; i < 2; ++i) {
      const __m512i q = widen16(blk + 16 + 32 * (s / 2) + 16 * i);
      w[i] = _mm512_permutexvar_ps(s % 2 ? _mm512_srli_epi32(q, 4) : q, table);
    }
  } else if constexpr (T == kQ6_K) {  // half h = s / 4, part s % 4 (see codes_q6_k)
    const int h = s / 4, part = s % 4;
    const float d = half_at(blk + 208);
    for (int i = 0; i < 2; ++i) {
      const __m128i l = load16(blk + 64 * h + 32 * (part % 2) + 16 * i), qh = load16(blk + 128 + 32 * h + 16 * i);
      const __m128i q = _mm_or_si128(part < 2 ? low_nibbles(l) : high_nibbles(l), two_bits(qh, 2 * part));
      w[i] = scaled16(_mm_sub_epi8(q, _mm_set1_epi8(32)), d * float(int8_t(blk[192 + 2 * s + i])));
    }
  }
}
#endif

// One row of W (k weights, its blocks at `row`) as fp32 into out.
template <int64_t T>
void decode_row_t(const uint8_t* row, int64_t k, float* out) {
  constexpr int64_t values = T == kQ4_K || T == kQ6_K ? 256 : 32;
  const int64_t bytes = block_format(T).bytes;
  for (int64_t i = 0; i < k / values; ++i, row += bytes, out += values) {
#if defined(__AVX512F__)
    for (int s = 0; s < values / 32; ++s) {
      __m512 w[2];
      slice32<T>(row, s, w);
      _mm512_storeu_ps(out + 32 * s, w[0]);
      _mm512_storeu_ps(out + 32 * s + 16, w[1]);
    }
#elif defined(__AVX2__)
    decode_block_vec<T>(row, out);
#else
    BlockCodes c;
    if constexpr (T == kQ4_0) codes_q4_0(row, c);
    if constexpr (T == kQ4_1) codes_q4_1(row, c);
    if constexpr (T == kQ5_0) codes_q5_0(row, c);
    if constexpr (T == kQ8_0) codes_q8_0(row, c);
    if constexpr (T == kQ4_K) codes_q4_k(row, c);
    if constexpr (T == kQ6_K) codes_q6_k(row, c);
    scale_codes<int(values / 16), T == kQ4_1 || T == kQ4_K>(c, out);
#endif
  }
}

// Rows [r0, r0 + count) of W (qtype, k columns, row_bytes per row) as fp32 (count, k) into out.
inline void decode_rows(const uint8_t* blocks, int64_t qtype, int64_t k, int64_t row_bytes, int64_t r0, int64_t count,
                        float* out) {
  for (int64_t r = r0; r < r0 + count; ++r, out += k) {
    const uint8_t* row = blocks + r * row_bytes;
    switch (qtype) {
      case kQ4_0: decode_row_t<kQ4_0>(row, k, out); break;
      case kQ4_1: decode_row_t<kQ4_1>(row, k, out); break;
      case kQ5_0: decode_row_t<kQ5_0>(row, k, out); break;
      case kQ8_0: decode_row_t<kQ8_0>(row, k, out); break;
      case kQ4_K: decode_row_t<kQ4_K>(row, k, out); break;
      case kQ6_K: decode_row_t<kQ6_K>(row, k, out); break;
      default: break;  // callers check the type first (gguf_blocks.cpp)
    }
  }
}

// Bytes of one row of k weights of qtype.
inline int64_t row_bytes_of(int64_t qtype, int64_t k) { return k / block_format(qtype).values * block_format(qtype).bytes; }

// All n rows of W as fp32 (n, k) into out, rows split over the threads.
inline void gguf_dequantize(const uint8_t* blocks, int64_t qtype, int64_t n, int64_t k, float* out) {
  const int64_t row_bytes = row_bytes_of(qtype, k);
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads())
  for (int64_t r = 0; r < n; ++r) decode_rows(blocks, qtype, k, row_bytes, r, 1, out + r * k);
}

}  // namespace lmforge
#pragma GCC pop_options
