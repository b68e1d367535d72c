// torch.save without Python (see torch_save.h). The pickle follows CPython's Pickler at protocol 2 (Lib/pickle.py:
// save_long, save_float, save_str, save_tuple, save_list, save_dict, save_global, save_reduce) for the values torch
// puts in a state dict, and torch/serialization.py _save (persistent_id) with torch/_tensor.py _reduce_ex_internal
// for tensors; the archive follows caffe2/serialize/inline_container.cc (PyTorchStreamWriter).
#include "io/torch_save.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <map>

#include "core/fs.h"
#include "dmx/error.h"

namespace dmx::io {

// ---------------------------------------------------------------------------------------------------
PyValue PyValue::boolean(bool b) {
  PyValue v;
  v.kind_ = Kind::Bool;
  v.b = b;
  return v;
}
PyValue PyValue::integer(int64_t i) {
  PyValue v;
  v.kind_ = Kind::Int;
  v.i = i;
  return v;
}
PyValue PyValue::real(double f) {
  PyValue v;
  v.kind_ = Kind::Float;
  v.f = f;
  return v;
}
PyValue PyValue::string(std::string s) {
  PyValue v;
  v.kind_ = Kind::String;
  v.s = std::move(s);
  return v;
}
PyValue PyValue::list(std::vector<PyValue> items) {
  PyValue v;
  v.kind_ = Kind::List;
  v.items = std::move(items);
  return v;
}
PyValue PyValue::tuple(std::vector<PyValue> items) {
  PyValue v;
  v.kind_ = Kind::Tuple;
  v.items = std::move(items);
  return v;
}
PyValue PyValue::dict() {
  PyValue v;
  v.kind_ = Kind::Dict;
  return v;
}
PyValue PyValue::ordered_dict() {
  PyValue v;
  v.kind_ = Kind::OrderedDict;
  return v;
}
PyValue PyValue::tensor(const at::Tensor& t) {
  DMX_CHECK_ARG(t.defined(), "torch_save: undefined tensor");
  PyValue v;
  v.kind_ = Kind::Tensor;
  v.t = t;
  return v;
}
PyValue PyValue::reals(const std::vector<double>& values) {
  PyValue v = list();
  for (double x : values) v.items.push_back(real(x));
  return v;
}
PyValue& PyValue::set(PyValue key, PyValue value) {
  DMX_CHECK_ARG(kind_ == Kind::Dict || kind_ == Kind::OrderedDict, "torch_save: set() on a value that is not a dict");
  pairs.emplace_back(std::move(key), std::move(value));
  return *this;
}
PyValue& PyValue::append(PyValue item) {
  DMX_CHECK_ARG(kind_ == Kind::List || kind_ == Kind::Tuple,
                "torch_save: append() on a value that is not a list or tuple");
  items.push_back(std::move(item));
  return *this;
}

// ---------------------------------------------------------------------------------------------------
namespace {

const char* storage_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "FloatStorage";
    case at::kHalf:
      return "HalfStorage";
    case at::kBFloat16:
      return "BFloat16Storage";
    case at::kDouble:
      return "DoubleStorage";
    case at::kLong:
      return "LongStorage";
    case at::kInt:
      return "IntStorage";
    case at::kShort:
      return "ShortStorage";
    case at::kChar:
      return "CharStorage";
    case at::kByte:
      return "ByteStorage";
    case at::kBool:
      return "BoolStorage";
    default:
      return nullptr;
  }
}

// Pickle opcodes (Lib/pickle.py).
enum : uint8_t {
  MARK = '(',
  STOP = '.',
  BINPERSID = 'Q',
  REDUCE = 'R',
  BININT = 'J',
  BININT1 = 'K',
  BININT2 = 'M',
  NONE = 'N',
  BINUNICODE = 'X',
  APPEND = 'a',
  APPENDS = 'e',
  BINGET = 'h',
  LONG_BINGET = 'j',
  EMPTY_LIST = ']',
  EMPTY_DICT = '}',
  EMPTY_TUPLE = ')',
  SETITEM = 's',
  SETITEMS = 'u',
  TUPLE = 't',
  BINFLOAT = 'G',
  GLOBAL = 'c',
  BINPUT = 'q',
  LONG_BINPUT = 'r',
  PROTO = 0x80,
  TUPLE1 = 0x85,
  TUPLE2 = 0x86,
  TUPLE3 = 0x87,
  NEWTRUE = 0x88,
  NEWFALSE = 0x89,
  LONG1 = 0x8a,
};
constexpr size_t kBatchSize = 1000;  // pickle.Pickler._BATCHSIZE

