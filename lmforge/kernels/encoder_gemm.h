// y (M, N) = x (M, K) @ W (N, K)^T in fp32 on AMX tiles, as three bf16 products ("bf16x3").
//
// A float splits exactly into hi = bf16(v) and lo = bf16(v - hi), leaving v - hi - lo below 2^-16 |v|.
// x W^T = xh Wh^T + xh Wl^T + xl Wh^T + (xl Wl^T, below 2^-16 of the product, dropped), and AMX's
// TDPBF16PS multiplies bf16 pairs and accumulates in fp32. So the three products are one bf16 GEMM
// over K' = 3K: A = [xh | xh | xl] against B = [Wh | Wl | Wh], fp32 accumulators all the way, a result
// within about 1e-5 relative of fp32's (the tests bound it; 16x more multiply-adds per cycle than
// AVX-512 fp32 pay for the three passes). The same split on tensor cores: Ootomo & Yokota 2022,
// "Recovering single precision accuracy from Tensor Cores", https://arxiv.org/abs/2203.03341.
//
// Tiles: C is 2x2 tiles of 16x16 fp32 (32 rows x 32 columns of y), A two 16x32 bf16 tiles of rows,
// B two 16x32 tiles of weights in AMX's pair-interleaved layout, packed once per weight. Work is cut
// into 128-row x 256-column blocks over 1152-long stretches of K', so a block's A and B (about 0.9 MB)
// stay in L2 while its tiles are computed; C is carried between stretches in y itself.
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace lmforge {

constexpr int64_t kAmxRows = 128, kAmxCols = 256, kAmxDepth = 1152;  // block sizes (K' elements for depth)

// bf16 elements per row of the split x: [xh | xl] plus 32 of padding, so the 16 rows a tile load reads do
// not fall into the same few L1 sets (a 6 KB stride, K = 1536, put 16 rows in 2 sets: 3x slower).
inline int64_t split_stride(int64_t k) { return 2 * k + 32; }

struct Identity {  // split x as it is
#if defined(__AVX512F__)
  __m512 operator()(__m512 v, int64_t) const { return v; }
#endif
  float operator()(float v, int64_t) const { return v; }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
// Whether this CPU has AMX-BF16 and the kernel lets this process use the tile registers.
inline bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    const bool hardware = (d >> 22 & 1) && (d >> 24 & 1);  // AMX-BF16, AMX-TILE
    constexpr long kReqPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return hardware && syscall(SYS_arch_prctl, kReqPermission, kTileData) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {  // 8 tiles of 16 rows x 64 bytes: C0-C3, A0-A1, B0-B1
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

inline uint16_t bf16_round(float f) {  // round to nearest even, as _mm512_cvtneps_pbh
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// W (N, K) -> (N / 16, 3K / 32, 16, 32) bf16: [Wh | Wl | Wh] per row, in pairs along K as TDPBF16PS reads B.
inline void pack_weight_bf16x3(const float* w, int64_t n, int64_t k, uint16_t* out) {
  const int64_t k3 = 3 * k, kblocks = k3 / 32;
  at::parallel_for(0, n / 16, 1, [&](int64_t lo, int64_t hi) {
    std::vector<uint16_t> wide(16 * k3);
    for (int64_t nb = lo; nb < hi; ++nb) {
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t c = 0; c < k; ++c) {
          const float v = w[(nb * 16 + j) * k + c];
          const uint16_t h = bf16_round(v), l = bf16_round(v - bf16_value(h));
          wide[j * k3 + c] = h, wide[j * k3 + k + c] = l, wide[j * k3 + 2 * k + c] = h;
        }
      for (int64_t kb = 0; kb < kblocks; ++kb)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t j = 0; j < 16; ++j)
            for (int64_t e = 0; e < 2; ++e)
              out[((nb * kblocks + kb) * 16 + r) * 32 + j * 2 + e] = wide[j * k3 + kb * 32 + 2 * r + e];
    }
  });
}

// f(x) (M, K) fp32 -> (Mp, split_stride(K)) bf16 rows [hi | lo | pad]; rows M..Mp-1 are zero. f(v, j)
// transforms 16 values (or one) from column j, so an activation can be applied in the same pass.
template <class F>
inline void split_rows(const float* x, int64_t m, int64_t k, int64_t mp, uint16_t* out, F f) {
  at::parallel_for(0, mp, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      uint16_t* o = out + i * split_stride(k);
      if (i >= m) {
        std::memset(o, 0, 4 * k);
        continue;
      }
      const float* r = x + i * k;
      int64_t j = 0;
      for (; j + 16 <= k; j += 16) {
        const __m512 v = f(_mm512_loadu_ps(r + j), j);
        const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
        const __m512 hv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        _mm256_storeu_si256((__m256i*)(o + j), h);
        _mm256_storeu_si256((__m256i*)(o + k + j), (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(v, hv)));
      }
      for (; j < k; ++j) {
        const float v = f(r[j], j);
        const uint16_t h = bf16_round(v);
        o[j] = h, o[k + j] = bf16_round(v - bf16_value(h));
      }
    }
  });
}

