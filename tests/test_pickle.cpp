// Weights-only loading of torch.save files (io/torch_pickle, io/zip_archive): real torch.save files
// (tests/data/pickle, made by make_corpus.py) against what Python itself loaded from them; the fixture
// sd15.ckpt against sd15.safetensors (tensors, and latents through `dmx generate`); the A1111
// hypernetwork fixture; `dmx convert`; the hostile corpus (refused with exit 2 by `dmx convert` and
// `dmx generate`, and no payload ran); the limits; truncated and corrupted archives.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>

#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "io/torch_pickle.h"
#include "io/zip_archive.h"
#include "test_util.h"

namespace dmx::test {
namespace {

using io::PickleValue;
using Kind = PickleValue::Kind;
using nlohmann::json;
using namespace std::string_literals;

std::string corpus(const std::string& name = "") {
  return std::string(DMX_SOURCE_DIR) + "/tests/data/pickle" + (name.empty() ? "" : "/" + name);
}
std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}
void write_bytes(const std::string& path, const std::string& bytes) { std::ofstream(path, std::ios::binary) << bytes; }
json read_json(const std::string& path) { return json::parse(read_bytes(path)); }
std::string fresh(const std::string& name) {
  const std::string d = temp_dir() + "/" + name;
  ::mkdir(d.c_str(), 0755);
  return d;
}
size_t count_files(const std::string& dir) {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) n += e.is_regular_file() ? 1 : 0;
  return n;
}

std::shared_ptr<const io::TorchFile> parse(const std::string& bytes, const std::string& what = "test") {
  return io::parse_torch_bytes(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), what, nullptr);
}
std::shared_ptr<const io::TorchFile> bare(const std::string& bytes) {
  return io::parse_bare_pickle(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "bare");
}

template <typename E, typename F>
void expect_error(F&& f, const std::vector<std::string>& needles, const std::string& what) {
  try {
    f();
    ADD_FAILURE() << what << ": no error";
  } catch (const E& e) {
    const std::string m = e.what();
    for (const auto& n : needles) EXPECT_NE(m.find(n), std::string::npos) << what << ": '" << n << "' not in: " << m;
  } catch (const std::exception& e) {
    ADD_FAILURE() << what << ": wrong exception type: " << e.what();
  }
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return "float32";
    case at::kHalf:
      return "float16";
    case at::kBFloat16:
      return "bfloat16";
    case at::kDouble:
      return "float64";
    case at::kLong:
      return "int64";
    case at::kInt:
      return "int32";
    case at::kShort:
      return "int16";
    case at::kChar:
      return "int8";
    case at::kByte:
      return "uint8";
    case at::kBool:
      return "bool";
    default:
      return "?";
  }
}

// The value tree against make_corpus.py's description of what torch.load returned.
void expect_matches(const PickleValue& v, const json& ref) {
  const std::string at = v.where();
  if (ref.is_null()) {
    EXPECT_TRUE(v.is_none()) << at;
  } else if (ref.is_boolean()) {
    ASSERT_EQ(v.kind(), Kind::Bool) << at;
    EXPECT_EQ(v.as_bool(), ref.get<bool>()) << at;
  } else if (ref.is_number_integer()) {
    ASSERT_EQ(v.kind(), Kind::Int) << at;
    EXPECT_EQ(v.as_int(), ref.get<int64_t>()) << at;
  } else if (ref.is_number_float()) {
    ASSERT_EQ(v.kind(), Kind::Float) << at;
    EXPECT_EQ(v.as_float(), ref.get<double>()) << at;
  } else if (ref.is_string()) {
    EXPECT_EQ(v.as_string(), ref.get<std::string>()) << at;
  } else if (ref.contains("tensor")) {
    ASSERT_TRUE(v.is_tensor()) << at;
    const at::Tensor t = v.as_tensor();
    EXPECT_EQ(dtype_name(t.scalar_type()), ref["tensor"].get<std::string>()) << at;
    EXPECT_EQ(t.sizes().vec(), ref["shape"].get<std::vector<int64_t>>()) << at;
    EXPECT_EQ(t.strides().vec(), ref["stride"].get<std::vector<int64_t>>()) << at;
    EXPECT_EQ(t.storage_offset(), ref["offset"].get<int64_t>()) << at;
    const at::Tensor flat = t.flatten();
    ASSERT_EQ(flat.numel(), static_cast<int64_t>(ref["values"].size())) << at;
    if (t.scalar_type() == at::kBool) {
      for (int64_t i = 0; i < flat.numel(); ++i) EXPECT_EQ(flat[i].item<bool>(), ref["values"][i].get<bool>()) << at;
    } else {
      const at::Tensor d = flat.to(at::kDouble);
      for (int64_t i = 0; i < flat.numel(); ++i)
        EXPECT_EQ(d[i].item<double>(), ref["values"][i].get<double>()) << at << " element " << i;
    }
  } else if (ref.contains("dict")) {
    ASSERT_TRUE(v.is_dict()) << at;
    EXPECT_EQ(v.kind() == Kind::OrderedDict, ref["ordered"].get<bool>()) << at;
    const auto items = v.items();
    ASSERT_EQ(items.size(), ref["dict"].size()) << at;
    for (size_t i = 0; i < items.size(); ++i) {
      const json& key = ref["dict"][i][0];
      if (key.is_string()) {
        EXPECT_EQ(items[i].first.as_string(), key.get<std::string>()) << at;
        expect_matches(v.at(key.get<std::string>()), ref["dict"][i][1]);
      } else {
        EXPECT_EQ(items[i].first.as_int(), key.get<int64_t>()) << at;
        expect_matches(v.at(key.get<int64_t>()), ref["dict"][i][1]);
      }
      expect_matches(items[i].second, ref["dict"][i][1]);
    }
  } else if (ref.contains("list") || ref.contains("tuple")) {
    const bool list = ref.contains("list");
    ASSERT_EQ(v.kind(), list ? Kind::List : Kind::Tuple) << at;
    const json& items = list ? ref["list"] : ref["tuple"];
    ASSERT_EQ(v.size(), items.size()) << at;
    for (size_t i = 0; i < items.size(); ++i) expect_matches(v[i], items[i]);
  } else if (ref.contains("bytes")) {
    std::string hex;
    for (unsigned char c : v.as_bytes()) {
      char h[3];
      std::snprintf(h, sizeof(h), "%02x", c);
      hex += h;
    }
    EXPECT_EQ(hex, ref["bytes"].get<std::string>()) << at;
  } else if (ref.contains("bigint")) {
    ASSERT_EQ(v.kind(), Kind::BigInt) << at;
    EXPECT_EQ(v.to_json(), json({{"int", ref["bigint"]}})) << at;
  } else {
    ADD_FAILURE() << at << ": unknown reference " << ref.dump();
  }
}