class Pickler {
 public:
  PickledObject run(const PyValue& root) {
    op(PROTO);
    op(2);
    save(root);
    op(STOP);
    return std::move(out_);
  }

 private:
  void op(uint8_t b) { out_.pickle.push_back(b); }
  void le32(uint32_t v) {
    for (int k = 0; k < 4; ++k) op(static_cast<uint8_t>(v >> (8 * k)));
  }
  void bytes(const std::string& s) { out_.pickle.insert(out_.pickle.end(), s.begin(), s.end()); }

  // Globals are memoized (as CPython does), so a second use is a BINGET.
  void global(const std::string& module, const std::string& name) {
    const std::string key = module + "\n" + name + "\n";
    auto it = memo_.find(key);
    if (it != memo_.end()) {
      get(it->second);
      return;
    }
    op(GLOBAL);
    bytes(key);
    const uint32_t idx = static_cast<uint32_t>(memo_.size());
    memo_.emplace(key, idx);
    if (idx < 256) {
      op(BINPUT);
      op(static_cast<uint8_t>(idx));
    } else {
      op(LONG_BINPUT);
      le32(idx);
    }
  }
  void get(uint32_t idx) {
    if (idx < 256) {
      op(BINGET);
      op(static_cast<uint8_t>(idx));
    } else {
      op(LONG_BINGET);
      le32(idx);
    }
  }

  void save_int(int64_t v) {  // save_long
    if (v >= 0 && v <= 0xff) {
      op(BININT1);
      op(static_cast<uint8_t>(v));
    } else if (v >= 0 && v <= 0xffff) {
      op(BININT2);
      op(static_cast<uint8_t>(v));
      op(static_cast<uint8_t>(v >> 8));
    } else if (v >= -0x80000000ll && v <= 0x7fffffffll) {
      op(BININT);
      le32(static_cast<uint32_t>(static_cast<int32_t>(v)));
    } else {  // LONG1: two's-complement little-endian, the fewest bytes that keep the sign (encode_long)
      std::vector<uint8_t> b;
      auto u = static_cast<uint64_t>(v);
      for (int k = 0; k < 8; ++k) b.push_back(static_cast<uint8_t>(u >> (8 * k)));
      while (b.size() > 1 &&
             ((b.back() == 0 && !(b[b.size() - 2] & 0x80)) || (b.back() == 0xff && (b[b.size() - 2] & 0x80))))
        b.pop_back();
      op(LONG1);
      op(static_cast<uint8_t>(b.size()));
      out_.pickle.insert(out_.pickle.end(), b.begin(), b.end());
    }
  }
  void save_float(double f) {  // BINFLOAT: big-endian IEEE double
    uint64_t u;
    std::memcpy(&u, &f, 8);
    op(BINFLOAT);
    for (int k = 7; k >= 0; --k) op(static_cast<uint8_t>(u >> (8 * k)));
  }
  void save_str(const std::string& s) {
    DMX_CHECK_ARG(s.size() <= 0xffffffffull, "torch_save: string of ", s.size(), " bytes is too long");
    op(BINUNICODE);
    le32(static_cast<uint32_t>(s.size()));
    bytes(s);
  }
  void save_tuple(const std::vector<PyValue>& items) {
    if (items.empty()) {
      op(EMPTY_TUPLE);
      return;
    }
    if (items.size() <= 3) {
      for (const auto& x : items) save(x);
      op(static_cast<uint8_t>(TUPLE1 + items.size() - 1));
      return;
    }
    op(MARK);
    for (const auto& x : items) save(x);
    op(TUPLE);
  }
  void save_list(const std::vector<PyValue>& items) {
    op(EMPTY_LIST);
    for (size_t start = 0; start < items.size(); start += kBatchSize) {  // _batch_appends
      const size_t n = std::min(kBatchSize, items.size() - start);
      if (n == 1) {
        save(items[start]);
        op(APPEND);
      } else {
        op(MARK);
        for (size_t k = 0; k < n; ++k) save(items[start + k]);
        op(APPENDS);
      }
    }
  }
  void save_items(const std::vector<std::pair<PyValue, PyValue>>& pairs) {  // _batch_setitems
    for (size_t start = 0; start < pairs.size(); start += kBatchSize) {
      const size_t n = std::min(kBatchSize, pairs.size() - start);
      if (n == 1) {
        save(pairs[start].first);
        save(pairs[start].second);
        op(SETITEM);
      } else {
        op(MARK);
        for (size_t k = 0; k < n; ++k) {
          save(pairs[start + k].first);
          save(pairs[start + k].second);
        }
        op(SETITEMS);
      }
    }
  }
  // OrderedDict.__reduce__: (OrderedDict, (), None, None, iter(items)) -> GLOBAL, EMPTY_TUPLE, REDUCE, items.
  void save_ordered_dict(const std::vector<std::pair<PyValue, PyValue>>& pairs) {
    global("collections", "OrderedDict");
    op(EMPTY_TUPLE);
    op(REDUCE);
    save_items(pairs);
  }
  // Tensor._reduce_ex_internal: _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
  // backward_hooks=OrderedDict()); the storage is the persistent id ('storage', <Type>Storage, key, 'cpu', numel).
  void save_tensor(const at::Tensor& tensor) {
    const char* type = storage_type(tensor.scalar_type());
    DMX_CHECK_ARG(type != nullptr, "torch_save: tensors of dtype ", tensor.scalar_type(),
                  " have no torch storage type");
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    if (t.is_neg()) t = t.resolve_neg();
    if (t.is_conj()) t = t.resolve_conj();
    const std::string key = std::to_string(out_.storages.size());
    out_.storages.push_back(t);
    global("torch._utils", "_rebuild_tensor_v2");
    op(MARK);
    op(MARK);  // the persistent id tuple (5 elements: MARK ... TUPLE)
    save_str("storage");
    global("torch", type);
    save_str(key);
    save_str("cpu");
    save_int(t.numel());
    op(TUPLE);
    op(BINPERSID);
    save_int(0);  // storage offset
    std::vector<PyValue> size, stride;
    for (int64_t d = 0; d < t.dim(); ++d) {
      size.push_back(PyValue::integer(t.size(d)));
      stride.push_back(PyValue::integer(t.stride(d)));
    }
    save_tuple(size);
    save_tuple(stride);
    op(NEWFALSE);  // requires_grad
    save_ordered_dict({});
    op(TUPLE);
    op(REDUCE);
  }

