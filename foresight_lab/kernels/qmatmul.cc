// Matrix products for decode on the CPU, for XLA through jax.ffi: GGUF-quantized weights,
// and at the end of the file float32 weights, stacked over layers or kept [out, in].
//
//   y[M, N] = x[M, K] . W[N, K]^T      x, y float32; W kept in its GGUF blocks
//
// Blocks of 32 weights along K, as llama.cpp stores them, split into arrays:
//   q4_1: nibbles uint8[N, K/2] (byte j of a block: weight j low, weight j+16 high),
//         scales d float16[N, K/32], mins m float16[N, K/32];  w = d * q + m
//   q8_0: values int8[N, K], scales d float16[N, K/32];         w = d * q
//
// With AVX2 and FMA, the weights are never formed: each block of x is rounded to
// int16 with a scale of its own (x ~ s * x16, |x16| <= 32767), and each block adds
//   d * s * (q . x16)  [+ m * sum(x_block) for q4_1]
// where q . x16 is an exact integer dot product (vpmaddwd) and the block sums of x
// are float32. Rounding x to 16 bits moves the result by at most about 2e-5 of the
// output's scale (tests hold it to 1e-4 of max |y|). A second q4_1 handler rounds x to
// int8 instead (llama.cpp's rounding; vpmaddubsw), faster by about a fifth a decode
// step and about 1e-3 of the output's scale from float32. Without AVX2 a portable path
// dequantizes a row of W into a buffer (multiply, then add, as the reference does)
// and dots it with x in float32. Output rows are shared out over XLA's intra-op
// threads.
//
// A decode step of a small model is bound by the bytes of weights it reads and by
// the work per weight: these blocks are about 4.5 (q4_1) or 8.5 (q8_0) bits a weight
// against float32's 32, and the integer products need one conversion to float a
// block instead of one a weight.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using foresight_lab::HalfToFloat;
using foresight_lab::ParallelFor;
#ifdef FL_X86
using foresight_lab::HasAvx2;
using foresight_lab::HorizontalSum;
#endif

constexpr int64_t kBlock = 32;

// ---- dequantizing one row of W into floats ---------------------------------------

struct Q41Row {
  const uint8_t* nibbles;  // [K/2]
  const uint16_t* scales;  // [K/32]
  const uint16_t* mins;    // [K/32]
};

struct Q80Row {
  const int8_t* values;    // [K]
  const uint16_t* scales;  // [K/32]
};

void DequantizeScalar(const Q41Row& row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float d = HalfToFloat(row.scales[b]);
    const float m = HalfToFloat(row.mins[b]);
    const uint8_t* q = row.nibbles + b * kBlock / 2;
    float* w = out + b * kBlock;
    for (int j = 0; j < kBlock / 2; ++j) {
      const float lo = d * static_cast<float>(q[j] & 0x0f);
      const float hi = d * static_cast<float>(q[j] >> 4);
      w[j] = lo + m;
      w[j + kBlock / 2] = hi + m;
    }
  }
}

void DequantizeScalar(const Q80Row& row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float d = HalfToFloat(row.scales[b]);
    for (int j = 0; j < kBlock; ++j) {
      out[b * kBlock + j] = static_cast<float>(row.values[b * kBlock + j]) * d;
    }
  }
}

// The dot product of two float32 vectors of length k, summed in a fixed order (eight
// running sums, then the rest), so a row's result never depends on its neighbours.
float RowDotScalar(const float* a, const float* b, int64_t k) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += a[j + l] * b[j + l];
  }
  float total = 0;
  for (float p : partial) total += p;
  for (; j < k; ++j) total += a[j] * b[j];
  return total;
}

#ifdef FL_X86
FL_AVX2 float RowDotAvx2(const float* a, const float* b, int64_t k) {
  __m256 acc[4];
  for (auto& v : acc) v = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= k; j += 32) {
    for (int s = 0; s < 4; ++s) {
      acc[s] = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8 * s), _mm256_loadu_ps(b + j + 8 * s),
                               acc[s]);
    }
  }
  for (; j + 8 <= k; j += 8) {
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc[0]);
  }
  float total =
      HorizontalSum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; j < k; ++j) total += a[j] * b[j];
  return total;
}
#endif