std::vector<std::string> valid_files() {
  std::vector<std::string> out;
  for (const auto& m : read_json(corpus("corpus.json")))
    if (m["kind"] == "valid") out.push_back(m["file"]);
  return out;
}

// ---------------------------------------------------------------- real torch.save files

TEST(PickleLoadUnit, RealTorchFilesMatchPython) {
  const auto files = valid_files();
  ASSERT_GE(files.size(), 8u);
  for (const auto& name : files) {
    SCOPED_TRACE(name);
    const json ref = read_json(corpus(name.substr(0, name.find_last_of('.')) + ".json"));
    auto f = io::load_torch_file(corpus(name));
    EXPECT_EQ(f->format(), name == "valid_legacy.pt" ? "legacy" : "zip");
    expect_matches(f->root(), ref["value"]);
    // The same bytes from memory (copied storages) give the same tree.
    expect_matches(parse(read_bytes(corpus(name)))->root(), ref["value"]);
  }
}

TEST(PickleLoadUnit, ViewsShareTheirStorage) {
  auto f = io::load_torch_file(corpus("valid_views.pth"));
  const PickleValue r = f->root();
  const at::Tensor base = r.at("base").as_tensor(), t = r.at("t").as_tensor(), rows = r.at("rows").as_tensor();
  EXPECT_TRUE(base.storage().is_alias_of(t.storage()));
  EXPECT_TRUE(base.storage().is_alias_of(rows.storage()));
  EXPECT_TRUE(t.equal(base.t()));
  EXPECT_TRUE(rows.equal(base.slice(0, 1, 3)));
  EXPECT_FALSE(r.at("scalar").as_tensor().storage().is_alias_of(base.storage()));
  // Writes stay in the process (copy-on-write mapping): the file does not change.
  const std::string before = read_bytes(corpus("valid_views.pth"));
  base.add_(1);
  EXPECT_EQ(read_bytes(corpus("valid_views.pth")), before);
  // The legacy format shares storages too.
  auto lf = io::load_torch_file(corpus("valid_legacy.pt"));
  EXPECT_TRUE(lf->root().at("w").as_tensor().storage().is_alias_of(lf->root().at("wt").as_tensor().storage()));
}

