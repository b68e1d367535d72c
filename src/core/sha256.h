// SHA-256 (FIPS 180-4), streaming, for model hashes in image metadata (A1111's "Model hash" is the
// first 10 hex digits of the checkpoint file's SHA-256).
#pragma once
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>

namespace dmx {

class Sha256 {
 public:
  Sha256();
  void update(const void* data, size_t size);
  std::array<uint8_t, 32> digest();  // finalises; call once
  std::string hex_digest();          // 64 lowercase hex digits; finalises

 private:
  void block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
  bool done_ = false;
};

std::string sha256_hex(const void* data, size_t size);
// Streams the file in 1 MiB chunks (never holds it in memory). IoError if it cannot be read.
// With `cancel`, stops early and returns "" once *cancel is true.
std::string sha256_file(const std::string& path, const std::atomic<bool>* cancel = nullptr);
}  // namespace dmx
