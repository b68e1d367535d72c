// Weights-only loading of torch.save files (.ckpt, .pt, .pth, .bin) without Python and without ever
// executing anything: a pickle machine that knows plain data (None, bool, int, float, str, bytes,
// list, tuple, dict, collections.OrderedDict) and torch's tensor rebuild functions, and nothing
// else. The same contract as PyTorch's `torch.load(weights_only=True)`, plus the opcodes real files
// use that torch 1.13's loader forgets (BINFLOAT in A1111 hypernetworks). Any other global or
// opcode, and anything past a limit, is a FormatError (exit 2) naming it; docs/pickle.md lists the
// allowed globals and the limits.
//
// Formats: the zip archive torch >= 1.6 writes (<dir>/data.pkl, <dir>/data/<key>, <dir>/version)
// and the legacy stream of torch < 1.6 / _use_new_zipfile_serialization=False (magic number,
// protocol, sys info, the pickle, the storage keys, then the storages). Tensors are CPU tensors
// over one shared, copy-on-write mapping of the file (views of one storage share it, as in torch).
#pragma once
#include <ATen/core/Tensor.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/safetensors.h"

namespace dmx::io {

// Limits. Each is stated in the error that enforces it.
struct PickleLimits {
  static constexpr uint64_t kMaxPickleBytes = 1ull << 30;  // one pickle stream (data.pkl)
  static constexpr uint64_t kMaxObjects = 1u << 21;        // values created by the machine
  static constexpr uint64_t kMaxStack = 1u << 21;          // values on the stack at once
  static constexpr uint64_t kMaxMarks = 1000;              // open MARKs
  static constexpr uint64_t kMaxMemo = 1u << 21;           // memo entries
  static constexpr uint64_t kMaxElements = 1u << 24;       // container slots, all containers together
  static constexpr uint64_t kMaxDepth = 1000;              // nesting of containers
  static constexpr uint64_t kMaxExpanded = 1u << 22;       // values counted once per path from the root
  static constexpr uint64_t kMaxIntBytes = 1024;           // LONG1/LONG4 integers
  static constexpr uint64_t kMaxNameBytes = 1024;          // GLOBAL module/name lines
  static constexpr uint64_t kMaxDims = 64;                 // tensor dimensions
};

class TorchFile;

// One value of a loaded pickle: a handle into the file's value tree (keeps the file alive).
// Accessors check the kind and throw FormatError naming the file, the path ("['32'][0]") and what
// was found, so callers can walk a layout without checks of their own.
class PickleValue {
 public:
  enum class Kind { None, Bool, Int, BigInt, Float, String, Bytes, List, Tuple, Dict, OrderedDict, Tensor };

  Kind kind() const;
  const char* kind_name() const;  // "dict", "OrderedDict", "tensor", ...
  const std::string& path() const { return path_; }
  std::string where() const;  // "<file>: <path>" for messages

  bool is_none() const { return kind() == Kind::None; }
  bool is_dict() const { return kind() == Kind::Dict || kind() == Kind::OrderedDict; }
  bool is_sequence() const { return kind() == Kind::List || kind() == Kind::Tuple; }
  bool is_tensor() const { return kind() == Kind::Tensor; }
  bool is_string() const { return kind() == Kind::String; }
  bool is_number() const { return kind() == Kind::Int || kind() == Kind::Float || kind() == Kind::Bool; }

  bool as_bool() const;
  int64_t as_int() const;   // Int (or Bool), within int64
  double as_float() const;  // Float, Int or Bool
  const std::string& as_string() const;
  const std::string& as_bytes() const;
  at::Tensor as_tensor() const;

  // Lists and tuples: size() and operator[]; dicts: size(), contains(), at() and items() in order.
  size_t size() const;
  PickleValue operator[](size_t i) const;
  bool contains(const std::string& key) const;
  bool contains(int64_t key) const;
  PickleValue at(const std::string& key) const;
  PickleValue at(int64_t key) const;
  std::vector<std::pair<PickleValue, PickleValue>> items() const;
  // Attributes an OrderedDict carried (its BUILD state, e.g. a state dict's `_metadata`): a dict.
  bool has_attributes() const;
  PickleValue attributes() const;

