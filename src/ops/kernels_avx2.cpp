// AVX2 + FMA + F16C kernels. This file alone is compiled with -mavx2 -mfma -mf16c (CMakeLists.txt); the
// dispatcher in kernels.cpp only calls into it when the CPU reports all three.
//
// Matrix-vector products read each weight row once for all activation rows (in chunks of up to 5 rows; a
// second chunk finds the row in L1). The integer ones also serve many rows (the ViT's 257, taken in tiles by
// ops::linear), where the work is bound by instructions: I8 then repacks 16 weight rows at a time so that
// each vector holds 8 output channels (see i8_packed_tile).
// Integer products (I8, I4) use vpmaddubsw (unsigned × signed bytes → int16 pairs) and vpmaddwd:
//   I8: |w| × sign(a, w) (w, a in [-127, 127]: pair sums ≤ 32258, never saturate), int32 per block of
//       activations, then one float multiply-add per block with the activation scale; the weight's
//       per-row scale multiplies the final sum (the same operations in every kernel: see i8_tile).
//   I4: stored nibbles are u = q + 8 in [0, 15], used directly as the unsigned operand: Σ u·a = Σ q·a + 8 Σ a,
//       and the offset is removed in integers with the block's Σa (computed when quantizing the
//       activations). Pair sums are ≤ 2·15·127 = 3810, so the int16 products of a whole group (up to 4
//       vectors) are added before the one vpmaddwd per group. Unpacking is an AND and a shift per 64
//       weights (see DType::I4's layout).
//
// The same source, compiled again with AVX-512 VNNI (kernels_vnni.cpp defines BLIP2_KERNELS_VNNI), replaces
// each vpmaddubsw + vpmaddwd pair by one vpdpbusd (unsigned × signed bytes, four products summed into int32,
// no intermediate saturation), and I8 multiplies w + 128 (unsigned) by a, removing 128·Σa as I4 removes its
// offset, instead of the sign trick: the same integers, so the same results, with fewer instructions.
// Everything else compiles to the same AVX2 code.
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "ops/kernels_impl.h"

