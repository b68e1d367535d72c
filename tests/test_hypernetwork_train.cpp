// `dmx train hypernetwork` (training/hypernetwork_train.h) and what it writes: the torch.save writer
// (io/torch_save.h) and A1111's .pt layout (loaders::save_hypernetwork), docs/hypernetworks.md. The file Python's
// torch.load and A1111's Hypernetwork.load were run on is tests/ref/hypernet_dmx_written.pt
// (tests/ref/make_hypernet_train_refs.py); the tests here check that dmx still writes exactly that file.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "api/train_sampler.h"
#include "core/fs.h"
#include "core/image.h"
#include "dmx/error.h"
#include "dmx/train.h"
#include "io/safetensors.h"
#include "io/torch_pickle.h"
#include "io/torch_save.h"
#include "io/zip_archive.h"
#include "loaders/hypernetwork_loader.h"
#include "loaders/model_bundle.h"
#include "models/hypernetwork.h"
#include "models/unet_2d_condition.h"
#include "schedulers/scheduler.h"
#include "test_util.h"
#include "tiny_models.h"
#include "train_test_util.h"
#include "training/dreambooth.h"
#include "training/hypernetwork_train.h"
#include "training/trainer.h"

namespace fs = std::filesystem;
using namespace dmx;
using namespace dmx::test;
namespace tr = dmx::training;
using io::PyValue;

