#include "io/safetensors.h"

#include "io/releasing_load.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <mutex>
#include <nlohmann/json.hpp>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx::io {
namespace {

constexpr uint64_t kMaxHeader = 100ull * 1024 * 1024;

struct DTypeDesc {
  const char* name;
  size_t size;
  bool torch_ok;
  at::ScalarType type;
};

const DTypeDesc* find_dtype(const std::string& s) {
  static const DTypeDesc table[] = {
      {"F64", 8, true, at::kDouble},    {"F32", 4, true, at::kFloat},     {"F16", 2, true, at::kHalf},
      {"BF16", 2, true, at::kBFloat16}, {"I64", 8, true, at::kLong},      {"I32", 4, true, at::kInt},
      {"I16", 2, true, at::kShort},     {"I8", 1, true, at::kChar},       {"U8", 1, true, at::kByte},
      {"BOOL", 1, true, at::kBool},     {"U16", 2, false, at::kByte},     {"U32", 4, false, at::kByte},
      {"U64", 8, false, at::kByte},     {"F8_E4M3", 1, false, at::kByte}, {"F8_E5M2", 1, false, at::kByte},
  };
  for (const auto& d : table)
    if (s == d.name) return &d;
  return nullptr;
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
      return "F64";
    case at::kFloat:
      return "F32";
    case at::kHalf:
      return "F16";
    case at::kBFloat16:
      return "BF16";
    case at::kLong:
      return "I64";
    case at::kInt:
      return "I32";
    case at::kShort:
      return "I16";
    case at::kChar:
      return "I8";
    case at::kByte:
      return "U8";
    case at::kBool:
      return "BOOL";
    default:
      return nullptr;
  }
}

// The live mappings of SafeTensorsFile, [begin, end) by begin, for release_mapped_pages. Never destroyed: a tensor
// kept in some other static (a test's cache of reference cases) may unmap its file at exit, after function-local
// statics made later than that cache are gone (it crashed at exit: SchedulerCoverageGolden).
std::mutex& mappings_mutex() {
  static auto* m = new std::mutex;
  return *m;
}
std::map<uintptr_t, uintptr_t>& mappings() {
  static auto* m = new std::map<uintptr_t, uintptr_t>;
  return *m;
}

}  // namespace