namespace blip2::kern::detail {

namespace {

// Σ over groups of four adjacent byte products u·s into int32 lanes, added to acc.
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#ifdef BLIP2_KERNELS_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

inline int imin(int a, int b) { return a < b ? a : b; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// ---- float weights (F32, F16, BF16) ---------------------------------------------------------------------

template <DType D>
inline __m256 load8(const void* p, int64_t i) {
  if constexpr (D == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else if constexpr (D == DType::F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <DType D>
inline float load1(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == DType::F16) return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  else return bf16_bits_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// For decoding every kernel below walks one output row at a time: a thread's share of the matrix is then one
// sequential stream, which the hardware prefetchers follow at full speed (measured: interleaving 2–8 rows per
// pass streams 25–50 % slower). The activation rows (a few KiB each) stay in L1/L2 and are re-read per row.

// Activation rows are split into chunks of at most kMaxNR (balanced: 6 → 3+3, 7 → 4+3, 8 → 4+4).
constexpr int kMaxNR = 5;
inline int chunk_rows(int R, int r0) {
  const int left = R - r0;
  if (left <= kMaxNR) return left;
  const int chunks = (left + 3) / 4;
  return (left + chunks - 1) / chunks;
}

// NO output rows × NR activation rows. One row (NR = 1) uses four accumulators against the FMA latency; with
// several activation rows two or four output rows share each activation load (the loads, not the FMAs, bound
// that case: measured 1.4× faster at 5 rows than one output row at a time).
template <DType D, int NO, int NR>
void float_tile(const float* x, int64_t ldx, const void* w, int64_t in, int64_t o, float* y, int64_t ldy) {
  constexpr int U = (NO == 1 && NR == 1) ? 4 : 1;
  __m256 acc[NO][NR][U];
  for (int a = 0; a < NO; ++a)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < U; ++u) acc[a][r][u] = _mm256_setzero_ps();
  const int64_t step = 8 * U, in_main = in / step * step;
  for (int64_t i = 0; i < in_main; i += step) {
    for (int u = 0; u < U; ++u) {
      __m256 wv[NO];
      for (int a = 0; a < NO; ++a) wv[a] = load8<D>(w, (o + a) * in + i + 8 * u);
      for (int r = 0; r < NR; ++r) {
        const __m256 xv = _mm256_loadu_ps(x + r * ldx + i + 8 * u);
        for (int a = 0; a < NO; ++a) acc[a][r][u] = _mm256_fmadd_ps(wv[a], xv, acc[a][r][u]);
      }
    }
  }
  int64_t i = in_main;
  for (; i + 8 <= in; i += 8)
    for (int a = 0; a < NO; ++a) {
      const __m256 wv = load8<D>(w, (o + a) * in + i);
      for (int r = 0; r < NR; ++r) acc[a][r][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * ldx + i), acc[a][r][0]);
    }
  for (int a = 0; a < NO; ++a)
    for (int r = 0; r < NR; ++r) {
      __m256 t = acc[a][r][0];
      for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[a][r][u]);
      float s = hsum(t);
      for (int64_t k = i; k < in; ++k) s += load1<D>(w, (o + a) * in + k) * x[r * ldx + k];
      y[r * ldy + o + a] = s;
    }
}

template <DType D, int NR>
void float_chunk(const float* x, int64_t ldx, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  constexpr int NO = NR == 1 ? 1 : (NR == 2 ? 4 : 2);
  int64_t o = o0;
  for (; o + NO <= o1; o += NO) float_tile<D, NO, NR>(x, ldx, w.data, w.cols, o, y, ldy);
  for (; o < o1; ++o) float_tile<D, 1, NR>(x, ldx, w.data, w.cols, o, y, ldy);
}

// Activation rows in chunks of up to 5; a second chunk finds the weight rows in cache only if the output
// range is small, so the output range is walked in blocks of 64 rows per chunk.
template <DType D>
void float_rows(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  for (int64_t ob = o0; ob < o1; ob += 64) {
    const int64_t oe = imin(o1, ob + 64);
    for (int r0 = 0; r0 < R;) {
      const int nr = chunk_rows(R, r0);
      const float* xr = x + r0 * ldx;
      float* yr = y + r0 * ldy;
      switch (nr) {
        case 1: float_chunk<D, 1>(xr, ldx, w, ob, oe, yr, ldy); break;
        case 2: float_chunk<D, 2>(xr, ldx, w, ob, oe, yr, ldy); break;
        case 3: float_chunk<D, 3>(xr, ldx, w, ob, oe, yr, ldy); break;
        case 4: float_chunk<D, 4>(xr, ldx, w, ob, oe, yr, ldy); break;
        default: float_chunk<D, 5>(xr, ldx, w, ob, oe, yr, ldy); break;
      }
      r0 += nr;
    }
  }
}

void gemv_float_avx2(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                     int64_t ldy) {
  switch (w.dtype) {
    case DType::F32: float_rows<DType::F32>(x, ldx, R, w, o0, o1, y, ldy); return;
    case DType::F16: float_rows<DType::F16>(x, ldx, R, w, o0, o1, y, ldy); return;
    case DType::BF16: float_rows<DType::BF16>(x, ldx, R, w, o0, o1, y, ldy); return;
    default: return;
  }
}

// ---- I8 weights × quantized activations -----------------------------------------------------------------

// Every I8 kernel, the scalar one included, computes an output the same way: acc = fma(d_b, s_a,b, acc) over
// the activation blocks b in order, where d_b is the block's exact int32 dot product, then y = acc · s_w. The
// same float operations in the same order whatever the tile, the number of rows or the instruction set: a
// row's result never depends on its batch-mates (batched captioning and serving rely on it), and the vector
// and scalar kernels agree bit for bit.

// acc = fma(d_k, s_k, acc) for k < n (n ≤ 4) in order, in lane 0.
inline __m128 fma_lanes(__m128 acc, __m128 d, const float* s, int n) {
  acc = _mm_fmadd_ss(d, _mm_set_ss(s[0]), acc);
  if (n > 1) acc = _mm_fmadd_ss(_mm_movehdup_ps(d), _mm_set_ss(s[1]), acc);
  if (n > 2) acc = _mm_fmadd_ss(_mm_movehl_ps(d, d), _mm_set_ss(s[2]), acc);
  if (n > 3) acc = _mm_fmadd_ss(_mm_shuffle_ps(d, d, 3), _mm_set_ss(s[3]), acc);
  return acc;
}

// Few rows (decoding): NO output rows × NR activation rows, one weight row streamed at a time. The int32 lanes
// hold partial sums of one output, added up exactly per block, eight blocks at a time (fewer instructions
// than a horizontal sum per block: decoding is bound by memory, but not by much), before the float
// multiply-adds. AVX2: |w| × sign(a, w) (vpmaddubsw needs one unsigned operand). VNNI: (w + 128) × a
// as unsigned × signed bytes, one instruction per vector and row, and the offset 128·Σa (the block's
// activation sum) subtracted in integers.
template <int NO, int NR>
void i8_tile(const QView& x, int64_t r0, const WView& w, int64_t o, float* y, int64_t ldy) {
  const int64_t ld = w.ld, B = x.block, nb = ld / B;
  const auto* wq = static_cast<const int8_t*>(w.data) + o * ld;
  const int8_t* aq = x.q + r0 * ld;
  const float* as = x.scale + r0 * nb;
  [[maybe_unused]] const int32_t* asum = x.sum + r0 * nb;
  __m128 acc[NO][NR];
  __m256i part[NO][NR][8];  // the int32 lanes of the last blocks
  for (int a = 0; a < NO; ++a)
    for (int r = 0; r < NR; ++r) acc[a][r] = _mm_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    // VNNI: the sums start from −128·Σa, the offset of (w + 128)·a (see the file comment).
    __m256i s32[NO][NR];
    for (int r = 0; r < NR; ++r) {
#ifdef BLIP2_KERNELS_VNNI
      const __m256i init = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-128 * asum[r * nb + b]));
#else
      const __m256i init = _mm256_setzero_si256();
#endif
      for (int a = 0; a < NO; ++a) s32[a][r] = init;
    }
    for (int64_t i = b * B; i < (b + 1) * B; i += 32) {
      __m256i wv[NO];
      for (int a = 0; a < NO; ++a) {
        wv[a] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + a * ld + i));
#ifdef BLIP2_KERNELS_VNNI
        wv[a] = _mm256_xor_si256(wv[a], _mm256_set1_epi8(-128));  // w + 128 as unsigned bytes
#endif
      }
      for (int r = 0; r < NR; ++r) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(aq + r * ld + i));
        for (int a = 0; a < NO; ++a) {
#ifdef BLIP2_KERNELS_VNNI
          s32[a][r] = dot_u8s8(s32[a][r], wv[a], av);
#else
          s32[a][r] = dot_u8s8(s32[a][r], _mm256_abs_epi8(wv[a]), _mm256_sign_epi8(av, wv[a]));
#endif
        }
      }
    }
    // Every eighth block (and the last) the eight blocks' totals come out of three rounds of horizontal adds
    // at once, and go into the sum in block order.
    const int j = static_cast<int>(b & 7);
    for (int a = 0; a < NO; ++a)
      for (int r = 0; r < NR; ++r) part[a][r][j] = s32[a][r];
    if (j == 7 || b == nb - 1) {
      const int64_t b0 = b - j;
      for (int a = 0; a < NO; ++a)
        for (int r = 0; r < NR; ++r) {
          __m256i* p = part[a][r];
          for (int k = j + 1; k < 8; ++k) p[k] = _mm256_setzero_si256();
          const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
          const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
          const __m256 d = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20),
                                                               _mm256_permute2x128_si256(h0, h1, 0x31)));
          const float* sa = as + r * nb + b0;
          acc[a][r] = fma_lanes(acc[a][r], _mm256_castps256_ps128(d), sa, imin(j + 1, 4));
          if (j >= 4) acc[a][r] = fma_lanes(acc[a][r], _mm256_extractf128_ps(d, 1), sa + 4, j - 3);
        }
    }
  }
  for (int a = 0; a < NO; ++a) {
    const float sw = static_cast<const float*>(w.scales)[o + a];
    for (int r = 0; r < NR; ++r) y[(r0 + r) * ldy + o + a] = _mm_cvtss_f32(acc[a][r]) * sw;
  }
}