TEST(PickleLoadUnit, StateDictAndAccessors) {
  auto f = io::load_torch_file(corpus("valid_nested.ckpt"));
  const io::TensorMap sd = io::torch_state_dict(*f);
  ASSERT_EQ(sd.size(), 2u);
  EXPECT_TRUE(sd.at("model.diffusion_model.w").equal(at::arange(6.0, at::kFloat).reshape({2, 3})));
  EXPECT_EQ(sd.at("first_stage_model.b").scalar_type(), at::kHalf);
  const PickleValue r = f->root();
  EXPECT_EQ(r.at("global_step").as_int(), 470000);
  EXPECT_EQ(r.at("meta").at(7).as_string(), "an int key");
  EXPECT_EQ(r.at("meta").at("floats")[1].as_float(), -2.25);
  EXPECT_EQ(r.at("meta").at("big").to_json(), json({{"int", "1180591620717411303424"}}));
  EXPECT_EQ(r.at("meta").at(-3).as_bytes(), std::string("\x00\x01\xff", 3));
  EXPECT_EQ(r.at("meta").at("empty_bytes").as_bytes(), "");
  // Errors name the file, the path and what was found.
  expect_error<FormatError>([&] { r.at("meta").at("floats").as_string(); },
                            {"valid_nested.ckpt", "['meta']['floats']", "must be a str, got a list"}, "kind");
  expect_error<FormatError>([&] { r.at("nope"); }, {"has no key 'nope'"}, "missing key");
  expect_error<FormatError>([&] { r.at("meta").at("floats")[9]; }, {"has 3 elements, no element 9"}, "index");
  // Flattening everything: tensors of the state dict under their names, the rest as JSON metadata.
  const io::FlatTorchFile flat = io::flatten_torch_file(*f);
  EXPECT_EQ(flat.tensors.size(), 2u);
  EXPECT_EQ(flat.metadata.at("global_step"), "470000");
  EXPECT_EQ(json::parse(flat.metadata.at("meta"))["floats"], json::parse("[1.5, -2.25, 1e300]"));
}

// ---------------------------------------------------------------- the fixtures

TEST(PickleGolden, Sd15CkptTensorsEqualSafetensors) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = fixture_model("sd15") + "/ldm/";
  const io::TensorMap st = io::load_safetensors(dir + "sd15.safetensors");
  const io::TensorMap pk = io::load_weights_file(dir + "sd15.ckpt");
  ASSERT_EQ(pk.size(), st.size());
  for (const auto& [k, t] : st) {
    ASSERT_TRUE(pk.count(k)) << k;
    EXPECT_EQ(pk.at(k).scalar_type(), t.scalar_type()) << k;
    EXPECT_EQ(pk.at(k).sizes(), t.sizes()) << k;
    EXPECT_TRUE(pk.at(k).equal(t)) << k;
  }
}

TEST(PickleGolden, Sd15CkptGivesTheSameLatentsAsSafetensors) {
  DMX_REQUIRE_FIXTURES();
  const std::string model = fixture_model("sd15");
  const std::string dir = fresh("ckpt_parity");
  for (const char* ext : {"safetensors", "ckpt"}) {
    CliRun r = dmx_run({"generate",
                        "--model",
                        model + "/ldm/sd15." + ext,
                        "--config",
                        model,
                        "--prompt",
                        "a lighthouse on a cliff",
                        "--negative-prompt",
                        "blurry",
                        "--steps",
                        "4",
                        "--seed",
                        "11",
                        "--width",
                        "64",
                        "--height",
                        "64",
                        "--save-latents",
                        dir + "/" + ext + ".latents.safetensors",
                        "--output",
                        dir + "/" + ext + ".png",
                        "--quiet"});
    ASSERT_EQ(r.code, 0) << r.output;
  }
  const at::Tensor a = io::load_safetensors(dir + "/safetensors.latents.safetensors").at("latents");
  const at::Tensor b = io::load_safetensors(dir + "/ckpt.latents.safetensors").at("latents");
  EXPECT_TRUE(a.equal(b)) << "max |diff| " << (a - b).abs().max().item<double>();
  EXPECT_EQ(load_image(dir + "/safetensors.png", "a").data, load_image(dir + "/ckpt.png", "b").data);
}

TEST(PickleGolden, A1111HypernetworkMatchesItsSafetensorsCopy) {
  DMX_REQUIRE_FIXTURES();
  const std::string dir = fixture_model("hypernet");
  auto f = io::load_torch_file(dir + "/tiny_hypernet.pt");
  auto st = io::SafeTensorsFile::open(dir + "/tiny_hypernet.safetensors");
  const PickleValue root = f->root();
  ASSERT_EQ(root.kind(), Kind::Dict);
  size_t matched = 0;
  for (int64_t width : {32, 64}) {
    const PickleValue pair = root.at(width);
    ASSERT_EQ(pair.kind(), Kind::Tuple);
    ASSERT_EQ(pair.size(), 2u);
    for (size_t kv = 0; kv < 2; ++kv) {
      const PickleValue sd = pair[kv];
      EXPECT_EQ(sd.kind(), Kind::OrderedDict);
      ASSERT_TRUE(sd.has_attributes());  // the state dict's _metadata (module versions)
      EXPECT_TRUE(sd.attributes().at("_metadata").contains("linear.0"));
      EXPECT_EQ(sd.size(), 8u);
      for (const auto& [key, value] : sd.items()) {
        const std::string name = std::to_string(width) + (kv ? ".v." : ".k.") + key.as_string();
        ASSERT_TRUE(st->contains(name)) << name;
        EXPECT_TRUE(value.as_tensor().equal(st->get(name))) << name;
        ++matched;
      }
    }
  }
  EXPECT_EQ(matched, st->names().size());
  // Every other field (BINFLOAT lists, bools, strings, None) as the safetensors copy states it.
  size_t fields = 0;
  for (const auto& [k, v] : st->metadata()) {
    if (k == "format") continue;
    EXPECT_EQ(root.at(k).to_json(), json::parse(v)) << k;
    ++fields;
  }
  EXPECT_EQ(fields, 13u);
  EXPECT_EQ(root.at("layer_structure")[1].as_float(), 2.0);
  EXPECT_EQ(root.at("dropout_structure")[1].as_float(), 0.3);
  EXPECT_EQ(root.at("activation_func").as_string(), "swish");
  EXPECT_FALSE(root.at("activate_output").as_bool());
  EXPECT_TRUE(root.at("optional_info").is_none());
}