  void save(const PyValue& v) {
    DMX_CHECK_ARG(++depth_ <= 1000, "torch_save: values nested more than 1000 deep");
    switch (v.kind()) {
      case PyValue::Kind::None:
        op(NONE);
        break;
      case PyValue::Kind::Bool:
        op(v.b ? NEWTRUE : NEWFALSE);
        break;
      case PyValue::Kind::Int:
        save_int(v.i);
        break;
      case PyValue::Kind::Float:
        save_float(v.f);
        break;
      case PyValue::Kind::String:
        save_str(v.s);
        break;
      case PyValue::Kind::Tuple:
        save_tuple(v.items);
        break;
      case PyValue::Kind::List:
        save_list(v.items);
        break;
      case PyValue::Kind::Dict:
        op(EMPTY_DICT);
        save_items(v.pairs);
        break;
      case PyValue::Kind::OrderedDict:
        save_ordered_dict(v.pairs);
        break;
      case PyValue::Kind::Tensor:
        save_tensor(v.t);
        break;
    }
    --depth_;
  }

  PickledObject out_;
  std::map<std::string, uint32_t> memo_;
  int depth_ = 0;
};

// ---- zip (APPNOTE 4.3.7 local header, 4.3.12 central directory, 4.3.16 end record) -------------------
constexpr uint64_t kAlignment = 64;  // PyTorchStreamWriter's kFieldAlignment

void put16(std::vector<uint8_t>& o, uint32_t v) {
  o.push_back(static_cast<uint8_t>(v));
  o.push_back(static_cast<uint8_t>(v >> 8));
}
void put32(std::vector<uint8_t>& o, uint32_t v) {
  put16(o, v & 0xffff);
  put16(o, v >> 16);
}

struct Entry {
  std::string name;
  uint32_t crc = 0;
  uint64_t size = 0, offset = 0;
};