template <int NO>
void i8_rows(const QView& x, const WView& w, int64_t o, float* y, int64_t ldy) {
  const int R = static_cast<int>(x.rows);
  for (int r0 = 0; r0 < R;) {
    const int nr = chunk_rows(R, r0);
    switch (nr) {
      case 1: i8_tile<NO, 1>(x, r0, w, o, y, ldy); break;
      case 2: i8_tile<NO, 2>(x, r0, w, o, y, ldy); break;
      case 3: i8_tile<NO, 3>(x, r0, w, o, y, ldy); break;
      case 4: i8_tile<NO, 4>(x, r0, w, o, y, ldy); break;
      default: i8_tile<NO, 5>(x, r0, w, o, y, ldy); break;
    }
    r0 += nr;
  }
}

#ifndef BLIP2_KERNELS_VNNI
// Many rows (the ViT's 257, a prompt, a batch of decoding rows), AVX2: the weight rows of kI8PackedOutputs
// output channels are first repacked into `scratch` so that one vector holds 8 channels × 4 consecutive inputs
// ([i/4][channel][4] bytes); each step then broadcasts 4 bytes of an activation row against two such vectors.
// Every int32 lane is one channel's sum, so no horizontal add is needed, and the block's float multiply-add
// serves 8 channels at once. Measured on the ViT's shapes (docs/PERFORMANCE.md): 1.3× the row tile above,
// which spends a horizontal add and a float multiply-add per channel and block. The repacking reads each
// weight byte once per call and tile of rows, against the tile's rows × 2 multiply-adds per byte.
// (The VNNI build keeps the row tile for every row count: this layout has not run on a VNNI machine.)

// Rows [0, 8) of w (row stride ld, a multiple of 32) as ld / 4 vectors: vector j holds inputs 4j..4j+3 of
// each row in turn (an 8 × 8 transpose of 32-bit words per 32 inputs).
void pack8_i8(const int8_t* w, int64_t ld, int8_t* out) {
  for (int64_t i = 0; i < ld; i += 32) {
    __m256i r[8];
    for (int o = 0; o < 8; ++o) r[o] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + o * ld + i));
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    const __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
    const __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
    // u_j holds words j and j + 4 (one per 128-bit lane) of rows 0-3 (u0..u3) or 4-7 (u4..u7).
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
    const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
    const __m256i lo[4] = {u0, u1, u2, u3}, hi[4] = {u4, u5, u6, u7};
    auto* v = reinterpret_cast<__m256i*>(out + i * 8);
    for (int j = 0; j < 4; ++j) {
      _mm256_storeu_si256(v + j, _mm256_permute2x128_si256(lo[j], hi[j], 0x20));
      _mm256_storeu_si256(v + j + 4, _mm256_permute2x128_si256(lo[j], hi[j], 0x31));
    }
  }
}

// kI8PackedOutputs (16) channels from o, packed in pw, × NR activation rows from r0.
template <int NR>
void i8_packed_tile(const QView& x, int64_t r0, const int8_t* pw, const float* sw, int64_t o, float* y,
                    int64_t ldy) {
  constexpr int NG = kI8PackedOutputs / 8;
  const int64_t ld = x.ld, B = x.block, nb = ld / B;
  const int8_t* aq = x.q + r0 * ld;
  const float* as = x.scale + r0 * nb;
  __m256 acc[NG][NR];
  for (int g = 0; g < NG; ++g)
    for (int r = 0; r < NR; ++r) acc[g][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i s32[NG][NR];
    for (int g = 0; g < NG; ++g)
      for (int r = 0; r < NR; ++r) s32[g][r] = _mm256_setzero_si256();
    for (int64_t i = b * B; i < (b + 1) * B; i += 4) {
      __m256i wv[NG], aw[NG];
      for (int g = 0; g < NG; ++g) {
        wv[g] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + g * 8 * ld + i * 8));
        aw[g] = _mm256_abs_epi8(wv[g]);
      }
      for (int r = 0; r < NR; ++r) {
        int32_t a4;
        memcpy(&a4, aq + r * ld + i, 4);
        const __m256i av = _mm256_set1_epi32(a4);
        for (int g = 0; g < NG; ++g) s32[g][r] = dot_u8s8(s32[g][r], aw[g], _mm256_sign_epi8(av, wv[g]));
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 sa = _mm256_set1_ps(as[r * nb + b]);
      for (int g = 0; g < NG; ++g) acc[g][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[g][r]), sa, acc[g][r]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    const __m256 s = _mm256_loadu_ps(sw + o + 8 * g);
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(y + (r0 + r) * ldy + o + 8 * g, _mm256_mul_ps(acc[g][r], s));
  }
}

