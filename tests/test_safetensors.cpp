// Safetensors reader/writer: round trips, zero-copy lifetime, every structural rule, and robustness
// against mutated files (the format spec: github.com/huggingface/safetensors, "Format").
#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>

#include "core/fs.h"
#include "dmx/error.h"
#include "io/safetensors.h"
#include "test_util.h"

namespace dmx::io {
namespace {

std::string tmp_path(const std::string& name) { return dmx::test::temp_dir() + "/" + name; }

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_raw(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A file with the given header text and data area; header_len overrides the length field.
std::vector<uint8_t> make_file(const std::string& header, size_t data_bytes, int64_t header_len = -1) {
  const uint64_t n = header_len >= 0 ? static_cast<uint64_t>(header_len) : header.size();
  std::vector<uint8_t> out(8 + header.size() + data_bytes, 0);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(n >> (8 * i));
  std::memcpy(out.data() + 8, header.data(), header.size());
  return out;
}

// Parses a buffer of exactly its own size (so that an over-read is visible to ASan).
void parse_exact(const std::vector<uint8_t>& bytes) {
  std::unique_ptr<uint8_t[]> buf(new uint8_t[bytes.empty() ? 1 : bytes.size()]);
  if (!bytes.empty()) std::memcpy(buf.get(), bytes.data(), bytes.size());
  std::map<std::string, TensorInfo> infos;
  std::map<std::string, std::string> meta;
  uint64_t offset = 0;
  parse_safetensors(buf.get(), bytes.size(), &infos, &meta, &offset);
}

void expect_format_error(const std::vector<uint8_t>& bytes, const std::string& needle, const std::string& name) {
  SCOPED_TRACE(name);
  try {
    parse_exact(bytes);
    ADD_FAILURE() << name << ": expected FormatError containing '" << needle << "'";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  // The same through a file: still a FormatError, now naming the path.
  const std::string path = tmp_path("bad_" + name + ".safetensors");
  write_raw(path, bytes);
  try {
    SafeTensorsFile::open(path);
    ADD_FAILURE() << name << ": expected FormatError from open()";
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
}

TensorMap all_dtypes() {
  at::manual_seed(0);
  TensorMap m;
  m["f32"] = at::randn({3, 5});
  m["f16"] = at::randn({4, 2}).to(at::kHalf);
  m["bf16"] = at::randn({7}).to(at::kBFloat16);
  m["f64"] = at::randn({2, 2, 2}, at::kDouble);
  m["i64"] = at::randint(-1000000, 1000000, {5}, at::kLong);
  m["i32"] = at::randint(-100000, 100000, {3, 1}, at::kInt);
  m["i16"] = at::randint(-30000, 30000, {6}, at::kShort);
  m["i8"] = at::randint(-128, 127, {9}, at::kChar);
  m["u8"] = at::randint(0, 255, {2, 5}, at::kByte);
  m["bool"] = at::randint(0, 2, {11}, at::kLong).to(at::kBool);
  m["scalar"] = at::scalar_tensor(3.5, at::kFloat);            // shape []
  m["empty"] = at::empty({0, 4}, at::kFloat);                  // no bytes
  m["strided"] = at::arange(24, at::kFloat).view({4, 6}).t();  // not contiguous
  return m;
}

TEST(SafetensorsUnit, RoundTripEveryDtypeWithMetadata) {
  const TensorMap in = all_dtypes();
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "dmx \"round\" trip"}};
  const std::string path = tmp_path("roundtrip.safetensors");
  save_safetensors(path, in, meta);
  auto f = SafeTensorsFile::open(path);
  EXPECT_EQ(f->metadata(), meta);
  EXPECT_EQ(f->names().size(), in.size());
  const std::map<std::string, std::string> spelled = {{"f32", "F32"}, {"f16", "F16"},  {"bf16", "BF16"}, {"f64", "F64"},
                                                      {"i64", "I64"}, {"i32", "I32"},  {"i16", "I16"},   {"i8", "I8"},
                                                      {"u8", "U8"},   {"bool", "BOOL"}};
  for (const auto& [name, dt] : spelled) EXPECT_EQ(f->info(name).dtype, dt) << name;
  const TensorMap out = f->load_all();
  for (const auto& [name, t] : in) {
    ASSERT_TRUE(out.count(name)) << name;
    const at::Tensor& u = out.at(name);
    EXPECT_EQ(u.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(u.sizes(), t.sizes()) << name;
    EXPECT_TRUE(at::equal(u, t)) << name;
  }
  // The in-memory serialisation is the file.
  EXPECT_EQ(serialize_safetensors(in, meta), read_bytes(path));
}

TEST(SafetensorsUnit, HeaderPaddedAndDataAligned) {
  const std::string path = tmp_path("aligned.safetensors");
  save_safetensors(path, all_dtypes());
  const std::vector<uint8_t> bytes = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  EXPECT_EQ(n % 8, 0u) << "header length " << n;
  EXPECT_EQ(bytes[8 + n - 1] == ' ' || bytes[8 + n - 1] == '}', true);
  auto f = SafeTensorsFile::open(path);
  for (const auto& name : f->names()) {
    const TensorInfo& ti = f->info(name);
    const at::Tensor t = f->get(name);
    if (ti.end > ti.begin) {
      EXPECT_EQ((8 + n + ti.begin) % t.element_size(), 0u) << name << " is misaligned";
    }
  }
}

TEST(SafetensorsUnit, ZeroCopyViewsOutliveTheFileAndNeverWriteIt) {
  const std::string path = tmp_path("views.safetensors");
  TensorMap in;
  in["a"] = at::arange(64, at::kFloat).view({8, 8});
  in["b"] = at::arange(16, at::kLong);
  save_safetensors(path, in);
  const std::vector<uint8_t> before = read_bytes(path);

  auto f = SafeTensorsFile::open(path);
  at::Tensor a = f->get("a");
  at::Tensor a2 = f->get("a");
  EXPECT_EQ(a.data_ptr(), a2.data_ptr()) << "aligned data should be a view of the mapping, not a copy";
  at::Tensor b = f->load_all().at("b");
  f.reset();  // the views keep the mapping alive
  EXPECT_TRUE(at::equal(a, in["a"]));
  EXPECT_TRUE(at::equal(b, in["b"]));

  a.fill_(42.0f);  // copy-on-write: the process sees the write, the file does not
  b.zero_();
  EXPECT_EQ(a.sum().item<float>(), 42.0f * 64);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_TRUE(at::equal(load_safetensors(path).at("a"), in["a"]));
}

// A view kept alive in a static made before the first file was opened outlives the library's own statics at exit;
// unmapping it then must not touch a destroyed registry (it crashed at exit, after every test had passed).
TEST(SafetensorsUnit, ViewsHeldInStaticsUnmapCleanlyAtExit) {
  const std::string path = tmp_path("static_view.safetensors");
  TensorMap in;
  in["a"] = at::arange(64, at::kFloat);
  save_safetensors(path, in);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    static std::vector<at::Tensor> held;  // constructed first, so destroyed after anything the load makes
    held.push_back(SafeTensorsFile::open(path)->get("a"));
    std::exit(held[0].sum().item<float>() == 2016.0f ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status)) << "the child died of signal " << (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  if (WIFEXITED(status)) {
    EXPECT_EQ(WEXITSTATUS(status), 0);
  }
}

TEST(SafetensorsUnit, EveryStructuralRuleIsAFormatError) {
  const std::string ok = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_format_error({1, 2, 3}, "shorter than the 8-byte", "short");
  expect_format_error(make_file(ok, 8, 1000), "runs past the end", "header_past_end");
  expect_format_error(make_file("{not json}", 0), "not valid JSON", "not_json");
  expect_format_error(make_file("[1, 2, 3]", 0), "must be a JSON object", "not_object");
  expect_format_error(make_file(R"({"t":{"dtype":"F17","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype",
                      "unknown_dtype");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
                      "negative or non-integer dimension", "negative_dim");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8),
                      "negative or non-integer dimension", "fractional_dim");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", 8),
                      "negative or non-integer dimension", "string_dim");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 8),
                      "outside the data area", "offsets_out_of_data");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8), "> end",
                      "begin_after_end");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "shape x dtype",
                      "byte_count");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", 8),
                      "negative or non-integer data offset", "negative_offset");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "data_offsets", "no_offsets");
  expect_format_error(make_file(R"({"t":{"shape":[2],"data_offsets":[0,8]}})", 8), "dtype", "no_dtype");
  expect_format_error(make_file(R"({"t":[1]})", 8), "must be an object", "entry_not_object");
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                12),
                      "overlap", "overlap");
  // An empty range between two overlapping ones must not hide the overlap.
  expect_format_error(make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},)"
                                R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                12),
                      "overlap", "overlap_behind_empty");
  expect_format_error(make_file(R"({"__metadata__":[1],"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
                      "__metadata__", "metadata_not_object");
  expect_format_error(make_file(R"({"__metadata__":{"k":1},"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
                      "__metadata__", "metadata_not_string");
  expect_format_error(make_file(ok, 8, int64_t{1} << 40), "exceeds", "huge_header");
  expect_format_error(make_file("{}", 0, 1), "header length must be >= 2", "tiny_header");
  expect_format_error(make_file(R"({"t":{"dtype":"F32","shape":[0,4611686018427387904,8],"data_offsets":[0,0]}})", 0),
                      "overflows", "dim_overflow_behind_zero");
  // Deep nesting must not exhaust the stack (parsing or destroying the JSON).
  const std::string deep = "{\"t\":" + std::string(1000000, '[') + std::string(1000000, ']') + "}";
  expect_format_error(make_file(deep, 0), "must be an object", "deep_nesting");
  expect_format_error(make_file("{\"t\":" + std::string(1000000, '['), 0), "not valid JSON", "deep_unclosed");
  // A zero-size dimension makes any other (in-range) dimension legal.
  EXPECT_NO_THROW(parse_exact(make_file(R"({"t":{"dtype":"F32","shape":[0,1000000],"data_offsets":[0,0]}})", 0)));
}

// A bad input path is invalid input (exit 2), not an I/O failure.
TEST(SafetensorsUnit, MissingPathAndDirectoryAreInvalidArguments) {
  EXPECT_THROW(SafeTensorsFile::open(tmp_path("does_not_exist.safetensors")), InvalidArgument);
  EXPECT_THROW(load_safetensors(dmx::test::temp_dir()), InvalidArgument);
  try {
    SafeTensorsFile::open(dmx::test::temp_dir());
    ADD_FAILURE() << "a directory opened";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("directory"), std::string::npos) << e.what();
  }
}

