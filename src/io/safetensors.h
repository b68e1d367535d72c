// Safetensors reader (mmap, lazy, zero-copy where alignment allows) and writer.
// Format: 8-byte little-endian header length N, N bytes of JSON, then the data area.
// Every structural rule is validated on open; a malformed file is a FormatError.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace dmx::io {

using TensorMap = std::map<std::string, at::Tensor>;

struct TensorInfo {
  std::string name;
  std::string dtype;  // safetensors spelling: F32, F16, BF16, I64, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data area
  uint64_t end = 0;
};

class SafeTensorsFile {
 public:
  // Opens and validates; throws IoError (cannot read) or FormatError (malformed).
  static std::shared_ptr<SafeTensorsFile> open(const std::string& path);
  ~SafeTensorsFile();
  SafeTensorsFile(const SafeTensorsFile&) = delete;
  SafeTensorsFile& operator=(const SafeTensorsFile&) = delete;

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return infos_.count(name) != 0; }
  const TensorInfo& info(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // A CPU tensor; shares the mapping when the data is aligned (writes are copy-on-write).
  at::Tensor get(const std::string& name) const;
  TensorMap load_all() const;

 private:
  SafeTensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;  // start of the data area
  uint64_t data_size_ = 0;
  std::map<std::string, TensorInfo> infos_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<SafeTensorsFile> self_;
};

// Parses and validates a header (exposed for tests and fuzzing). file_size is the total size.
void parse_safetensors(const uint8_t* bytes, size_t file_size, std::map<std::string, TensorInfo>* infos,
                       std::map<std::string, std::string>* metadata, uint64_t* data_offset);

TensorMap load_safetensors(const std::string& path);
// Writes atomically; tensors are made contiguous on the CPU. Supported: F32 F16 BF16 F64 I64 I32 I16 I8 U8 BOOL.
void save_safetensors(const std::string& path, const TensorMap& tensors,
                      const std::map<std::string, std::string>& metadata = {});
std::vector<uint8_t> serialize_safetensors(const TensorMap& tensors,
                                           const std::map<std::string, std::string>& metadata = {});
}  // namespace dmx::io