// The outlier columns (add_i8_column) of the kI8PackedOutputs channels packed at pw from o, for every row:
// column j of 8 channels is byte j % 4 of each 32-bit word of packed vector j / 4, one load for all 8.
void add_packed_columns(const CView& c, int64_t rows, const int8_t* pw, int64_t ld, const float* sw, int64_t o,
                        float* y, int64_t ldy) {
  constexpr int NG = kI8PackedOutputs / 8;
  __m256 s[NG];
  for (int g = 0; g < NG; ++g) s[g] = _mm256_loadu_ps(sw + o + 8 * g);
  for (int64_t r = 0; r < rows; ++r)
    for (int k = 0; k < c.counts[r]; ++k) {
      const int64_t j = c.cols[r * c.max + k];
      const __m256 a = _mm256_set1_ps(c.x[r * c.ldx + j]);
      const __m128i up = _mm_cvtsi32_si128(8 * (3 - static_cast<int>(j & 3)));  // byte j % 4 to the top
      for (int g = 0; g < NG; ++g) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pw + g * 8 * ld + (j & ~int64_t{3}) * 8));
        const __m256 wq = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_sll_epi32(v, up), 24)), s[g]);
        float* yp = y + r * ldy + o + 8 * g;
        _mm256_storeu_ps(yp, _mm256_add_ps(_mm256_loadu_ps(yp), _mm256_mul_ps(a, wq)));
      }
    }
}
#endif

// Decoding (a few rows) streams one weight row at a time; with many rows the products are bound by
// instructions, not bytes: AVX2 packs 16 channels at a time (above), the VNNI build lets two weight rows share
// each activation load.
void gemv_i8_avx2(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy, int8_t* scratch,
                  const CView* columns) {
  int64_t o = o0;
#ifndef BLIP2_KERNELS_VNNI
  if (x.rows > kMaxNR && scratch != nullptr) {
    constexpr int kRows = 3;  // 2 × 3 int32 sums: the fastest of 1-3 × 3-8 tiles measured
    const auto* wq = static_cast<const int8_t*>(w.data);
    const auto* sw = static_cast<const float*>(w.scales);
    for (; o + kI8PackedOutputs <= o1; o += kI8PackedOutputs) {
      for (int g = 0; g < kI8PackedOutputs; g += 8) pack8_i8(wq + (o + g) * w.ld, w.ld, scratch + g * w.ld);
      int64_t r = 0;
      for (; r + kRows <= x.rows; r += kRows) i8_packed_tile<kRows>(x, r, scratch, sw, o, y, ldy);
      if (x.rows - r == 2) i8_packed_tile<2>(x, r, scratch, sw, o, y, ldy);
      if (x.rows - r == 1) i8_packed_tile<1>(x, r, scratch, sw, o, y, ldy);
      if (columns != nullptr) add_packed_columns(*columns, x.rows, scratch, w.ld, sw, o, y, ldy);
    }
  }
#else
  (void)scratch;
#endif
  const int64_t unpacked = o;
  if (x.rows > kMaxNR)
    for (; o + 2 <= o1; o += 2) i8_rows<2>(x, w, o, y, ldy);
  for (; o < o1; ++o) i8_rows<1>(x, w, o, y, ldy);
  if (columns != nullptr) add_i8_columns(*columns, x.rows, w, unpacked, o1, y, ldy);
}

// ---- I4 weights × quantized activations -----------------------------------------------------------------

// One output row against NR activation rows, groups of G = 32·NV. Per group and activation row: the
// unsigned-nibble dot d_u = Σ u·a (vpmaddubsw over the group's vectors, int16 adds, one vpmaddwd), then
// the offset removed exactly in integers (d = d_u − 8·Σa, subtracted from one lane), then
// acc += d · (s_w · s_a), the product of scales prepared per chunk of 64 groups with vector multiplies.
// Removing the offset before the float multiply keeps the result as accurate as the scalar kernel's: Σ u·a
// carries 8·Σa, often far larger than the result, and subtracting it in float afterwards cancelled low bits
// (test_kernels needed a 20× wider rounding allowance for I4 before; now one bound serves every format).
template <int NV, int NO, int NR>
void i4_tile(const QView& x, int64_t r0, const WView& w, int64_t o, float* y, int64_t ldy) {
  constexpr int G = 32 * NV;
  constexpr int kUnit = NV == 4 ? 128 : 64;  // elements per step: one 32-byte block (two for G = 128)
  constexpr int kVec = kUnit / 32, kGroups = kUnit / G;
  constexpr int kChunk = 64;  // groups whose scale products are prepared at once
  const int64_t ld = w.ld, ng = ld / G;
  const uint8_t* wq = static_cast<const uint8_t*>(w.data) + o * (ld / 2);
  const uint16_t* s16 = static_cast<const uint16_t*>(w.scales) + o * ng;
  const int8_t* aq = x.q + r0 * ld;
  const float* as = x.scale + r0 * ng;
  const int32_t* asum = x.sum + r0 * ng;
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  [[maybe_unused]] const __m256i ones = _mm256_set1_epi16(1);
  // One accumulator per output and row, whatever NO and NR, so that a row's sums are added in the same order
  // alone or in a batch (two alternating accumulators for one or two rows, hiding the FMA latency, made a row
  // alone differ from the same row among five).
  __m256 acc[NO][NR];
  for (int a = 0; a < NO; ++a)
    for (int r = 0; r < NR; ++r) acc[a][r] = _mm256_setzero_ps();
  alignas(32) float P[NO][NR][kChunk];
  for (int64_t g0 = 0; g0 < ng; g0 += kChunk) {
    const int64_t gn = imin(static_cast<int64_t>(kChunk), ng - g0);
    for (int a = 0; a < NO; ++a) {
      int64_t g = 0;
      for (; g + 8 <= gn; g += 8) {
        const __m256 swv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + a * ng + g0 + g)));
        for (int r = 0; r < NR; ++r)
          _mm256_store_ps(&P[a][r][g], _mm256_mul_ps(swv, _mm256_loadu_ps(as + r * ng + g0 + g)));
      }
      for (; g < gn; ++g) {
        const float sw = _cvtsh_ss(s16[a * ng + g0 + g]);
        for (int r = 0; r < NR; ++r) P[a][r][g] = sw * as[r * ng + g0 + g];
      }
    }
    for (int64_t e = g0 * G; e < (g0 + gn) * G; e += kUnit) {
      __m256i wv[NO][kVec];
      for (int a = 0; a < NO; ++a)
        for (int s = 0; s < kVec / 2; ++s) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + a * (ld / 2) + e / 2 + 32 * s));
          wv[a][2 * s] = _mm256_and_si256(b, m4);
          wv[a][2 * s + 1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
        }
      for (int gi = 0; gi < kGroups; ++gi) {
        const int64_t gl = (e - g0 * G) / G + gi;  // group index within the chunk
        for (int r = 0; r < NR; ++r) {
          const int8_t* ap = aq + r * ld + e + gi * G;
          __m256i av[NV];
          for (int v = 0; v < NV; ++v) av[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + 32 * v));
          // The offset −8·Σa in one lane: VNNI sums start from it, AVX2 adds it to the pair sums.
          const __m256i off = _mm256_zextsi128_si256(_mm_cvtsi32_si128(-8 * asum[r * ng + g0 + gl]));
          for (int a = 0; a < NO; ++a) {
#ifdef BLIP2_KERNELS_VNNI
            __m256i t = off;
            for (int v = 0; v < NV; ++v) t = dot_u8s8(t, wv[a][gi * NV + v], av[v]);
#else
            __m256i t = _mm256_maddubs_epi16(wv[a][gi * NV], av[0]);
            for (int v = 1; v < NV; ++v) t = _mm256_add_epi16(t, _mm256_maddubs_epi16(wv[a][gi * NV + v], av[v]));
            t = _mm256_add_epi32(_mm256_madd_epi16(t, ones), off);
#endif
            acc[a][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(P[a][r][gl]), acc[a][r]);
          }
        }
      }
    }
  }
  for (int a = 0; a < NO; ++a)
    for (int r = 0; r < NR; ++r) y[(r0 + r) * ldy + o + a] = hsum(acc[a][r]);
}