// ---------------------------------------------------------------- dmx convert

TEST(PickleConvertGolden, CkptToSafetensors) {
  DMX_REQUIRE_FIXTURES();
  const std::string model = fixture_model("sd15");
  const std::string dir = fresh("convert");
  CliRun r = dmx_run(
      {"convert", "--input", model + "/ldm/sd15.ckpt", "--output", dir + "/keep.safetensors", "--dtype", "keep"});
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("from a torch.save zip file"), std::string::npos) << r.output;
  const io::TensorMap st = io::load_safetensors(model + "/ldm/sd15.safetensors");
  const io::TensorMap out = io::load_safetensors(dir + "/keep.safetensors");
  ASSERT_EQ(out.size(), st.size());
  for (const auto& [k, t] : st) {
    ASSERT_TRUE(out.count(k)) << k;
    EXPECT_TRUE(out.at(k).equal(t)) << k;
  }
  // Default fp16.
  r = dmx_run({"convert", "--input", model + "/ldm/sd15.ckpt", "--output", dir + "/half.safetensors", "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  const io::TensorMap half = io::load_safetensors(dir + "/half.safetensors");
  for (const auto& [k, t] : st) EXPECT_TRUE(half.at(k).equal(t.to(at::kHalf))) << k;
  // The converted file runs as a model.
  r = dmx_run({"generate", "--model", dir + "/keep.safetensors", "--config", model, "--prompt", "x", "--steps", "1",
               "--width", "32", "--height", "32", "--output", dir + "/o.png", "--quiet"});
  EXPECT_EQ(r.code, 0) << r.output;
}

TEST(PickleConvertGolden, HypernetworkAndErrors) {
  DMX_REQUIRE_FIXTURES();
  const std::string hn = fixture_model("hypernet");
  const std::string dir = fresh("convert_hn");
  CliRun r = dmx_run({"convert", "--input", hn + "/tiny_hypernet.pt", "--output", dir + "/hn.safetensors", "--dtype",
                      "keep", "--quiet"});
  ASSERT_EQ(r.code, 0) << r.output;
  auto out = io::SafeTensorsFile::open(dir + "/hn.safetensors");
  auto ref = io::SafeTensorsFile::open(hn + "/tiny_hypernet.safetensors");
  EXPECT_EQ(out->names().size(), ref->names().size());
  EXPECT_TRUE(out->get("32.0.linear.0.weight").equal(ref->get("32.k.linear.0.weight")));
  EXPECT_TRUE(out->get("64.1.linear.5.bias").equal(ref->get("64.v.linear.5.bias")));
  EXPECT_EQ(json::parse(out->metadata().at("layer_structure")), json::parse("[1.0, 2.0, 1.0]"));
  EXPECT_EQ(out->metadata().at("activation_func"), "\"swish\"");
  EXPECT_EQ(out->metadata().at("optional_info"), "null");
  // Not a torch file, a wrong output name, an existing output.
  write_bytes(dir + "/fake.pt", "just some text, not a pickle");
  r = dmx_run({"convert", "--input", dir + "/fake.pt", "--output", dir + "/fake.safetensors"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("not a torch.save file"), std::string::npos) << r.output;
  r = dmx_run({"convert", "--input", hn + "/tiny_hypernet.pt", "--output", dir + "/hn.bin"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_NE(r.output.find("--output must name a .safetensors file"), std::string::npos) << r.output;
  r = dmx_run({"convert", "--input", hn + "/tiny_hypernet.pt", "--output", dir + "/hn.safetensors"});
  EXPECT_EQ(r.code, 2) << r.output;
  EXPECT_EQ(count_files(dir), 2u);
}

TEST(PickleLoadUnit, DiffusersFolderWithBinWeights) {
  const std::string dir = fresh("binfolder");
  ::mkdir((dir + "/unet").c_str(), 0755);
  write_bytes(dir + "/unet/diffusion_pytorch_model.bin", read_bytes(corpus("valid_protocol4.bin")));
  const io::TensorMap t = io::load_diffusers_component(dir, "unet");
  ASSERT_EQ(t.size(), 2u);
  EXPECT_TRUE(t.at("a").equal(at::arange(3)));
  EXPECT_TRUE(t.at("b.0").equal(at::ones({2})));
}

// ---------------------------------------------------------------- the hostile corpus

struct EvilCase {
  std::string file, what;
  std::vector<std::string> expect;
  std::string marker;
};
std::vector<EvilCase> evil_cases() {
  std::vector<EvilCase> out;
  for (const auto& m : read_json(corpus("corpus.json"))) {
    if (m["kind"] != "evil") continue;
    EvilCase c;
    c.file = m["file"];
    c.what = m["what"];
    c.expect = m["expect"].get<std::vector<std::string>>();
    if (m["marker"].is_string()) c.marker = m["marker"];
    out.push_back(c);
  }
  return out;
}

TEST(PickleEvilUnit, CorpusIsRefusedByTheLoader) {
  const auto cases = evil_cases();
  ASSERT_GE(cases.size(), 40u);
  size_t code_running = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.file + " (" + c.what + ")");
    if (!c.marker.empty()) {
      std::remove(c.marker.c_str());
      ++code_running;
    }
    try {  // what `dmx convert` does with a file
      io::flatten_torch_file(*io::load_torch_file(corpus(c.file)));
      ADD_FAILURE() << "loaded";
    } catch (const FormatError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(corpus(c.file)), std::string::npos) << m;  // the message names the file
      for (const auto& n : c.expect) EXPECT_NE(m.find(n), std::string::npos) << "'" << n << "' not in: " << m;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a FormatError: " << e.what();
    }
    if (!c.marker.empty()) {
      EXPECT_FALSE(path_exists(c.marker)) << "the payload ran: " << c.marker;
    }
  }
  EXPECT_GE(code_running, 10u);
}

// Every hostile file through the CLI, four processes at a time; each run gets its own output folder.
// kHypernetwork: `dmx generate --hypernetwork FILE` (the hypernetwork is read before the model, so --model is any
// existing folder: the run must stop at the pickle).
enum CorpusRoute { kConvert, kGenerateModel, kHypernetwork };
void run_cli_corpus(CorpusRoute route) {
  ::setenv("OMP_WAIT_POLICY", "PASSIVE", 0);  // spares each dmx process its re-exec
  const auto cases = evil_cases();
  const bool generate = route != kConvert;
  const std::string prefix = route == kConvert         ? "evil_convert"
                             : route == kGenerateModel ? "evil_generate"
                                                       : "evil_hypernet";
  const std::string base = fresh(prefix);
  const std::string model_dir = route == kHypernetwork ? fresh("evil_hypernet_model") : "";
  for (size_t first = 0; first < cases.size(); first += 4) {
    std::vector<std::future<CliRun>> runs;
    const size_t last = std::min(cases.size(), first + 4);
    for (size_t i = first; i < last; ++i) {
      const EvilCase& c = cases[i];
      if (!c.marker.empty()) std::remove(c.marker.c_str());
      const std::string dir = fresh(prefix + "/" + std::to_string(i));
      const std::vector<std::string> args =
          route == kHypernetwork ? std::vector<std::string>{"generate",
                                                            "--model",
                                                            model_dir,
                                                            "--prompt",
                                                            "x",
                                                            "--steps",
                                                            "1",
                                                            "--hypernetwork",
                                                            corpus(c.file) + ":0.5",
                                                            "--output",
                                                            dir + "/o.png"}
          : generate
              ? std::vector<std::string>{"generate", "--model",  corpus(c.file), "--prompt", "x",
                                         "--steps",  "1",        "--width",      "32",       "--height",
                                         "32",       "--output", dir + "/o.png"}
              : std::vector<std::string>{"convert", "--input", corpus(c.file), "--output", dir + "/o.safetensors"};
      runs.push_back(std::async(std::launch::async, [args] { return dmx_run(args); }));
    }
    for (size_t i = first; i < last; ++i) {
      const EvilCase& c = cases[i];
      SCOPED_TRACE(c.file + " (" + c.what + ")");
      const CliRun r = runs[i - first].get();
      EXPECT_EQ(r.code, 2) << r.output;
      EXPECT_EQ(r.output.rfind("error: ", 0), 0u) << r.output;
      // A hypernetwork is read as A1111's dict, not flattened: the limits of a whole-file conversion (paths, total
      // sizes) may not be what stops it; a code-running file is stopped by the unpickler whatever reads it.
      if (route != kHypernetwork || !c.marker.empty()) {
        for (const auto& n : c.expect)
          EXPECT_NE(r.output.find(n), std::string::npos) << "'" << n << "' not in: " << r.output;
      }
      EXPECT_NE(r.output.find(corpus(c.file)), std::string::npos) << "the message names the file: " << r.output;
      EXPECT_EQ(count_files(base + "/" + std::to_string(i)), 0u) << "a refused file must write nothing";
      if (!c.marker.empty()) {
        EXPECT_FALSE(path_exists(c.marker)) << "the payload ran: " << c.marker;
      }
    }
  }
}
TEST(PickleEvilCli, ConvertRefusesTheCorpus) { run_cli_corpus(kConvert); }
TEST(PickleEvilCli, GenerateRefusesTheCorpus) { run_cli_corpus(kGenerateModel); }
TEST(PickleEvilCli, HypernetworkRefusesTheCorpus) { run_cli_corpus(kHypernetwork); }

// ---------------------------------------------------------------- limits and malformed pickles

std::string repeat(const std::string& s, size_t n) {
  std::string out;
  out.reserve(s.size() * n);
  for (size_t i = 0; i < n; ++i) out += s;
  return out;
}
std::string le32(uint32_t v) { return std::string(reinterpret_cast<const char*>(&v), 4); }
std::string le64(uint64_t v) { return std::string(reinterpret_cast<const char*>(&v), 8); }
std::string uni(const std::string& s) { return "X" + le32(static_cast<uint32_t>(s.size())) + s; }
const std::string P2 = "\x80\x02";
// _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', numel), offset, size, stride, False, OrderedDict())
std::string tensor_pickle(int64_t numel, const std::vector<int64_t>& size, const std::vector<int64_t>& stride,
                          int64_t offset = 0, const std::string& type = "FloatStorage") {
  auto integer = [](int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) return "J" + le32(static_cast<uint32_t>(v));
    return "\x8a\x08" + le64(static_cast<uint64_t>(v));
  };
  std::string p = P2 + "ctorch._utils\n_rebuild_tensor_v2\n(" + "(" + uni("storage") + "ctorch\n" + type + "\n" +
                  uni("0") + uni("cpu") + integer(numel) + "tQ" + integer(offset) + "(";
  for (int64_t s : size) p += integer(s);
  p += "t(";
  for (int64_t s : stride) p += integer(s);
  p += "t\x89"
       "ccollections\nOrderedDict\n)Rt"
       "R.";
  return p;
}

