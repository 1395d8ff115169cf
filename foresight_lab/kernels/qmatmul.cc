// Matrix products with GGUF-quantized weights on the CPU, for XLA through jax.ffi.
//
//   y[M, N] = x[M, K] . W[N, K]^T      x, y float32; W kept in its GGUF blocks
//
// Blocks of 32 weights along K, as llama.cpp stores them, split into arrays:
//   q4_1: nibbles uint8[N, K/2] (byte j of a block: weight j low, weight j+16 high),
//         scales d float16[N, K/32], mins m float16[N, K/32];  w = d * q + m
//   q8_0: values int8[N, K], scales d float16[N, K/32];         w = d * q
//
// Each output row's weights are dequantized into a float buffer that stays in L1
// (multiply, then add, so they equal the GGUF reader's float32 values bit for bit),
// then dotted with every row of x. Only the order of the sums differs from a float32
// matmul of the dequantized matrix. Rows are shared out over XLA's intra-op threads.
//
// The decode step of a small model is bound by the bytes of weights it reads: these
// blocks are about 4.5 (q4_1) or 8.5 (q8_0) bits a weight against float32's 32.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FL_X86 1
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

float HalfToFloat(uint16_t h) {
  // IEEE binary16 -> binary32, exact (subnormals included).
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000 | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    exponent = 113;
    while ((mantissa & 0x400) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

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

// out[i] = sum_k w[k] * x[i][k] for `rows` rows of x (stride k).
void DotScalar(const float* w, const float* x, int64_t rows, int64_t k, int64_t x_stride,
               float* out, int64_t out_stride) {
  for (int64_t i = 0; i < rows; ++i) {
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t j = 0; j < k; j += 8) {
      for (int l = 0; l < 8; ++l) partial[l] += w[j + l] * x[i * x_stride + j + l];
    }
    float total = 0;
    for (float p : partial) total += p;
    out[i * out_stride] = total;
  }
}

#ifdef FL_X86

#define FL_AVX2 __attribute__((target("avx2,fma,f16c")))

// One block's 32 weights as four vectors of eight, equal to the reference's floats.
FL_AVX2 inline void BlockAvx2(const Q41Row& row, int64_t b, __m256 w[4]) {
  const __m128i low_bits = _mm_set1_epi8(0x0f);
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(row.scales[b]));
  const __m256 m = _mm256_set1_ps(_cvtsh_ss(row.mins[b]));
  const __m128i bytes =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(row.nibbles + b * kBlock / 2));
  const __m128i lo = _mm_and_si128(bytes, low_bits);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits);
  const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
  for (int p = 0; p < 4; ++p) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
    w[p] = _mm256_add_ps(_mm256_mul_ps(d, q), m);
  }
}

FL_AVX2 inline void BlockAvx2(const Q80Row& row, int64_t b, __m256 w[4]) {
  const __m256 d = _mm256_set1_ps(_cvtsh_ss(row.scales[b]));
  const int8_t* q = row.values + b * kBlock;
  for (int p = 0; p < 4; ++p) {
    const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * p));
    w[p] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight)), d);
  }
}

template <typename Row>
FL_AVX2 void DequantizeAvx2(const Row& row, int64_t k, float* out) {
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m256 w[4];
    BlockAvx2(row, b, w);
    for (int p = 0; p < 4; ++p) _mm256_storeu_ps(out + b * kBlock + 8 * p, w[p]);
  }
}

FL_AVX2 float HorizontalSum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

// Sums four accumulators of eight into one float.
FL_AVX2 inline float Total(const __m256 a[4]) {
  return HorizontalSum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

// One or two rows of x against one row of weights, four accumulators each (k is a
// multiple of 32), so the fused multiply-adds do not wait on one another. `Weights`
// gives block b's 32 weights as four vectors: loaded from a buffer, or dequantized in
// registers.
template <bool kTwo, typename Weights>
FL_AVX2 inline void DotBlocksAvx2(Weights weights, int64_t k, const float* x0, const float* x1,
                                  float* out0, float* out1) {
  __m256 a[8];
  for (auto& v : a) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / kBlock; ++b) {
    __m256 w[4];
    weights(b, w);
    for (int p = 0; p < 4; ++p) {
      a[p] = _mm256_fmadd_ps(w[p], _mm256_loadu_ps(x0 + b * kBlock + 8 * p), a[p]);
      if (kTwo) {
        a[4 + p] = _mm256_fmadd_ps(w[p], _mm256_loadu_ps(x1 + b * kBlock + 8 * p), a[4 + p]);
      }
    }
  }
  *out0 = Total(a);
  if (kTwo) *out1 = Total(a + 4);
}

