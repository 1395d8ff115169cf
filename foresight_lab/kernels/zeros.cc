// A zeroed buffer whose pages the process does not hold until they are written.
//
// The KV cache is allocated once at its full budget, but a server's sequences usually
// fill a small part of it. Writing zeros (what jnp.zeros compiles to) makes every page
// resident at once. Here the buffer's whole pages are handed back to the kernel instead
// (madvise MADV_DONTNEED): on the private anonymous memory that XLA's CPU buffers live
// in, a page dropped so reads as zeros and becomes resident only when written. The
// partial pages at either end are zeroed by hand, and where madvise refuses, memset
// does the whole buffer.

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void ZeroUncommitted(char* data, size_t bytes) {
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + page - 1) / page * page;
  const uintptr_t last = (begin + bytes) / page * page;
  if (last <= first) {
    std::memset(data, 0, bytes);
    return;
  }
  void* pages = reinterpret_cast<void*>(first);
  const size_t length = last - first;
#ifdef MADV_NOHUGEPAGE
  // With transparent huge pages on "always", one write would make 2 MB resident.
  madvise(pages, length, MADV_NOHUGEPAGE);
#endif
  if (madvise(pages, length, MADV_DONTNEED) != 0) {
    std::memset(pages, 0, length);
  }
  std::memset(data, 0, first - begin);
  std::memset(reinterpret_cast<char*>(last), 0, begin + bytes - last);
}

// Every result is zeroed: one call makes several buffers (a cache's keys and values),
// which XLA could otherwise merge as identical calls without operands. Operands are not
// read; one aliased to a result (input_output_aliases) has its memory zeroed in place.
ffi::Error Zeros(ffi::RemainingArgs, ffi::RemainingRets results) {
  for (size_t i = 0; i < results.size(); ++i) {
    auto out = results.get<ffi::AnyBuffer>(i);
    if (!out.has_value()) return out.error();
    ZeroUncommitted(static_cast<char*>((*out)->untyped_data()), (*out)->size_bytes());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlZeros, Zeros, ffi::Ffi::Bind().RemainingArgs().RemainingRets());