namespace {

// Bitwise equality of two tensors (dtype, shape and bytes: -0.0 and NaN payloads included).
bool same_bits(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  return x.nbytes() == y.nbytes() && std::memcmp(x.data_ptr(), y.data_ptr(), x.nbytes()) == 0;
}

bool same_double(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

// Walks what was written next to what the safe unpickler read, failing with the path where they differ.
void expect_same(const PyValue& w, const io::PickleValue& r, const std::string& path) {
  using K = PyValue::Kind;
  using RK = io::PickleValue::Kind;
  switch (w.kind()) {
    case K::None:
      EXPECT_TRUE(r.is_none()) << path;
      break;
    case K::Bool:
      ASSERT_EQ(r.kind(), RK::Bool) << path;
      EXPECT_EQ(r.as_bool(), w.b) << path;
      break;
    case K::Int:
      ASSERT_EQ(r.kind(), RK::Int) << path;
      EXPECT_EQ(r.as_int(), w.i) << path;
      break;
    case K::Float:
      ASSERT_EQ(r.kind(), RK::Float) << path;
      EXPECT_TRUE(same_double(r.as_float(), w.f)) << path << ": " << r.as_float() << " vs " << w.f;
      break;
    case K::String:
      ASSERT_TRUE(r.is_string()) << path;
      EXPECT_EQ(r.as_string(), w.s) << path;
      break;
    case K::List:
    case K::Tuple:
      ASSERT_EQ(r.kind(), w.kind() == K::List ? RK::List : RK::Tuple) << path;
      ASSERT_EQ(r.size(), w.items.size()) << path;
      for (size_t k = 0; k < w.items.size(); ++k) expect_same(w.items[k], r[k], path + "[" + std::to_string(k) + "]");
      break;
    case K::Dict:
    case K::OrderedDict: {
      ASSERT_EQ(r.kind(), w.kind() == K::Dict ? RK::Dict : RK::OrderedDict) << path;
      const auto items = r.items();
      ASSERT_EQ(items.size(), w.pairs.size()) << path;
      for (size_t k = 0; k < items.size(); ++k) {
        expect_same(w.pairs[k].first, items[k].first, path + "<key " + std::to_string(k) + ">");
        expect_same(w.pairs[k].second, items[k].second, path + "[" + std::to_string(k) + "]");
      }
      break;
    }
    case K::Tensor:
      ASSERT_TRUE(r.is_tensor()) << path;
      EXPECT_TRUE(same_bits(r.as_tensor(), w.t.contiguous())) << path;
      break;
  }
}

std::shared_ptr<const io::TorchFile> parse(const std::vector<uint8_t>& bytes, const std::string& what) {
  auto keep = std::make_shared<std::vector<uint8_t>>(bytes);
  return io::parse_torch_bytes(keep->data(), keep->size(), what, keep);
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Every option of the format at once: four layers, Hardswish on the output too, LayerNorms, two dropouts.
models::HypernetworkConfig rich_config() {
  models::HypernetworkConfig c;
  c.layer_structure = {1.0, 2.0, 1.5, 1.0};
  c.activation_func = "swish";
  c.is_layer_norm = true;
  c.activate_output = true;
  c.use_dropout = true;
  c.dropout_structure = {0.0, 0.3, 0.1, 0.0};
  c.weight_initialization = "XavierNormal";
  c.name = "rich";
  c.step = 123;
  c.sd_checkpoint_name = "tiny";
  return c;
}

// Parameters from a formula (no random generator: the same numbers on any machine), every one distinct.
models::Hypernetwork formula_hypernetwork(const models::HypernetworkConfig& cfg, const std::vector<int64_t>& widths) {
  models::Hypernetwork hn(cfg, widths);
  at::NoGradGuard no_grad;
  int64_t k = 1;
  for (auto& p : hn->parameters()) {
    const at::Tensor idx = at::arange(p.numel(), at::kLong) + k;
    p.copy_(((idx * 7919) % 1000 - 500).to(at::kFloat).div(4096.0).view(p.sizes()));
    k += p.numel();
  }
  hn->eval();
  return hn;
}

void expect_same_hypernetwork(models::Hypernetwork& a, models::Hypernetwork& b) {
  const auto& x = a->config();
  const auto& y = b->config();
  EXPECT_EQ(x.layer_structure, y.layer_structure);
  EXPECT_EQ(x.activation_func, y.activation_func);
  EXPECT_EQ(x.is_layer_norm, y.is_layer_norm);
  EXPECT_EQ(x.activate_output, y.activate_output);
  EXPECT_EQ(x.use_dropout, y.use_dropout);
  EXPECT_EQ(x.effective_dropout_structure(), y.effective_dropout_structure());
  EXPECT_EQ(x.last_layer_dropout || x.effective_dropout_structure()[x.layer_structure.size() - 2] != 0,
            y.last_layer_dropout);
  EXPECT_EQ(x.name, y.name);
  EXPECT_EQ(x.step, y.step);
  EXPECT_EQ(x.weight_initialization, y.weight_initialization);
  EXPECT_EQ(x.sd_checkpoint_name, y.sd_checkpoint_name);
  EXPECT_EQ(a->widths(), b->widths());
  auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& item : pa) {
    ASSERT_NE(pb.find(item.key()), nullptr) << item.key();
    EXPECT_TRUE(same_bits(item.value(), *pb.find(item.key()))) << item.key();
  }
}
}  // namespace

// ---------------------------------------------------------------------------------------------------
// The pickle writer: every kind of value, read back by the safe unpickler exactly.
TEST(TorchSaveUnit, EveryValueKindReadsBackThroughTheSafeUnpickler) {
  PyValue root = PyValue::dict();
  for (int64_t i : {int64_t(0), int64_t(1), int64_t(255), int64_t(256), int64_t(65535), int64_t(65536), int64_t(-1),
                    int64_t(-129), int64_t(2147483647), int64_t(2147483648), int64_t(-2147483648), int64_t(-2147483649),
                    int64_t(1) << 40, -(int64_t(1) << 62), INT64_MAX, INT64_MIN})
    root.set(PyValue::integer(i), PyValue::integer(-i / 3));
  root.set("none", PyValue::none());
  root.set("true", PyValue::boolean(true));
  root.set("false", PyValue::boolean(false));
  root.set("floats", PyValue::reals({0.1, -0.0, 1e300, -2.5e-310, 3.0, 1.0 / 3.0}));
  root.set("", PyValue::string("é ✓ \xf0\x9f\x98\x80"));
  root.set("long string", PyValue::string(std::string(70000, 'x')));
  PyValue tuples = PyValue::list();
  for (int n = 0; n <= 5; ++n) {
    PyValue t = PyValue::tuple();
    for (int k = 0; k < n; ++k) t.append(PyValue::integer(k));
    tuples.append(t);
  }
  root.set("tuples", tuples);
  root.set("empty list", PyValue::list());
  root.set("one", PyValue::list({PyValue::string("only")}));
  PyValue big = PyValue::list();  // more than one APPENDS batch of 1000
  for (int k = 0; k < 2501; ++k) big.append(PyValue::integer(k * 1000));
  root.set("big list", big);
  PyValue many = PyValue::dict();  // more than one SETITEMS batch
  for (int k = 0; k < 1001; ++k) many.set("k" + std::to_string(k), PyValue::integer(k));
  root.set("big dict", many);
  PyValue nested = PyValue::dict();
  nested.set("single", PyValue::dict().set("a", PyValue::integer(1)));
  nested.set("od empty", PyValue::ordered_dict());
  root.set("nested", nested);
  PyValue sd = PyValue::ordered_dict();
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor f = at::randn({3, 4}, g, at::TensorOptions().dtype(at::kFloat));
  sd.set("f32", PyValue::tensor(f));
  sd.set("f32 transposed", PyValue::tensor(f.t()));  // not contiguous: written contiguous
  sd.set("f16", PyValue::tensor(f.to(at::kHalf)));
  sd.set("bf16", PyValue::tensor(f.to(at::kBFloat16)));
  sd.set("f64", PyValue::tensor(f.to(at::kDouble)));
  sd.set("i64", PyValue::tensor(at::arange(-5, 5, at::kLong)));
  sd.set("i32", PyValue::tensor(at::arange(-5, 5, at::kInt)));
  sd.set("i16", PyValue::tensor(at::arange(-5, 5, at::kShort)));
  sd.set("i8", PyValue::tensor(at::arange(-5, 5, at::kChar)));
  sd.set("u8", PyValue::tensor(at::arange(0, 250, at::kByte)));
  sd.set("bool", PyValue::tensor(f > 0));
  sd.set("scalar", PyValue::tensor(at::scalar_tensor(2.5)));
  sd.set("empty", PyValue::tensor(at::zeros({0, 3})));
  root.set("state", sd);

  const std::vector<uint8_t> bytes = io::torch_save_bytes(root, "all-kinds");
  const auto file = parse(bytes, "all-kinds.pt");
  EXPECT_EQ(file->format(), "zip");
  EXPECT_EQ(file->tensor_count(), 13u);
  expect_same(root, file->root(), "root");
  // The same through flattening (what `dmx convert` and --model use).
  EXPECT_TRUE(same_bits(io::torch_state_dict(*file).at("state.f32 transposed"), f.t().contiguous()));

  // A list nested past the writer's limit is refused, not written.
  PyValue deep = PyValue::list();
  for (int k = 0; k < 1200; ++k) deep = PyValue::list({deep});
  EXPECT_THROW(io::torch_save_bytes(deep), InvalidArgument);
  // Complex tensors have no storage type torch.save would name here.
  EXPECT_THROW(io::torch_save_bytes(PyValue::tensor(at::zeros({2}, at::kComplexFloat))), InvalidArgument);
}

// The archive is laid out as PyTorchStreamWriter lays it out: data.pkl, data/<key> in key order, version "3\n";
// stored entries with their CRC-32 and data aligned to 64 bytes; the folder is the file's stem.
TEST(TorchSaveUnit, ArchiveLayoutIsTorchs) {
  PyValue root = PyValue::dict();
  root.set("a", PyValue::tensor(at::ones({5})));
  root.set("b", PyValue::tensor(at::ones({3}, at::kHalf)));
  const std::vector<uint8_t> bytes = io::torch_save_bytes(root, "my-net");
  io::ZipArchive zip(bytes.data(), bytes.size(), "my-net.pt");
  std::vector<std::string> names;
  for (const auto& e : zip.entries()) {
    names.push_back(e.name);
    EXPECT_EQ(e.data_offset % 64, 0u) << e.name;
    (void)zip.bytes(e, /*verify=*/true);  // CRC-32
  }
  EXPECT_EQ(names, (std::vector<std::string>{"my-net/data.pkl", "my-net/data/0", "my-net/data/1", "my-net/version"}));
  const auto* v = zip.find("my-net/version");
  ASSERT_NE(v, nullptr);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(zip.bytes(*v)), v->size), "3\n");
  EXPECT_EQ(zip.find("my-net/data/1")->size, 6u);  // 3 halves
  EXPECT_EQ(io::torch_save_folder("/x/y/emoji-hypernetwork-twitter.pt"), "emoji-hypernetwork-twitter");
  EXPECT_EQ(io::torch_save_folder("/x/y/b\xc3\xa4r.pt"), "archive");
  EXPECT_THROW(io::torch_save_bytes(root, "a/b"), InvalidArgument);
}

