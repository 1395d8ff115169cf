// Attention of one new token per row over the KV cache where it lies, on the CPU, for
// XLA through jax.ffi: the attention of a decode step.
//
//   q          float32[B, Hkv, G, D]      queries, grouped by the kv head they share
//   k, v       float32 or float16[L, slots, Hkv, S, D]  the cache, stacked over layers
//   positions  int32[B]                   row b attends to cache positions 0..positions[b]
//   rows       int32[B]                   batch row b reads cache row rows[b]
//   layer      int32[]                    of this layer
//   kv_length  attribute: at most this many cache positions are read
//   out        float32[B, Hkv, G, D]      softmax(q . k / sqrt(D)) . v over those positions
//
// The pure-JAX attention in models/decoder.py first copies a window of the cache
// (rows x kv_length) out of it and then runs two small batched products and a masked
// softmax over the whole window; at decode those are a few microseconds of arithmetic
// behind tens of microseconds of copying and dispatch, per layer. This kernel reads
// only the positions each row can see, in place.
//
// A task is one (row, kv head) and a piece of at most kPiece of its positions; a head
// with several pieces merges their softmaxes (each piece's largest score and sum of
// exponentials weigh its normalized output). Pieces keep the two cores busy at batch 1,
// where SmolLM2's three kv heads made three tasks: one core ran two of them while the
// other waited. The pieces of a row depend on its own position only, so its output is
// the same in any batch; a row of at most kPiece positions is one piece, computed as
// before the split.
//
// A float16 cache is converted to float32 as it is read (exactly; F16C converts eight
// at a time), and everything after is float32: the same numbers as the reference,
// which converts the window it copies. It halves the bytes read, but on the Zen 1 CPU
// measured the conversions cost nearly what that saves: 30 layers over 600 positions
// take 2.6-2.75 ms either way at batch 1, and 14.7 against float32's 16.0-16.7 at
// batch 8. The gain of a float16 cache is its memory.
//
// Edge cases follow the reference: a row index is clamped into the cache, as its
// gather does; a row at or beyond kv_length (an idle row) sees all kv_length
// positions; a row with a negative position sees none, which in the reference's masked
// softmax means equal weights on all kv_length positions.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using foresight_lab::HalfToFloat;
using foresight_lab::ParallelFor;

// A cache entry as float32: float32 itself, or float16 in its bits.
inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t x) { return HalfToFloat(x); }

template <typename T>  // the cache's element: float or uint16_t (float16 bits)
struct Head {
  const float* q;  // [G, D]
  const T* k;      // [visible, D]
  const T* v;      // [visible, D]
  float* out;      // [G, D]
  float* top;      // [G]: each query's largest score over these positions
  float* total;    // [G]: each query's sum of exp(score - top)
  int64_t groups;
  int64_t visible;  // positions read
  bool uniform;     // none visible: equal weights, as the reference's masked softmax
};

// One head, portable: scores, a softmax per query, then the weighted sum of values.
template <typename T>
void HeadScalar(const Head<T>& h, int64_t d, float* scores) {
  const float root = static_cast<float>(std::sqrt(static_cast<double>(d)));
  for (int64_t g = 0; g < h.groups; ++g) {
    float* row = scores + g * h.visible;
    float top = -INFINITY;
    for (int64_t s = 0; s < h.visible; ++s) {
      float dot = 0;
      for (int64_t j = 0; j < d; ++j) dot += h.q[g * d + j] * ToFloat(h.k[s * d + j]);
      row[s] = h.uniform ? 0.0f : dot / root;
      top = std::max(top, row[s]);
    }
    float total = 0;
    for (int64_t s = 0; s < h.visible; ++s) total += (row[s] = std::exp(row[s] - top));
    h.top[g] = top;
    h.total[g] = total;
    float* out = h.out + g * d;
    std::fill(out, out + d, 0.0f);
    for (int64_t s = 0; s < h.visible; ++s) {
      const float weight = row[s] / total;
      for (int64_t j = 0; j < d; ++j) out[j] += weight * ToFloat(h.v[s * d + j]);
    }
  }
}

#ifdef FL_X86
using foresight_lab::HorizontalSum;

// Eight cache entries as float32.
FL_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
FL_AVX2 inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// e^x for x <= 0 within a few float32 ulps: 2^n * e^r with r = x - n ln 2 in
// [-ln2/2, ln2/2] and e^r by its minimax polynomial (Cephes' expf coefficients).
// Below -87 it gives about 1e-38 instead of a denormal or 0, which a softmax sum of at
// least 1 does not notice.
FL_AVX2 inline __m256 Exp(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 e_r = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r),
                                   _mm256_set1_ps(1.0f));
  const __m256i exponent =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(e_r, _mm256_castsi256_ps(exponent));
}

