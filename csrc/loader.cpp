// nano-gpt native batch loader (`_loader`), the compiled backend of data.ShardLoader.
//
// Shard format. An llm.c `.bin` shard is a 1024-byte header of 256 little-endian int32
// [20240520, 1, ntok, 0, ...] followed by ntok little-endian uint16 tokens; the file size is
// exactly 1024 + 2*ntok. A `.npy` shard is a 1-D '<u2' NumPy array. Shards are mmap'd read
// only and never read whole; every header is checked here as data.read_shard checks it.
//
// Sample stream (must match data.py token for token). Shard s holds the windows
// tokens[j*T : j*T+T+1], j < (ntok_s-1)/T. An epoch is the shards in epoch order, each
// shard's windows in epoch order; epochs follow each other forever. Global batch k is the
// stream samples [k*W*B, (k+1)*W*B); rank r takes the B samples from k*W*B + r*B. With
// shuffle, epoch e sorts shard ids by mix64(key(seed, e, 0) ^ id) and shard s's windows by
// mix64(key(seed, e, 1+s) ^ j), key(seed, e, c) = mix(mix(mix(seed) ^ e) ^ c), where mix is
// splitmix64's output function. mix is a bijection, so sort keys never tie.
//
// State. Everything resume needs is one integer, the batch index (`step`): the producer
// position and the consumer position are both steps, and seek(step) restarts from any.
//
// Threads. One producer std::thread per loader fills a ring of slots in step order; each slot
// is a caller-owned int64 buffer of 2*B*T values (x then y) that Python allocated (pinned when
// the target is CUDA) and handed over as a raw pointer together with an owning object, which
// this class keeps alive until the slot is handed a new buffer or the loader is destroyed.
// The producer never touches Python objects, so it runs without the GIL; acquire() waits with
// the GIL released. A slot cycles free -> filling -> ready -> in use -> free (release()).
// On CPU, Python takes every ready batch (up to half the ring) per acquire_ready() call and
// hands them out one by one, so most next_batch() calls do not cross into C++ at all.
// An exception in the producer is stored and rethrown by the next acquire(). close() stops
// the producer between two samples and joins it, so it returns promptly even mid-fill.
// Wake-ups. Waking a sleeping thread costs a futex call and a cross-CPU interrupt (tens to
// hundreds of microseconds on a VM), paid by the caller of next_batch(). So once the ring is
// full the producer sleeps until half of it is free and then refills in one go, and it
// notices that by itself: it rechecks every millisecond. The consumer wakes it only when
// fewer than half a ring of ready batches is left, so a consumer slower than the producer
// never pays for a wake-up.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int32_t kShardMagic = 20240520;
constexpr int32_t kShardVersion = 1;
constexpr int64_t kHeaderInts = 256;
constexpr int64_t kHeaderBytes = kHeaderInts * sizeof(int32_t);
// The kernel maps page-cache folios of up to 2 MB whole on a fault, so one 2 KB sample can
// add 2 MB to the resident set. The maps' pages are dropped (they stay in the page cache)
// once the 2 MB granules touched since the last drop could add up to kMapBudgetBytes, which
// keeps the resident set flat in shard size even under shuffled access.
constexpr int64_t kGranuleBytes = int64_t{2} << 20;
constexpr int64_t kMapBudgetBytes = int64_t{32} << 20;
// How often a sleeping producer checks for free slots on its own (see "Wake-ups").
constexpr auto kProducerPoll = std::chrono::milliseconds(1);

// A bad shard; Python sees it as _loader.ShardError (a ValueError).
class ShardError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// ------------------------------------------------------------------------ seeded order

uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

uint64_t order_key(uint64_t seed, uint64_t epoch, uint64_t stream) {
  return mix64(mix64(mix64(seed) ^ epoch) ^ stream);
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t key) {
  std::vector<std::pair<uint64_t, int64_t>> keyed(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    keyed[static_cast<size_t>(i)] = {mix64(key ^ static_cast<uint64_t>(i)), i};
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<int64_t> perm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) perm[static_cast<size_t>(i)] = keyed[static_cast<size_t>(i)].second;
  return perm;
}

// ------------------------------------------------------------------------ shards