// 32 rows x 32 columns of y over K' blocks [k0, k1): C tiles start from zero (k0 == 0) or from y.
inline void tile_block(const uint16_t* a, int64_t k, const uint16_t* b0, const uint16_t* b1, int64_t k0, int64_t k1,
                       float* c, int64_t n) {
  const int64_t kb1 = k / 32, a_stride = 2 * split_stride(k), c_stride = 4 * n;  // bytes per row of A and of y
  if (k0 == 0) {  // the tile intrinsics are asm statements: one per line
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  } else {
    _tile_loadd(0, c, c_stride);
    _tile_loadd(1, c + 16, c_stride);
    _tile_loadd(2, c + 16 * n, c_stride);
    _tile_loadd(3, c + 16 * n + 16, c_stride);
  }
  for (int64_t kb = k0; kb < k1; ++kb) {
    const int64_t src = kb < kb1 ? kb : kb - kb1;  // K' = [xh | xh | xl] over rows stored as [xh | xl]
    _tile_loadd(4, a + src * 32, a_stride);
    _tile_loadd(5, a + 16 * split_stride(k) + src * 32, a_stride);
    _tile_loadd(6, b0 + kb * 512, 64);
    _tile_loadd(7, b1 + kb * 512, 64);
    _tile_dpbf16ps(0, 4, 6);  // C00 += A0 B0
    _tile_dpbf16ps(1, 4, 7);  // C01 += A0 B1
    _tile_dpbf16ps(2, 5, 6);  // C10 += A1 B0
    _tile_dpbf16ps(3, 5, 7);  // C11 += A1 B1
  }
  _tile_stored(0, c, c_stride);
  _tile_stored(1, c + 16, c_stride);
  _tile_stored(2, c + 16 * n, c_stride);
  _tile_stored(3, c + 16 * n + 16, c_stride);
}

// y (Mp, N) = x W^T with x split by split_rows into a (Mp, split_stride(K)) and W packed by pack_weight_bf16x3;
// Mp, N and K multiples of 32.
inline void gemm_bf16x3(const uint16_t* a, int64_t mp, int64_t k, const uint16_t* packed, int64_t n, float* y) {
  const int64_t kblocks = 3 * k / 32, depth = kAmxDepth / 32;
  const int64_t row_blocks = (mp + kAmxRows - 1) / kAmxRows, col_blocks = (n + kAmxCols - 1) / kAmxCols;
  for (int64_t k0 = 0; k0 < kblocks; k0 += depth) {
    const int64_t k1 = std::min(kblocks, k0 + depth);
    at::parallel_for(0, row_blocks * col_blocks, 1, [&](int64_t lo, int64_t hi) {
      configure_tiles();
      for (int64_t task = lo; task < hi; ++task) {
        const int64_t r0 = task / col_blocks * kAmxRows, c0 = task % col_blocks * kAmxCols;
        for (int64_t r = r0; r < std::min(mp, r0 + kAmxRows); r += 32)
          for (int64_t c = c0; c < std::min(n, c0 + kAmxCols); c += 32) {
            const uint16_t* b0 = packed + (c / 16) * kblocks * 512;
            tile_block(a + r * split_stride(k), k, b0, b0 + kblocks * 512, k0, k1, y + r * n + c, n);
          }
      }
      _tile_release();
    });
  }
}
#else
inline bool amx_available() { return false; }
#endif

}  // namespace lmforge