uint32_t crc32_of(const uint8_t* p, uint64_t n) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  while (n > 0) {
    const uInt chunk = static_cast<uInt>(std::min<uint64_t>(n, 1u << 30));
    crc = ::crc32(crc, p, chunk);
    p += chunk;
    n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

class ZipWriter {
 public:
  void add(const std::string& name, const uint8_t* data, uint64_t size) {
    DMX_CHECK_SUPPORTED(size < 0xffffffffull && out_.size() < 0xffffffffull - size - 1024,
                        "torch_save: archives of 4 GiB or more (zip64) are not written");
    Entry e{name, crc32_of(data, size), size, out_.size()};
    // Local header; the extra field "FB" pads the data to a multiple of 64 bytes, as PyTorchStreamWriter does.
    const uint64_t header_end = out_.size() + 30 + name.size();
    uint64_t pad = (kAlignment - (header_end + 4) % kAlignment) % kAlignment;
    put32(out_, 0x04034b50);
    put16(out_, 20);  // version needed
    put16(out_, 0);   // flags
    put16(out_, 0);   // stored
    put16(out_, 0);   // time
    put16(out_, 0);   // date
    put32(out_, e.crc);
    put32(out_, static_cast<uint32_t>(size));
    put32(out_, static_cast<uint32_t>(size));
    put16(out_, static_cast<uint32_t>(name.size()));
    put16(out_, static_cast<uint32_t>(4 + pad));
    out_.insert(out_.end(), name.begin(), name.end());
    put16(out_, 0x4246);  // "FB"
    put16(out_, static_cast<uint32_t>(pad));
    out_.insert(out_.end(), pad, 'Z');
    out_.insert(out_.end(), data, data + size);
    entries_.push_back(e);
  }
  std::vector<uint8_t> finish() {
    const uint64_t cd_offset = out_.size();
    for (const auto& e : entries_) {
      put32(out_, 0x02014b50);
      put16(out_, 20);  // version made by
      put16(out_, 20);  // version needed
      put16(out_, 0);
      put16(out_, 0);
      put16(out_, 0);
      put16(out_, 0);
      put32(out_, e.crc);
      put32(out_, static_cast<uint32_t>(e.size));
      put32(out_, static_cast<uint32_t>(e.size));
      put16(out_, static_cast<uint32_t>(e.name.size()));
      put16(out_, 0);  // extra
      put16(out_, 0);  // comment
      put16(out_, 0);  // disk
      put16(out_, 0);  // internal attributes
      put32(out_, 0);  // external attributes
      put32(out_, static_cast<uint32_t>(e.offset));
      out_.insert(out_.end(), e.name.begin(), e.name.end());
    }
    const uint64_t cd_size = out_.size() - cd_offset;
    DMX_CHECK_SUPPORTED(entries_.size() < 0xffff && out_.size() < 0xffffffffull,
                        "torch_save: archives of 4 GiB or more (zip64) are not written");
    put32(out_, 0x06054b50);
    put16(out_, 0);
    put16(out_, 0);
    put16(out_, static_cast<uint32_t>(entries_.size()));
    put16(out_, static_cast<uint32_t>(entries_.size()));
    put32(out_, static_cast<uint32_t>(cd_size));
    put32(out_, static_cast<uint32_t>(cd_offset));
    put16(out_, 0);
    return std::move(out_);
  }

 private:
  std::vector<uint8_t> out_;
  std::vector<Entry> entries_;
};

bool portable_name(const std::string& s) {
  if (s.empty() || s.size() > 200 || s == "." || s == "..") return false;
  for (char c : s)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
          c == '-'))
      return false;
  return true;
}
}  // namespace

PickledObject pickle_object(const PyValue& root) { return Pickler().run(root); }

std::vector<uint8_t> torch_save_bytes(const PyValue& root, const std::string& folder) {
  DMX_CHECK_ARG(portable_name(folder), "torch_save: archive folder '", folder, "' must be made of [A-Za-z0-9._-]");
  const PickledObject p = pickle_object(root);
  ZipWriter zip;
  zip.add(folder + "/data.pkl", p.pickle.data(), p.pickle.size());
  for (size_t k = 0; k < p.storages.size(); ++k) {
    const at::Tensor& t = p.storages[k];
    zip.add(folder + "/data/" + std::to_string(k), static_cast<const uint8_t*>(t.data_ptr()), t.nbytes());
  }
  static const std::string version = "3\n";
  zip.add(folder + "/version", reinterpret_cast<const uint8_t*>(version.data()), version.size());
  return zip.finish();
}

std::string torch_save_folder(const std::string& path) {
  const std::string stem = file_stem(path);
  return portable_name(stem) ? stem : "archive";
}

void torch_save(const PyValue& root, const std::string& path) {
  const std::vector<uint8_t> bytes = torch_save_bytes(root, torch_save_folder(path));
  write_bytes_atomic(path, bytes.data(), bytes.size());
}
}  // namespace dmx::io