// Block b's weights read from a float buffer, or dequantized in registers (the
// target attribute does not reach into lambdas, hence small structs).
struct LoadedBlocks {
  const float* w;
  FL_AVX2 void operator()(int64_t b, __m256 v[4]) const {
    for (int p = 0; p < 4; ++p) v[p] = _mm256_loadu_ps(w + b * kBlock + 8 * p);
  }
};

template <typename Row>
struct DequantizedBlocks {
  const Row& row;
  FL_AVX2 void operator()(int64_t b, __m256 v[4]) const { BlockAvx2(row, b, v); }
};

// out[i * out_stride] = row w (floats) dotted with row i of x, for every row of x.
FL_AVX2 void DotAvx2(const float* w, const float* x, int64_t rows, int64_t k, int64_t x_stride,
                     float* out, int64_t out_stride) {
  const LoadedBlocks load{w};
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) {
    DotBlocksAvx2<true>(load, k, x + i * x_stride, x + (i + 1) * x_stride, out + i * out_stride,
                        out + (i + 1) * out_stride);
  }
  if (i < rows) {
    DotBlocksAvx2<false>(load, k, x + i * x_stride, nullptr, out + i * out_stride, nullptr);
  }
}

// The same for at most two rows of x, dequantizing each block in registers.
template <typename Row>
FL_AVX2 void FusedAvx2(const Row& row, int64_t k, const float* x, int64_t rows, float* out,
                       int64_t out_stride) {
  const DequantizedBlocks<Row> dequantize{row};
  if (rows == 2) {
    DotBlocksAvx2<true>(dequantize, k, x, x + k, out, out + out_stride);
  } else {
    DotBlocksAvx2<false>(dequantize, k, x, nullptr, out, nullptr);
  }
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

#endif  // FL_X86

template <typename Row>
void Dequantize(const Row& row, int64_t k, float* out) {
#ifdef FL_X86
  if (HasAvx2()) return DequantizeAvx2(row, k, out);
#endif
  DequantizeScalar(row, k, out);
}

void Dot(const float* w, const float* x, int64_t rows, int64_t k, float* out, int64_t n) {
#ifdef FL_X86
  if (HasAvx2()) return DotAvx2(w, x, rows, k, k, out, n);
#endif
  DotScalar(w, x, rows, k, k, out, n);
}

// ---- sharing rows out over threads ----------------------------------------------

// Workers claim chunks of output rows until none is left. The calling thread works
// too and then waits only for chunks already claimed, so a task that the pool starts
// late finds nothing to do and returns at once (the state it reads is shared-owned).
template <typename Body>
void ParallelRows(ffi::ThreadPool& pool, int64_t n, int64_t weights_per_row, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  // Chunks of at least ~64K weights, so a task is worth its scheduling.
  const int64_t chunk = std::max<int64_t>(8, (1 << 16) / std::max<int64_t>(1, weights_per_row));
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto state = std::make_shared<State>();
  auto work = [state, chunk, chunks, n, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

template <typename MakeRow>
ffi::Error Matmul(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x, int64_t n,
                  MakeRow make_row, ffi::ResultBuffer<ffi::F32>& y) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("x must be [M, K]");
  const int64_t m = x_dims[0];
  const int64_t k = x_dims[1];
  if (k % kBlock != 0) return ffi::Error::InvalidArgument("K must be a multiple of 32");
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  ParallelRows(pool, n, k, [=](int64_t begin, int64_t end) {
    thread_local std::vector<float> row;
    row.resize(k);
    for (int64_t r = begin; r < end; ++r) {
#ifdef FL_X86
      if (m <= 2 && HasAvx2()) {
        FusedAvx2(make_row(r), k, x_data, m, y_data + r, n);
        continue;
      }
#endif
      Dequantize(make_row(r), k, row.data());
      Dot(row.data(), x_data, m, k, y_data + r, n);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Q41Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> nibbles,
                     ffi::Buffer<ffi::F16> scales, ffi::Buffer<ffi::F16> mins,
                     ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = nibbles.dimensions();
  const int64_t n = dims[0];
  const int64_t half_k = dims[1];
  const int64_t blocks = half_k * 2 / kBlock;
  const uint8_t* q = nibbles.typed_data();
  const uint16_t* d = scales.typed_data();
  const uint16_t* mn = mins.typed_data();
  return Matmul(
      pool, x, n,
      [=](int64_t r) { return Q41Row{q + r * half_k, d + r * blocks, mn + r * blocks}; }, y);
}

ffi::Error Q80Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> values,
                     ffi::Buffer<ffi::F16> scales, ffi::ResultBuffer<ffi::F32> y) {
  const auto dims = values.dimensions();
  const int64_t n = dims[0];
  const int64_t k = dims[1];
  const int8_t* q = values.typed_data();
  const uint16_t* d = scales.typed_data();
  return Matmul(
      pool, x, n, [=](int64_t r) { return Q80Row{q + r * k, d + r * (k / kBlock)}; }, y);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlQ41Matmul, Q41Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlQ80Matmul, Q80Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