// ---------------------------------------------------------------------------------------------------
// A1111's .pt and the .safetensors layout written by dmx load back in dmx with identical tensors and options.
TEST(HypernetworkSaveUnit, PtAndSafetensorsLoadBackBitForBit) {
  models::Hypernetwork hn = formula_hypernetwork(rich_config(), {24, 16});
  for (const std::string ext : {".pt", ".safetensors"}) {
    const std::string path = temp_dir() + "/rich" + ext;
    loaders::save_hypernetwork(hn, path);
    models::Hypernetwork back = loaders::load_hypernetwork(path);
    SCOPED_TRACE(ext);
    expect_same_hypernetwork(hn, back);
    // The modules compute the same: eval mode, a multiplier, every width.
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(1);
    for (int64_t w : {16, 24}) {
      const at::Tensor x = at::randn({2, 5, w}, g, at::TensorOptions());
      EXPECT_TRUE(at::equal(hn->k(w)->forward(x, 0.7), back->k(w)->forward(x, 0.7)));
      EXPECT_TRUE(at::equal(hn->v(w)->forward(x, 0.7), back->v(w)->forward(x, 0.7)));
    }
  }
  // The .pt holds A1111's dict, in Hypernetwork.save's order: the widths in creation order, then the fields.
  const auto file = io::load_torch_file(temp_dir() + "/rich.pt");
  std::vector<std::string> keys;
  for (const auto& [k, v] : file->root().items())
    keys.push_back(k.kind() == io::PickleValue::Kind::Int ? std::to_string(k.as_int()) : k.as_string());
  EXPECT_EQ(keys,
            (std::vector<std::string>{"24", "16", "step", "name", "layer_structure", "activation_func", "is_layer_norm",
                                      "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
                                      "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"}));
  const io::PickleValue root = file->root();
  const io::PickleValue pair = root.at(int64_t(24));
  ASSERT_EQ(pair.kind(), io::PickleValue::Kind::Tuple);
  ASSERT_EQ(pair.size(), 2u);
  std::vector<std::string> sd_keys;
  for (const auto& [k, v] : pair[0].items()) sd_keys.push_back(k.as_string());
  // Linear, Hardswish, LayerNorm, Dropout(0.3), Linear, Hardswish, LayerNorm, Dropout(0.1), Linear, Hardswish,
  // LayerNorm: A1111's Sequential indices.
  EXPECT_EQ(sd_keys,
            (std::vector<std::string>{"linear.0.weight", "linear.0.bias", "linear.2.weight", "linear.2.bias",
                                      "linear.4.weight", "linear.4.bias", "linear.6.weight", "linear.6.bias",
                                      "linear.8.weight", "linear.8.bias", "linear.10.weight", "linear.10.bias"}));
  EXPECT_EQ(pair[0].kind(), io::PickleValue::Kind::OrderedDict);
  EXPECT_EQ(root.at("layer_structure")[1].kind(), io::PickleValue::Kind::Float);
  EXPECT_EQ(root.at("layer_structure")[2].as_float(), 1.5);
  EXPECT_EQ(root.at("dropout_structure")[2].as_float(), 0.1);
  EXPECT_TRUE(root.at("use_dropout").as_bool());
  EXPECT_TRUE(root.at("last_layer_dropout").as_bool());  // dropout_structure[-2] != 0
  EXPECT_TRUE(root.at("sd_checkpoint").is_none());
  EXPECT_TRUE(root.at("optional_info").is_none());
  EXPECT_EQ(root.at("activation_func").as_string(), "swish");
  EXPECT_EQ(root.at("step").as_int(), 123);

  // Another extension is refused before anything is written.
  EXPECT_THROW(loaders::save_hypernetwork(hn, temp_dir() + "/rich.bin"), InvalidArgument);
  EXPECT_FALSE(fs::exists(temp_dir() + "/rich.bin"));
}

