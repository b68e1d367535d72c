// `dmx serve` (docs/serve.md): the A1111 request mapping in-process (ServeUnit), and the server started as a process on
// a free loopback port with the bundled emoji model, driven with cpp-httplib's client (ServeCli, the load test
// included), and the session under it (SessionTiny). Generations are 2-step 32-px emoji pictures.
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "core/canny.h"
#include "core/image.h"
#include "dmx/dmx.h"
#include "dmx/session.h"
#include "serve/a1111.h"
#include "serve/dmx_api.h"
#include "serve/server.h"
#include "test_util.h"
#include "tiny_models.h"

namespace dmx::test {
namespace {
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::string emoji_model() { return std::string(DMX_SOURCE_DIR) + "/models/emoji"; }
std::string models_dir() { return std::string(DMX_SOURCE_DIR) + "/models"; }

// A `dmx serve` process on a free port; SIGTERM and a wait at the end.
class ServerProcess {
 public:
  explicit ServerProcess(std::vector<std::string> extra, std::string tmpdir = "") {
    static int servers = 0;  // the server's uploads folder lives in the test's scratch folder, whatever happens
    if (tmpdir.empty()) tmpdir = temp_subdir("serve-tmp-" + std::to_string(servers++));
    std::vector<std::string> args = {cli_path(), "serve", "--port", "0", "--threads", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    int out[2];
    if (pipe(out) != 0) throw std::runtime_error("pipe");
    pid_ = fork();
    if (pid_ == 0) {
      dup2(out[1], 1);
      close(out[0]);
      close(out[1]);
      unsetenv("OMP_WAIT_POLICY");
      unsetenv("DMX_OMP_CONFIGURED");
      setenv("TMPDIR", tmpdir.c_str(), 1);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(out[1]);
    out_ = fdopen(out[0], "r");
    char line[4096];
    while (std::fgets(line, sizeof line, out_)) {
      startup_ += line;
      const std::string s = line;
      const size_t at = s.find("listening on http://");
      if (at != std::string::npos) {
        const size_t colon = s.find(':', at + 20);
        port_ = std::stoi(s.substr(colon + 1));
        break;
      }
    }
  }
  ~ServerProcess() {
    if (pid_ > 0 && !exited_ && stop(10) < 0) {  // a failed test: SIGTERM first, SIGKILL if it hangs
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
    if (out_) std::fclose(out_);
  }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  const std::string& startup() const { return startup_; }
  // SIGTERM, then the exit status (-1 if it did not end within `seconds`).
  int stop(double seconds = 20) {
    kill(pid_, SIGTERM);
    return wait_exit(seconds);
  }
  int wait_exit(double seconds) {
    const auto end = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < end) {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }
  std::string rest_of_output() {
    std::string s;
    char line[4096];
    while (out_ && std::fgets(line, sizeof line, out_)) s += line;
    return s;
  }
  double rss_mib() const {
    std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
    std::string line;
    while (std::getline(f, line))
      if (line.rfind("VmRSS:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
    return 0;
  }

 private:
  pid_t pid_ = -1;
  FILE* out_ = nullptr;
  int port_ = 0;
  bool exited_ = false;
  std::string startup_;
};

httplib::Client client(int port) {
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(120, 0);
  c.set_write_timeout(60, 0);
  return c;
}

json post(httplib::Client& c, const std::string& path, const json& body, int* status) {
  auto r = c.Post(path.c_str(), body.dump(), "application/json");
  if (!r) {
    *status = -1;
    return json();
  }
  *status = r->status;
  return json::parse(r->body, nullptr, false);
}

json get(httplib::Client& c, const std::string& path, int* status) {
  auto r = c.Get(path.c_str());
  if (!r) {
    *status = -1;
    return json();
  }
  *status = r->status;
  return json::parse(r->body, nullptr, false);
}

// A txt2img body with A1111's field names and types, at the emoji model's 2-step 32 px.
json a1111_txt2img(uint64_t seed, int steps = 2) {
  return {{"prompt", "grinning face"},
          {"negative_prompt", ""},
          {"seed", seed},
          {"steps", steps},
          {"width", 32},
          {"height", 32},
          {"cfg_scale", 3},
          {"sampler_name", "DDIM"},
          {"n_iter", 1},
          {"batch_size", 1}};
}

std::string write_bytes(const std::string& dir, const std::string& name, const std::string& bytes) {
  const std::string path = dir + "/" + name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

bool is_png(const std::string& b) { return b.size() > 8 && b.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0; }

// A long job in another thread: its response once it ends.
struct Background {
  std::thread t;
  int status = 0;
  json body;
  Background(int port, json req) {
    t = std::thread([this, port, req] {
      auto c = client(port);
      body = post(c, "/sdapi/v1/txt2img", req, &status);
    });
  }
  ~Background() {
    if (t.joinable()) t.join();
  }
};

// Waits until the server runs a job (progress > 0).
json wait_running(httplib::Client& c, double seconds = 30) {
  const auto end = Clock::now() + std::chrono::duration<double>(seconds);
  json p;
  while (Clock::now() < end) {
    int st = 0;
    p = get(c, "/sdapi/v1/progress", &st);
    if (st == 200 && p["progress"].get<double>() > 0) return p;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return p;
}
}  // namespace

// ---- in-process: the request mapping ----------------------------------------------------------------------------
TEST(ServeUnit, Base64RoundTripsAndRefusesGarbage) {
  for (const std::string& s : std::vector<std::string>{"a", "ab", "abc", "abcd", std::string("\x00\xff\x10", 3)})
    EXPECT_EQ(serve::base64_decode(serve::base64_encode(s), "x"), s);
  EXPECT_EQ(serve::base64_decode("data:image/png;base64,YWJj", "x"), "abc");
  try {
    serve::base64_decode("ab$c", "init_images");
    FAIL() << "no error";
  } catch (const serve::RequestError& e) {
    EXPECT_EQ(e.field, "init_images");
    EXPECT_EQ(e.status, 400);
  }
}

TEST(ServeUnit, FieldOfMessageNamesTheA1111Field) {
  EXPECT_EQ(serve::field_of_message("--steps must be in [1, 1000], got 5000"), "steps");
  EXPECT_EQ(serve::field_of_message("--guidance-scale must be in [0, 100], got 300"), "cfg_scale");
  EXPECT_EQ(serve::field_of_message("--width/--height must be positive"), "width");
  EXPECT_EQ(serve::field_of_message("--strength must be in [0, 1], got 2"), "denoising_strength");
  EXPECT_EQ(serve::field_of_message("no flag here"), "");
}

TEST(ServeUnit, RequestsGoThroughTheCliOptionTable) {
  std::vector<serve::ServedModel> models = {{"emoji", emoji_model(), "0123456789", "emoji [0123456789]"}};
  serve::RequestContext ctx;
  ctx.models = &models;
  ctx.current = &models[0];
  ctx.models_dir = models_dir();
  auto parse = [&](const json& body) { return serve::parse_generation_request(body, false, ctx); };
  auto r = parse({{"prompt", "x"},
                  {"steps", 3},
                  {"seed", 5},
                  {"batch_size", 2},
                  {"n_iter", 2},
                  {"sampler_name", "Euler a"},
                  {"unknown_field", 1},
                  {"restore_faces", true}});
  ASSERT_EQ(r.runs.size(), 4u);
  EXPECT_EQ(*r.runs[3].seed, 8u);  // A1111's all_seeds: seed + i
  EXPECT_EQ(r.runs[0].steps, 3);
  EXPECT_EQ(r.runs[0].scheduler, "euler_a");
  EXPECT_EQ(r.runs[0].guidance_scale, 7.0);  // A1111's default cfg_scale
  EXPECT_EQ(r.ignored_fields, std::vector<std::string>{"restore_faces"});
  // Refusals name the field, the rule (the CLI's, word for word) and the value.
  auto refusal = [&](const json& body) -> serve::RequestError {
    try {
      parse(body);
    } catch (const serve::RequestError& e) {
      return e;
    }
    ADD_FAILURE() << "no refusal of " << body.dump();
    return serve::RequestError(0, "", "", nullptr);
  };
  auto e = refusal({{"steps", 5000}});
  EXPECT_EQ(e.field, "steps");
  EXPECT_NE(e.rule.find("must be in [1, 1000], got 5000"), std::string::npos) << e.rule;
  EXPECT_EQ(e.value, 5000);
  EXPECT_EQ(refusal({{"steps", "ten"}}).rule, "must be an integer");
  EXPECT_EQ(refusal({{"steps", 2.5}}).field, "steps");
  EXPECT_EQ(refusal({{"cfg_scale", 1000}}).field, "cfg_scale");
  EXPECT_EQ(refusal({{"seed", -7}}).field, "seed");
  EXPECT_EQ(refusal({{"sampler_name", "nope"}}).field, "sampler_name");
  EXPECT_EQ(refusal({{"prompt", 3}}).field, "prompt");
  EXPECT_EQ(refusal({{"batch_size", 65}}).field, "batch_size");
  EXPECT_EQ(refusal({{"override_settings", {{"sd_model_checkpoint", "../../etc"}}}}).field,
            "override_settings.sd_model_checkpoint");
  EXPECT_EQ(refusal(json::array()).rule, "the body must be a JSON object");
}

TEST(ServeUnit, DmxRequestsAreTheCommandsOptions) {
  serve::ServedLists lists;
  lists.models = {{"emoji", emoji_model(), "0123456789", "emoji [0123456789]"}};
  lists.controlnets = {{"emoji-controlnet-canny", models_dir() + "/emoji-controlnet-canny"}};
  lists.models_dir = models_dir();
  serve::Uploads uploads;
  uploads.dir = temp_subdir("serve-dmx-unit");
  const serve::DmxEndpoint* generate = nullptr;
  const serve::DmxEndpoint* p2p = nullptr;
  const serve::DmxEndpoint* upscale = nullptr;
  for (const auto& e : serve::dmx_endpoints()) {
    if (std::string(e.name) == "generate") generate = &e;
    if (std::string(e.name) == "p2p") p2p = &e;
    if (std::string(e.name) == "upscale") upscale = &e;
  }
  ASSERT_TRUE(generate && p2p && upscale);
  auto parse = [&](const serve::DmxEndpoint& e, const json& body) {
    return serve::parse_dmx_request(e, body, lists, "emoji", uploads, 1 << 20, 1);
  };
  const auto r = parse(*generate, {{"prompt", "x"},
                                   {"steps", 3},
                                   {"scheduler", "ddim"},
                                   {"guess_mode", true},
                                   {"controlnet", {"emoji-controlnet-canny"}},
                                   {"eta", 0.5},
                                   {"zzz", 1}});
  const auto has = [&](const std::vector<std::string>& args, const std::string& a, const std::string& v) {
    for (size_t i = 0; i + 1 < args.size(); ++i)
      if (args[i] == a && args[i + 1] == v) return true;
    return false;
  };
  EXPECT_TRUE(has(r.args, "--scheduler", "ddim"));
  EXPECT_TRUE(has(r.args, "--eta", "0.5"));
  EXPECT_TRUE(has(r.args, "--model", emoji_model()));
  EXPECT_TRUE(has(r.args, "--controlnet", models_dir() + "/emoji-controlnet-canny"));
  EXPECT_NE(std::find(r.args.begin(), r.args.end(), "--guess-mode"), r.args.end());
  EXPECT_TRUE(std::find(r.args.begin(), r.args.end(), "--seed") != r.args.end()) << "a seed is drawn";
  EXPECT_EQ(r.ignored_fields, std::vector<std::string>{"zzz"});
  EXPECT_EQ(r.steps, 3);
  // A picture becomes a file of the job's folder; repeatable options take arrays.
  const auto pic = encode_png(Image{8, 8, 3, std::vector<uint8_t>(8 * 8 * 3, 200)});
  const auto q = parse(*p2p, {{"prompt", "a cat"},
                              {"edit_prompt", "a dog"},
                              {"reweight", {"dog=2", "a=0.5"}},
                              {"image", serve::base64_encode(std::string(pic.begin(), pic.end()))}});
  EXPECT_TRUE(has(q.args, "--reweight", "dog=2"));
  EXPECT_TRUE(has(q.args, "--reweight", "a=0.5"));
  EXPECT_TRUE(has(q.args, "--image", uploads.dir + "/upload-0.img"));
  auto refusal = [&](const serve::DmxEndpoint& e, const json& body) -> serve::RequestError {
    try {
      parse(e, body);
    } catch (const serve::RequestError& err) {
      return err;
    }
    ADD_FAILURE() << "no refusal of " << body.dump();
    return serve::RequestError(0, "", "", nullptr);
  };
  auto e = refusal(*generate, {{"prompt", "x"}, {"steps", 5000}});
  EXPECT_EQ(e.field, "steps");
  EXPECT_EQ(e.value, 5000);
  EXPECT_NE(e.rule.find("must be in [1, 1000], got 5000"), std::string::npos) << e.rule;
  // The rules between options, as the command line has them.
  EXPECT_EQ(refusal(*generate, {{"prompt", "x"}, {"mask_dilation", 9}}).rule, "needs --mask");
  EXPECT_EQ(refusal(*generate, {{"output", "/tmp/x.png"}}).field, "output");
  EXPECT_EQ(refusal(*generate, {{"save-latents", "/tmp/x"}}).field, "save-latents");
  EXPECT_EQ(refusal(*generate, {{"guess_mode", "yes"}}).rule, "must be a boolean");
  EXPECT_EQ(refusal(*generate, {{"model", "/work/models/emoji"}}).field, "model");
  EXPECT_EQ(refusal(*generate, {{"steps", {{"a", 1}}}}).field, "steps");
  EXPECT_EQ(refusal(*generate, {{"init_image", "!!"}}).field, "init_image");
  EXPECT_EQ(refusal(*p2p, {{"prompt", "a"}}).field, "edit_prompt");  // required, as the command line says
  EXPECT_EQ(refusal(*upscale, {{"prompt", "a"}}).field, "model");    // no upscaler served
  // The fields of an endpoint: its command's options, without those naming files on the server.
  std::set<std::string> fields;
  for (const auto& f : serve::dmx_fields(*generate)) fields.insert(f.field);
  for (const char* f : {"prompt", "mask", "background", "region", "layout", "control_image", "adapter"})
    EXPECT_TRUE(fields.count(f)) << f;
  for (const char* f : {"output", "save_latents", "lora", "lora_dir", "init_latents", "threads", "device", "from"})
    EXPECT_FALSE(fields.count(f)) << f;
}

// ---- in-process: the session under the server ------------------------------------------------------------------
TEST(SessionTiny, KeepsTheModelLoadedAndMakesDmxGeneratesPicture) {
  GenerateOptions o;
  o.model = tiny_model_dir();
  o.prompt = "a red square";
  o.steps = 2;
  o.seed = 7;
  o.progress = false;
  Session s;
  const SessionResult a = s.generate(o);
  EXPECT_EQ(s.loads(), 1);
  EXPECT_GT(a.load_seconds, 0.0);
  const SessionResult b = s.generate(o);
  EXPECT_EQ(s.loads(), 1) << "the loaded model was loaded again";
  EXPECT_EQ(b.load_seconds, 0.0);
  ASSERT_EQ(a.pngs.size(), 1u);
  EXPECT_EQ(a.pngs, b.pngs);
  EXPECT_EQ(s.loaded_model(), o.model);
  // The same bytes as dmx::generate's file (pixels and parameters chunk).
  GenerateOptions f = o;
  f.output = temp_subdir("session-tiny") + "/out.png";
  generate(f);
  std::ifstream in(f.output, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(file, a.pngs[0]);
  EXPECT_EQ(read_image_parameters(f.output), a.parameters);
  // A session writes no file.
  EXPECT_THROW(s.generate(f), InvalidArgument);
}

TEST(SessionTiny, AHookCancelsTheRunAndTheSessionCarriesOn) {
  GenerateOptions o;
  o.model = tiny_model_dir();
  o.prompt = "a red square";
  o.steps = 4;
  o.seed = 1;
  o.progress = false;
  Session s;
  SessionHooks h;
  std::vector<std::pair<int, int>> steps;
  int previews = 0;
  h.on_step = [&](int done, int total) {
    steps.push_back({done, total});
    if (done == 2) throw Cancelled("stop");
  };
  h.want_preview = [] { return true; };
  h.on_preview = [&](const std::string& png) {
    EXPECT_TRUE(is_png(png));
    ++previews;
  };
  EXPECT_THROW(s.generate(o, h), Cancelled);
  EXPECT_EQ(steps, (std::vector<std::pair<int, int>>{{1, 4}, {2, 4}}));
  EXPECT_EQ(previews, 2);
  EXPECT_EQ(s.generate(o).pngs.size(), 1u);
  EXPECT_EQ(s.loads(), 1);
}

// ---- the server process -----------------------------------------------------------------------------------------
TEST(ServeCli, Txt2ImgAsA1111DocumentsItMatchesDmxGenerate) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  json req = a1111_txt2img(1234);
  req["batch_size"] = 2;
  req["some_future_field"] = "ignored as A1111 ignores it";
  req["tiling"] = true;  // A1111 field dmx does not honour: reported
  const json r = post(c, "/sdapi/v1/txt2img", req, &st);
  ASSERT_EQ(st, 200) << r.dump();
  ASSERT_EQ(r["images"].size(), 2u);
  const json info = json::parse(r["info"].get<std::string>());
  EXPECT_EQ(info["all_seeds"], json::array({1234, 1235}));
  EXPECT_EQ(info["width"], 32);
  EXPECT_EQ(info["steps"], 2);
  EXPECT_EQ(info["sampler_name"], "DDIM");
  EXPECT_EQ(info["sd_model_name"], "emoji");
  EXPECT_EQ(info["ignored_fields"], json::array({"tiling"}));
  EXPECT_EQ(r["parameters"]["prompt"], "grinning face");
  EXPECT_EQ(r["parameters"]["seed"], 1234);
  const std::string dir = temp_subdir("serve-txt2img");
  // Each picture is the one `dmx generate` makes with the same settings and seed, metadata included.
  for (int i = 0; i < 2; ++i) {
    const std::string png = serve::base64_decode(r["images"][i].get<std::string>(), "images");
    ASSERT_TRUE(is_png(png));
    const std::string served = write_bytes(dir, "served-" + std::to_string(i) + ".png", png);
    const std::string params = read_image_parameters(served);
    EXPECT_EQ(params, info["infotexts"][i].get<std::string>());
    EXPECT_NE(params.find("Seed: " + std::to_string(1234 + i)), std::string::npos) << params;
    EXPECT_NE(params.find("Steps: 2, Sampler: DDIM, CFG scale: 3"), std::string::npos) << params;
    const std::string cli_png = dir + "/cli-" + std::to_string(i) + ".png";
    const CliRun g = dmx_run({"generate",
                              "--model",
                              emoji_model(),
                              "--prompt",
                              "grinning face",
                              "--steps",
                              "2",
                              "--width",
                              "32",
                              "--height",
                              "32",
                              "--guidance-scale",
                              "3",
                              "--scheduler",
                              "ddim",
                              "--seed",
                              std::to_string(1234 + i),
                              "--threads",
                              "1",
                              "--quiet",
                              "--output",
                              cli_png});
    ASSERT_EQ(g.code, 0) << g.output;
    const Image a = load_image(served, "served"), b = load_image(cli_png, "cli");
    ASSERT_EQ(a.width, 32);
    EXPECT_EQ(a.data, b.data) << "picture " << i << " differs from dmx generate's";
    EXPECT_EQ(read_image_parameters(cli_png), params);
  }
  // The API wiki's own example body (github.com/AUTOMATIC1111/stable-diffusion-webui/wiki/API), as it is.
  const json wiki = post(c, "/sdapi/v1/txt2img", {{"prompt", "maltese puppy"}, {"steps", 5}}, &st);
  ASSERT_EQ(st, 200) << wiki.dump();
  EXPECT_EQ(wiki["images"].size(), 1u);
  EXPECT_EQ(json::parse(wiki["info"].get<std::string>())["cfg_scale"], 7.0);  // A1111's default
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, Img2ImgAndInpaintWithAMask) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json t = post(c, "/sdapi/v1/txt2img", a1111_txt2img(7), &st);
  ASSERT_EQ(st, 200) << t.dump();
  const std::string init = t["images"][0];
  json req = {{"init_images", {"data:image/png;base64," + init}},
              {"prompt", "grinning face"},
              {"steps", 4},
              {"denoising_strength", 0.5},
              {"cfg_scale", 3},
              {"seed", 3},
              {"sampler_name", "DDIM"}};
  const json r = post(c, "/sdapi/v1/img2img", req, &st);
  ASSERT_EQ(st, 200) << r.dump();
  const std::string png = serve::base64_decode(r["images"][0].get<std::string>(), "images");
  const std::string dir = temp_subdir("serve-img2img");
  const std::string path = write_bytes(dir, "img2img.png", png);
  EXPECT_EQ(load_image(path, "x").width, 32);
  EXPECT_NE(read_image_parameters(path).find("Denoising strength: 0.5"), std::string::npos)
      << read_image_parameters(path);
  EXPECT_EQ(json::parse(r["info"].get<std::string>())["denoising_strength"], 0.5);
  // The same run through `dmx generate --init-image`: the same picture.
  const std::string init_path = write_bytes(dir, "init.png", serve::base64_decode(init, "init"));
  const CliRun g = dmx_run({"generate",      "--model",          emoji_model(), "--prompt",
                            "grinning face", "--steps",          "4",           "--strength",
                            "0.5",           "--guidance-scale", "3",           "--scheduler",
                            "ddim",          "--seed",           "3",           "--init-image",
                            init_path,       "--threads",        "1",           "--quiet",
                            "--output",      dir + "/cli.png"});
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(path, "a").data, load_image(dir + "/cli.png", "b").data);
  // Inpainting: a white (repaint) square in a black mask.
  Image mask{32, 32, 1, std::vector<uint8_t>(32 * 32, 0)};
  for (int y = 8; y < 24; ++y)
    for (int x = 8; x < 24; ++x) mask.data[y * 32 + x] = 255;
  const auto mask_png = encode_png(mask);
  req["mask"] = serve::base64_encode(std::string(mask_png.begin(), mask_png.end()));
  const json m = post(c, "/sdapi/v1/img2img", req, &st);
  ASSERT_EQ(st, 200) << m.dump();
  // A picture that is no PNG/JPEG is refused by the CLI's loader, naming the field.
  req["init_images"] = {serve::base64_encode("GIF89a not a picture")};
  req.erase("mask");
  const json bad = post(c, "/sdapi/v1/img2img", req, &st);
  EXPECT_EQ(st, 400) << bad.dump();
  EXPECT_EQ(bad["field"], "init_images") << bad.dump();
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, ControlNetUnitsAreDmxGeneratesControlNet) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json t = post(c, "/sdapi/v1/txt2img", a1111_txt2img(11), &st);
  ASSERT_EQ(st, 200) << t.dump();
  const std::string dir = temp_subdir("serve-controlnet");
  const std::string map = write_bytes(dir, "map.png", serve::base64_decode(t["images"][0].get<std::string>(), "x"));
  json req = a1111_txt2img(4);
  json unit = {
      {"module", "canny"},   {"model", "emoji-controlnet-canny"}, {"weight", 0.8},        {"guidance_start", 0.0},
      {"guidance_end", 1.0}, {"image", t["images"][0]},           {"pixel_perfect", true}};
  req["alwayson_scripts"] = {{"controlnet", {{"args", {unit}}}}};
  const json r = post(c, "/sdapi/v1/txt2img", req, &st);
  ASSERT_EQ(st, 200) << r.dump();
  EXPECT_EQ(json::parse(r["info"].get<std::string>())["ignored_fields"],
            json::array({"alwayson_scripts.controlnet.args.pixel_perfect"}));
  const std::string served =
      write_bytes(dir, "served.png", serve::base64_decode(r["images"][0].get<std::string>(), "x"));
  const CliRun g = dmx_run({"generate",
                            "--model",
                            emoji_model(),
                            "--prompt",
                            "grinning face",
                            "--steps",
                            "2",
                            "--width",
                            "32",
                            "--height",
                            "32",
                            "--guidance-scale",
                            "3",
                            "--scheduler",
                            "ddim",
                            "--seed",
                            "4",
                            "--controlnet",
                            models_dir() + "/emoji-controlnet-canny",
                            "--control-image",
                            map,
                            "--control-preprocess",
                            "canny",
                            "--control-scale",
                            "0.8",
                            "--control-start",
                            "0",
                            "--control-end",
                            "1",
                            "--threads",
                            "1",
                            "--quiet",
                            "--output",
                            dir + "/cli.png"});
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(served, "a").data, load_image(dir + "/cli.png", "b").data);
  // Only the server's ControlNets, only the preprocessors dmx has.
  unit["model"] = "../emoji-controlnet-canny";
  req["alwayson_scripts"]["controlnet"]["args"] = {unit};
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", req, &st)["field"], "alwayson_scripts.controlnet.args.model");
  EXPECT_EQ(st, 400);
  unit["model"] = "emoji-controlnet-canny";
  unit["module"] = "depth_midas";
  req["alwayson_scripts"]["controlnet"]["args"] = {unit};
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", req, &st)["field"], "alwayson_scripts.controlnet.args.module");
  EXPECT_EQ(st, 400);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, ModelsOptionsSwitchSamplersLorasOpenapi) {
  // Two names for the emoji model: a switch between them loads, a request for the loaded one does not.
  const std::string dir = temp_subdir("serve-models");
  fs::create_directory_symlink(emoji_model(), dir + "/emoji");
  fs::create_directory_symlink(emoji_model(), dir + "/emoji-b");
  fs::copy_file(models_dir() + "/emoji-lora-twitter.safetensors", dir + "/twitter.safetensors");
  ServerProcess s({"--models", dir, "--model", "emoji-b"});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json models = get(c, "/sdapi/v1/sd-models", &st);
  ASSERT_EQ(st, 200);
  ASSERT_EQ(models.size(), 2u) << models.dump();
  EXPECT_EQ(models[0]["model_name"], "emoji");
  EXPECT_EQ(models[0]["title"], "emoji [" + models[0]["hash"].get<std::string>() + "]");
  EXPECT_EQ(get(c, "/sdapi/v1/options", &st)["sd_model_checkpoint"], models[1]["title"]);
  json r = post(c, "/sdapi/v1/options", {{"sd_model_checkpoint", "emoji"}}, &st);
  ASSERT_EQ(st, 200) << r.dump();
  EXPECT_GT(r["load_seconds"].get<double>(), 0.0);
  std::printf("[measure] model switch: %.3f s\n", r["load_seconds"].get<double>());
  EXPECT_EQ(get(c, "/sdapi/v1/options", &st)["sd_model_checkpoint"], models[0]["title"]);
  r = post(c, "/sdapi/v1/options", {{"sd_model_checkpoint", models[0]["title"]}, {"samples_format", "jpg"}}, &st);
  ASSERT_EQ(st, 200) << r.dump();
  EXPECT_EQ(r["load_seconds"], 0.0);  // already loaded: not reloaded
  EXPECT_EQ(r["ignored_fields"], json::array({"samples_format"}));
  // A generation on the loaded model does not reload it either.
  const json g = post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st);
  ASSERT_EQ(st, 200) << g.dump();
  EXPECT_EQ(json::parse(g["info"].get<std::string>())["load_seconds"], 0.0);
  // Names only from the server's list: no paths.
  for (const std::string& bad : std::vector<std::string>{"../emoji", emoji_model(), "nope"}) {
    r = post(c, "/sdapi/v1/options", {{"sd_model_checkpoint", bad}}, &st);
    EXPECT_EQ(st, 400) << bad;
    EXPECT_EQ(r["field"], "sd_model_checkpoint");
  }
  const json samplers = get(c, "/sdapi/v1/samplers", &st);
  ASSERT_EQ(st, 200);
  std::vector<std::string> names;
  for (const auto& x : samplers) names.push_back(x["name"]);
  for (const char* want : {"Euler a", "DDIM", "DPM++ 2M Karras"})
    EXPECT_NE(std::find(names.begin(), names.end(), want), names.end()) << want;
  const json loras = get(c, "/sdapi/v1/loras", &st);
  ASSERT_EQ(st, 200);
  ASSERT_EQ(loras.size(), 1u) << loras.dump();
  EXPECT_EQ(loras[0]["name"], "twitter");
  // A LoRA by its listed name in the prompt, as A1111's <lora:NAME:WEIGHT>.
  json req = a1111_txt2img(1);
  req["prompt"] = "grinning face <lora:twitter:1>";
  const json lr = post(c, "/sdapi/v1/txt2img", req, &st);
  EXPECT_EQ(st, 200) << lr.dump();
  req["prompt"] = "grinning face <lora:../../etc/passwd:1>";
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", req, &st)["field"], "prompt");
  EXPECT_EQ(st, 400);
  // The OpenAPI document lists every endpoint, and every GET it lists answers.
  const json api = get(c, "/openapi.json", &st);
  ASSERT_EQ(st, 200);
  for (const char* p : {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt",
                        "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/samplers", "/sdapi/v1/loras"})
    EXPECT_TRUE(api["paths"].contains(p)) << p;
  EXPECT_TRUE(
      api["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
          .contains("cfg_scale"));
  for (auto it = api["paths"].begin(); it != api["paths"].end(); ++it)
    if (it.value().contains("get") && it.key().find('(') == std::string::npos) {
      auto res = c.Get(it.key().c_str());
      ASSERT_TRUE(res) << it.key();
      EXPECT_EQ(res->status, 200) << it.key();
    }
  auto page = c.Get("/");
  ASSERT_TRUE(page);
  EXPECT_NE(page->body.find("<script src=\"/web/app.js\">"), std::string::npos);
  EXPECT_EQ(c.Get("/web/app.js")->status, 200);
  EXPECT_NE(c.Get("/web/../CMakeLists.txt")->status, 200);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, ProgressPreviewAndInterrupt) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  json idle = get(c, "/sdapi/v1/progress", &st);
  ASSERT_EQ(st, 200);
  EXPECT_EQ(idle["progress"], 0.0);
  EXPECT_TRUE(idle["current_image"].is_null());
  Background job(s.port(), a1111_txt2img(5, 900));
  json p = wait_running(c);
  ASSERT_GT(p["progress"].get<double>(), 0.0) << p.dump();
  // The preview comes with the next step after it is asked for.
  double worst_ms = 0, total_ms = 0;
  int polls = 0;
  json with_image;
  for (int i = 0; i < 400 && (with_image.is_null() || polls < 50); ++i) {
    const auto t0 = Clock::now();
    p = get(c, "/sdapi/v1/progress", &st);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    worst_ms = std::max(worst_ms, ms);
    total_ms += ms;
    ++polls;
    ASSERT_EQ(st, 200);
    if (p["current_image"].is_string() && with_image.is_null()) with_image = p;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::printf("[measure] /progress latency during a job: mean %.2f ms, max %.2f ms (%d polls)\n", total_ms / polls,
              worst_ms, polls);
  ASSERT_FALSE(with_image.is_null()) << p.dump();
  EXPECT_TRUE(is_png(serve::base64_decode(with_image["current_image"].get<std::string>(), "current_image")));
  EXPECT_EQ(with_image["state"]["sampling_steps"], 900);
  EXPECT_GT(with_image["eta_relative"].get<double>(), 0.0);
  EXPECT_TRUE(get(c, "/sdapi/v1/progress?skip_current_image=true", &st)["current_image"].is_null());
  const auto t0 = Clock::now();
  post(c, "/sdapi/v1/interrupt", json::object(), &st);
  EXPECT_EQ(st, 200);
  job.t.join();
  const double stop_s = std::chrono::duration<double>(Clock::now() - t0).count();
  EXPECT_LT(stop_s, 5.0);
  ASSERT_EQ(job.status, 200) << job.body.dump();
  EXPECT_TRUE(json::parse(job.body["info"].get<std::string>())["interrupted"].get<bool>());
  EXPECT_EQ(job.body["images"].size(), 0u);
  // The server carries on.
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st)["images"].size(), 1u);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, BadRequestsNameTheField) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  auto r = c.Post("/sdapi/v1/txt2img", "{\"prompt\": ", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 400);
  EXPECT_NE(r->body.find("malformed JSON"), std::string::npos) << r->body;
  json req = a1111_txt2img(1);
  req["steps"] = 5000;
  json e = post(c, "/sdapi/v1/txt2img", req, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(e["field"], "steps");
  EXPECT_EQ(e["value"], 5000);
  EXPECT_NE(e["rule"].get<std::string>().find("[1, 1000]"), std::string::npos) << e.dump();
  req["steps"] = 2;
  req["width"] = 33;  // the pipeline's rule, after the model is known
  e = post(c, "/sdapi/v1/txt2img", req, &st);
  EXPECT_EQ(st, 400) << e.dump();
  EXPECT_EQ(e["field"], "width") << e.dump();
  // Bodies over the limit: 413 (32 MiB + 1).
  const std::string big(static_cast<size_t>(32 << 20) + 1, ' ');
  r = c.Post("/sdapi/v1/txt2img", big, "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 413);
  EXPECT_EQ(json::parse(r->body)["error"], "PayloadTooLarge");
  r = c.Get("/sdapi/v1/nothing");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_EQ(json::parse(r->body)["error"], "NotFound");
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, FullQueueAnswers503AtOnce) {
  ServerProcess s({"--max-queue", "1"});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  Background running(s.port(), a1111_txt2img(1, 900));
  ASSERT_GT(wait_running(c)["progress"].get<double>(), 0.0) << "the long job did not start";
  Background queued(s.port(), a1111_txt2img(2));
  int st = 0;
  for (int i = 0; i < 200; ++i) {  // until the second job waits in the queue
    if (get(c, "/sdapi/v1/progress", &st)["state"]["queue_size"] == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto t0 = Clock::now();
  const json full = post(c, "/sdapi/v1/txt2img", a1111_txt2img(3), &st);
  EXPECT_EQ(st, 503) << full.dump();
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 2.0);
  post(c, "/sdapi/v1/interrupt", json::object(), &st);
  running.t.join();
  queued.t.join();
  EXPECT_EQ(queued.status, 200);
  EXPECT_EQ(queued.body["images"].size(), 1u);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, TokenRequiredBeyondLoopback) {
  {  // another address without a token: refused at start-up, exit 2
    const CliRun r = dmx_run({"serve", "--host", "0.0.0.0", "--port", "0"});
    EXPECT_EQ(r.code, 2) << r.output;
    EXPECT_NE(r.output.find("--token is required"), std::string::npos) << r.output;
  }
  ServerProcess s({"--host", "0.0.0.0", "--token", "s3cret"});
  ASSERT_GT(s.port(), 0) << s.startup();
  EXPECT_NE(s.startup().find("Authorization: Bearer"), std::string::npos) << s.startup();
  auto c = client(s.port());
  int st = 0;
  get(c, "/sdapi/v1/sd-models", &st);
  EXPECT_EQ(st, 401);
  post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st);
  EXPECT_EQ(st, 401);
  c.set_bearer_token_auth("wrong");
  get(c, "/sdapi/v1/sd-models", &st);
  EXPECT_EQ(st, 401);
  c.set_bearer_token_auth("s3cret");
  get(c, "/sdapi/v1/sd-models", &st);
  EXPECT_EQ(st, 200);
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st)["images"].size(), 1u);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, SigtermStopsCleanlyMidJob) {
  const std::string tmp = temp_subdir("serve-sigterm-tmp");
  ServerProcess s({}, tmp);
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  Background job(s.port(), a1111_txt2img(1, 900));
  ASSERT_GT(wait_running(c)["progress"].get<double>(), 0.0) << "the long job did not start";
  const auto t0 = Clock::now();
  EXPECT_EQ(s.stop(), 0);
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - t0).count(), 10.0);
  job.t.join();
  ASSERT_EQ(job.status, 200) << "the running job's client gets its answer";
  EXPECT_TRUE(json::parse(job.body["info"].get<std::string>())["interrupted"].get<bool>());
  EXPECT_TRUE(fs::is_empty(tmp)) << "the server's temporary folder was left behind";
  EXPECT_NE(s.rest_of_output().find("stopped"), std::string::npos);
}