template <int NV, int NO>
void i4_rows(const QView& x, const WView& w, int64_t o, float* y, int64_t ldy) {
  const int R = static_cast<int>(x.rows);
  for (int r0 = 0; r0 < R;) {
    const int nr = chunk_rows(R, r0);
    switch (nr) {
      case 1: i4_tile<NV, NO, 1>(x, r0, w, o, y, ldy); break;
      case 2: i4_tile<NV, NO, 2>(x, r0, w, o, y, ldy); break;
      case 3: i4_tile<NV, NO, 3>(x, r0, w, o, y, ldy); break;
      case 4: i4_tile<NV, NO, 4>(x, r0, w, o, y, ldy); break;
      default: i4_tile<NV, NO, 5>(x, r0, w, o, y, ldy); break;
    }
    r0 += nr;
  }
}

// As for I8: one weight row at a time for decoding, two sharing each activation load for many rows.
template <int NV>
void i4_outputs(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  int64_t o = o0;
  if (x.rows > kMaxNR)
    for (; o + 2 <= o1; o += 2) i4_rows<NV, 2>(x, w, o, y, ldy);
  for (; o < o1; ++o) i4_rows<NV, 1>(x, w, o, y, ldy);
}

void gemv_i4_avx2(const QView& x, const WView& w, int64_t o0, int64_t o1, float* y, int64_t ldy) {
  switch (w.group) {
    case 32: i4_outputs<1>(x, w, o0, o1, y, ldy); return;
    case 64: i4_outputs<2>(x, w, o0, o1, y, ldy); return;
    default: i4_outputs<4>(x, w, o0, o1, y, ldy); return;
  }
}

// ---- I8 weights widened to float (the weight-only alternative) ------------------------------------------

template <int NR>
void i8f_row(const float* x, int64_t ldx, const int8_t* wq, int64_t in, float sw, float* y, int64_t ldy) {
  __m256 acc[NR][2];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t in16 = in & ~int64_t(15);
  for (int64_t i = 0; i < in16; i += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + i));
    const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
    for (int r = 0; r < NR; ++r) {
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + i), acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + r * ldx + i + 8), acc[r][1]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t i = in16; i < in; ++i) s += static_cast<float>(wq[i]) * x[r * ldx + i];
    y[r * ldy] = s * sw;
  }
}

void gemv_i8_float_avx2(const float* x, int64_t ldx, int R, const WView& w, int64_t o0, int64_t o1, float* y,
                        int64_t ldy) {
  const int64_t in = w.cols, ld = w.ld;
  const auto* q = static_cast<const int8_t*>(w.data);
  const auto* sw = static_cast<const float*>(w.scales);
  for (int64_t o = o0; o < o1; ++o)
    for (int r0 = 0; r0 < R; r0 += 4) {
      const float* xr = x + r0 * ldx;
      float* yr = y + r0 * ldy + o;
      switch (imin(4, R - r0)) {
        case 1: i8f_row<1>(xr, ldx, q + o * ld, in, sw[o], yr, ldy); break;
        case 2: i8f_row<2>(xr, ldx, q + o * ld, in, sw[o], yr, ldy); break;
        case 3: i8f_row<3>(xr, ldx, q + o * ld, in, sw[o], yr, ldy); break;
        default: i8f_row<4>(xr, ldx, q + o * ld, in, sw[o], yr, ldy); break;
      }
    }
}