// A1111's defaults as A1111's create_hypernetwork writes them: [1, 2, 1] floats, linear, Normal, no LayerNorm,
// dropout_structure [0, 0, 0] (ints), use_dropout / last_layer_dropout / activate_output False.
TEST(HypernetworkSaveUnit, DefaultOptionsWriteA1111sFields) {
  tr::HypernetworkTrainOptions o;
  o.widths = {8};
  models::Hypernetwork hn(o.config(), o.widths);
  const std::string path = temp_dir() + "/defaults.pt";
  loaders::save_hypernetwork(hn, path);
  const io::PickleValue root = io::load_torch_file(path)->root();
  EXPECT_EQ(root.at("layer_structure").to_json(), nlohmann::json::parse("[1.0, 2.0, 1.0]"));
  EXPECT_EQ(root.at("layer_structure")[0].kind(), io::PickleValue::Kind::Float);
  EXPECT_EQ(root.at("activation_func").as_string(), "linear");
  EXPECT_EQ(root.at("weight_initialization").as_string(), "Normal");
  EXPECT_FALSE(root.at("is_layer_norm").as_bool());
  EXPECT_FALSE(root.at("use_dropout").as_bool());
  EXPECT_FALSE(root.at("activate_output").as_bool());
  EXPECT_FALSE(root.at("last_layer_dropout").as_bool());
  ASSERT_EQ(root.at("dropout_structure").size(), 3u);
  for (size_t k = 0; k < 3; ++k) EXPECT_EQ(root.at("dropout_structure")[k].kind(), io::PickleValue::Kind::Int);
  std::vector<std::string> sd_keys;
  for (const auto& [k, v] : root.at(int64_t(8))[1].items()) sd_keys.push_back(k.as_string());
  EXPECT_EQ(sd_keys,
            (std::vector<std::string>{"linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"}));
}