TEST(PickleLimitsUnit, MalformedPicklesNameTheRule) {
  struct Case {
    std::string bytes;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"", {"ends without a STOP"}},
      {P2 + "N", {"ends without a STOP"}},
      {"\x80\x07N.", {"unsupported pickle protocol 7"}},
      {P2 + "NN.", {"STOP with 2 values on the stack"}},
      {P2 + "(N.", {"STOP with 1 MARK(s) still open"}},
      {P2 + ".", {"STOP with 0 values on the stack"}},
      {P2 + "h\x05.", {"BINGET", "memo entry 5 was never stored"}},
      {P2 + "q\x00."s, {"BINPUT", "stack is empty"}},
      {P2 + "Na.", {"APPEND", "stack is empty"}},
      {P2 + "NNa.", {"appends to a None, not a list"}},
      {P2 + "}]NNs.", {"SETITEM", "sets items of a list"}},
      {P2 + "}]Ns.", {"dict keys must be str or int, got a list"}},
      {P2 + "}(NNNu.", {"odd number (3)"}},
      {P2 + "\xff.", {"unknown pickle opcode 0xff"}},
      {P2 + "I01\n.", {"protocol-0 text opcode INT"}},
      {P2 + "X\x02\x00\x00\x00\xff\xfe."s, {"BINUNICODE", "not valid UTF-8"}},
      {P2 + "X\xff\xff\xff\xff", {"declares a string of 4294967295 bytes"}},
      {P2 + "\x8b\x00\x00\x10\x00"s, {"LONG4", "1048576 bytes exceeds the limit of 1024"}},
      {P2 + "c" + std::string(2000, 'a') + "\nb\n.", {"GLOBAL", "longer than 1024 bytes"}},
      {P2 + "cos\nsys", {"GLOBAL", "runs past the end"}},
      {P2 + "ctorch\nFloatStorage\n)R.", {"may only appear inside a storage persistent id"}},
      {P2 + "ccollections\nOrderedDict\n.", {"returns the global OrderedDict as a value"}},
      {P2 + "NNR.", {"REDUCE", "calls a None, which is not callable"}},
      {P2 + "ccollections\nOrderedDict\nNR.", {"arguments must be a tuple"}},
      {P2 + "ccollections\nOrderedDict\n(K\x01tR.", {"a list of (key, value) pairs, got an int"}},
      {P2 + "c_codecs\nencode\n(" + uni("x") + uni("utf-8") + "tR.", {"only the 'latin1' encoding"}},
      {P2 + "NQ.", {"BINPERSID", "a persistent id must be a 5-tuple"}},
      {P2 + "(" + uni("storage") + "ctorch\nload\n", {"global 'torch.load' is not allowed"}},
      // Code-running globals of other platforms' modules, refused by name like any global off the allowlist.
      {P2 + "cnt\nsystem\n(" + uni("calc.exe") + "tR.", {"global 'nt.system' is not allowed"}},
      {P2 + "cposix\nsystem\n(" + uni("id") + "tR.", {"global 'posix.system' is not allowed"}},
      {P2 + "cbuiltins\neval\n(" + uni("1") + "tR.", {"global 'builtins.eval' is not allowed"}},
      {P2 + "(" + uni("storage") + "N" + uni("0") + uni("cpu") + "K\x01tQ.", {"storage type must be one of torch's"}},
      {P2 + "(" + uni("storage") + "ctorch\nFloatStorage\n" + uni("0") + uni("cpu") + "K\x01tQ.",
       {"returns a bare storage"}},
      {tensor_pickle(4, std::vector<int64_t>(65, 1), std::vector<int64_t>(65, 1)),
       {"65 dimensions, more than the limit of 64"}},
      {tensor_pickle(4, {2, 2}, {2}), {"size has 2 dimensions but stride has 1"}},
      {tensor_pickle(4, {int64_t{1} << 40, int64_t{1} << 40}, {1, 1}), {"overflows int64"}},
      {tensor_pickle(int64_t{1} << 30, {2}, {1}), {"a bare pickle may use 1048576 in all"}},
      {tensor_pickle(4, {4}, {1}, 1), {"reaches element 4", "holds 4 elements"}},
      {tensor_pickle(4, {0}, {1}, 9), {"offset 9 lies past the end"}},
      {tensor_pickle(4, {2}, {1}, 0, "ComplexFloatStorage"), {"global 'torch.ComplexFloatStorage' is not allowed"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(json(std::vector<uint8_t>(c.bytes.begin(), c.bytes.end())).dump().substr(0, 80));
    expect_error<FormatError>([&] { bare(c.bytes); }, c.needles, "bare pickle");
  }
  // The well-formed ones load: a view inside its storage, an empty one at its end, a zero-stride one.
  EXPECT_TRUE(bare(tensor_pickle(4, {2, 2}, {2, 1}))->root().as_tensor().equal(at::zeros({2, 2})));
  EXPECT_EQ(bare(tensor_pickle(4, {0}, {1}, 4))->root().as_tensor().numel(), 0);
  EXPECT_EQ(bare(tensor_pickle(4, {4}, {0}))->root().as_tensor().sizes(), at::IntArrayRef({4}));
  // Repeated dict keys keep the last value, as Python does; ints and strs stay apart.
  auto d = bare(P2 + "}(" + uni("a") + "K\x01" + uni("a") + "K\x02" + "K\x07K\x03" + uni("7") + "K\x04u.");
  EXPECT_EQ(d->root().size(), 3u);
  EXPECT_EQ(d->root().at("a").as_int(), 2);
  EXPECT_EQ(d->root().at(7).as_int(), 3);
  EXPECT_EQ(d->root().at("7").as_int(), 4);
  // LONG1 sign extension and int64 bounds.
  EXPECT_EQ(bare(P2 + "\x8a\x01\xff.")->root().as_int(), -1);
  EXPECT_EQ(bare(P2 + "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\xff."s)->root().as_int(), INT64_MIN);
  EXPECT_EQ(bare(P2 + "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."s)->root().kind(), Kind::BigInt);
  EXPECT_EQ(bare(P2 + "\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."s)->root().to_json(),
            json({{"int", "9223372036854775808"}}));
  EXPECT_EQ(bare(P2 + "\x8a\x02\x00\x80."s)->root().as_int(), -32768);
}

TEST(PickleLimitsUnit, ResourceLimits) {
  // objects: 2^21 ints (each BININT1 creates one)
  expect_error<FormatError>(
      [&] {
        bare(P2 +
             repeat("K\x01"
                    "0",
                    (1u << 21) + 1) +
             "N.");
      },
      {"creates more than 2097152 values (limit)"}, "objects");
  // stack: DUP never creates a value
  expect_error<FormatError>([&] { bare(P2 + "N" + repeat("2", 1u << 21) + "."); },
                            {"more than 2097152 values on the stack (limit)"}, "stack");
  expect_error<FormatError>([&] { bare(P2 + repeat("(", 1001) + "."); }, {"more than 1000 nested MARKs"}, "marks");
  // memo: distinct LONG_BINPUT slots
  std::string memo = P2 + "N";
  for (uint32_t i = 0; i <= (1u << 21); ++i) memo += "r" + le32(i * 7u);
  expect_error<FormatError>([&] { bare(memo + "."); }, {"more than 2097152 memo entries"}, "memo");
  // elements: one list grown by APPENDS of DUPed values past 2^24 slots
  const std::string chunk = "(N" + repeat("2", (1u << 20) - 1) + "e";
  expect_error<FormatError>([&] { bare(P2 + "]N" + "0" + repeat(chunk, 17) + "."); },
                            {"more than 16777216 elements in all"}, "elements");
  // nesting and sharing
  expect_error<FormatError>([&] { bare(P2 + "N" + repeat("\x85", 1001) + "."); }, {"deeper than 1000"}, "depth");
  EXPECT_NO_THROW(bare(P2 + "N" + repeat("\x85", 998) + "."));
  std::string laughs = P2 + "N" + "q\x00"s + "0";
  for (int level = 1; level <= 8; ++level)
    laughs += "](" + repeat(std::string("h") + char(level - 1), 10) + "eq" + char(level) + (level < 8 ? "0" : "");
  expect_error<FormatError>([&] { bare(laughs + "."); }, {"expands to more than 4194304 values"}, "laughs");
  // the same sharing, smaller, is fine and flattens by path
  std::string small = P2 + "N" + "q\x00"s + "0";
  for (int level = 1; level <= 3; ++level)
    small += "](" + repeat(std::string("h") + char(level - 1), 10) + "eq" + char(level) + (level < 3 ? "0" : "");
  EXPECT_EQ(bare(small + ".")->root()[9][9].size(), 10u);
  // one tensor of 1 MiB reached through 10 x 10 paths flattens to 100 MiB: more than 4x its storage + 16 MiB
  const std::string t = tensor_pickle(1 << 18, {1 << 18}, {1});
  const std::string hundred = t.substr(0, t.size() - 1) + "q\x00"s + "0" + "](" + repeat("h\x00"s, 10) + "eq\x01"s +
                              "0" + "](" + repeat("h\x01", 10) + "e.";
  auto f = bare(hundred);
  EXPECT_EQ(f->root()[3][4].as_tensor().numel(), 1 << 18);
  expect_error<FormatError>([&] { f->root().tensors(); }, {"add up to more than 20971520 bytes"}, "repeats");
  expect_error<FormatError>([&] { io::flatten_torch_file(*f); }, {"add up to more than"}, "repeats (flat)");
  EXPECT_EQ(f->root()[0].tensors().size(), 10u);  // 10 MiB is fine
}

// ---------------------------------------------------------------- archives

TEST(PickleZipUnit, TruncatedAndCorruptedArchivesAreErrors) {
  const std::string good = read_bytes(corpus("valid_dtypes.pt"));
  ASSERT_NO_THROW(parse(good));
  size_t refused = 0;
  for (size_t n = 0; n < good.size(); ++n) {
    try {
      parse(good.substr(0, n));
      ADD_FAILURE() << "a prefix of " << n << " bytes loaded";
    } catch (const FormatError&) {
      ++refused;
    }
  }
  EXPECT_EQ(refused, good.size());
  // Every byte flipped: refused with a dmx error, or (in padding and unused fields) loaded; never a crash.
  size_t flips_refused = 0;
  for (size_t i = 0; i < good.size(); ++i) {
    std::string bad = good;
    bad[i] = static_cast<char>(bad[i] ^ 0x5a);
    try {
      parse(bad);
    } catch (const FormatError&) {
      ++flips_refused;
    } catch (const Unsupported&) {
      ++flips_refused;
    }
  }
  EXPECT_GT(flips_refused, good.size() / 2);
  // The zip64 re-pack reads the same.
  EXPECT_TRUE(io::load_torch_file(corpus("valid_zip64.pt"))
                  ->root()
                  .at("int16")
                  .as_tensor()
                  .equal(io::load_torch_file(corpus("valid_dtypes.pt"))->root().at("int16").as_tensor()));
}

// The fuzz seeds: the corpus files (identical) and the bare data.pkl streams, which must load on their own.
TEST(PickleZipUnit, FuzzSeeds) {
  const std::string dir = std::string(DMX_SOURCE_DIR) + "/fuzz/corpus/pickle";
  size_t bare_seeds = 0, files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    SCOPED_TRACE(name);
    if (name.rfind("pkl_", 0) == 0) {
      const auto f = bare(read_bytes(e.path().string()));
      EXPECT_GT(f->tensor_count(), 0u);
      ++bare_seeds;
    } else {
      EXPECT_EQ(read_bytes(e.path().string()), read_bytes(corpus(name))) << "stale seed: run make_corpus.py";
      ++files;
    }
  }
  EXPECT_EQ(bare_seeds, 4u);
  EXPECT_EQ(files, valid_files().size() + evil_cases().size());
}

TEST(PickleZipUnit, Detection) {
  EXPECT_TRUE(io::looks_like_torch_file(corpus("valid_dtypes.pt")));
  EXPECT_TRUE(io::looks_like_torch_file(corpus("valid_legacy.pt")));
  EXPECT_FALSE(io::looks_like_torch_file(corpus("corpus.json")));
  expect_error<FormatError>([&] { parse("PK\x05\x06" + std::string(18, '\0')); }, {"no <folder>/data.pkl"},
                            "empty zip");
  expect_error<FormatError>([&] { parse("hello"); }, {"not a torch.save file"}, "text");
  std::string tar(600, '\0');
  tar.replace(257, 5, "ustar");
  expect_error<FormatError>([&] { parse(tar); }, {"tar-format torch file"}, "tar");
}
}  // namespace
}  // namespace dmx::test