// out[i * out_stride] = w . x[i] for the m rows of x (each k long, contiguous).
void DotRows(const float* w, const float* x, int64_t m, int64_t k, float* out,
             int64_t out_stride) {
  for (int64_t i = 0; i < m; ++i) {
#ifdef FL_X86
    if (HasAvx2()) {
      out[i * out_stride] = RowDotAvx2(w, x + i * k, k);
      continue;
    }
#endif
    out[i * out_stride] = RowDotScalar(w, x + i * k, k);
  }
}

#ifdef FL_X86

// The integers of block b as two vectors of sixteen int16 (weights 0-15 and 16-31).
FL_AVX2 inline void IntegersAvx2(const Q41Row& row, int64_t b, __m256i q[2]) {
  const __m128i low_bits = _mm_set1_epi8(0x0f);
  const __m128i bytes =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.nibbles + b * kBlock / 2));
  q[0] = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low_bits));
  q[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits));
}

FL_AVX2 inline void IntegersAvx2(const Q80Row& row, int64_t b, __m256i q[2]) {
  const int8_t* values = row.values + b * kBlock;
  for (int p = 0; p < 2; ++p) {
    q[p] = _mm256_cvtepi8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(values + 16 * p)));
  }
}

// Each of `blocks` blocks of 32 floats of x rounded to T (int16 or int8) with a scale
// of its own, x ~ rounded * scale with |rounded| <= T's largest (to nearest, ties to
// even), and the block's float32 sum. A block with an infinity or NaN gets a NaN scale,
// so its products are NaN, as the float32 product would be.
template <typename T>
FL_AVX2 void RoundBlocksAvx2(const float* x, int64_t blocks, T* rounded, float* scales,
                             float* sums) {
  constexpr float kLargest = std::numeric_limits<T>::max();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 largest_float = _mm256_set1_ps(std::numeric_limits<float>::max());
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    int finite = 0xff;
    for (int p = 0; p < 4; ++p) {
      v[p] = _mm256_loadu_ps(xb + 8 * p);
      const __m256 magnitude = _mm256_andnot_ps(sign, v[p]);
      finite &= _mm256_movemask_ps(_mm256_cmp_ps(magnitude, largest_float, _CMP_LE_OQ));
      amax = _mm256_max_ps(amax, magnitude);
    }
    sums[b] = HorizontalSum(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
    __m128 half = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    half = _mm_max_ps(half, _mm_movehl_ps(half, half));
    const float top = _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
    const bool ok = finite == 0xff;
    scales[b] = ok ? top / kLargest : NAN;
    const __m256 inverse = _mm256_set1_ps(ok && top > 0 ? kLargest / top : 0.0f);
    __m256i q[4];
    for (int p = 0; p < 4; ++p) q[p] = _mm256_cvtps_epi32(_mm256_mul_ps(v[p], inverse));
    // The packs work within 128-bit lanes; the permutes put the values back in order.
    const __m256i lo = _mm256_packs_epi32(q[0], q[1]);  // 0-3 8-11 | 4-7 12-15
    const __m256i hi = _mm256_packs_epi32(q[2], q[3]);  // 16-19 24-27 | 20-23 28-31
    if constexpr (std::is_same_v<T, int8_t>) {
      const __m256i bytes = _mm256_packs_epi16(lo, hi);  // fours 0 2 4 6 | 1 3 5 7
      _mm256_storeu_si256(
          reinterpret_cast<__m256i*>(rounded + b * kBlock),
          _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + b * kBlock),
                          _mm256_permute4x64_epi64(lo, 0xd8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rounded + b * kBlock + 16),
                          _mm256_permute4x64_epi64(hi, 0xd8));
    }
  }
}

// The lanes of `products` summed, plus q4_1's sum over blocks of m * (the block's sum
// of x).
FL_AVX2 inline float MinsTerm(const Q41Row& row, int64_t blocks, const float* sums,
                              __m256 products) {
  int64_t b = 0;
  __m256 mins = _mm256_setzero_ps();
  for (; b + 8 <= blocks; b += 8) {
    const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.mins + b));
    mins = _mm256_fmadd_ps(_mm256_cvtph_ps(halves), _mm256_loadu_ps(sums + b), mins);
  }
  float total = HorizontalSum(products) + HorizontalSum(mins);
  for (; b < blocks; ++b) total += _cvtsh_ss(row.mins[b]) * sums[b];
  return total;
}