std::string suffix_of(const std::string& path) {
  return path.size() >= 4 ? path.substr(path.size() - 4) : std::string();
}

// One memory-mapped shard.
struct Shard {
  std::string path;
  int fd = -1;
  void* base = nullptr;
  size_t map_bytes = 0;
  const uint16_t* tokens = nullptr;
  int64_t ntok = 0;
  int64_t file_bytes = 0;  // the size the shard had when opened; checked before each use
  bool touched = false;

  Shard() = default;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  ~Shard() {
    if (base != nullptr) munmap(base, map_bytes);
    if (fd >= 0) ::close(fd);
  }
};

[[noreturn]] void shard_fail(const std::string& path, const std::string& what) {
  throw ShardError(path + ": " + what);
}

void read_exact(const Shard& s, void* dst, size_t n, off_t at) {
  size_t done = 0;
  while (done < n) {
    ssize_t got = pread(s.fd, static_cast<char*>(dst) + done, n - done, at + static_cast<off_t>(done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) shard_fail(s.path, std::string("read failed: ") + std::strerror(errno));
    done += static_cast<size_t>(got);
  }
}

// Returns the byte offset of the tokens and sets s.ntok.
int64_t check_bin_header(Shard& s) {
  if (s.file_bytes < kHeaderBytes) {
    shard_fail(s.path, std::to_string(s.file_bytes) + " bytes, shorter than the " +
                           std::to_string(kHeaderBytes) +
                           "-byte shard header; the file is truncated or not a token shard");
  }
  int32_t header[kHeaderInts];
  read_exact(s, header, sizeof(header), 0);
  if (header[0] != kShardMagic) {
    shard_fail(s.path, "magic number " + std::to_string(header[0]) + ", expected " +
                           std::to_string(kShardMagic) + "; not an llm.c token shard");
  }
  if (header[1] != kShardVersion) {
    shard_fail(s.path, "format version " + std::to_string(header[1]) + ", expected " +
                           std::to_string(kShardVersion) + " (uint16 tokens)");
  }
  const int64_t ntok = header[2];
  const int64_t expected = kHeaderBytes + 2 * ntok;
  if (ntok < 0 || s.file_bytes != expected) {
    shard_fail(s.path, "file size " + std::to_string(s.file_bytes) + " bytes, expected " +
                           std::to_string(expected) + " for " + std::to_string(ntok) +
                           " tokens; the shard is truncated or corrupt");
  }
  s.ntok = ntok;
  return kHeaderBytes;
}

// The value after `'key':` in a .npy header dict, up to the next ',' or '}' outside brackets.
std::string npy_field(const std::string& header, const std::string& key) {
  const size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) return std::string();
  size_t i = header.find(':', at);
  if (i == std::string::npos) return std::string();
  ++i;
  int depth = 0;
  std::string value;
  for (; i < header.size(); ++i) {
    const char c = header[i];
    if (c == '(') ++depth;
    if (c == ')') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
    if (c != ' ') value += c;
  }
  return value;
}

// Returns the byte offset of the tokens and sets s.ntok.
int64_t check_npy_header(Shard& s) {
  unsigned char prefix[12] = {0};
  if (s.file_bytes < 12) shard_fail(s.path, "not a readable .npy file (too short)");
  read_exact(s, prefix, sizeof(prefix), 0);
  if (std::memcmp(prefix, "\x93NUMPY", 6) != 0) {
    shard_fail(s.path, "not a readable .npy file (bad magic)");
  }
  int64_t header_len = 0;
  int64_t header_at = 0;
  if (prefix[6] == 1) {
    header_len = prefix[8] | (prefix[9] << 8);
    header_at = 10;
  } else if (prefix[6] == 2 || prefix[6] == 3) {
    header_len = static_cast<int64_t>(prefix[8]) | (static_cast<int64_t>(prefix[9]) << 8) |
                 (static_cast<int64_t>(prefix[10]) << 16) | (static_cast<int64_t>(prefix[11]) << 24);
    header_at = 12;
  } else {
    shard_fail(s.path, "not a readable .npy file (format version " + std::to_string(prefix[6]) + ")");
  }
  if (header_at + header_len > s.file_bytes) shard_fail(s.path, "not a readable .npy file (truncated header)");
  std::string header(static_cast<size_t>(header_len), '\0');
  read_exact(s, header.data(), header.size(), header_at);
  const std::string descr = npy_field(header, "descr");
  if (descr != "'<u2'") shard_fail(s.path, "dtype " + descr + ", expected uint16 tokens");
  const std::string shape = npy_field(header, "shape");
  const size_t comma = shape.find(',');
  if (shape.size() < 3 || shape.front() != '(' || comma == std::string::npos ||
      shape.substr(comma) != ",)") {
    shard_fail(s.path, "shape " + shape + ", expected a 1-D token array");
  }
  const int64_t ntok = std::stoll(shape.substr(1, comma - 1));
  const int64_t offset = header_at + header_len;
  if (offset % 2 != 0 || s.file_bytes < offset + 2 * ntok) {
    shard_fail(s.path, "not a readable .npy file (data shorter than its shape)");
  }
  s.ntok = ntok;
  return offset;
}

