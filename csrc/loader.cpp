// nano-gpt native batch loader (`_loader`), the compiled backend of data.ShardLoader.
//
// Shards. data.py parses and checks every header (llm.c `.bin` or NumPy `.npy`) and hands
// over, per shard, its path, the byte offset of its first token and its token count. Here a
// shard is only memory-mapped read only (never read whole) and its size checked before use.
//
// Sample stream (must match data.py token for token). Shard s holds the windows
// tokens[j*T : j*T+T+1], j < (ntok_s-1)/T. An epoch is the shards in epoch order, each
// shard's windows in epoch order; epochs follow each other forever. Global batch k is the
// stream samples [k*W*B, (k+1)*W*B); rank r takes the B samples from k*W*B + r*B. With
// shuffle, epoch e sorts shard ids by mix64(key(seed, e, 0) ^ id) and shard s's windows by
// mix64(key(seed, e, 1+s) ^ j), key(seed, e, c) = mix(mix(mix(seed) ^ e) ^ c), where mix is
// splitmix64's output function. mix is a bijection, so sort keys never tie.
//
// State. Everything resume needs is one integer, the batch index (`step`); seek(step)
// restarts the stream there.
//
// Threads. One producer std::thread per loader fills a ring of slots in step order. Each slot
// is an int64 buffer of 2*B*T values (x then y) that Python allocated (pinned when the target
// is CUDA) and this class holds a reference to; release() may give a slot a new buffer (on
// CPU the filled one goes to the caller). The ring is three counters: batches filled, taken
// (acquire) and handed back (release, in the order taken); the producer fills step s into
// slot s % n once step s - n has been handed back. The producer never touches Python objects,
// so it runs without the GIL; acquire() waits with the GIL released. An exception in the
// producer is raised by the acquire() that would have returned the batch it was filling.
// close() stops the producer between two samples.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

// The kernel maps page-cache folios of up to 2 MB whole on a fault, so one 2 KB sample can
// add 2 MB to the resident set. The maps' pages are dropped (they stay in the page cache)
// once the 2 MB granules touched since the last drop could add up to kMapBudgetBytes, which
// keeps the resident set flat in shard size even under shuffled access.
constexpr int64_t kGranuleBytes = int64_t{2} << 20;
constexpr int64_t kMapBudgetBytes = int64_t{32} << 20;

// A bad shard; Python sees it as _loader.ShardError (a ValueError).
class ShardError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] void shard_fail(const std::string& path, const std::string& what) {
  throw ShardError(path + ": " + what);
}

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
  std::vector<std::pair<uint64_t, int64_t>> keyed;
  keyed.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keyed.emplace_back(mix64(key ^ static_cast<uint64_t>(i)), i);
  std::sort(keyed.begin(), keyed.end());
  std::vector<int64_t> perm;
  perm.reserve(static_cast<size_t>(n));
  for (const auto& entry : keyed) perm.push_back(entry.second);
  return perm;
}

// ------------------------------------------------------------------------ shards

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

// (path, byte offset of the first token, token count), as data.py read them from the header.
using ShardSpec = std::tuple<std::string, int64_t, int64_t>;

std::unique_ptr<Shard> open_shard(const ShardSpec& spec) {
  auto s = std::make_unique<Shard>();
  const auto& [path, offset, ntok] = spec;
  s->path = path;
  s->ntok = ntok;
  s->fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (s->fd < 0) shard_fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  if (fstat(s->fd, &st) != 0) shard_fail(path, std::string("cannot stat: ") + std::strerror(errno));
  s->file_bytes = st.st_size;
  // uint16 loads need an even offset; .bin (1024) and .npy (a multiple of 16) headers give one.
  if (offset < 0 || offset % 2 != 0 || ntok < 0 || s->file_bytes < offset + 2 * ntok) {
    shard_fail(path, "file size " + std::to_string(s->file_bytes) + " bytes cannot hold " +
                         std::to_string(ntok) + " tokens from byte " + std::to_string(offset) +
                         "; the shard changed after its header was read");
  }
  if (ntok > 0) {
    s->map_bytes = static_cast<size_t>(offset + 2 * ntok);
    s->base = mmap(nullptr, s->map_bytes, PROT_READ, MAP_SHARED, s->fd, 0);
    if (s->base == MAP_FAILED) {
      s->base = nullptr;
      shard_fail(path, std::string("mmap failed: ") + std::strerror(errno));
    }
    s->tokens = reinterpret_cast<const uint16_t*>(static_cast<const char*>(s->base) + offset);
  }
  return s;
}