// ---- activation quantization ----------------------------------------------------------------------------

void quantize_rows_avx2(const float* x, int64_t rows, int64_t cols, int64_t ldx, const QOut& out) {
  const int64_t ld = out.ld, B = out.block, nb = ld / B;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) float tail[32];
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * ldx;
    // Pointer to 32 floats at i: the row itself, or a zero-padded copy where the row ends.
    const auto chunk = [&](int64_t i) -> const float* {
      if (i + 32 <= cols) return xr + i;
      memset(tail, 0, sizeof tail);
      if (i < cols) memcpy(tail, xr + i, static_cast<size_t>(cols - i) * 4);
      return tail;
    };
    for (int64_t b = 0; b < nb; ++b) {
      __m256 mx = _mm256_setzero_ps();
      for (int64_t i = b * B; i < (b + 1) * B; i += 32) {
        const float* p = chunk(i);
        for (int k = 0; k < 4; ++k) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(p + 8 * k), absmask));
      }
      __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m = _mm_max_ps(m, _mm_movehl_ps(m, m));
      m = _mm_max_ss(m, _mm_movehdup_ps(m));
      const float amax = _mm_cvtss_f32(m);
      const float inv_s = amax > 0.0f ? 127.0f / amax : 0.0f;
      const __m256 inv = _mm256_set1_ps(inv_s);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = b * B; i < (b + 1) * B; i += 32) {
        const float* p = chunk(i);
        __m256i v[4];
        for (int k = 0; k < 4; ++k) {
          v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + 8 * k), inv));
          sum = _mm256_add_epi32(sum, v[k]);
        }
        const __m256i p16 = _mm256_packs_epi32(v[0], v[1]), p16b = _mm256_packs_epi32(v[2], v[3]);
        const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16, p16b), perm);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q + r * ld + i), p8);
      }
      out.scale[r * nb + b] = amax / 127.0f;
      out.sum[r * nb + b] = hsum_i32(sum);
    }
  }
}

// ---- widening for the BLAS path -------------------------------------------------------------------------

void dequant_rows_avx2(const WView& w, int64_t r0, int64_t n, float* out, int64_t ldo) {
  const int64_t c = w.cols;
  switch (w.dtype) {
    case DType::F32:
      for (int64_t r = 0; r < n; ++r)
        memcpy(out + r * ldo, static_cast<const float*>(w.data) + (r0 + r) * c, static_cast<size_t>(c) * 4);
      return;
    case DType::F16:
    case DType::BF16:
      for (int64_t r = 0; r < n; ++r) {
        const auto* src = static_cast<const uint16_t*>(w.data) + (r0 + r) * c;
        float* dst = out + r * ldo;
        int64_t i = 0;
        if (w.dtype == DType::F16) {
          for (; i + 8 <= c; i += 8) _mm256_storeu_ps(dst + i, load8<DType::F16>(src, i));
          for (; i < c; ++i) dst[i] = _cvtsh_ss(src[i]);
        } else {
          for (; i + 8 <= c; i += 8) _mm256_storeu_ps(dst + i, load8<DType::BF16>(src, i));
          for (; i < c; ++i) dst[i] = bf16_bits_to_f32(src[i]);
        }
      }
      return;
    case DType::I8:
      for (int64_t r = 0; r < n; ++r) {
        const auto* src = static_cast<const int8_t*>(w.data) + (r0 + r) * w.ld;
        const float s = static_cast<const float*>(w.scales)[r0 + r];
        const __m256 sv = _mm256_set1_ps(s);
        float* dst = out + r * ldo;
        int64_t i = 0;
        for (; i + 8 <= c; i += 8) {
          const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + i));
          _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sv));
        }
        for (; i < c; ++i) dst[i] = static_cast<float>(src[i]) * s;
      }
      return;
    case DType::I4: {
      const int64_t ld = w.ld, G = w.group, ng = ld / G;
      alignas(32) float tmp[64];
      const __m256i m4 = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi32(8);
      for (int64_t r = 0; r < n; ++r) {
        const auto* src = static_cast<const uint8_t*>(w.data) + (r0 + r) * (ld / 2);
        const auto* sc = static_cast<const uint16_t*>(w.scales) + (r0 + r) * ng;
        float* dst = out + r * ldo;
        for (int64_t s = 0; s * 64 < c; ++s) {
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 32 * s));
          alignas(32) uint8_t u[64];
          _mm256_store_si256(reinterpret_cast<__m256i*>(u), _mm256_and_si256(b, m4));
          _mm256_store_si256(reinterpret_cast<__m256i*>(u + 32), _mm256_and_si256(_mm256_srli_epi16(b, 4), m4));
          float* d = (s * 64 + 64 <= c) ? dst + s * 64 : tmp;
          for (int k = 0; k < 8; ++k) {
            const int64_t e = s * 64 + 8 * k;
            const __m256 scale = _mm256_set1_ps(_cvtsh_ss(sc[e / G]));
            const __m256i v = _mm256_sub_epi32(
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + 8 * k))), eight);
            _mm256_storeu_ps(d + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
          }
          if (d == tmp) memcpy(dst + s * 64, tmp, static_cast<size_t>(c - s * 64) * 4);
        }
      }
      return;
    }
  }
}

// ---- load-time conversion (the same arithmetic as the scalar versions: identical bytes) -----------------

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// 32 int32 lanes (four vectors, each in [-128, 127]) to 32 bytes in order.
inline __m256i pack32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)), perm);
}