std::unique_ptr<Shard> open_shard(const std::string& path) {
  auto s = std::make_unique<Shard>();
  s->path = path;
  s->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (s->fd < 0) shard_fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(s->fd, &st) != 0) shard_fail(path, std::string("cannot stat: ") + std::strerror(errno));
  s->file_bytes = st.st_size;
  const bool npy = suffix_of(path) == ".npy";
  const int64_t offset = npy ? check_npy_header(*s) : check_bin_header(*s);
  if (s->ntok > 0) {
    s->map_bytes = static_cast<size_t>(offset + 2 * s->ntok);
    s->base = mmap(nullptr, s->map_bytes, PROT_READ, MAP_SHARED, s->fd, 0);
    if (s->base == MAP_FAILED) {
      s->base = nullptr;
      shard_fail(path, std::string("mmap failed: ") + std::strerror(errno));
    }
    s->tokens = reinterpret_cast<const uint16_t*>(static_cast<const char*>(s->base) + offset);
  }
  return s;
}

// Widens n uint16 to int64 with non-temporal stores where dst is 16-byte aligned: the ring
// of batch buffers is far larger than the cache, and plain stores would first read every
// destination line from memory (that read-for-ownership alone halves the throughput).
void widen(const uint16_t* src, int64_t* dst, int64_t n) {
  int64_t t = 0;
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    const __m128i zero = _mm_setzero_si128();
    for (; t + 8 <= n; t += 8) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + t));
      const __m128i lo = _mm_unpacklo_epi16(v, zero);  // 4 x uint32
      const __m128i hi = _mm_unpackhi_epi16(v, zero);
      __m128i* out = reinterpret_cast<__m128i*>(dst + t);
      _mm_stream_si128(out + 0, _mm_unpacklo_epi32(lo, zero));  // 2 x int64
      _mm_stream_si128(out + 1, _mm_unpackhi_epi32(lo, zero));
      _mm_stream_si128(out + 2, _mm_unpacklo_epi32(hi, zero));
      _mm_stream_si128(out + 3, _mm_unpackhi_epi32(hi, zero));
    }
  }
#endif
  for (; t < n; ++t) dst[t] = src[t];
}

// x[t] = src[t], y[t] = src[t+1] for t < T; returns the largest token of src[0..T].
// A free function on locals: inside the class, int64 stores could alias the int64 members
// (T_), which stops the compiler from vectorising the loops.
uint16_t widen_sample(const uint16_t* src, int64_t* x, int64_t* y, const int64_t T) {
  uint16_t top = 0;
  for (int64_t t = 0; t <= T; ++t) top = std::max(top, src[t]);
  widen(src, x, T);
  widen(src + 1, y, T);
  return top;
}

// ------------------------------------------------------------------------ epoch order

// Where the i-th sample of one epoch lives.
struct EpochPlan {
  std::vector<int64_t> shard_order;
  std::vector<int64_t> starts;  // starts[k]: first epoch index of the k-th shard in order
  std::map<int64_t, std::vector<int64_t>> perms;
};

// ------------------------------------------------------------------------ the loader