// x[t] = src[t], y[t] = src[t+1] for t < T; returns the largest of the T+1 tokens src[0..T].
// A free function on locals: inside the class, int64 stores could alias the int64 members,
// which stops the compiler from vectorising the loops.
uint16_t widen_sample(const uint16_t* src, int64_t* x, int64_t* y, const int64_t T) {
  uint16_t top = 0;
  for (int64_t t = 0; t <= T; ++t) top = std::max(top, src[t]);
  for (int64_t t = 0; t < T; ++t) x[t] = src[t];
  for (int64_t t = 0; t < T; ++t) y[t] = src[t + 1];
  return top;
}

// Where the i-th sample of one epoch lives.
struct EpochPlan {
  std::vector<int64_t> shard_order;
  std::vector<int64_t> starts;  // starts[k]: first epoch index of the k-th shard in order
  std::map<int64_t, std::vector<int64_t>> perms;
};

// ------------------------------------------------------------------------ the loader

class BatchLoader {
 public:
  BatchLoader(const std::vector<ShardSpec>& shards, int64_t batch_size, int64_t seq_len,
              int64_t rank, int64_t world_size, bool shuffle, uint64_t seed, int64_t vocab_size,
              const std::vector<py::object>& buffers)
      : B_(batch_size), T_(seq_len), rank_(rank), W_(world_size), shuffle_(shuffle),
        seed_(seed), vocab_(vocab_size) {
    if (B_ < 1 || T_ < 1 || W_ < 1 || rank_ < 0 || rank_ >= W_ || buffers.size() < 2) {
      throw std::invalid_argument("BatchLoader: bad batch_size/seq_len/rank/world_size/buffers");
    }
    for (const py::object& buffer : buffers) slots_.push_back(writable_slot(buffer));
    buffers_ = buffers;
    for (const ShardSpec& spec : shards) {
      shards_.push_back(open_shard(spec));
      const int64_t n = shards_.back()->ntok;
      counts_.push_back(n > T_ ? (n - 1) / T_ : 0);
      per_epoch_ += counts_.back();
    }
    if (per_epoch_ == 0) throw std::invalid_argument("BatchLoader: no shard holds seq_len+1 tokens");
    start_producer(0);
  }

  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  ~BatchLoader() { close(); }