// Row r of W dotted with kRows rows of x without forming the weights: the sum over
// blocks of d * x_scale * (q . x16), plus for q4_1 the sum of m * (the block's sum of
// x). The integer products q * x16 add up exactly in int32 (at most 4 * 127 * 32767 <
// 2^24, so the conversion to float is exact too): one conversion a block, not one a
// weight. A block's integers are widened once for all kRows rows.
template <int kRows, typename Row>
FL_AVX2 void FactoredAvx2(const Row& row, int64_t k, const int16_t* x16,
                          const float* x_scales, const float* x_sums, float* out,
                          int64_t out_stride) {
  __m256 acc[kRows];
  for (auto& v : acc) v = _mm256_setzero_ps();
  const int64_t blocks = k / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i q[2];
    IntegersAvx2(row, b, q);
    const float d = _cvtsh_ss(row.scales[b]);
    for (int i = 0; i < kRows; ++i) {
      const int16_t* xb = x16 + i * k + b * kBlock;
      const __m256i lo = _mm256_madd_epi16(q[0], _mm256_loadu_si256((const __m256i*)xb));
      const __m256i hi = _mm256_madd_epi16(q[1], _mm256_loadu_si256((const __m256i*)(xb + 16)));
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(lo, hi)),
                               _mm256_set1_ps(d * x_scales[i * blocks + b]), acc[i]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    if constexpr (std::is_same_v<Row, Q41Row>) {
      out[i * out_stride] = MinsTerm(row, blocks, x_sums + i * blocks, acc[i]);
    } else {
      out[i * out_stride] = HorizontalSum(acc[i]);
    }
  }
}

// q4_1 with x rounded to int8 (llama.cpp's rounding for these blocks): the unsigned
// nibbles meet x in vpmaddubsw, 32 products an instruction against vpmaddwd's 16. Four
// products add up in each int16 (at most 4 * 15 * 127) and eight in each int32, exactly.
// 128-bit vectors: on CPUs that split 256-bit integer work in two (AMD's Zen 1) they
// are as fast, and a block sums without crossing lanes.
template <int kRows>
FL_AVX2 void FactoredAvx2(const Q41Row& row, int64_t k, const int8_t* x8,
                          const float* x_scales, const float* x_sums, float* out,
                          int64_t out_stride) {
  __m128 acc[kRows];
  for (auto& v : acc) v = _mm_setzero_ps();
  const __m128i low_bits = _mm_set1_epi8(0x0f);
  const __m128i ones = _mm_set1_epi16(1);
  const int64_t blocks = k / kBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    const __m128i bytes =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.nibbles + b * kBlock / 2));
    const __m128i first = _mm_and_si128(bytes, low_bits);                       // 0-15
    const __m128i second = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits);  // 16-31
    const float d = _cvtsh_ss(row.scales[b]);
    for (int i = 0; i < kRows; ++i) {
      const __m128i* xb = reinterpret_cast<const __m128i*>(x8 + i * k + b * kBlock);
      const __m128i fours = _mm_add_epi16(_mm_maddubs_epi16(first, _mm_loadu_si128(xb)),
                                          _mm_maddubs_epi16(second, _mm_loadu_si128(xb + 1)));
      acc[i] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(fours, ones)),
                            _mm_set1_ps(d * x_scales[i * blocks + b]), acc[i]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    out[i * out_stride] =
        MinsTerm(row, blocks, x_sums + i * blocks, _mm256_setr_m128(acc[i], _mm_setzero_ps()));
  }
}

// Every row of x (m of them) against row r of W, eight rows of x at a time, then four,
// then the rest: each row sums the same way whichever group it falls in.
template <typename Row, typename T>
FL_AVX2 void FactoredRowsAvx2(const Row& row, int64_t k, const T* rounded, int64_t m,
                              const float* x_scales, const float* x_sums, float* out,
                              int64_t out_stride) {
  const int64_t blocks = k / kBlock;
  int64_t i = 0;
  for (; i + 8 <= m; i += 8) {
    FactoredAvx2<8>(row, k, rounded + i * k, x_scales + i * blocks, x_sums + i * blocks,
                    out + i * out_stride, out_stride);
  }
  for (; i + 4 <= m; i += 4) {
    FactoredAvx2<4>(row, k, rounded + i * k, x_scales + i * blocks, x_sums + i * blocks,
                    out + i * out_stride, out_stride);
  }
  const T* xi = rounded + i * k;
  const float* ci = x_scales + i * blocks;
  const float* si = x_sums + i * blocks;
  float* oi = out + i * out_stride;
  switch (m - i) {
    case 3: FactoredAvx2<3>(row, k, xi, ci, si, oi, out_stride); break;
    case 2: FactoredAvx2<2>(row, k, xi, ci, si, oi, out_stride); break;
    case 1: FactoredAvx2<1>(row, k, xi, ci, si, oi, out_stride); break;
    default: break;
  }
}