void quantize_weight_i8_avx2(const float* x, int64_t cols, int64_t ld, int8_t* q, float* scale) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
  float amax = hmax(mx);
  for (; i < cols; ++i) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 iv = _mm256_set1_ps(inv);
  i = 0;
  for (; i + 32 <= cols; i += 32) {
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), iv));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), pack32(v[0], v[1], v[2], v[3]));
  }
  for (; i < cols; ++i) {
    int v = static_cast<int>(nearbyintf(x[i] * inv));
    q[i] = static_cast<int8_t>(v < -127 ? -127 : (v > 127 ? 127 : v));
  }
  memset(q + cols, 0, static_cast<size_t>(ld - cols));
  *scale = amax / 127.0f;
}

// Group scales first (the element of largest magnitude, the first such, maps to -8), then the nibbles one
// 64-element block at a time; blocks that the row's end cuts take the element-wise path.
void quantize_weight_i4_avx2(const float* x, int64_t cols, int64_t ld, int G, uint8_t* out, uint16_t* scales) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int64_t ng = ld / G;
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t lo = g * G, hi = imin(cols, lo + G);
    float m = 0.0f, amax = 0.0f;
    if (hi - lo == G) {
      __m256 mx = _mm256_setzero_ps();
      for (int64_t i = lo; i < hi; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + i), absmask));
      amax = hmax(mx);
      if (amax > 0.0f) {
        const __m256 am = _mm256_set1_ps(amax);
        for (int64_t i = lo; i < hi; i += 8) {
          const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), am, _CMP_EQ_OQ));
          if (mask) {
            m = x[i + __builtin_ctz(static_cast<unsigned>(mask))];
            break;
          }
        }
      }
    } else {
      for (int64_t i = lo; i < hi; ++i)
        if (fabsf(x[i]) > amax) {
          amax = fabsf(x[i]);
          m = x[i];
        }
    }
    float d = m / -8.0f;
    d = d < -65504.0f ? -65504.0f : (d > 65504.0f ? 65504.0f : d);
    scales[g] = static_cast<uint16_t>(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
  }
  const __m256i lo8 = _mm256_set1_epi32(-8), hi7 = _mm256_set1_epi32(7), eight = _mm256_set1_epi32(8);
  for (int64_t s = 0; s < ld / 64; ++s) {
    const int64_t e = s * 64;
    if (e + 64 <= cols) {
      __m256i u[2];
      for (int h = 0; h < 2; ++h) {
        const float dr = _cvtsh_ss(scales[(e + 32 * h) / G]);
        const __m256 iv = _mm256_set1_ps(dr != 0.0f ? 1.0f / dr : 0.0f);
        __m256i v[4];
        for (int k = 0; k < 4; ++k) {
          const __m256i qv = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + e + 32 * h + 8 * k), iv));
          v[k] = _mm256_add_epi32(_mm256_min_epi32(_mm256_max_epi32(qv, lo8), hi7), eight);
        }
        u[h] = pack32(v[0], v[1], v[2], v[3]);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + s * 32), _mm256_or_si256(u[0], _mm256_slli_epi16(u[1], 4)));
    } else {
      for (int j = 0; j < 32; ++j) {
        uint8_t b = 0;
        for (int h = 0; h < 2; ++h) {
          const int64_t k = e + 32 * h + j;
          int v = 0;
          if (k < cols) {
            const float dr = _cvtsh_ss(scales[k / G]);
            const float inv = dr != 0.0f ? 1.0f / dr : 0.0f;
            v = static_cast<int>(nearbyintf(x[k] * inv));
            v = v < -8 ? -8 : (v > 7 ? 7 : v);
          }
          b = static_cast<uint8_t>(b | ((v + 8) << (4 * h)));
        }
        out[s * 32 + j] = b;
      }
    }
  }
}

void round_half_avx2(const float* x, int64_t n, uint16_t* out, bool f16) {
  int64_t i = 0;
  if (f16) {
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) out[i] = static_cast<uint16_t>(_cvtss_sh(x[i], _MM_FROUND_TO_NEAREST_INT));
    return;
  }
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), quiet = _mm256_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    __m256i h[2];
    for (int k = 0; k < 2; ++k) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * k);
      const __m256i b = _mm256_castps_si256(v);
      const __m256i r = _mm256_srli_epi32(
          _mm256_add_epi32(_mm256_add_epi32(b, bias), _mm256_and_si256(_mm256_srli_epi32(b, 16), one)), 16);
      const __m256i nan = _mm256_or_si256(_mm256_srli_epi32(b, 16), quiet);
      h[k] = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                        _mm256_permute4x64_epi64(_mm256_packus_epi32(h[0], h[1]), 0xd8));
  }
  for (; i < n; ++i) {
    uint32_t b;
    memcpy(&b, x + i, 4);
    out[i] = (b & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>((b >> 16) | 0x40)
                                              : static_cast<uint16_t>((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
}

// ---- element-wise ---------------------------------------------------------------------------------------

// exp(x) for x <= 88.7 (Cephes' single-precision polynomial; about 1 ulp). Inputs below -87.3 give 0.
inline __m256 exp256(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

// 0.5·x·(1 + erf(x/√2)). erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), as PyTorch's vectorised GELU.
inline __m256 gelu_erf8(__m256 x) {
  const __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(0.70710678118654752f));
  const __m256 sign = _mm256_and_ps(z, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u))));
  const __m256 az = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u))), z);
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), az, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(1.061405429f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = exp256(_mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), az), az));
  const __m256 erf_abs = _mm256_fnmadd_ps(p, e, _mm256_set1_ps(1.0f));
  const __m256 erf = _mm256_or_ps(erf_abs, sign);
  return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.0f), erf));
}

void gelu_erf_avx2(float* p, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, gelu_erf8(_mm256_loadu_ps(p + i)));
  for (; i < n; ++i) p[i] = 0.5f * p[i] * (1.0f + erff(p[i] * 0.70710678118654752f));
}