// 200+ mixed requests from 8 concurrent clients: good, malformed, oversized, interrupted, abandoned. The server stays
// up, every good request gets a valid PNG whose metadata matches it, and memory returns near its baseline. About 10 s
// on 2 cores: a Cli test, not a Slow one.
TEST(ServeCli, LoadOfMixedRequestsFrom8Clients) {
  ServerProcess s({"--max-queue", "64"});
  ASSERT_GT(s.port(), 0) << s.startup();
  {  // warm-up: one generation
    auto c = client(s.port());
    int st = 0;
    ASSERT_EQ(post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st)["images"].size(), 1u);
  }
  const double rss_before = s.rss_mib();
  {  // the throughput of good requests alone: 8 clients, 8 generations each
    const auto g0 = Clock::now();
    std::vector<std::thread> ts;
    std::atomic<int> ok{0};
    for (int k = 0; k < 8; ++k)
      ts.emplace_back([&, k] {
        auto c = client(s.port());
        int st = 0;
        for (int i = 0; i < 8; ++i)
          if (post(c, "/sdapi/v1/txt2img", a1111_txt2img(static_cast<uint64_t>(100 * k + i)), &st)["images"].size() ==
              1u)
            ++ok;
      });
    for (auto& t : ts) t.join();
    const double sec = std::chrono::duration<double>(Clock::now() - g0).count();
    std::printf("[measure] 64 good 2-step 32-px txt2img requests from 8 clients in %.2f s: %.0f requests/min\n", sec,
                64 * 60.0 / sec);
    EXPECT_EQ(ok.load(), 64);
  }
  std::atomic<int> good{0}, good_ok{0}, bad{0}, bad_ok{0}, big_ok{0}, other{0}, failures{0};
  const int kClients = 8, kPerClient = 26;
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int k = 0; k < kClients; ++k)
    clients.emplace_back([&, k] {
      auto c = client(s.port());
      for (int i = 0; i < kPerClient; ++i) {
        const int kind = (k * kPerClient + i) % 10;
        int st = 0;
        if (kind <= 5) {  // good
          const uint64_t seed = static_cast<uint64_t>(k * 1000 + i);
          const json r = post(c, "/sdapi/v1/txt2img", a1111_txt2img(seed), &st);
          ++good;
          if (st == 200 && r["images"].size() == 1u) {
            const std::string png = serve::base64_decode(r["images"][0].get<std::string>(), "images");
            const json info = json::parse(r["info"].get<std::string>());
            if (is_png(png) && info["seed"] == seed &&
                info["infotexts"][0].get<std::string>().find("Seed: " + std::to_string(seed) + ",") !=
                    std::string::npos)
              ++good_ok;
            else
              ++failures;
          } else {
            ++failures;
          }
        } else if (kind == 6) {  // malformed
          ++bad;
          auto r = c.Post("/sdapi/v1/txt2img", "{\"steps\": [", "application/json");
          if (r && r->status == 400) ++bad_ok;
        } else if (kind == 7) {  // out of range
          ++bad;
          json req = a1111_txt2img(1);
          req["cfg_scale"] = -3;
          if (post(c, "/sdapi/v1/txt2img", req, &st)["field"] == "cfg_scale" && st == 400) ++bad_ok;
        } else if (kind == 8) {  // oversized
          auto r = c.Post("/sdapi/v1/txt2img", std::string((32 << 20) + 16, 'x'), "application/json");
          if (r && r->status == 413) ++big_ok;
        } else {  // interrupt someone's job, and abandon a request (the client gives up after 50 ms)
          post(c, "/sdapi/v1/interrupt", json::object(), &st);
          httplib::Client quick("127.0.0.1", s.port());
          quick.set_read_timeout(0, 50000);
          quick.Post("/sdapi/v1/txt2img", a1111_txt2img(99).dump(), "application/json");
          ++other;
        }
      }
    });
  for (auto& t : clients) t.join();
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  // Drain: the abandoned jobs finish; then memory.
  auto c = client(s.port());
  int st = 0;
  for (int i = 0; i < 600; ++i) {
    const json p = get(c, "/sdapi/v1/progress", &st);
    if (st == 200 && p["state"]["job_count"] == 0 && p["state"]["queue_size"] == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double rss_after = s.rss_mib();
  std::printf(
      "[measure] %d requests from %d clients in %.1f s: %d good (%d valid PNGs; %.1f good requests/min, "
      "interrupts included), %d malformed/out-of-range 400, %d oversized 413, %d interrupt+abandon\n",
      kClients * kPerClient, kClients, seconds, good.load(), good_ok.load(), good.load() * 60.0 / seconds,
      bad_ok.load(), big_ok.load(), other.load());
  std::printf("[measure] RSS before %.1f MiB, after the queue drained %.1f MiB\n", rss_before, rss_after);
  // An interrupt can hit a good request's job: it then answers 200 with no image and interrupted = true; count those.
  EXPECT_EQ(good_ok.load() + failures.load(), good.load());
  EXPECT_GE(good_ok.load(), good.load() - other.load()) << "more good requests failed than interrupts were sent";
  EXPECT_EQ(bad_ok.load(), bad.load()) << "every malformed or out-of-range request gets 400";
  EXPECT_GE(big_ok.load(), 1);
  EXPECT_LT(rss_after, rss_before + 64.0) << "memory did not return near its baseline";
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st)["images"].size(), 1u);  // still up
  EXPECT_EQ(s.stop(), 0);
}
// ---- dmx's own endpoints (/dmx/v1) -------------------------------------------------------------------------------
namespace {
std::string b64_png(const Image& img) {
  const auto png = encode_png(img);
  return serve::base64_encode(std::string(png.begin(), png.end()));
}
Image square_mask(int size, int from, int to) {
  Image mask{size, size, 1, std::vector<uint8_t>(static_cast<size_t>(size) * size, 0)};
  for (int y = from; y < to; ++y)
    for (int x = from; x < to; ++x) mask.data[static_cast<size_t>(y) * size + x] = 255;
  return mask;
}
// A served picture written to dir/name, for the loaders and read_image_parameters.
std::string save_served(const std::string& dir, const std::string& name, const json& b64) {
  const std::string png = serve::base64_decode(b64.get<std::string>(), name);
  EXPECT_TRUE(is_png(png)) << name;
  return write_bytes(dir, name, png);
}
}  // namespace