class BatchLoader {
 public:
  BatchLoader(const std::vector<std::string>& paths, int64_t batch_size, int64_t seq_len,
              int64_t rank, int64_t world_size, bool shuffle, uint64_t seed, int64_t vocab_size,
              int64_t num_slots)
      : B_(batch_size), T_(seq_len), rank_(rank), W_(world_size), shuffle_(shuffle),
        seed_(seed), vocab_(vocab_size) {
    if (B_ < 1 || T_ < 1 || W_ < 1 || rank_ < 0 || rank_ >= W_ || num_slots < 2) {
      throw std::invalid_argument("BatchLoader: bad batch_size/seq_len/rank/world_size/slots");
    }
    for (const auto& path : paths) {
      shards_.push_back(open_shard(path));
      const int64_t n = shards_.back()->ntok;
      counts_.push_back(n > T_ ? (n - 1) / T_ : 0);
      per_epoch_ += counts_.back();
    }
    if (per_epoch_ == 0) throw std::invalid_argument("BatchLoader: no shard holds seq_len+1 tokens");
    slots_.resize(static_cast<size_t>(num_slots));
  }

  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  ~BatchLoader() { close(); }

  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }
  int64_t samples_per_epoch() const { return per_epoch_; }

  // Give slot `i` a buffer of 2*B*T int64 at `address`; `owner` keeps that memory alive.
  void set_buffer(int64_t i, py::object owner, uintptr_t address) {
    Slot& slot = slot_at(i);
    std::lock_guard<std::mutex> lock(mu_);
    if (slot.state == State::kFilling) throw std::logic_error("BatchLoader: slot is being filled");
    slot.owner = std::move(owner);
    slot.data = reinterpret_cast<int64_t*>(address);
  }

  void start(int64_t step) {
    stop_thread();
    for (const Slot& slot : slots_) {
      if (slot.data == nullptr) throw std::logic_error("BatchLoader: start() before every slot has a buffer");
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) throw std::runtime_error("BatchLoader: start() after close()");
      for (Slot& slot : slots_) slot.state = State::kFree;
      produce_step_ = consume_step_ = step;
      failed_ = false;
      error_.clear();
    }
    stop_ = false;
    producer_ = std::thread(&BatchLoader::produce, this);
  }

  // Wait (GIL released by the binding) for the next batch; returns its slot index.
  int64_t acquire() { return acquire_ready(1).front(); }

  // Wait (GIL released by the binding) for the next batch, then take it and the batches
  // ready right behind it, up to `max_count` in all; returns their slot indices in order.
  // Taking several per call spreads the call's fixed cost over several batches.
  std::vector<int64_t> acquire_ready(int64_t max_count) {
    if (max_count < 1) throw std::invalid_argument("BatchLoader: acquire_ready needs max_count >= 1");
    std::unique_lock<std::mutex> lock(mu_);
    if (!consumable_locked() && running_low_locked()) cv_.notify_all();  // about to wait
    cv_.wait(lock, [&] { return closed_ || failed_ || consumable_locked(); });
    if (closed_) throw std::runtime_error("BatchLoader: next_batch() after close()");
    if (failed_) {
      if (error_is_shard_) throw ShardError(error_);
      throw std::runtime_error(error_);
    }
    std::vector<int64_t> taken;
    while (static_cast<int64_t>(taken.size()) < max_count && consumable_locked()) {
      const int64_t i = consume_step_++ % num_slots();
      slots_[static_cast<size_t>(i)].state = State::kInUse;
      taken.push_back(i);
    }
    const bool wake = running_low_locked();
    lock.unlock();
    if (wake) cv_.notify_all();
    return taken;
  }

  // A slot handed back to the producer with the buffer it fills next.
  struct Handback {
    int64_t slot;
    py::object owner;
    uintptr_t address;
  };

  // Hand slot `i` back to the producer, with a new buffer (CPU) or the same one (CUDA).
  void release(int64_t i, py::object owner, uintptr_t address) {
    std::vector<Handback> one;
    one.push_back({i, std::move(owner), address});
    release_many(std::move(one));
  }

  // release() for several slots under one lock, waking the producer at most once.
  void release_many(std::vector<Handback> handbacks) {
    for (const Handback& h : handbacks) slot_at(h.slot);  // range-check before changing any
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Handback& h : handbacks) {
        if (slots_[static_cast<size_t>(h.slot)].state != State::kInUse) {
          throw std::logic_error("BatchLoader: release() of a slot not in use");
        }
      }
      for (const Handback& h : handbacks) {
        Slot& slot = slots_[static_cast<size_t>(h.slot)];
        slot.data = reinterpret_cast<int64_t*>(h.address);
        slot.state = State::kFree;
      }
      wake = running_low_locked();
    }
    // Dropping the old owners may free their memory; the producer no longer points at it.
    for (Handback& h : handbacks) std::swap(slots_[static_cast<size_t>(h.slot)].owner, h.owner);
    if (wake) cv_.notify_all();
  }

  // The slot the next acquire() returns.
  int64_t next_slot() {
    std::lock_guard<std::mutex> lock(mu_);
    return consume_step_ % num_slots();
  }

  void seek(int64_t step) {
    if (step < 0) throw std::invalid_argument("BatchLoader: negative step");
    start(step);
  }

  void close() {
    stop_thread();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    cv_.notify_all();
    shards_.clear();
  }

 private:
  enum class State { kFree, kFilling, kReady, kInUse };
  struct Slot {
    State state = State::kFree;
    int64_t step = -1;
    int64_t* data = nullptr;
    py::object owner;
  };

  // Whether the batch the consumer needs next is ready (mu_ held).
  bool consumable_locked() const {
    const Slot& slot = slots_[static_cast<size_t>(consume_step_ % num_slots())];
    return slot.state == State::kReady && slot.step == consume_step_;
  }

  // Whether a sleeping producer should start refilling (mu_ held): its next slot is free and
  // either half the ring ahead of it is free too or the consumer has few batches left.
  bool may_produce_locked() {
    const int64_t n = num_slots();
    const int64_t refill = std::max<int64_t>(1, n / 2);
    const Slot& next = slots_[static_cast<size_t>(produce_step_ % n)];
    const Slot& last = slots_[static_cast<size_t>((produce_step_ + refill - 1) % n)];
    return next.state == State::kFree &&
           (last.state == State::kFree || produce_step_ - consume_step_ < refill);
  }

  // Whether the consumer should wake the sleeping producer (mu_ held): it could refill and
  // fewer than half a ring of batches is ready ahead of the consumer.
  bool running_low_locked() {
    const int64_t refill = std::max<int64_t>(1, num_slots() / 2);
    return producer_waiting_ && may_produce_locked() && produce_step_ - consume_step_ < refill;
  }

  Slot& slot_at(int64_t i) {
    if (i < 0 || i >= num_slots()) throw std::out_of_range("BatchLoader: slot index");
    return slots_[static_cast<size_t>(i)];
  }

  void stop_thread() {
    if (!producer_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    producer_.join();
  }

  void produce() {
    try {
      bool refilling = true;  // keep going while free slots last; once asleep, wait for many
      while (true) {
        int64_t step = 0;
        int64_t* out = nullptr;
        Slot* slot = nullptr;
        {
          std::unique_lock<std::mutex> lock(mu_);
          const auto ready_to_go = [&] {
            slot = &slots_[static_cast<size_t>(produce_step_ % num_slots())];
            const bool go = stop_.load() ||
                            (slot->state == State::kFree && (refilling || may_produce_locked()));
            refilling = go;
            producer_waiting_ = !go;
            return go;
          };
          while (!cv_.wait_for(lock, kProducerPoll, ready_to_go)) {
          }
          if (stop_) return;
          step = produce_step_;
          out = slot->data;
          slot->state = State::kFilling;
        }
        if (!fill(step, out)) return;
        {
          std::lock_guard<std::mutex> lock(mu_);
          slot->step = step;
          slot->state = State::kReady;
          ++produce_step_;
        }
        cv_.notify_all();
      }
    } catch (const std::exception& e) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        failed_ = true;
        error_is_shard_ = dynamic_cast<const ShardError*>(&e) != nullptr;
        error_ = e.what();
      }
      cv_.notify_all();
    }
  }

  // Writes batch `step` of this rank: x into out[0, B*T), y into out[B*T, 2*B*T).
  // Returns false when asked to stop part way.
  bool fill(int64_t step, int64_t* out) {
    int64_t* x = out;
    int64_t* y = out + B_ * T_;
    const int64_t first = (step * W_ + rank_) * B_;
    std::vector<int64_t> checked;
    for (int64_t b = 0; b < B_; ++b) {
      if (stop_.load(std::memory_order_relaxed)) return false;
      const int64_t pos = first + b;
      const auto [shard, offset] = locate(pos / per_epoch_, pos % per_epoch_);
      Shard& s = *shards_[static_cast<size_t>(shard)];
      if (std::find(checked.begin(), checked.end(), shard) == checked.end()) {
        check_unchanged(s);
        checked.push_back(shard);
      }
      const uint16_t top = widen_sample(s.tokens + offset, x + b * T_, y + b * T_, T_);
      if (top >= vocab_) {
        shard_fail(s.path, "token id " + std::to_string(top) + " near token " +
                               std::to_string(offset) + " is not below the vocabulary size " +
                               std::to_string(vocab_) +
                               "; the shard was made with another tokenizer or is corrupt");
      }
      note_touched(s, shard, offset);
    }
#if defined(__SSE2__)
    _mm_sfence();  // the streamed stores are visible before the slot is marked ready
#endif
    return true;
  }

  // A file shrunk under a live map faults (SIGBUS) on access, so check its size first.
  void check_unchanged(const Shard& s) {
    struct stat st {};
    if (fstat(s.fd, &st) != 0) shard_fail(s.path, std::string("cannot stat: ") + std::strerror(errno));
    if (st.st_size != s.file_bytes) {
      shard_fail(s.path, "file size changed from " + std::to_string(s.file_bytes) + " to " +
                             std::to_string(st.st_size) +
                             " bytes while the loader was reading it; the shard was truncated or rewritten");
    }
  }

  void note_touched(Shard& s, int64_t shard, int64_t offset) {
    s.touched = true;
    const int64_t at = reinterpret_cast<const char*>(s.tokens + offset) - static_cast<const char*>(s.base);
    const int64_t first = at / kGranuleBytes;
    const int64_t last = (at + 2 * (T_ + 1) - 1) / kGranuleBytes;
    for (int64_t g = first; g <= last; ++g) {
      if (shard != last_shard_ || g != last_granule_) mapped_estimate_ += kGranuleBytes;
      last_shard_ = shard;
      last_granule_ = g;
    }
    if (mapped_estimate_ > kMapBudgetBytes) drop_resident_pages();
  }

  void drop_resident_pages() {
    for (auto& s : shards_) {
      if (s->touched && s->base != nullptr) madvise(s->base, s->map_bytes, MADV_DONTNEED);
      s->touched = false;
    }
    mapped_estimate_ = 0;
    last_shard_ = -1;
  }

  // (shard id, token offset) of sample `index` of epoch `epoch`.
  std::pair<int64_t, int64_t> locate(int64_t epoch, int64_t index) {
    EpochPlan& plan = plan_for(epoch);
    const auto it = std::upper_bound(plan.starts.begin(), plan.starts.end(), index);
    const size_t k = static_cast<size_t>(it - plan.starts.begin()) - 1;
    const int64_t shard = plan.shard_order[k];
    int64_t local = index - plan.starts[k];
    if (shuffle_) {
      auto found = plan.perms.find(shard);
      if (found == plan.perms.end()) {
        if (plan.perms.size() > 2) plan.perms.clear();
        const uint64_t key = order_key(seed_, static_cast<uint64_t>(epoch), 1 + static_cast<uint64_t>(shard));
        found = plan.perms.emplace(shard, seeded_permutation(counts_[static_cast<size_t>(shard)], key)).first;
      }
      local = found->second[static_cast<size_t>(local)];
    }
    return {shard, local * T_};
  }

  EpochPlan& plan_for(int64_t epoch) {
    auto found = plans_.find(epoch);
    if (found != plans_.end()) return found->second;
    if (plans_.size() > 1) plans_.clear();
    EpochPlan plan;
    const int64_t nshards = static_cast<int64_t>(shards_.size());
    if (shuffle_) {
      plan.shard_order = seeded_permutation(nshards, order_key(seed_, static_cast<uint64_t>(epoch), 0));
    } else {
      for (int64_t s = 0; s < nshards; ++s) plan.shard_order.push_back(s);
    }
    plan.starts.push_back(0);
    for (const int64_t s : plan.shard_order) plan.starts.push_back(plan.starts.back() + counts_[static_cast<size_t>(s)]);
    return plans_.emplace(epoch, std::move(plan)).first->second;
  }

  const int64_t B_, T_, rank_, W_;
  const bool shuffle_;
  const uint64_t seed_;
  const int64_t vocab_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<int64_t> counts_;
  int64_t per_epoch_ = 0;

  // Producer-only state.
  std::map<int64_t, EpochPlan> plans_;
  int64_t mapped_estimate_ = 0;  // bytes the maps may hold resident since the last drop
  int64_t last_shard_ = -1;
  int64_t last_granule_ = -1;

  // Shared state, guarded by mu_ (stop_ is also read without it between samples).
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Slot> slots_;
  int64_t produce_step_ = 0;
  int64_t consume_step_ = 0;
  std::atomic<bool> stop_{false};
  bool producer_waiting_ = false;
  bool closed_ = false;
  bool failed_ = false;
  bool error_is_shard_ = false;
  std::string error_;
  std::thread producer_;
};

}  // namespace