// Random bit flips, byte writes, truncations and length edits of a valid file: every open either
// succeeds (and then every tensor can be read) or throws dmx::Error; nothing else escapes, nothing crashes.
TEST(SafetensorsUnit, MutatedFilesNeverCrash) {
  TensorMap in;
  in["w"] = at::randn({3, 4});
  in["h"] = at::randn({5}).to(at::kHalf);
  in["i"] = at::arange(6, at::kLong);
  in["m"] = at::randint(0, 2, {7}, at::kLong).to(at::kBool);
  const std::vector<uint8_t> valid = serialize_safetensors(in, {{"format", "pt"}});
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | valid[i];

  std::mt19937_64 rng(20240531);
  const std::string path = tmp_path("mutated.safetensors");
  int opened = 0, rejected = 0;
  // DMX_FUZZ_MUTATIONS raises the count for a long (e.g. sanitizer) run; the seed stays fixed.
  const char* env = std::getenv("DMX_FUZZ_MUTATIONS");
  const int kMutations = env ? std::max(1, std::atoi(env)) : 2000;
  for (int m = 0; m < kMutations; ++m) {
    std::vector<uint8_t> b = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      // Most edits land in the length field and the header, where the parser works.
      const size_t where = rng() % 4 == 0 ? rng() % b.size() : rng() % std::min<size_t>(b.size(), 8 + header);
      switch (rng() % 7) {
        case 0:
          b[where] ^= static_cast<uint8_t>(1u << (rng() % 8));
          break;
        case 1:
          b[where] = static_cast<uint8_t>(rng());
          break;
        case 2:
          b.resize(rng() % (b.size() + 1));
          break;
        case 3:
          b[where] = static_cast<uint8_t>("0123456789[]{},:\"-.eE"[rng() % 21]);
          break;
        case 4:  // the length field
          if (b.size() >= 8) b[rng() % 8] = static_cast<uint8_t>(rng());
          break;
        case 5:
          b.insert(b.begin() + static_cast<std::ptrdiff_t>(where), static_cast<uint8_t>(rng()));
          break;
        case 6:  // another digit in a number of the header: JSON stays valid, the rules get tested
          if (b[where] >= '0' && b[where] <= '9') b[where] = static_cast<uint8_t>('0' + rng() % 10);
          break;
      }
      if (b.empty()) break;
    }
    bool parsed = false;
    try {
      parse_exact(b);
      parsed = true;
    } catch (const dmx::Error&) {
    } catch (const std::exception& e) {
      FAIL() << "mutation " << m << ": parse threw a non-dmx exception: " << e.what();
    }
    write_raw(path, b);
    try {
      auto f = SafeTensorsFile::open(path);
      EXPECT_TRUE(parsed) << "mutation " << m << ": open succeeded where parse failed";
      for (const auto& name : f->names()) {
        try {
          at::Tensor t = f->get(name);
          if (t.numel() > 0) (void)t.reshape({-1}).to(at::kDouble).sum().item<double>();  // touch every byte
        } catch (const Unsupported&) {  // e.g. a U16 tensor: valid file, not representable in libtorch 1.13
        }
      }
      ++opened;
    } catch (const dmx::Error&) {
      EXPECT_FALSE(parsed) << "mutation " << m << ": parse succeeded where open failed";
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "mutation " << m << ": open threw a non-dmx exception: " << e.what();
    }
  }
  std::printf("[fuzz] %d mutations: %d opened, %d rejected with dmx::Error\n", kMutations, opened, rejected);
  EXPECT_EQ(opened + rejected, kMutations);
  EXPECT_GT(rejected, kMutations / 2);
}

