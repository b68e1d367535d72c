// Zip reading per PKWARE's APPNOTE 6.3.x (sections 4.3.7 local header, 4.3.12 central directory,
// 4.3.14-4.3.16 zip64 end records, 4.5.3 zip64 extra field), restricted to what torch.save writes.
#include "io/zip_archive.h"

#include <zlib.h>

#include <algorithm>
#include <utility>

#include "dmx/error.h"

namespace dmx::io {
namespace {

constexpr uint32_t kLocalSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50;
constexpr uint32_t kZip64EndSig = 0x06064b50, kZip64LocatorSig = 0x07064b50;
constexpr size_t kLocalSize = 30, kCentralSize = 46, kEndSize = 22, kZip64LocatorSize = 20, kZip64EndSize = 56;

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t rd32(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t rd64(const uint8_t* p) { return static_cast<uint64_t>(rd32(p)) | (static_cast<uint64_t>(rd32(p + 4)) << 32); }

// [offset, offset + len) inside [0, size), without overflow.
bool fits(uint64_t offset, uint64_t len, uint64_t size) { return offset <= size && len <= size - offset; }

}  // namespace

bool looks_like_zip(const uint8_t* data, size_t size) {
  return size >= 4 && data[0] == 'P' && data[1] == 'K' &&
         ((data[2] == 3 && data[3] == 4) || (data[2] == 5 && data[3] == 6));
}

ZipArchive::ZipArchive(const uint8_t* data, size_t size, std::string what)
    : data_(data), size_(size), what_(std::move(what)) {
  const std::string& w = what_;
  DMX_CHECK_FORMAT(size >= kEndSize, w, ": zip archive of ", size, " bytes is shorter than its end record (22 bytes)");
  // The end record is the last 22 bytes plus a comment of at most 65535 bytes; take the last
  // signature whose comment length reaches exactly the end of the file.
  uint64_t end = UINT64_MAX;
  const uint64_t lowest = size > kEndSize + 0xFFFF ? size - kEndSize - 0xFFFF : 0;
  for (uint64_t pos = size - kEndSize + 1; pos-- > lowest;) {
    if (rd32(data + pos) == kEndSig && pos + kEndSize + rd16(data + pos + 20) == size) {
      end = pos;
      break;
    }
  }
  DMX_CHECK_FORMAT(end != UINT64_MAX, w, ": no zip end-of-central-directory record (truncated or not a zip file)");
  const uint8_t* e = data + end;
  uint64_t disk = rd16(e + 4), cd_disk = rd16(e + 6), n_disk = rd16(e + 8), n_total = rd16(e + 10);
  uint64_t cd_size = rd32(e + 12), cd_offset = rd32(e + 16);
  uint64_t directory_end = end;  // the central directory must end before this
  const bool zip64 = n_disk == 0xFFFF || n_total == 0xFFFF || cd_size == 0xFFFFFFFFu || cd_offset == 0xFFFFFFFFu;
  if (zip64) {
    DMX_CHECK_FORMAT(end >= kZip64LocatorSize && rd32(data + end - kZip64LocatorSize) == kZip64LocatorSig, w,
                     ": the zip end record points to zip64 records, but there is no zip64 locator before it");
    const uint8_t* loc = data + end - kZip64LocatorSize;
    DMX_CHECK_FORMAT(rd32(loc + 4) == 0 && rd32(loc + 16) == 1, w, ": multi-disk zip archives are not supported");
    const uint64_t z = rd64(loc + 8);
    DMX_CHECK_FORMAT(fits(z, kZip64EndSize, end - kZip64LocatorSize) && rd32(data + z) == kZip64EndSig, w,
                     ": zip64 end record offset ", z, " does not point to a zip64 end record");
    const uint8_t* r = data + z;
    const uint64_t record = rd64(r + 4);
    DMX_CHECK_FORMAT(record >= kZip64EndSize - 12 && fits(z + 12, record, end - kZip64LocatorSize), w,
                     ": zip64 end record size ", record, " is out of range");
    disk = rd32(r + 16);
    cd_disk = rd32(r + 20);
    n_disk = rd64(r + 24);
    n_total = rd64(r + 32);
    cd_size = rd64(r + 40);
    cd_offset = rd64(r + 48);
    directory_end = z;
  }
  DMX_CHECK_FORMAT(disk == 0 && cd_disk == 0 && n_disk == n_total, w, ": multi-disk zip archives are not supported");
  DMX_CHECK_FORMAT(fits(cd_offset, cd_size, directory_end), w, ": zip central directory [", cd_offset, ", +", cd_size,
                   ") lies outside the ", directory_end, " bytes before the end record");
  DMX_CHECK_FORMAT(n_total <= kMaxEntries, w, ": zip archive declares ", n_total, " entries, more than the limit of ",
                   kMaxEntries);
  DMX_CHECK_FORMAT(n_total <= cd_size / kCentralSize, w, ": zip archive declares ", n_total,
                   " entries, but its central directory of ", cd_size, " bytes holds at most ", cd_size / kCentralSize);
  entries_.reserve(n_total);
  uint64_t pos = cd_offset;
  const uint64_t cd_end = cd_offset + cd_size;
  for (uint64_t i = 0; i < n_total; ++i) {
    DMX_CHECK_FORMAT(fits(pos, kCentralSize, cd_end) && rd32(data + pos) == kCentralSig, w,
                     ": zip central directory entry ", i, " at byte ", pos, " is missing or truncated");
    const uint8_t* c = data + pos;
    const uint16_t flags = rd16(c + 8), method = rd16(c + 10);
    const uint16_t name_len = rd16(c + 28), extra_len = rd16(c + 30), comment_len = rd16(c + 32);
    DMX_CHECK_FORMAT(fits(pos + kCentralSize, uint64_t(name_len) + extra_len + comment_len, cd_end), w,
                     ": zip central directory entry ", i, " runs past the directory");
    ZipEntry z;
    z.name.assign(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    const std::string& n = z.name;
    DMX_CHECK_FORMAT(!(flags & 0x0001) && !(flags & 0x0040) && !(flags & 0x2000), w, ": zip entry '", n,
                     "' is encrypted (not supported)");
    DMX_CHECK_FORMAT(method == 0, w, ": zip entry '", n, "' is compressed (method ", method,
                     "); torch.save stores entries uncompressed, and compressed ones are not supported");
    z.crc32 = rd32(c + 16);
    uint64_t csize = rd32(c + 20), usize = rd32(c + 24), offset = rd32(c + 42);
    uint64_t start_disk = rd16(c + 34);
    // Zip64 extended information: the 64-bit values of the fields saturated above, in this order.
    const uint8_t* x = c + kCentralSize + name_len;
    const uint8_t* x_end = x + extra_len;
    while (x_end - x >= 4) {
      const uint16_t id = rd16(x), len = rd16(x + 2);
      DMX_CHECK_FORMAT(len <= x_end - x - 4, w, ": zip entry '", n, "' has an extra field running past its end");
      if (id == 0x0001) {
        const uint8_t* f = x + 4;
        const uint8_t* f_end = f + len;
        auto take64 = [&](uint64_t* v, const char* field) {
          DMX_CHECK_FORMAT(f_end - f >= 8, w, ": zip entry '", n, "': zip64 field lacks the ", field);
          *v = rd64(f);
          f += 8;
        };
        if (usize == 0xFFFFFFFFu) take64(&usize, "uncompressed size");
        if (csize == 0xFFFFFFFFu) take64(&csize, "compressed size");
        if (offset == 0xFFFFFFFFu) take64(&offset, "local header offset");
        if (start_disk == 0xFFFF) {
          DMX_CHECK_FORMAT(f_end - f >= 4, w, ": zip entry '", n, "': zip64 field lacks the disk number");
          start_disk = rd32(f);
        }
      }
      x += 4 + len;
    }
    DMX_CHECK_FORMAT(usize != 0xFFFFFFFFu && csize != 0xFFFFFFFFu && offset != 0xFFFFFFFFu, w, ": zip entry '", n,
                     "' has saturated 32-bit sizes but no zip64 extra field");
    DMX_CHECK_FORMAT(start_disk == 0, w, ": multi-disk zip archives are not supported");
    DMX_CHECK_FORMAT(csize == usize, w, ": zip entry '", n, "' is stored with size ", csize,
                     " but declares an uncompressed size of ", usize);
    // The local header repeats the name; its extra field (torch pads data to 64 bytes there) may differ.
    DMX_CHECK_FORMAT(fits(offset, kLocalSize, cd_offset) && rd32(data + offset) == kLocalSig, w, ": zip entry '", n,
                     "': local header offset ", offset, " does not point to a local file header");
    const uint8_t* l = data + offset;
    const uint64_t l_name = rd16(l + 26), l_extra = rd16(l + 28);
    DMX_CHECK_FORMAT(rd16(l + 8) == method && l_name == name_len && fits(offset + kLocalSize, l_name, cd_offset) &&
                         std::equal(l + kLocalSize, l + kLocalSize + l_name, c + kCentralSize),
                     w, ": zip entry '", n, "': the local header does not match the central directory");
    z.header_offset = offset;
    z.data_offset = offset + kLocalSize + l_name + l_extra;
    z.size = usize;
    DMX_CHECK_FORMAT(fits(z.data_offset, z.size, cd_offset), w, ": zip entry '", n, "' declares ", z.size,
                     " bytes at offset ", z.data_offset, ", past the start of the central directory (", cd_offset,
                     "): its size is wrong or the archive is truncated");
    DMX_CHECK_FORMAT(by_name_.emplace(n, entries_.size()).second, w, ": zip entry '", n, "' appears twice");
    entries_.push_back(std::move(z));
    pos += kCentralSize + name_len + extra_len + comment_len;
  }
  // Entries may not share bytes: stored data then adds up to at most the size of the file, however
  // many entries point at it (an overlapping-entries zip bomb is refused).
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  ranges.reserve(entries_.size());
  for (const auto& z : entries_) ranges.emplace_back(z.header_offset, z.data_offset + z.size);
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    DMX_CHECK_FORMAT(ranges[i].first >= ranges[i - 1].second, w, ": zip entries overlap at byte ", ranges[i].first,
                     " (an archive whose entries share data is refused)");
}

const ZipEntry* ZipArchive::find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &entries_[it->second];
}

const uint8_t* ZipArchive::bytes(const ZipEntry& e, bool verify) const {
  DMX_CHECK_FORMAT(e.data_offset <= size_ && e.size <= size_ - e.data_offset, what_, ": zip entry '", e.name,
                   "' lies outside the archive");
  const uint8_t* p = data_ + e.data_offset;
  if (verify) {
    uLong crc = ::crc32(0L, Z_NULL, 0);
    const uint8_t* q = p;
    uint64_t left = e.size;
    while (left > 0) {  // zlib takes 32-bit lengths
      const uInt chunk = static_cast<uInt>(std::min<uint64_t>(left, 1u << 30));
      crc = ::crc32(crc, q, chunk);
      q += chunk;
      left -= chunk;
    }
    DMX_CHECK_FORMAT(static_cast<uint32_t>(crc) == e.crc32, what_, ": zip entry '", e.name,
                     "' is corrupt (CRC-32 mismatch)");
  }
  return p;
}
}  // namespace dmx::io