#endif  // FL_X86

// ---- float32 weights, stored [in, out] ----------------------------------------
//
// y[M, N] = x[M, K] . w[K, N], w one layer of a stacked [L, K, N]: the decoder's float
// path (Hugging Face checkpoints, `quantized=False`), which would otherwise copy each
// layer's slice out of the stack every step. Each task owns a strip of 32 columns and
// keeps its sums in registers while it walks down the K rows.

constexpr int64_t kStrip = 32;

void StripScalar(const float* x, const float* w, int64_t m, int64_t k, int64_t n, int64_t c0,
                 int64_t width, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    float acc[kStrip] = {};
    for (int64_t j = 0; j < k; ++j) {
      const float xv = x[i * k + j];
      const float* wj = w + j * n + c0;
      for (int64_t c = 0; c < width; ++c) acc[c] += xv * wj[c];
    }
    for (int64_t c = 0; c < width; ++c) y[i * n + c0 + c] = acc[c];
  }
}

#ifdef FL_X86
FL_AVX2 void StripAvx2(const float* x, const float* w, int64_t m, int64_t k, int64_t n,
                       int64_t c0, float* y) {
  for (int64_t i = 0; i < m; ++i) {
    __m256 acc[kStrip / 8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      const __m256 xv = _mm256_broadcast_ss(x + i * k + j);
      const float* wj = w + j * n + c0;
      for (int s = 0; s < kStrip / 8; ++s) {
        acc[s] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(wj + 8 * s), acc[s]);
      }
    }
    for (int s = 0; s < kStrip / 8; ++s) _mm256_storeu_ps(y + i * n + c0 + 8 * s, acc[s]);
  }
}
#endif

// ---- the handlers ------------------------------------------------------------

// Rows of W (each k weights long) a task takes: at least 8 and about 64K weights, so a
// task is worth its scheduling.
int64_t RowsPerTask(int64_t k) {
  return std::max<int64_t>(8, (1 << 16) / std::max<int64_t>(1, k));
}

template <typename T, typename MakeRow>
ffi::Error Matmul(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, int64_t n,
                  MakeRow make_row, ffi::ResultBuffer<ffi::F32>& y) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  const int64_t m = x_dims[0];
  const int64_t k = x_dims[1];
  if (k % kBlock != 0) return ffi::Error::InvalidArgument("K must be a multiple of 32");
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  // For the factored path, each block of 32 of x once: its float32 sum, and its values
  // rounded to T (x ~ rounded * x_scale, |rounded| <= T's largest).
  const int64_t blocks = k / kBlock;
  auto x_sums = std::make_shared<std::vector<float>>();
  auto x_rounded = std::make_shared<std::vector<T>>();
  auto x_scales = std::make_shared<std::vector<float>>();
#ifdef FL_X86
  if (HasAvx2()) {
    x_sums->resize(m * blocks);
    x_rounded->resize(m * k);
    x_scales->resize(m * blocks);
    RoundBlocksAvx2(x_data, m * blocks, x_rounded->data(), x_scales->data(), x_sums->data());
  }
#endif
  ParallelFor(pool, n, RowsPerTask(k), [=](int64_t begin, int64_t end) {
    thread_local std::vector<float> row;
    row.resize(k);
    for (int64_t r = begin; r < end; ++r) {
#ifdef FL_X86
      if (HasAvx2()) {
        FactoredRowsAvx2(make_row(r), k, x_rounded->data(), m, x_scales->data(), x_sums->data(),
                         y_data + r, n);
        continue;
      }
#endif
      DequantizeScalar(make_row(r), k, row.data());
      DotRows(row.data(), x_data, m, k, y_data + r, n);
    }
  });
  return ffi::Error::Success();
}

// Values are [N, ...] or stacked over layers, [L, N, ...]: then `layer` picks one.
// Returns the offset, in matrices, of that layer (0 when not stacked).
template <typename Dims>
int64_t LayerOffset(const Dims& dims, const ffi::Buffer<ffi::S32>& layer) {
  if (dims.size() != 3) return 0;
  return std::clamp<int64_t>(layer.typed_data()[0], 0, dims[0] - 1);
}