TEST(ServeCli, DmxGenerateBlendedEditIsDmxGenerates) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json t = post(c, "/sdapi/v1/txt2img", a1111_txt2img(11), &st);
  ASSERT_EQ(st, 200) << t.dump();
  const std::string dir = temp_subdir("serve-dmx-blend");
  const std::string init = save_served(dir, "init.png", t["images"][0]);
  const std::string mask = dir + "/mask.png";
  save_png(mask, square_mask(32, 8, 24));
  // Every background option of blended editing: the picture `dmx generate` makes with the same flags.
  for (const std::string bg : {"latent", "pixel", "poisson"}) {
    const json req = {{"prompt", "smiling face with sunglasses"},
                      {"init_image", t["images"][0]},
                      {"mask", "data:image/png;base64," + b64_png(load_image(mask, "mask"))},
                      {"background", bg},
                      {"blend_start", 0.25},
                      {"strength", 0.75},
                      {"steps", 4},
                      {"guidance_scale", 3},
                      {"scheduler", "ddim"},
                      {"seed", 5},
                      {"a_future_field", 1}};
    const json r = post(c, "/dmx/v1/generate", req, &st);
    ASSERT_EQ(st, 200) << bg << ": " << r.dump();
    ASSERT_EQ(r["images"].size(), 1u);
    const json info = json::parse(r["info"].get<std::string>());
    EXPECT_EQ(info["seed"], 5);
    EXPECT_EQ(info["ignored_fields"], json::array({"a_future_field"}));
    EXPECT_EQ(info["interrupted"], false);
    const std::string served = save_served(dir, "served-" + bg + ".png", r["images"][0]);
    const std::string cli_png = dir + "/cli-" + bg + ".png";
    const CliRun g = dmx_run({"generate",
                              "--model",
                              emoji_model(),
                              "--prompt",
                              "smiling face with sunglasses",
                              "--init-image",
                              init,
                              "--mask",
                              mask,
                              "--background",
                              bg,
                              "--blend-start",
                              "0.25",
                              "--strength",
                              "0.75",
                              "--steps",
                              "4",
                              "--guidance-scale",
                              "3",
                              "--scheduler",
                              "ddim",
                              "--seed",
                              "5",
                              "--threads",
                              "1",
                              "--quiet",
                              "--output",
                              cli_png});
    ASSERT_EQ(g.code, 0) << g.output;
    EXPECT_EQ(load_image(served, "a").data, load_image(cli_png, "b").data) << "background " << bg;
    EXPECT_EQ(read_image_parameters(served), read_image_parameters(cli_png)) << bg;
    EXPECT_EQ(info["parameters"], read_image_parameters(cli_png)) << bg;
  }
  // The command line's rules between options hold too: a mask without a strength repaints from noise (strength 1,
  // diffusers' inpainting default), not from generate's 0.8.
  const json ns = post(c, "/dmx/v1/generate",
                       {{"prompt", "pizza"},
                        {"init_image", t["images"][0]},
                        {"mask", b64_png(load_image(mask, "m"))},
                        {"steps", 3},
                        {"guidance_scale", 3},
                        {"seed", 2}},
                       &st);
  ASSERT_EQ(st, 200) << ns.dump();
  const CliRun ng = dmx_run({"generate", "--model",      emoji_model(), "--prompt",
                             "pizza",    "--init-image", init,          "--mask",
                             mask,       "--steps",      "3",           "--guidance-scale",
                             "3",        "--seed",       "2",           "--threads",
                             "1",        "--quiet",      "--output",    dir + "/cli-nostrength.png"});
  ASSERT_EQ(ng.code, 0) << ng.output;
  EXPECT_EQ(load_image(save_served(dir, "nostrength.png", ns["images"][0]), "a").data,
            load_image(dir + "/cli-nostrength.png", "b").data);
  EXPECT_NE(json::parse(ns["info"].get<std::string>())["parameters"].get<std::string>().find("Denoising strength: 1"),
            std::string::npos);
  const json needs = post(c, "/dmx/v1/generate", {{"prompt", "x"}, {"background", "pixel"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(needs["field"], "background") << needs.dump();
  // A regional layout: a map whose colours carry texts, as `dmx generate --layout --region`.
  Image layout{32, 32, 3, std::vector<uint8_t>(32 * 32 * 3, 0)};
  for (int y = 0; y < 32; ++y)
    for (int x = 0; x < 16; ++x) layout.data[(static_cast<size_t>(y) * 32 + x) * 3] = 255;
  save_png(dir + "/layout.png", layout);
  const json lr = post(c, "/dmx/v1/generate",
                       {{"prompt", "two emoji"},
                        {"layout", b64_png(layout)},
                        {"region", {"#ff0000=pizza", "#000000=cat face"}},
                        {"layout_guidance_scale", 2},
                        {"steps", 3},
                        {"guidance_scale", 3},
                        {"seed", 6}},
                       &st);
  ASSERT_EQ(st, 200) << lr.dump();
  const CliRun lg = dmx_run({"generate",
                             "--model",
                             emoji_model(),
                             "--prompt",
                             "two emoji",
                             "--layout",
                             dir + "/layout.png",
                             "--region",
                             "#ff0000=pizza",
                             "--region",
                             "#000000=cat face",
                             "--layout-guidance-scale",
                             "2",
                             "--steps",
                             "3",
                             "--guidance-scale",
                             "3",
                             "--seed",
                             "6",
                             "--threads",
                             "1",
                             "--quiet",
                             "--output",
                             dir + "/cli-layout.png"});
  ASSERT_EQ(lg.code, 0) << lg.output;
  EXPECT_EQ(load_image(save_served(dir, "layout-served.png", lr["images"][0]), "a").data,
            load_image(dir + "/cli-layout.png", "b").data);
  // Refusals name the field, with the command line's rule.
  json bad = {{"prompt", "x"}, {"steps", 2}, {"background", "sepia"}};
  json r = post(c, "/dmx/v1/generate", bad, &st);
  EXPECT_EQ(st, 400) << r.dump();
  EXPECT_EQ(r["field"], "background") << r.dump();
  bad = {{"prompt", "x"}, {"steps", 5000}};
  r = post(c, "/dmx/v1/generate", bad, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(r["field"], "steps") << r.dump();
  EXPECT_EQ(r["value"], 5000) << r.dump();
  for (const char* file_field : {"output", "save_latents", "init_latents", "lora_dir", "from"}) {
    r = post(c, "/dmx/v1/generate", {{"prompt", "x"}, {file_field, "/etc/passwd"}}, &st);
    EXPECT_EQ(st, 400) << file_field;
    EXPECT_EQ(r["field"], file_field) << r.dump();
  }
  r = post(c, "/dmx/v1/generate", {{"prompt", "x"}, {"model", "../emoji"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(r["field"], "model") << r.dump();
  r = post(c, "/dmx/v1/generate", {{"prompt", "x"}, {"init_image", "not base64 !"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(r["field"], "init_image") << r.dump();
  r = post(c, "/dmx/v1/generate",
           {{"prompt", "x"}, {"steps", 2}, {"controlnet", {"nope"}}, {"control_image", {t["images"][0]}}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(r["field"], "controlnet") << r.dump();
  r = post(c, "/dmx/v1/generate", {{"prompt", "x"}, {"steps", "two"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(r["field"], "steps") << r.dump();
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, DmxDiffEditAndPromptToPromptAreTheCommands) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json t = post(c, "/sdapi/v1/txt2img", a1111_txt2img(21), &st);
  ASSERT_EQ(st, 200) << t.dump();
  const std::string dir = temp_subdir("serve-dmx-edit");
  const std::string picture = save_served(dir, "picture.png", t["images"][0]);
  // DiffEdit: the edited picture and its mask, as `dmx diffedit` writes them.
  const json d = post(c, "/dmx/v1/diffedit",
                      {{"image", t["images"][0]},
                       {"source_prompt", "grinning face"},
                       {"target_prompt", "smiling face with sunglasses"},
                       {"steps", 4},
                       {"num_maps", 2},
                       {"seed", 9}},
                      &st);
  ASSERT_EQ(st, 200) << d.dump();
  ASSERT_TRUE(d.contains("mask")) << d.dump();
  const CliRun g = dmx_run({"diffedit",
                            "--model",
                            emoji_model(),
                            "--image",
                            picture,
                            "--source-prompt",
                            "grinning face",
                            "--target-prompt",
                            "smiling face with sunglasses",
                            "--steps",
                            "4",
                            "--num-maps",
                            "2",
                            "--seed",
                            "9",
                            "--threads",
                            "1",
                            "--quiet",
                            "--output",
                            dir + "/cli-edit.png",
                            "--mask-output",
                            dir + "/cli-mask.png"});
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(save_served(dir, "edit.png", d["images"][0]), "a").data,
            load_image(dir + "/cli-edit.png", "b").data);
  EXPECT_EQ(load_image(save_served(dir, "mask.png", d["mask"]), "a").data, load_image(dir + "/cli-mask.png", "b").data);
  // Prompt-to-Prompt reweighting: the source, the edit and the attention maps of `dmx p2p`.
  const json p = post(c, "/dmx/v1/p2p",
                      {{"prompt", "grinning face"},
                       {"edit_prompt", "grinning face"},
                       {"mode", "reweight"},
                       {"reweight", {"grinning=2"}},
                       {"steps", 3},
                       {"width", 32},
                       {"height", 32},
                       {"seed", 4}},
                      &st);
  ASSERT_EQ(st, 200) << p.dump();
  ASSERT_EQ(p["images"].size(), 2u);
  ASSERT_TRUE(p.contains("attention_maps")) << p.dump();
  const CliRun q = dmx_run({"p2p",
                            "--model",
                            emoji_model(),
                            "--prompt",
                            "grinning face",
                            "--edit-prompt",
                            "grinning face",
                            "--mode",
                            "reweight",
                            "--reweight",
                            "grinning=2",
                            "--steps",
                            "3",
                            "--width",
                            "32",
                            "--height",
                            "32",
                            "--seed",
                            "4",
                            "--threads",
                            "1",
                            "--quiet",
                            "--output",
                            dir + "/p2p.png",
                            "--save-attention-maps",
                            dir + "/maps.png"});
  ASSERT_EQ(q.code, 0) << q.output;
  EXPECT_EQ(load_image(save_served(dir, "source.png", p["images"][0]), "a").data,
            load_image(dir + "/p2p-source.png", "b").data);
  EXPECT_EQ(load_image(save_served(dir, "edit2.png", p["images"][1]), "a").data,
            load_image(dir + "/p2p-edit.png", "b").data);
  EXPECT_EQ(load_image(save_served(dir, "maps2.png", p["attention_maps"]), "a").data,
            load_image(dir + "/maps.png", "b").data);
  // A real picture through null-text inversion: the reconstruction is measured.
  const json n = post(c, "/dmx/v1/p2p",
                      {{"prompt", "grinning face"},
                       {"edit_prompt", "grinning cat"},
                       {"image", t["images"][0]},
                       {"null_text_inversion", true},
                       {"null_text_inner_steps", 2},
                       {"steps", 3},
                       {"seed", 4}},
                      &st);
  ASSERT_EQ(st, 200) << n.dump();
  EXPECT_EQ(n["images"].size(), 2u);
  EXPECT_GT(json::parse(n["info"].get<std::string>())["reconstruction_psnr"].get<double>(), 5.0);
  // A rule of the command: null-text inversion needs a picture.
  const json bad = post(c, "/dmx/v1/p2p", {{"prompt", "a"}, {"edit_prompt", "b"}, {"null_text_inversion", true}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(bad["field"], "null_text_inversion") << bad.dump();
  // A rule the command checks when it runs (not its parser): still 400 naming the field.
  const json mode = post(c, "/dmx/v1/p2p", {{"prompt", "a"}, {"edit_prompt", "b"}, {"mode", "swap"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(mode["field"], "mode") << mode.dump();
  const json missing = post(c, "/dmx/v1/diffedit", {{"source_prompt", "a"}, {"target_prompt", "b"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(missing["field"], "image") << missing.dump();
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, DmxProgressPhasesAndInterrupt) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  int status = 0;
  json body;
  std::thread job([&] {
    auto c = client(s.port());
    body = post(c, "/dmx/v1/p2p",
                {{"prompt", "grinning face"}, {"edit_prompt", "grinning cat"}, {"steps", 400}, {"seed", 1}}, &status);
  });
  auto c = client(s.port());
  const json p = wait_running(c);
  EXPECT_GT(p["progress"].get<double>(), 0.0) << p.dump();
  EXPECT_EQ(p["state"]["job"], "dmx/p2p") << p.dump();
  EXPECT_NE(p["textinfo"].get<std::string>().find("/400"), std::string::npos) << p.dump();
  int st = 0;
  post(c, "/sdapi/v1/interrupt", json::object(), &st);
  EXPECT_EQ(st, 200);
  job.join();
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(json::parse(body["info"].get<std::string>())["interrupted"], true);
  EXPECT_TRUE(body["images"].empty());
  // The server carries on.
  EXPECT_EQ(post(c, "/sdapi/v1/txt2img", a1111_txt2img(1), &st)["images"].size(), 1u);
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeCli, DmxModelsListsAndCannyPreview) {
  ServerProcess s({});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json m = get(c, "/dmx/v1/models", &st);
  ASSERT_EQ(st, 200) << m.dump();
  EXPECT_EQ(m["current"], "emoji");
  bool emoji = false;
  for (const auto& x : m["models"]) emoji |= x["name"] == "emoji" && x["kind"] == "sd";
  EXPECT_TRUE(emoji) << m.dump();
  EXPECT_EQ(m["controlnets"], json::array({{{"name", "emoji-controlnet-canny"}}})) << m.dump();
  EXPECT_EQ(m["adapters"], json::array({{{"name", "emoji-adapter-canny"}}})) << m.dump();
  EXPECT_EQ(get(c, "/controlnet/model_list", &st)["model_list"], json::array({"emoji-controlnet-canny"}));
  // The Canny preview is the map a ControlNet run uses.
  const json t = post(c, "/sdapi/v1/txt2img", a1111_txt2img(3), &st);
  ASSERT_EQ(st, 200);
  const std::string dir = temp_subdir("serve-dmx-canny");
  const std::string picture = save_served(dir, "picture.png", t["images"][0]);
  const json e = post(c, "/dmx/v1/canny", {{"image", t["images"][0]}, {"canny_low", 50}, {"canny_high", 120}}, &st);
  ASSERT_EQ(st, 200) << e.dump();
  const Image served = load_image(save_served(dir, "edges.png", e["image"]), "edges");
  EXPECT_EQ(served.data, canny_edges(to_rgb(load_image(picture, "p")), 50, 120).data);
  const json bad = post(c, "/dmx/v1/canny", {{"image", t["images"][0]}, {"canny_low", -3}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(bad["field"], "canny_low") << bad.dump();
  const json no_pic = post(c, "/dmx/v1/canny", {{"image", serve::base64_encode("plain text")}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(no_pic["field"], "image") << no_pic.dump();
  // The OpenAPI document describes every endpoint, with the fields of its command.
  const json api = get(c, "/openapi.json", &st);
  for (const char* path : {"/dmx/v1/generate", "/dmx/v1/diffedit", "/dmx/v1/p2p", "/dmx/v1/upscale",
                           "/dmx/v1/variations", "/dmx/v1/canny", "/dmx/v1/models"})
    EXPECT_TRUE(api["paths"].contains(path)) << path;
  const json props =
      api["paths"]["/dmx/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"];
  for (const char* f : {"background", "blend_start", "mask", "region", "layout", "controlnet"})
    EXPECT_TRUE(props.contains(f)) << f;
  EXPECT_FALSE(props.contains("output"));
  EXPECT_FALSE(props.contains("save_latents"));
  EXPECT_EQ(s.stop(), 0);
}

TEST(ServeGolden, DmxUpscaleAndVariationsOnTheFixtureModels) {
  DMX_REQUIRE_FIXTURES();
  // A models folder with the emoji model, the tiny x4 upscaler and the tiny Stable unCLIP img2img pair.
  const std::string models = temp_subdir("serve-dmx-models");
  fs::create_directory_symlink(emoji_model(), models + "/emoji");
  fs::create_directory_symlink(fixtures_dir() + "/models/upscale_x4", models + "/upscaler");
  fs::create_directory_symlink(fixtures_dir() + "/models/unclip_img2img", models + "/variations");
  fs::create_directory_symlink(fixtures_dir() + "/models/unclip", models + "/unclip");
  ServerProcess s({"--models", models});
  ASSERT_GT(s.port(), 0) << s.startup();
  auto c = client(s.port());
  int st = 0;
  const json m = get(c, "/dmx/v1/models", &st);
  std::map<std::string, std::string> kinds;
  for (const auto& x : m["models"]) kinds[x["name"]] = x["kind"];
  EXPECT_EQ(kinds["upscaler"], "upscaler") << m.dump();
  EXPECT_EQ(kinds["variations"], "unclip-img2img") << m.dump();
  EXPECT_EQ(kinds["unclip"], "unclip") << m.dump();
  // The upscaler is not a txt2img model.
  for (const auto& x : get(c, "/sdapi/v1/sd-models", &st)) EXPECT_EQ(x["model_name"], "emoji");
  const std::string dir = temp_subdir("serve-dmx-up");
  const std::string low = fixtures_dir() + "/ref/upscale_x4/upscale_ddim_nl20.low.png";
  std::ifstream lf(low, std::ios::binary);
  const std::string low_bytes((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
  const json u = post(
      c, "/dmx/v1/upscale",
      {{"image", serve::base64_encode(low_bytes)}, {"prompt", "a cat"}, {"steps", 3}, {"noise_level", 30}, {"seed", 2}},
      &st);
  ASSERT_EQ(st, 200) << u.dump();
  const CliRun g =
      dmx_run({"upscale", "--model", models + "/upscaler", "--image", low, "--prompt", "a cat", "--steps", "3",
               "--noise-level", "30", "--seed", "2", "--threads", "1", "--quiet", "--output", dir + "/cli-up.png"});
  ASSERT_EQ(g.code, 0) << g.output;
  EXPECT_EQ(load_image(save_served(dir, "up.png", u["images"][0]), "a").data,
            load_image(dir + "/cli-up.png", "b").data);
  const json v = post(c, "/dmx/v1/variations",
                      {{"image", serve::base64_encode(low_bytes)}, {"steps", 2}, {"num_images", 2}, {"seed", 8}}, &st);
  ASSERT_EQ(st, 200) << v.dump();
  ASSERT_EQ(v["images"].size(), 2u);
  const CliRun w =
      dmx_run({"variations", "--model", models + "/variations", "--image", low, "--steps", "2", "--num-images", "2",
               "--seed", "8", "--threads", "1", "--quiet", "--output", dir + "/cli-var.png"});
  ASSERT_EQ(w.code, 0) << w.output;
  EXPECT_EQ(load_image(save_served(dir, "var1.png", v["images"][1]), "a").data,
            load_image(dir + "/cli-var-1.png", "b").data);
  // Stable unCLIP text to image (prior, then decoder): `dmx generate` on the unCLIP folder.
  const json un = post(c, "/dmx/v1/generate",
                       {{"model", "unclip"}, {"prompt", "a cat"}, {"steps", 2}, {"prior_steps", 2}, {"seed", 3}}, &st);
  ASSERT_EQ(st, 200) << un.dump();
  const CliRun ug =
      dmx_run({"generate", "--model", models + "/unclip", "--prompt", "a cat", "--steps", "2", "--prior-steps", "2",
               "--seed", "3", "--threads", "1", "--quiet", "--output", dir + "/cli-unclip.png"});
  ASSERT_EQ(ug.code, 0) << ug.output;
  EXPECT_EQ(load_image(save_served(dir, "unclip.png", un["images"][0]), "a").data,
            load_image(dir + "/cli-unclip.png", "b").data);
  // A model of another kind is refused, naming the field.
  const json bad = post(c, "/dmx/v1/upscale",
                        {{"model", "emoji"}, {"image", serve::base64_encode(low_bytes)}, {"prompt", "x"}}, &st);
  EXPECT_EQ(st, 400);
  EXPECT_EQ(bad["field"], "model") << bad.dump();
  EXPECT_EQ(s.stop(), 0);
}
}  // namespace dmx::test