// tanh(u) = 1 - 2 / (exp(2u) + 1)
void gelu_tanh_avx2(float* p, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
    const __m256 e = exp256(_mm256_min_ps(_mm256_mul_ps(two, u), _mm256_set1_ps(80.0f)));
    const __m256 th = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(e, one)));
    _mm256_storeu_ps(p + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), v), _mm256_add_ps(one, th)));
  }
  for (; i < n; ++i) {
    const float v = p[i];
    p[i] = 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  }
}

float exp_sum_avx2(float* p, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p + i), m));
    _mm256_storeu_ps(p + i, e);
    s = _mm256_add_ps(s, e);
  }
  float t = hsum(s);
  for (; i < n; ++i) {
    p[i] = expf(p[i] - mx);
    t += p[i];
  }
  return t;
}

float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// The int8 products' inner instructions (dot_u8s8: vpmaddubsw + vpmaddwd + vpaddd, or one vpdpbusd) with no
// memory operands. Each accumulator has its own operand, so no product is shared between them, and enough
// accumulators run side by side to cover the latency: 10 for vpdpbusd (5 cycles × 2 ports; the VNNI build
// has 32 vector registers), 6 for the AVX2 chain, whose only dependency on the accumulator is the add. Named
// variables, not arrays, keep everything in registers; the empty asm makes the operands opaque, so every
// round does every product.
// Sign (AVX2 only): each product also takes its vpsignb, as the I8 tile does: the ceiling of exact int8 × int8
// on AVX2, where vpsignb competes with vpmaddubsw and vpmaddwd for the same two ports (docs/PERFORMANCE.md).
// Int16 (AVX2 only): vpmaddwd + vpaddd on int16 lanes, 16 multiply-adds per product: the other exact route
// (bytes widened), measured there to reach no more than Sign.
template <DotLoop Loop>
int64_t int8_dot_rounds(int64_t iters, int32_t* sink) {
  __m256i u = _mm256_set1_epi8(3);
  __m256i s0 = _mm256_set1_epi8(-5), s1 = _mm256_set1_epi8(-4), s2 = _mm256_set1_epi8(-3),
          s3 = _mm256_set1_epi8(-2), s4 = _mm256_set1_epi8(-1), s5 = _mm256_set1_epi8(1);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
#ifdef BLIP2_KERNELS_VNNI
  constexpr int K = 10;
  __m256i s6 = _mm256_set1_epi8(2), s7 = _mm256_set1_epi8(3), s8 = _mm256_set1_epi8(4), s9 = _mm256_set1_epi8(5);
  __m256i a6 = a0, a7 = a0, a8 = a0, a9 = a0;
#else
  constexpr int K = 6;
#endif
  const auto product = [&u](__m256i acc, __m256i s) {
    if constexpr (Loop == DotLoop::Int16) return _mm256_add_epi32(acc, _mm256_madd_epi16(u, s));
    return dot_u8s8(acc, u, Loop == DotLoop::Sign ? _mm256_sign_epi8(s, u) : s);
  };
  for (int64_t i = 0; i < iters; ++i) {
    a0 = product(a0, s0);
    a1 = product(a1, s1);
    a2 = product(a2, s2);
    a3 = product(a3, s3);
    a4 = product(a4, s4);
    a5 = product(a5, s5);
    __asm__ volatile("" : "+x"(u), "+x"(s0), "+x"(s1), "+x"(s2), "+x"(s3), "+x"(s4), "+x"(s5));
#ifdef BLIP2_KERNELS_VNNI
    a6 = product(a6, s6);
    a7 = product(a7, s7);
    a8 = product(a8, s8);
    a9 = product(a9, s9);
    __asm__ volatile("" : "+x"(s6), "+x"(s7), "+x"(s8), "+x"(s9));
#endif
  }
  __m256i t = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3)),
                               _mm256_add_epi32(a4, a5));
#ifdef BLIP2_KERNELS_VNNI
  t = _mm256_add_epi32(t, _mm256_add_epi32(_mm256_add_epi32(a6, a7), _mm256_add_epi32(a8, a9)));
#endif
  *sink = _mm256_extract_epi32(t, 0);
  return iters * K * (Loop == DotLoop::Int16 ? 16 : 32);
}

int64_t int8_dot_loop_avx2(int64_t iters, int32_t* sink, DotLoop loop) {
#ifdef BLIP2_KERNELS_VNNI
  (void)loop;  // the VNNI I8 tile needs neither: (w + 128) × a
  return int8_dot_rounds<DotLoop::Peak>(iters, sink);
#else
  switch (loop) {
    case DotLoop::Sign: return int8_dot_rounds<DotLoop::Sign>(iters, sink);
    case DotLoop::Int16: return int8_dot_rounds<DotLoop::Int16>(iters, sink);
    default: return int8_dot_rounds<DotLoop::Peak>(iters, sink);
  }
#endif
}

#ifdef BLIP2_KERNELS_VNNI
const Impl kAvx2 = {"avx2+vnni",
#else
const Impl kAvx2 = {"avx2",
#endif
                    gemv_float_avx2,
                    gemv_i8_avx2,
                    gemv_i4_avx2,
                    gemv_i8_float_avx2,
                    quantize_rows_avx2,
                    dequant_rows_avx2,
                    quantize_weight_i8_avx2,
                    quantize_weight_i4_avx2,
                    round_half_avx2,
                    gelu_erf_avx2,
                    gelu_tanh_avx2,
                    exp_sum_avx2,
                    dot_avx2,
                    axpy_avx2,
                    int8_dot_loop_avx2};

}  // namespace

#ifdef BLIP2_KERNELS_VNNI
const Impl* vnni_impl() { return &kAvx2; }
#else
const Impl* avx2_impl() { return &kAvx2; }
#endif

}  // namespace blip2::kern::detail