// row[0..n) = exp(row - max(row)), returns their sum; *largest = max(row).
FL_AVX2 float ExpShiftedAvx2(float* row, int64_t n, float* largest) {
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(row + s));
  float lanes[8];
  _mm256_storeu_ps(lanes, top8);
  float top = *std::max_element(lanes, lanes + 8);
  for (int64_t t = s; t < n; ++t) top = std::max(top, row[t]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  for (s = 0; s + 8 <= n; s += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(row + s), shift));
    _mm256_storeu_ps(row + s, e);
    total8 = _mm256_add_ps(total8, e);
  }
  float total = HorizontalSum(total8);
  for (; s < n; ++s) total += (row[s] = std::exp(row[s] - top));
  *largest = top;
  return total;
}

// One head with AVX2 for a head size of kD (a multiple of 8): a key's vectors are
// loaded once for all the group's queries, and a query's output stays in registers
// while the values stream past. Float16 values are converted once, beside their key,
// into `values` (float32[visible, kD]), since every query of the group reads them all:
// converting them for each query cost more than reading them (Zen 1, which splits a
// 256-bit conversion in two).
template <int kD, typename T>
FL_AVX2 void HeadAvx2(const Head<T>& h, float* scores, float* values) {
  constexpr int kVectors = kD / 8;
  constexpr bool kConvert = !std::is_same_v<T, float>;
  const float root = static_cast<float>(std::sqrt(static_cast<double>(kD)));
  alignas(32) float converted_key[kConvert ? kD : 1];
  const float* value_rows;  // [visible, kD]
  if constexpr (kConvert) {
    value_rows = values;
  } else {
    value_rows = h.v;
  }
  for (int64_t s = 0; s < h.visible; ++s) {
    const float* key;
    if constexpr (kConvert) {
      for (int j = 0; j < kVectors; ++j) {
        _mm256_store_ps(converted_key + 8 * j, Load8(h.k + s * kD + 8 * j));
        _mm256_storeu_ps(values + s * kD + 8 * j, Load8(h.v + s * kD + 8 * j));
      }
      key = converted_key;
    } else {
      key = h.k + s * kD;
    }
    for (int64_t g = 0; g < h.groups; ++g) {
      const float* query = h.q + g * kD;
      __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(query), _mm256_loadu_ps(key));
      for (int j = 1; j < kVectors; ++j) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(query + 8 * j), _mm256_loadu_ps(key + 8 * j), acc);
      }
      scores[g * h.visible + s] = h.uniform ? 0.0f : HorizontalSum(acc) / root;
    }
  }
  for (int64_t g = 0; g < h.groups; ++g) {
    float* row = scores + g * h.visible;
    const float sum = ExpShiftedAvx2(row, h.visible, h.top + g);
    h.total[g] = sum;
    const __m256 total = _mm256_set1_ps(sum);
    __m256 out[kVectors];
    for (auto& o : out) o = _mm256_setzero_ps();
    int64_t s = 0;
    for (; s + 8 <= h.visible; s += 8) {
      _mm256_storeu_ps(row + s, _mm256_div_ps(_mm256_loadu_ps(row + s), total));
    }
    for (; s < h.visible; ++s) row[s] /= sum;
    for (s = 0; s < h.visible; ++s) {
      const __m256 weight = _mm256_set1_ps(row[s]);
      const float* value = value_rows + s * kD;
      for (int j = 0; j < kVectors; ++j) {
        out[j] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * j), out[j]);
      }
    }
    for (int j = 0; j < kVectors; ++j) _mm256_storeu_ps(h.out + g * kD + 8 * j, out[j]);
  }
}
#endif  // FL_X86

// One head; `scratch` holds at least groups * visible floats (the scores), and for a
// float16 cache visible * d more (the converted values).
template <typename T>
void OneHead(const Head<T>& h, int64_t d, float* scratch) {
#ifdef FL_X86
  if (foresight_lab::HasAvx2()) {
    float* values = scratch + h.groups * h.visible;
    if (d == 64) return HeadAvx2<64>(h, scratch, values);
    if (d == 128) return HeadAvx2<128>(h, scratch, values);
  }
#endif
  HeadScalar(h, d, scratch);
}

constexpr int64_t kPiece = 128;  // positions a task reads at most

struct Piece {
  int64_t row_head;  // b * kv_heads + kv head
  int64_t cache_head;  // offset of its (cache row, kv head) in the layer
  int64_t start, count;  // of the positions it reads
  bool uniform;
};

// out[G, D] = the softmax-weighted merge of a head's pieces' outputs, each normalized
// over its own positions.
void MergePieces(int64_t pieces, int64_t groups, int64_t d, const float* partial,
                 const float* top, const float* total, float* out) {
  for (int64_t g = 0; g < groups; ++g) {
    float largest = -INFINITY;
    for (int64_t p = 0; p < pieces; ++p) largest = std::max(largest, top[p * groups + g]);
    const auto weight_of = [&](int64_t p) {
      return total[p * groups + g] * std::exp(top[p * groups + g] - largest);
    };
    float sum = 0;
    for (int64_t p = 0; p < pieces; ++p) sum += weight_of(p);
    float* o = out + g * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t p = 0; p < pieces; ++p) {
      const float weight = weight_of(p) / sum;
      const float* part = partial + (p * groups + g) * d;
      for (int64_t j = 0; j < d; ++j) o[j] += weight * part[j];
    }
  }
}