  // Waits (GIL released by the binding) for the next batch and returns its slot.
  int64_t acquire() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return closed_ || failed_ || taken_ < filled_; });
    if (closed_) throw std::runtime_error("BatchLoader: next_batch() after close()");
    if (taken_ == filled_) {  // the producer failed on exactly this batch
      if (error_is_shard_) throw ShardError(error_);
      throw std::runtime_error(error_);
    }
    return taken_++ % num_slots();
  }

  // Hands the oldest taken slot back to the producer; `slot` must be that one. Given a
  // buffer, the slot fills that one from now on and its old buffer is the caller's.
  void release(int64_t slot, const py::object& buffer) {
    int64_t* fresh = buffer.is_none() ? nullptr : writable_slot(buffer);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (freed_ == taken_ || slot != freed_ % num_slots()) {
        throw std::logic_error("BatchLoader: release(" + std::to_string(slot) +
                               ") is not the oldest slot in use");
      }
      if (fresh != nullptr) slots_[static_cast<size_t>(slot)] = fresh;
      ++freed_;
    }
    if (fresh != nullptr) buffers_[static_cast<size_t>(slot)] = buffer;  // the GIL is held
    cv_.notify_all();
  }

  void seek(int64_t step) {
    if (step < 0) throw std::invalid_argument("BatchLoader: negative step");
    stop_producer();
    start_producer(step);
  }

  void close() {
    stop_producer();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) return;
      closed_ = true;
    }
    cv_.notify_all();
    shards_.clear();
  }

 private:
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }

  // The address of a writable C-contiguous buffer of 2*B*T int64 (any buffer-protocol
  // object; Python passes tensor.numpy()). The caller keeps `buffer` alive.
  int64_t* writable_slot(const py::object& buffer) const {
    Py_buffer view;
    if (PyObject_GetBuffer(buffer.ptr(), &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) != 0) {
      throw py::error_already_set();
    }
    void* address = view.buf;
    const Py_ssize_t bytes = view.len;
    PyBuffer_Release(&view);
    if (bytes != static_cast<Py_ssize_t>(2 * B_ * T_ * sizeof(int64_t)) ||
        reinterpret_cast<uintptr_t>(address) % alignof(int64_t) != 0) {
      throw std::invalid_argument("BatchLoader: each buffer must be 2*B*T aligned int64");
    }
    return static_cast<int64_t*>(address);
  }

  void start_producer(int64_t step) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (closed_) throw std::runtime_error("BatchLoader: seek() after close()");
      filled_ = taken_ = freed_ = step;
      failed_ = false;
      error_.clear();
      stop_ = false;
    }
    producer_ = std::thread(&BatchLoader::produce, this);
  }

  void stop_producer() {
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
      while (true) {
        int64_t step = 0;
        int64_t* out = nullptr;
        {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return stop_ || filled_ < freed_ + num_slots(); });
          if (stop_) return;
          step = filled_;
          out = slots_[static_cast<size_t>(step % num_slots())];
        }
        if (!fill(step, out)) return;
        {
          std::lock_guard<std::mutex> lock(mu_);
          ++filled_;
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
  std::vector<py::object> buffers_;  // keeps the slots' memory alive; dropped with the GIL held
  std::vector<int64_t*> slots_;  // guarded by mu_: release() may give a slot a new buffer
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
  int64_t filled_ = 0;  // steps below this are in their slots (or already taken)
  int64_t taken_ = 0;   // the step the next acquire() returns
  int64_t freed_ = 0;   // steps below this have been handed back
  std::atomic<bool> stop_{false};
  bool closed_ = false;
  bool failed_ = false;
  bool error_is_shard_ = false;
  std::string error_;
  std::thread producer_;
};

}  // namespace

PYBIND11_MODULE(_loader, m) {
  m.doc() = "nano-gpt native extension: memory-mapped token shards, background batch prefetch";
  py::register_exception<ShardError>(m, "ShardError", PyExc_ValueError);

  m.def("mix64", &mix64, "splitmix64's output function");
  m.def("order_key", &order_key, py::arg("seed"), py::arg("epoch"), py::arg("stream"));
  m.def("seeded_permutation", &seeded_permutation, py::arg("n"), py::arg("key"));

  py::class_<BatchLoader>(m, "BatchLoader")
      .def(py::init<const std::vector<ShardSpec>&, int64_t, int64_t, int64_t, int64_t, bool,
                    uint64_t, int64_t, const std::vector<py::object>&>(),
           py::arg("shards"), py::arg("batch_size"), py::arg("seq_len"), py::arg("rank"),
           py::arg("world_size"), py::arg("shuffle"), py::arg("seed"), py::arg("vocab_size"),
           py::arg("buffers"))
      .def("acquire", &BatchLoader::acquire, py::call_guard<py::gil_scoped_release>())
      .def("release", &BatchLoader::release, py::arg("slot"), py::arg("buffer") = py::none())
      .def("seek", &BatchLoader::seek, py::arg("step"), py::call_guard<py::gil_scoped_release>())
      .def("close", &BatchLoader::close, py::call_guard<py::gil_scoped_release>());
}
