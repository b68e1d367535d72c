// A zip reader for the archives torch.save writes (PyTorchStreamWriter: stored entries, a data
// descriptor after each, zip64 records past 4 GiB). It reads the central directory of a byte
// range that is already in memory (a mapping) and hands out pointers into it; it never inflates.
// Every count, size and offset is checked against the bytes there before it is used: a malformed,
// compressed, encrypted, multi-disk, overlapping or truncated archive is a FormatError.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dmx::io {

struct ZipEntry {
  std::string name;
  uint64_t header_offset = 0;  // local file header
  uint64_t data_offset = 0;    // first byte of the stored data
  uint64_t size = 0;           // stored == uncompressed size
  uint32_t crc32 = 0;          // from the central directory
};

class ZipArchive {
 public:
  static constexpr uint64_t kMaxEntries = 1u << 20;

  // `what` names the archive in errors (usually its path).
  ZipArchive(const uint8_t* data, size_t size, std::string what);

  const std::vector<ZipEntry>& entries() const { return entries_; }
  const ZipEntry* find(const std::string& name) const;
  // The stored bytes of an entry; with verify, their CRC-32 is checked against the directory.
  const uint8_t* bytes(const ZipEntry& e, bool verify = true) const;
  const std::string& what() const { return what_; }

 private:
  const uint8_t* data_;
  size_t size_;
  std::string what_;
  std::vector<ZipEntry> entries_;
  std::map<std::string, size_t> by_name_;
};

// Starts with a local file header ("PK\3\4") or is an empty archive ("PK\5\6").
bool looks_like_zip(const uint8_t* data, size_t size);
}  // namespace dmx::io