// The file Python's torch.load (and A1111's Hypernetwork.load on it) was checked on is byte for byte what dmx
// writes now, and what torch read from it (tests/ref/hypernet_dmx_written.torch.safetensors, .json) is what dmx
// reads: every tensor bit for bit, every field, and A1111's module outputs. DMX_UPDATE_REFS=1 rewrites the .pt
// (then rerun tests/ref/make_hypernet_train_refs.py).
TEST(HypernetworkSaveUnit, TheFileTorchLoadReadIsWhatDmxWrites) {
  const std::string ref = std::string(DMX_SOURCE_DIR) + "/tests/ref/hypernet_dmx_written";
  models::Hypernetwork hn = formula_hypernetwork(rich_config(), {24, 16});
  const std::vector<uint8_t> bytes =
      io::torch_save_bytes(loaders::hypernetwork_torch_value(hn), "hypernet_dmx_written");
  const char* update = std::getenv("DMX_UPDATE_REFS");
  if (update && std::string(update) == "1") write_bytes_atomic(ref + ".pt", bytes.data(), bytes.size());
  ASSERT_TRUE(fs::exists(ref + ".pt"));
  EXPECT_TRUE(read_all(ref + ".pt") == bytes)
      << "dmx no longer writes " << ref << ".pt: rerun with DMX_UPDATE_REFS=1 and the harness script";
  ASSERT_TRUE(fs::exists(ref + ".json")) << "run tests/ref/make_hypernet_train_refs.py";
  std::ifstream jf(ref + ".json");
  const nlohmann::json j = nlohmann::json::parse(jf);
  EXPECT_TRUE(j.at("torch_load").get<bool>());
  EXPECT_TRUE(j.at("a1111_load").get<bool>());
  const auto torch_read = io::load_safetensors(ref + ".torch.safetensors");
  models::Hypernetwork back = loaders::load_hypernetwork(ref + ".pt");
  int tensors = 0;
  for (const auto& item : back->named_parameters()) {
    const std::string key = item.key();
    ASSERT_TRUE(torch_read.count(key)) << key;
    EXPECT_TRUE(same_bits(item.value(), torch_read.at(key))) << key;
    ++tensors;
  }
  EXPECT_EQ(tensors, 2 * 2 * 12);
  // The fields as torch.load returned them (JSON of the Python values, types named).
  const nlohmann::json& fields = j.at("fields");
  EXPECT_EQ(fields.at("layer_structure"), nlohmann::json::parse("[1.0, 2.0, 1.5, 1.0]"));
  EXPECT_EQ(fields.at("activation_func"), "swish");
  EXPECT_EQ(fields.at("name"), "rich");
  EXPECT_EQ(fields.at("step"), 123);
  EXPECT_EQ(j.at("key_order"), nlohmann::json::parse(R"([24, 16, "step", "name", "layer_structure",
      "activation_func", "is_layer_norm", "weight_initialization", "sd_checkpoint", "sd_checkpoint_name",
      "activate_output", "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"])"));
  // A1111's HypernetworkModule (the harness's port) built from the file computes what dmx's modules compute.
  for (int64_t w : {16, 24})
    for (const char* kv : {"k", "v"}) {
      const std::string s = std::to_string(w) + "." + kv;
      const at::Tensor x = torch_read.at("input." + s);
      const at::Tensor mine = (std::string(kv) == "k" ? back->k(w) : back->v(w))->forward(x, 0.7);
      EXPECT_LT((mine - torch_read.at("a1111_output." + s)).abs().max().item<double>(), 1e-6) << s;
    }
}

// A1111's initialisation: Normal = N(0, 0.01^2) weights (LayerNorm weights too), zero biases; the others by
// their bounds; seeded.
TEST(HypernetworkTrainUnit, InitialisationIsA1111s) {
  models::HypernetworkConfig cfg;
  cfg.layer_structure = {1.0, 2.0, 1.0};
  cfg.is_layer_norm = true;
  cfg.activation_func = "relu";
  auto make = [&](const std::string& init, uint64_t seed) {
    models::Hypernetwork hn(cfg, std::vector<int64_t>{64, 32});
    at::Generator g = at::make_generator<at::CPUGeneratorImpl>(seed);
    tr::init_hypernetwork(hn, init, g);
    return hn;
  };
  models::Hypernetwork a = make("Normal", 4), b = make("Normal", 4), c = make("Normal", 5);
  const at::Tensor w0 = *a->named_parameters().find("64.k.linear.0.weight");  // [128, 64]
  EXPECT_NEAR(w0.std().item<double>(), 0.01, 0.0005);
  EXPECT_NEAR(w0.mean().item<double>(), 0.0, 0.0005);
  EXPECT_EQ(a->named_parameters().find("64.k.linear.0.bias")->abs().max().item<double>(), 0.0);
  // The LayerNorm's weight too (A1111 draws it with normal_(std=0.01), not ones), its bias zero.
  const at::Tensor ln = *a->named_parameters().find("64.k.linear.2.weight");
  EXPECT_EQ(ln.dim(), 1);
  EXPECT_LT(ln.abs().max().item<double>(), 0.06);
  EXPECT_GT(ln.abs().max().item<double>(), 0.0);
  for (const auto& item : a->named_parameters())
    EXPECT_TRUE(at::equal(item.value(), *b->named_parameters().find(item.key()))) << item.key();
  EXPECT_FALSE(at::equal(w0, *c->named_parameters().find("64.k.linear.0.weight")));
  // k and v are drawn separately.
  EXPECT_FALSE(at::equal(w0, *a->named_parameters().find("64.v.linear.0.weight")));
  const double bound = std::sqrt(6.0 / (64 + 128));  // xavier_uniform_ on [128, 64]
  const at::Tensor xu = *make("XavierUniform", 1)->named_parameters().find("64.k.linear.0.weight");
  EXPECT_LE(xu.abs().max().item<double>(), bound);
  EXPECT_GT(xu.abs().max().item<double>(), 0.9 * bound);
  const at::Tensor ku = *make("KaimingUniform", 1)->named_parameters().find("64.k.linear.0.weight");
  EXPECT_LE(ku.abs().max().item<double>(), std::sqrt(2.0) * std::sqrt(3.0 / 64));
  EXPECT_GT(ku.abs().max().item<double>(), 0.9 * std::sqrt(2.0) * std::sqrt(3.0 / 64));
  const at::Tensor kn = *make("KaimingNormal", 1)->named_parameters().find("64.k.linear.0.weight");
  EXPECT_NEAR(kn.std().item<double>(), std::sqrt(2.0 / 64), 0.01);
  const at::Tensor xn = *make("XavierNormal", 1)->named_parameters().find("64.k.linear.0.weight");
  EXPECT_NEAR(xn.std().item<double>(), std::sqrt(2.0 / (64 + 128)), 0.005);
  models::Hypernetwork bad(cfg, std::vector<int64_t>{8});
  at::Generator g = at::make_generator<at::CPUGeneratorImpl>(0);
  EXPECT_THROW(tr::init_hypernetwork(bad, "Uniform", g), InvalidArgument);
}