// The heads of every row over a cache of T, in pieces shared out over XLA's threads.
template <typename T>
void AttendRows(ffi::ThreadPool pool, const float* q, const T* k, const T* v,
                const int32_t* position, const int32_t* row, float* out, int64_t batch,
                int64_t kv_heads, int64_t groups, int64_t d, int64_t slots, int64_t length,
                int64_t readable) {
  // Each head's pieces, in order: pieces[first[i]..first[i + 1]) for row_head i.
  thread_local std::vector<Piece> pieces;
  thread_local std::vector<int64_t> first;
  pieces.clear();
  first.clear();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t slot = std::clamp<int64_t>(row[b], 0, slots - 1);
    const int64_t seen = std::min<int64_t>(static_cast<int64_t>(position[b]) + 1, readable);
    const bool uniform = seen <= 0;
    const int64_t visible = uniform ? readable : seen;
    for (int64_t head = 0; head < kv_heads; ++head) {
      first.push_back(static_cast<int64_t>(pieces.size()));
      const int64_t cache_head = (slot * kv_heads + head) * length * d;
      for (int64_t start = 0; start < visible; start += kPiece) {
        pieces.push_back({b * kv_heads + head, cache_head, start,
                          std::min(kPiece, visible - start), uniform});
      }
    }
  }
  first.push_back(static_cast<int64_t>(pieces.size()));
  // A head of one piece writes its output in place; the others write here to be merged.
  thread_local std::vector<float> partial, stats;
  partial.resize(pieces.size() * groups * d);
  stats.resize(2 * pieces.size() * groups);
  const Piece* piece = pieces.data();
  const int64_t* first_piece = first.data();
  float* partial_out = partial.data();
  float* top = stats.data();
  float* total = top + pieces.size() * groups;
  ParallelFor(pool, static_cast<int64_t>(pieces.size()), 1, [=](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    for (int64_t p = begin; p < end; ++p) {
      const Piece& it = piece[p];
      const bool alone = first_piece[it.row_head + 1] - first_piece[it.row_head] == 1;
      const int64_t offset = it.cache_head + it.start * d;
      Head<T> head{q + it.row_head * groups * d,
                   k + offset,
                   v + offset,
                   alone ? out + it.row_head * groups * d : partial_out + p * groups * d,
                   top + p * groups,
                   total + p * groups,
                   groups,
                   it.count,
                   it.uniform};
      scratch.resize((groups + (std::is_same_v<T, float> ? 0 : d)) * head.visible);
      OneHead(head, d, scratch.data());
    }
  });
  for (int64_t i = 0; i < batch * kv_heads; ++i) {
    const int64_t count = first[i + 1] - first[i];
    if (count > 1) {
      MergePieces(count, groups, d, partial_out + first[i] * groups * d, top + first[i] * groups,
                  total + first[i] * groups, out + i * groups * d);
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k_cache,
                           ffi::AnyBuffer v_cache, ffi::Buffer<ffi::S32> positions,
                           ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> layer,
                           int64_t kv_length, ffi::ResultBuffer<ffi::F32> out) {
  const auto q_dims = q.dimensions();
  const auto cache_dims = k_cache.dimensions();
  if (q_dims.size() != 4 || cache_dims.size() != 5 || v_cache.dimensions().size() != 5) {
    return ffi::Error::InvalidArgument(
        "q must be [B, Hkv, G, D] and the cache [L, slots, Hkv, S, D]");
  }
  const auto dtype = k_cache.element_type();
  if (v_cache.element_type() != dtype ||
      (dtype != ffi::DataType::F32 && dtype != ffi::DataType::F16)) {
    return ffi::Error::InvalidArgument("the cache's keys and values must both be f32 or f16");
  }
  const int64_t batch = q_dims[0], kv_heads = q_dims[1], groups = q_dims[2], d = q_dims[3];
  const int64_t layers = cache_dims[0], slots = cache_dims[1], length = cache_dims[3];
  if (cache_dims[2] != kv_heads || cache_dims[4] != d ||
      v_cache.element_count() != k_cache.element_count() ||
      positions.element_count() != static_cast<size_t>(batch) ||
      rows.element_count() != static_cast<size_t>(batch)) {
    return ffi::Error::InvalidArgument("q, cache and positions disagree in shape");
  }
  const int64_t readable = std::clamp<int64_t>(kv_length, 1, length);
  // This layer's rows: the cache is stacked over layers and read in place.
  const int64_t layer_offset =
      std::clamp<int64_t>(layer.typed_data()[0], 0, layers - 1) * slots * kv_heads * length * d;
  const auto attend = [&](auto* k_data, auto* v_data) {
    AttendRows(pool, q.typed_data(), k_data + layer_offset, v_data + layer_offset,
               positions.typed_data(), rows.typed_data(), out->typed_data(), batch, kv_heads,
               groups, d, slots, length, readable);
  };
  if (dtype == ffi::DataType::F16) {
    attend(k_cache.typed_data<uint16_t>(), v_cache.typed_data<uint16_t>());
  } else {
    attend(k_cache.typed_data<float>(), v_cache.typed_data<float>());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("kv_length")
                                  .Ret<ffi::Buffer<ffi::F32>>());
