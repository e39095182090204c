// nano-gpt native extension. The batch loader lands here; for now the module exposes the
// shard-format constants so Python and C++ agree on them from one place.
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace {
constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr int64_t kHeaderBytes = 256 * sizeof(int32_t);
}  // namespace

PYBIND11_MODULE(_loader, m) {
  m.doc() = "nano-gpt native extension: memory-mapped token shards";
  m.attr("SHARD_MAGIC") = kShardMagic;
  m.attr("SHARD_VERSION") = kShardVersion;
  m.attr("HEADER_BYTES") = kHeaderBytes;
}