template <typename T>
ffi::Error Q41Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> nibbles,
                     ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                     ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = nibbles.dimensions();
  if (dims.size() != 2 && dims.size() != 3) {
    return ffi::Error::InvalidArgument("q4_1 values must be [N, K/2] or [L, N, K/2]");
  }
  const int64_t n = dims[dims.size() - 2];
  const int64_t half_k = dims[dims.size() - 1];
  const int64_t blocks = half_k * 2 / kBlock;
  const int64_t matrix = LayerOffset(dims, layer) * n;
  const uint8_t* q = nibbles.typed_data() + matrix * half_k;
  const uint16_t* d = scales.typed_data() + matrix * blocks;
  const uint16_t* mn = mins.typed_data() + matrix * blocks;
  return Matmul<T>(
      pool, x, n,
      [=](int64_t r) { return Q41Row{q + r * half_k, d + r * blocks, mn + r * blocks}; }, y);
}

ffi::Error Q80Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> values,
                     ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::S32> layer,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = values.dimensions();
  if (dims.size() != 2 && dims.size() != 3) {
    return ffi::Error::InvalidArgument("q8_0 values must be [N, K] or [L, N, K]");
  }
  const int64_t n = dims[dims.size() - 2];
  const int64_t k = dims[dims.size() - 1];
  const int64_t matrix = LayerOffset(dims, layer) * n;
  const int8_t* q = values.typed_data() + matrix * k;
  const uint16_t* d = scales.typed_data() + matrix * (k / kBlock);
  return Matmul<int16_t>(
      pool, x, n, [=](int64_t r) { return Q80Row{q + r * k, d + r * (k / kBlock)}; }, y);
}

ffi::Error F32Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                     ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto dims = w.dimensions();
  if (x_dims.size() != 2 || (dims.size() != 2 && dims.size() != 3)) {
    return ffi::Error::InvalidArgument("x must be [M, K] and w [K, N] or [L, K, N]");
  }
  const int64_t m = x_dims[0];
  const int64_t k = dims[dims.size() - 2];
  const int64_t n = dims[dims.size() - 1];
  if (x_dims[1] != k) return ffi::Error::InvalidArgument("x and w disagree in K");
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data() + LayerOffset(dims, layer) * k * n;
  float* y_data = y->typed_data();
  ParallelFor(pool, (n + kStrip - 1) / kStrip, 1, [=](int64_t begin, int64_t end) {
    for (int64_t strip = begin; strip < end; ++strip) {
      const int64_t c0 = strip * kStrip;
      const int64_t width = std::min(kStrip, n - c0);
#ifdef FL_X86
      if (HasAvx2() && width == kStrip) {
        StripAvx2(x_data, w_data, m, k, n, c0, y_data);
        continue;
      }
#endif
      StripScalar(x_data, w_data, m, k, n, c0, width, y_data);
    }
  });
  return ffi::Error::Success();
}

// y[M, N] = x[M, K] . w[N, K]^T for float32 w kept [out, in]: a tied embedding read as
// the output layer. Each output is one row dot product, in the same order however many
// rows x has (XLA's dot takes a matrix-vector path for one row and rounds otherwise),
// so a decode row's logits do not depend on the batch it runs in.
ffi::Error F32MatmulTransposed(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto dims = w.dimensions();
  if (x_dims.size() != 2 || dims.size() != 2 || x_dims[1] != dims[1]) {
    return ffi::Error::InvalidArgument("x must be [M, K] and w [N, K]");
  }
  const int64_t m = x_dims[0], n = dims[0], k = dims[1];
  const float* x_data = x.typed_data();
  const float* w_data = w.typed_data();
  float* y_data = y->typed_data();
  ParallelFor(pool, n, RowsPerTask(k), [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) DotRows(w_data + r * k, x_data, m, k, y_data + r, n);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlF32MatmulTransposed, F32MatmulTransposed,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlF32Matmul, F32Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

#define FL_Q41_BINDING                   \
  ffi::Ffi::Bind()                       \
      .Ctx<ffi::ThreadPool>()            \
      .Arg<ffi::Buffer<ffi::F32>>()      \
      .Arg<ffi::Buffer<ffi::U8>>()       \
      .Arg<ffi::Buffer<ffi::F16>>()      \
      .Arg<ffi::Buffer<ffi::F16>>()      \
      .Arg<ffi::Buffer<ffi::S32>>()      \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlQ41Matmul, Q41Matmul<int16_t>, FL_Q41_BINDING);
// x rounded to 8 bits, as llama.cpp rounds it (EngineConfig.activation_bits = 8).
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlQ41Matmul8, Q41Matmul<int8_t>, FL_Q41_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlQ80Matmul, Q80Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