PYBIND11_MODULE(_loader, m) {
  m.doc() = "nano-gpt native extension: memory-mapped token shards, background batch prefetch";
  m.attr("SHARD_MAGIC") = kShardMagic;
  m.attr("SHARD_VERSION") = kShardVersion;
  m.attr("HEADER_BYTES") = kHeaderBytes;
  py::register_exception<ShardError>(m, "ShardError", PyExc_ValueError);

  m.def("mix64", &mix64, "splitmix64's output function");
  m.def("order_key", &order_key, py::arg("seed"), py::arg("epoch"), py::arg("stream"));
  m.def("seeded_permutation", &seeded_permutation, py::arg("n"), py::arg("key"));

  py::class_<BatchLoader>(m, "BatchLoader")
      .def(py::init<const std::vector<std::string>&, int64_t, int64_t, int64_t, int64_t, bool,
                    uint64_t, int64_t, int64_t>(),
           py::arg("paths"), py::arg("batch_size"), py::arg("seq_len"), py::arg("rank"),
           py::arg("world_size"), py::arg("shuffle"), py::arg("seed"), py::arg("vocab_size"),
           py::arg("num_slots"))
      .def_property_readonly("num_slots", &BatchLoader::num_slots)
      .def_property_readonly("samples_per_epoch", &BatchLoader::samples_per_epoch)
      .def("set_buffer", &BatchLoader::set_buffer, py::arg("slot"), py::arg("owner"), py::arg("address"))
      .def("start", &BatchLoader::start, py::arg("step"), py::call_guard<py::gil_scoped_release>())
      .def("acquire", &BatchLoader::acquire, py::call_guard<py::gil_scoped_release>())
      .def("acquire_ready", &BatchLoader::acquire_ready, py::arg("max_count"),
           py::call_guard<py::gil_scoped_release>())
      .def("release", &BatchLoader::release, py::arg("slot"), py::arg("owner"), py::arg("address"))
      .def("release_many", [](BatchLoader& self, const std::vector<py::tuple>& items) {
             std::vector<BatchLoader::Handback> handbacks;
             handbacks.reserve(items.size());
             for (const py::tuple& item : items) {
               if (item.size() != 3) throw std::invalid_argument("release_many: (slot, owner, address) tuples");
               handbacks.push_back({item[0].cast<int64_t>(), item[1], item[2].cast<uintptr_t>()});
             }
             self.release_many(std::move(handbacks));
           }, py::arg("items"))
      .def("next_slot", &BatchLoader::next_slot)
      .def("seek", &BatchLoader::seek, py::arg("step"), py::call_guard<py::gil_scoped_release>())
      .def("close", &BatchLoader::close, py::call_guard<py::gil_scoped_release>());
}