void parse_safetensors(const uint8_t* bytes, size_t file_size, std::map<std::string, TensorInfo>* infos,
                       std::map<std::string, std::string>* metadata, uint64_t* data_offset) {
  DMX_CHECK_FORMAT(file_size >= 8, "safetensors: file is ", file_size, " bytes, shorter than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  DMX_CHECK_FORMAT(n >= 2, "safetensors: header length must be >= 2, got ", n);
  DMX_CHECK_FORMAT(n <= kMaxHeader, "safetensors: header length ", n, " exceeds the ", kMaxHeader, "-byte limit");
  DMX_CHECK_FORMAT(n <= file_size - 8, "safetensors: header length ", n, " runs past the end of the file (", file_size,
                   " bytes)");
  const uint64_t data_size = file_size - 8 - n;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(bytes + 8, bytes + 8 + n);
  } catch (const std::exception& e) {
    throw FormatError(detail::concat("safetensors: header is not valid JSON: ", e.what()));
  }
  DMX_CHECK_FORMAT(j.is_object(), "safetensors: header must be a JSON object");
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      DMX_CHECK_FORMAT(v.is_object(), "safetensors: __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        DMX_CHECK_FORMAT(m.value().is_string(), "safetensors: __metadata__[\"", m.key(), "\"] must be a string");
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    DMX_CHECK_FORMAT(v.is_object(), "safetensors: entry '", key, "' must be an object");
    DMX_CHECK_FORMAT(v.contains("dtype") && v["dtype"].is_string(), "safetensors: tensor '", key,
                     "' has no dtype string");
    DMX_CHECK_FORMAT(v.contains("shape") && v["shape"].is_array(), "safetensors: tensor '", key,
                     "' has no shape array");
    DMX_CHECK_FORMAT(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2,
                     "safetensors: tensor '", key, "' needs data_offsets [begin, end]");
    TensorInfo info;
    info.name = key;
    info.dtype = v["dtype"].get<std::string>();
    const DTypeDesc* d = find_dtype(info.dtype);
    DMX_CHECK_FORMAT(d != nullptr, "safetensors: tensor '", key, "' has unknown dtype '", info.dtype, "'");
    // The product of the non-zero dimensions is bounded too, so that every dimension (and any
    // partial product libtorch computes) fits in int64 even when another dimension is 0.
    uint64_t nonzero_numel = 1;
    bool has_zero = false;
    for (const auto& s : v["shape"]) {
      DMX_CHECK_FORMAT(s.is_number_unsigned() || (s.is_number_integer() && s.get<int64_t>() >= 0),
                       "safetensors: tensor '", key, "' has a negative or non-integer dimension");
      const uint64_t dim = s.get<uint64_t>();
      if (dim == 0) {
        has_zero = true;
      } else {
        DMX_CHECK_FORMAT(nonzero_numel <= std::numeric_limits<uint64_t>::max() / 16 / dim, "safetensors: tensor '", key,
                         "' shape overflows");
        nonzero_numel *= dim;
      }
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    const uint64_t numel = has_zero ? 0 : nonzero_numel;
    for (const auto& o : v["data_offsets"])
      DMX_CHECK_FORMAT(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0),
                       "safetensors: tensor '", key, "' has a negative or non-integer data offset");
    info.begin = v["data_offsets"][0].get<uint64_t>();
    info.end = v["data_offsets"][1].get<uint64_t>();
    DMX_CHECK_FORMAT(info.begin <= info.end, "safetensors: tensor '", key, "' has begin ", info.begin, " > end ",
                     info.end);
    DMX_CHECK_FORMAT(info.end <= data_size, "safetensors: tensor '", key, "' data [", info.begin, ", ", info.end,
                     ") lies outside the data area of ", data_size, " bytes");
    DMX_CHECK_FORMAT(info.end - info.begin == numel * d->size, "safetensors: tensor '", key, "' holds ",
                     info.end - info.begin, " bytes but shape x dtype ", info.dtype, " needs ", numel * d->size);
    ranges.emplace_back(info.begin, info.end);
    if (infos) (*infos)[key] = std::move(info);
  }
  // Empty ranges hold no bytes and may sit anywhere; every other range must start at or after the
  // furthest end seen so far (comparing only neighbours misses [0,8) [4,4) [4,12)).
  std::sort(ranges.begin(), ranges.end());
  uint64_t furthest_end = 0;
  for (const auto& r : ranges) {
    if (r.first == r.second) continue;
    DMX_CHECK_FORMAT(r.first >= furthest_end, "safetensors: tensor data ranges overlap at byte ", r.first);
    furthest_end = r.second;
  }
  if (data_offset) *data_offset = 8 + n;
}

std::shared_ptr<SafeTensorsFile> SafeTensorsFile::open(const std::string& path) {
  // A regular file only (no device, FIFO or directory: those are refused without blocking); mapped, so
  // its size costs address space, not memory.
  uint64_t size = 0;
  const int fd = open_regular_file(path, "safetensors file", &size);
  std::shared_ptr<SafeTensorsFile> f(new SafeTensorsFile());
  f->path_ = path;
  f->map_size_ = static_cast<size_t>(size);
  if (f->map_size_ > 0) {
    // Private, writable mapping: views handed out are copy-on-write, never writing to the file.
    void* p = ::mmap(nullptr, f->map_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw IoError(detail::concat("cannot map ", path, ": ", std::strerror(errno)));
    }
    f->map_ = p;
    std::lock_guard<std::mutex> lock(mappings_mutex());
    mappings()[reinterpret_cast<uintptr_t>(p)] = reinterpret_cast<uintptr_t>(p) + f->map_size_;
  }
  ::close(fd);
  uint64_t offset = 0;
  try {
    parse_safetensors(static_cast<const uint8_t*>(f->map_), f->map_size_, &f->infos_, &f->metadata_, &offset);
  } catch (const FormatError& e) {
    throw FormatError(detail::concat(e.what(), " (in ", path, ")"));
  }
  f->data_ = static_cast<const uint8_t*>(f->map_) + offset;
  f->data_size_ = f->map_size_ - offset;
  f->self_ = f;
  return f;
}

SafeTensorsFile::~SafeTensorsFile() {
  if (!map_) return;
  std::lock_guard<std::mutex> lock(mappings_mutex());
  mappings().erase(reinterpret_cast<uintptr_t>(map_));
  ::munmap(map_, map_size_);
}