// Options: A1111's rules, each error naming the option.
TEST(HypernetworkTrainUnit, OptionsAreChecked) {
  auto expect_bad = [](std::function<void(tr::HypernetworkTrainOptions&)> f, const std::string& needle) {
    tr::HypernetworkTrainOptions o;
    f(o);
    try {
      o.validate();
      ADD_FAILURE() << "expected InvalidArgument naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  tr::HypernetworkTrainOptions ok;
  ok.validate();
  expect_bad([](auto& o) { o.layer_structure = {2, 1}; }, "--layer-structure");
  expect_bad([](auto& o) { o.layer_structure = {1}; }, "--layer-structure");
  expect_bad([](auto& o) { o.layer_structure = {1, 100, 1}; }, "--layer-structure");
  expect_bad([](auto& o) { o.activation = "softmax"; }, "--activation");
  expect_bad([](auto& o) { o.weight_init = "normal"; }, "--weight-init");
  expect_bad([](auto& o) { o.dropout_structure = {0, 0.3}; }, "--dropout-structure");
  expect_bad([](auto& o) { o.dropout_structure = {0, 1.0, 0}; }, "--dropout-structure");
  expect_bad([](auto& o) { o.dropout_structure = {0.2, 0.1, 0}; }, "--dropout-structure");
  expect_bad([](auto& o) { o.widths = {0}; }, "--hypernetwork-widths");
  expect_bad([](auto& o) { o.widths = {8, 8}; }, "--hypernetwork-widths");
  expect_bad([](auto& o) { o.widths = {1 << 20}; }, "--hypernetwork-widths");
  // parse_dropout_structure without a structure; a given structure wins.
  tr::HypernetworkTrainOptions d;
  d.layer_structure = {1, 2, 2, 1};
  d.use_dropout = true;
  EXPECT_EQ(d.config().dropout_structure, (std::vector<double>{0, 0.3, 0, 0}));
  d.last_layer_dropout = true;
  EXPECT_EQ(d.config().dropout_structure, (std::vector<double>{0, 0.3, 0.3, 0}));
  d.dropout_structure = {0, 0, 0.2, 0};
  EXPECT_EQ(d.config().dropout_structure, (std::vector<double>{0, 0, 0.2, 0}));
}

// ---------------------------------------------------------------------------------------------------
// Training on the tiny model.
namespace {

tr::TrainConfig config(const std::string& name, int64_t steps) {
  tr::TrainConfig c;
  c.output_dir = temp_dir() + "/" + name;
  c.max_train_steps = steps;
  c.train_batch_size = 2;
  c.learning_rate = 1e-3;
  c.quiet = true;
  c.save_final_checkpoint = false;
  c.seed = 3;
  c.sample_images = api::pipeline_sampler();
  return c;
}

}  // namespace

// The default widths are every width the UNet's attentions read (the tiny model: cross 32, self 64), and a few
// steps lower the loss of a fixed draw.
TEST(TrainHypernetworkTiny, FewStepsLowerTheLossOnAFixedDraw) {
  auto m = load_tiny_model("test");
  EXPECT_EQ(tr::attention_widths(*m->unet), (std::vector<int64_t>{32, 64}));
  tr::HypernetworkTrainOptions o;
  o.activation = "relu";
  auto src = std::make_shared<MemorySource>(2, 32, 2);
  tr::TrainConfig c = config("hn-loss", 12);
  c.learning_rate = 5e-3;
  const tr::Batch b = src->get(0);
  // The base model's loss (no hypernetwork at all) and the freshly initialised one's differ only a little.
  auto recipe = std::make_shared<tr::HypernetworkRecipe>(m, o);
  recipe->setup(c);
  recipe->train_mode(false);  // eval mode: no dropout
  const double before = fixed_draw_loss(*recipe, b, 99);
  auto m2 = load_tiny_model("test");
  auto recipe2 = std::make_shared<tr::HypernetworkRecipe>(m2, o);
  tr::Trainer t2(c, recipe2, src);
  const tr::TrainResult r = t2.run();
  recipe2->train_mode(false);
  const double after = fixed_draw_loss(*recipe2, b, 99);
  std::printf("[hypernetwork] fixed-draw loss before %.5f after %.5f (%lld steps; step losses %.4f .. %.4f)\n", before,
              after, static_cast<long long>(r.steps), r.history.front().loss, r.history.back().loss);
  EXPECT_EQ(r.steps, 12);
  EXPECT_LT(after, before);
  EXPECT_EQ(recipe2->hypernetwork()->width_order(), (std::vector<int64_t>{32, 64}));
  int64_t n = 0;
  for (const auto& p : recipe2->trainable_parameters()) n += p.tensor.numel();
  // Two widths x (k, v) x [1, 2, 1]: 2 * (w * 2w + 2w + 2w * w + w) each.
  EXPECT_EQ(n, 2 * (2 * 32 * 64 + 64 + 32) + 2 * (2 * 64 * 128 + 128 + 64));
}

// Resume equals the uninterrupted run bit for bit, dropout masks included (their generator is in the
// checkpoint), and the two runs write byte-identical .pt files.
TEST(TrainHypernetworkTiny, ResumeEqualsUninterruptedBitForBit) {
  tr::HypernetworkTrainOptions o;
  o.layer_structure = {1, 2, 1};
  o.activation = "relu";
  o.layer_norm = true;
  o.dropout_structure = {0, 0.3, 0};
  o.widths = {32};
  auto run = [&](const std::string& dir, int64_t stop, const std::string& resume) {
    auto m = load_tiny_model("test");
    auto recipe = std::make_shared<tr::HypernetworkRecipe>(m, o);
    tr::TrainConfig c = config(dir, 4);
    fs::create_directories(temp_dir() + "/" + dir + "-out");
    c.output = temp_dir() + "/" + dir + "-out/net.pt";  // the same name: 'name' and the archive folder agree
    c.gradient_accumulation_steps = 2;
    c.lr_scheduler = tr::LRSchedule::Cosine;
    c.stop_at_step = stop;
    c.save_final_checkpoint = true;
    c.resume_from_checkpoint = resume;
    tr::Trainer t(c, recipe, std::make_shared<MemorySource>(3, 32, 2));
    const tr::TrainResult r = t.run();
    std::map<std::string, at::Tensor> p;
    for (const auto& q : recipe->trainable_parameters()) p[q.name] = q.tensor.detach().clone();
    return std::make_pair(p, r);
  };
  auto [straight, r1] = run("hn-straight", 0, "");
  auto [half, r2] = run("hn-resumed", 2, "");
  EXPECT_EQ(r2.steps, 2);
  EXPECT_FALSE(fs::exists(temp_dir() + "/hn-resumed-out/net.pt"));  // stopped early: no result yet
  auto [resumed, r3] = run("hn-resumed", 0, temp_dir() + "/hn-resumed");
  EXPECT_EQ(r3.first_step, 2);
  ASSERT_EQ(straight.size(), resumed.size());
  for (const auto& [k, v] : straight) EXPECT_TRUE(same_bits(v, resumed.at(k))) << k;
  EXPECT_EQ(r1.history[3].loss, r3.history[1].loss);
  const auto a = read_all(temp_dir() + "/hn-straight-out/net.pt"), b = read_all(temp_dir() + "/hn-resumed-out/net.pt");
  EXPECT_FALSE(a.empty());
  EXPECT_TRUE(a == b);
  // The file holds the trained tensors (dmx reads them back exactly) and step = --steps.
  models::Hypernetwork back = loaders::load_hypernetwork(temp_dir() + "/hn-straight-out/net.pt");
  EXPECT_EQ(back->config().step, 4);
  EXPECT_EQ(back->config().name, "net");
  for (const auto& item : back->named_parameters())
    EXPECT_TRUE(same_bits(item.value(), straight.at("hypernetwork." + item.key()))) << item.key();
  // Dropout drew masks: without it the same run ends elsewhere (the option is not inert).
  o.dropout_structure = {0, 0, 0};
  auto [no_dropout, r4] = run("hn-nodrop", 0, "");
  EXPECT_FALSE(
      at::equal(no_dropout.at("hypernetwork.32.k.linear.0.weight"), straight.at("hypernetwork.32.k.linear.0.weight")));
}

// Bad input through the API: exit-2 errors naming the option, nothing written.
TEST(TrainHypernetworkTiny, BadInputNamesTheOptionAndWritesNothing) {
  const std::string data = temp_dir() + "/hn-cli-data";
  fs::create_directories(data);
  const std::string out = temp_dir() + "/hn-cli-out.pt";
  TrainOptions base;
  base.recipe = "hypernetwork";
  base.model = tiny_model_dir("test");
  base.data = data;
  base.output = out;
  validate_train_options(base);
  auto expect_invalid = [&](std::function<void(TrainOptions&)> f, const std::string& needle) {
    TrainOptions o = base;
    f(o);
    for (int api = 0; api < 2; ++api) {
      try {
        if (api == 0)
          validate_train_options(o);
        else
          train(o);
        ADD_FAILURE() << "expected InvalidArgument naming " << needle;
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      }
    }
    EXPECT_FALSE(fs::exists(o.output));
    EXPECT_FALSE(fs::exists(o.output + ".train"));
  };
  expect_invalid([](TrainOptions& o) { o.layer_structure = "2,1"; }, "--layer-structure");
  expect_invalid([](TrainOptions& o) { o.layer_structure = "1,x,1"; }, "--layer-structure");
  expect_invalid([](TrainOptions& o) { o.activation = "bogus"; }, "--activation");
  expect_invalid([](TrainOptions& o) { o.weight_init = "Zeros"; }, "--weight-init");
  expect_invalid([](TrainOptions& o) { o.dropout_structure = "0,0.5"; }, "--dropout-structure");
  expect_invalid([](TrainOptions& o) { o.hypernetwork_widths = "32,2.5"; }, "--hypernetwork-widths");
  expect_invalid([&](TrainOptions& o) { o.output = temp_dir() + "/hn-cli-out.bin"; }, "--output");
  // A width no attention of the model reads: found once the model is loaded, still before anything is written.
  // (A folder with one image, so that the dataset opens and the model loads.)
  const std::string one = temp_dir() + "/hn-cli-one-image";
  fs::create_directories(one);
  save_png(one + "/a.png", tensor_to_image(at::rand({32, 32, 3})));
  write_bytes_atomic(one + "/a.txt", "a red square", 12);
  TrainOptions w = base;
  w.data = one;
  w.hypernetwork_widths = "768";
  try {
    train(w);
    ADD_FAILURE() << "expected InvalidArgument for --hypernetwork-widths 768";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("--hypernetwork-widths"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[32,64]"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(fs::exists(out));
  EXPECT_FALSE(fs::exists(out + ".train"));
}

// The command: exit 2 with nothing written for bad input; a real run on an image folder writes a .pt that
// `dmx generate --hypernetwork` takes.
TEST(TrainHypernetworkCli, ExitCodesAndAFileGenerateTakes) {
  const std::string data = temp_dir() + "/hn-cli-images";
  fs::create_directories(data);
  {
    auto m = load_tiny_model("test");
    tr::ClassImageOptions ci;
    ci.dir = data;
    ci.prompt = "a red square";
    ci.num_class_images = 2;
    ci.resolution = 32;
    ci.num_inference_steps = 1;
    tr::generate_class_images(m, ci, api::pipeline_sampler());
    for (const auto& img : tr::list_images(data)) {
      const std::string txt = img.substr(0, img.size() - 4) + ".txt";
      const std::string cap = "a red square";
      write_bytes_atomic(txt, cap.data(), cap.size());
    }
  }
  const std::string model = tiny_model_dir("test");
  const std::string out = temp_dir() + "/hn-cli.pt";
  const std::vector<std::string> base = {"train", "hypernetwork", "--model", model,          "--data",
                                         data,    "--output",     out,       "--resolution", "32"};
  for (const auto& [extra, needle] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--layer-structure", "1,2"}, "--layer-structure"},
           {{"--dropout-structure", "0,0.3"}, "--dropout-structure"},
           {{"--hypernetwork-widths", "100"}, "--hypernetwork-widths"},
           {{"--activation", "nope"}, "--activation"}}) {
    std::vector<std::string> args = base;
    args.insert(args.end(), extra.begin(), extra.end());
    const CliRun r = dmx_run(args);
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find(needle), std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(out));
    EXPECT_FALSE(fs::exists(out + ".train"));
  }
  std::vector<std::string> args = base;
  for (const char* a : {"--steps", "2", "--batch-size", "2", "--quiet", "--threads", "1", "--learning-rate", "1e-3"})
    args.push_back(a);
  const CliRun r = dmx_run(args);
  ASSERT_EQ(r.code, 0) << r.output;
  ASSERT_TRUE(fs::exists(out));
  const std::string png = temp_dir() + "/hn-cli.png";
  const CliRun g = dmx_run({"generate", "--model", model, "--prompt", "a red square", "--steps", "2", "--hypernetwork",
                            out + ":0.8", "--output", png, "--threads", "1"});
  EXPECT_EQ(g.code, 0) << g.output;
  EXPECT_TRUE(fs::exists(png));
}