  // Every tensor below this value, named by '.'-joined keys and indices ("32.0.linear.0.weight"),
  // with prefix in front. Non-tensor leaves are skipped. Two paths giving one name is a FormatError.
  TensorMap tensors(const std::string& prefix = "") const;
  // Plain data as JSON (tensors as {"tensor": dtype, "shape": [...]}, bytes as {"bytes_hex": ...},
  // integers past int64 as {"int": "<decimal>"}).
  nlohmann::json to_json() const;
  uint32_t node_index() const { return node_; }

 private:
  friend class TorchFile;
  PickleValue(std::shared_ptr<const TorchFile> file, uint32_t node, std::string path)
      : file_(std::move(file)), node_(node), path_(std::move(path)) {}
  PickleValue child(uint32_t node, const std::string& step) const;
  [[noreturn]] void mismatch(const char* expected) const;
  std::shared_ptr<const TorchFile> file_;
  uint32_t node_ = 0;
  std::string path_;
};

// A loaded torch.save file. Build one with load_torch_file or parse_torch_bytes.
class TorchFile : public std::enable_shared_from_this<TorchFile> {
 public:
  PickleValue root() const;
  const std::string& what() const { return what_; }
  const std::string& format() const { return format_; }  // "zip" | "legacy" | "bare pickle"
  size_t tensor_count() const { return tensors_.size(); }

  // Internal representation, public for the pickle machine in torch_pickle.cpp.
  struct Node {
    PickleValue::Kind kind = PickleValue::Kind::None;
    uint8_t special = 0;  // non-zero: a global, a storage or a mark (not a value of the tree)
    int64_t i = 0;        // Int, Bool; string/bytes/tensor/storage index
    double f = 0;
    std::vector<uint32_t> items;  // List/Tuple elements; Dict: key, value, key, value, ...
    uint32_t attrs = UINT32_MAX;  // OrderedDict BUILD state
  };
  struct TensorRecord {
    uint32_t storage = 0;  // index into storages_
    int64_t offset = 0;
    std::vector<int64_t> sizes, strides;
    at::Tensor tensor;
  };
  struct StorageRecord {
    std::string key, location;
    at::ScalarType dtype;
    int64_t numel = 0;
    int64_t view_offset = 0, view_numel = -1;  // legacy storage views
    at::Storage storage;
  };
  std::string what_, format_;
  std::vector<Node> nodes_;
  std::deque<std::string> strings_;  // String and Bytes payloads (stable addresses)
  std::vector<TensorRecord> tensors_;
  std::vector<StorageRecord> storages_;
  std::shared_ptr<const void> keep_alive_;  // the mapping the storages point into
  uint32_t root_ = 0;
};

// Loads a torch.save file by content (zip or legacy). IoError when it cannot be read; FormatError
// for anything malformed, refused or past a limit; Unsupported for a big-endian file.
std::shared_ptr<const TorchFile> load_torch_file(const std::string& path);
// The same on bytes in memory; keep_alive (may be null) owns them and is kept by the tensors.
std::shared_ptr<const TorchFile> parse_torch_bytes(const uint8_t* data, size_t size, const std::string& what,
                                                   std::shared_ptr<const void> keep_alive);
// For tests and the fuzzer: one bare pickle stream; a storage persistent id gets a zero-filled
// storage of its declared element count (at most 1 << 20 elements for all storages together).
std::shared_ptr<const TorchFile> parse_bare_pickle(const uint8_t* data, size_t size, const std::string& what);

// A checkpoint's state dict: the top-level dict, or the dict under "state_dict" keys (followed while
// present, as .ckpt files nest it), flattened by PickleValue::tensors.
TensorMap torch_state_dict(const TorchFile& file);

// Everything a file holds, for `dmx convert`: the state dict's tensors under their own names (as
// torch_state_dict names them), tensors elsewhere under their full '.'-joined path, and every other
// value as JSON text under its path (a container without tensors as one JSON value).
struct FlatTorchFile {
  TensorMap tensors;
  std::map<std::string, std::string> metadata;
};
FlatTorchFile flatten_torch_file(const TorchFile& file);

// Bytes that start like a torch.save file (a zip local header or a pickle PROTO opcode).
bool looks_like_torch_file(const uint8_t* data, size_t size);
bool looks_like_torch_file(const std::string& path);
}  // namespace dmx::io