size_t release_mapped_pages(const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.has_storage()) return 0;
  const bool whole = !t.is_contiguous();
  const uintptr_t begin = reinterpret_cast<uintptr_t>(whole ? t.storage().data() : t.data_ptr());
  const uintptr_t end = begin + (whole ? t.storage().nbytes() : static_cast<size_t>(t.numel()) * t.element_size());
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (begin == 0 || last <= first) return 0;
  std::lock_guard<std::mutex> lock(mappings_mutex());
  auto it = mappings().upper_bound(begin);  // the first mapping starting after begin; the one before may hold it
  if (it == mappings().begin()) return 0;
  --it;
  if (begin < it->first || end > it->second) return 0;  // not (entirely) inside a live mapping: heap memory
  if (::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED) != 0) return 0;
  return last - first;
}

std::vector<std::string> SafeTensorsFile::names() const {
  std::vector<std::string> out;
  for (const auto& kv : infos_) out.push_back(kv.first);
  return out;
}

const TensorInfo& SafeTensorsFile::info(const std::string& name) const {
  auto it = infos_.find(name);
  DMX_CHECK_FORMAT(it != infos_.end(), "safetensors: no tensor named '", name, "' in ", path_);
  return it->second;
}

at::Tensor SafeTensorsFile::get(const std::string& name) const {
  const TensorInfo& ti = info(name);
  const DTypeDesc* d = find_dtype(ti.dtype);
  DMX_CHECK_SUPPORTED(d->torch_ok, "safetensors: tensor '", name, "' has dtype ", ti.dtype,
                      ", which libtorch 1.13 cannot represent");
  auto opts = at::TensorOptions().dtype(d->type).device(at::kCPU);
  const uint8_t* p = data_ + ti.begin;
  if (ti.end == ti.begin) return at::empty(ti.shape, opts);
  if (reinterpret_cast<uintptr_t>(p) % d->size == 0) {
    auto keep = self_.lock();
    return at::from_blob(
        const_cast<uint8_t*>(p), ti.shape, [keep](void*) {}, opts);
  }
  at::Tensor t = at::empty(ti.shape, opts);
  std::memcpy(t.data_ptr(), p, ti.end - ti.begin);
  return t;
}

TensorMap SafeTensorsFile::load_all() const {
  TensorMap out;
  for (const auto& kv : infos_) out[kv.first] = get(kv.first);
  return out;
}

TensorMap load_safetensors(const std::string& path) { return SafeTensorsFile::open(path)->load_all(); }

std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<std::pair<std::string, at::Tensor>> blobs;
  for (const auto& kv : tensors) {
    DMX_CHECK_ARG(kv.first != "__metadata__", "save_safetensors: a tensor may not be named '__metadata__'");
    DMX_CHECK_ARG(kv.second.defined(), "save_safetensors: tensor '", kv.first, "' is undefined");
    at::Tensor t = kv.second.detach().to(at::kCPU).contiguous();
    DMX_CHECK_SUPPORTED(dtype_name(t.scalar_type()) != nullptr, "save_safetensors: tensor '", kv.first,
                        "' has unsupported dtype ", t.scalar_type(),
                        " (supported: F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL)");
    blobs.emplace_back(kv.first, t);
  }
  // Data is laid out by decreasing element size (then name), so that every tensor starts at a
  // multiple of its element size and a reader can map it without copying.
  std::stable_sort(blobs.begin(), blobs.end(),
                   [](const auto& a, const auto& b) { return a.second.element_size() > b.second.element_size(); });
  uint64_t offset = 0;
  for (const auto& [name, t] : blobs) {
    const uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');
  std::vector<uint8_t> out(8 + h.size() + offset);
  uint64_t n = h.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, h.data(), h.size());
  uint8_t* p = out.data() + 8 + h.size();
  for (const auto& [name, t] : blobs) {
    const size_t nb = t.numel() * t.element_size();
    if (nb) std::memcpy(p, t.data_ptr(), nb);
    p += nb;
  }
  return out;
}

void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<uint8_t> bytes = serialize_safetensors(tensors, metadata);
  write_bytes_atomic(path, bytes.data(), bytes.size());
}
}  // namespace dmx::io
