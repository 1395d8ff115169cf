// What the CPU kernels share: CPU feature checks and sharing work over XLA's threads.

#ifndef FORESIGHT_LAB_KERNELS_COMMON_H_
#define FORESIGHT_LAB_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FL_X86 1
// Functions compiled for AVX2 and FMA; callers check HasAvx2() first.
#define FL_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace foresight_lab {

#ifdef FL_X86
inline bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

FL_AVX2 inline float HorizontalSum(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}
#endif

// IEEE binary16 -> binary32, exact (subnormals included).
inline float HalfToFloat(uint16_t h) {
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

// body(begin, end) over [0, n) in chunks of `chunk` items, shared over XLA's intra-op
// threads. Workers claim chunks until none is left. The calling thread works too and
// then waits only for chunks already claimed, so a task that the pool starts late
// finds nothing to do and returns at once (the state it reads is shared-owned).
//
// At most one worker a core, the caller included. XLA's pool has a thread a core and
// the caller may be outside it, so a helper on every pool thread put three workers on
// two cores; waiting for chunks that a preempted worker had claimed then made a decode
// step as slow on two cores as on one (27 ms at batch 1, now 17).
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, Body body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  chunk = std::max<int64_t>(1, chunk);
  const int64_t chunks = (n + chunk - 1) / chunk;
  auto state = std::make_shared<State>();
  auto work = [state, chunk, chunks, n, body]() {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      body(c * chunk, std::min(n, (c + 1) * chunk));
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), cores - 1, chunks - 1});
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  while (state->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace foresight_lab

#endif  // FORESIGHT_LAB_KERNELS_COMMON_H_