size_t count_entries(const std::string& dir) {
  size_t n = 0;
  if (DIR* d = opendir(dir.c_str())) {
    while (dirent* e = readdir(d))
      if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) ++n;
    closedir(d);
  }
  return n;
}

TEST(SafetensorsUnit, WriterIsAtomic) {
  const std::string dir = tmp_path("atomic");
  ::mkdir(dir.c_str(), 0755);
  const std::string path = dir + "/out.safetensors";
  TensorMap bad;
  bad["ok"] = at::ones({2});
  bad["z"] = at::ones({2}, at::kComplexFloat);
  try {
    save_safetensors(path, bad);
    ADD_FAILURE() << "complex tensors should be rejected";
  } catch (const Unsupported& e) {
    EXPECT_NE(std::string(e.what()).find("'z'"), std::string::npos) << e.what();
  }
  EXPECT_EQ(count_entries(dir), 0u) << "a failed save left a file behind";

  // A failed save over an existing file leaves the old file as it was.
  TensorMap good;
  good["ok"] = at::ones({2});
  save_safetensors(path, good);
  const std::vector<uint8_t> before = read_bytes(path);
  EXPECT_THROW(save_safetensors(path, bad), Unsupported);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_EQ(count_entries(dir), 1u);

  TensorMap reserved;
  reserved["__metadata__"] = at::ones({1});
  EXPECT_THROW(save_safetensors(path, reserved), InvalidArgument);
  TensorMap undefined;
  undefined["u"] = at::Tensor();
  EXPECT_THROW(save_safetensors(path, undefined), InvalidArgument);
  EXPECT_THROW(save_safetensors(dir + "/no/such/dir/x.safetensors", good), InvalidArgument);
  EXPECT_EQ(read_bytes(path), before);
}

}  // namespace
}  // namespace dmx::io
