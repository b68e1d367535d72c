// `dmx serve` (serve/server.h, docs/serve.md).
#include "serve/server.h"

#include <httplib.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "dmx/session.h"
#include "serve/a1111.h"
#include "serve/dmx_api.h"
#include "serve/web_assets.h"

namespace dmx::serve {
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

bool is_loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

std::string default_models_dir() {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) candidates = {exe.parent_path().parent_path() / "models", exe.parent_path() / "models"};
  candidates.push_back(fs::current_path(ec) / "models");
  for (const auto& c : candidates)
    if (fs::is_directory(c, ec) && !list_models(c.string()).empty()) return fs::canonical(c, ec).string();
  return "";
}

namespace {

// A job's uploaded pictures: a private folder removed with the job.
struct JobFiles {
  Uploads uploads;
  explicit JobFiles(const std::string& root) {
    std::string tmpl = root + "/job-XXXXXX";
    if (!::mkdtemp(tmpl.data())) throw IoError("cannot create a temporary folder in " + root);
    uploads.dir = tmpl;
  }
  ~JobFiles() {
    std::error_code ec;
    std::filesystem::remove_all(uploads.dir, ec);
  }
};

struct Job {
  enum class Kind { kGenerate, kLoad, kDmx } kind = Kind::kGenerate;
  GenerationRequest request;
  DmxRequest dmx;                      // kDmx
  const ServedModel* model = nullptr;  // kLoad
  std::unique_ptr<JobFiles> files;
  std::atomic<bool> cancel{false};
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  int status = 200;
  json response;
  void finish(int s, json r) {
    std::lock_guard<std::mutex> lk(m);
    status = s;
    response = std::move(r);
    done = true;
    cv.notify_all();
  }
};

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(body.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

// The request's JSON body; false (after answering 400) when it is not JSON.
bool parse_body(const httplib::Request& req, httplib::Response& res, json* body) {
  try {
    *body = json::parse(req.body);
    return true;
  } catch (const json::exception& e) {
    send_json(res, 400,
              {{"error", "InvalidArgument"},
               {"field", ""},
               {"rule", "the body must be JSON"},
               {"detail", std::string("malformed JSON: ") + e.what()}});
    return false;
  }
}

// One route: what the OpenAPI document says about it, and its handler.
struct Route {
  std::string method;
  std::string path;
  std::string summary;
  std::string request;  // "" | "txt2img" | "img2img" | "options" | "canny" | "dmx:<endpoint>"
  std::function<void(const httplib::Request&, httplib::Response&)> handler;
};

class Server {
 public:
  explicit Server(const ServeOptions& o) : o_(o) {}
  int run();

 private:
  json openapi() const;
  void add_routes();
  void worker();
  void run_job(Job& job);
  void shutdown();
  std::shared_ptr<Job> submit(std::shared_ptr<Job> job, httplib::Response& res);
  void wait(Job& job, httplib::Response& res);
  void generation(const httplib::Request& req, httplib::Response& res, bool img2img);
  void dmx_job(const DmxEndpoint& e, const httplib::Request& req, httplib::Response& res);
  void run_dmx_job(Job& job);
  // A step of the running job (phase "steps", "invert", ...): shown by /progress; an interrupt stops it here.
  void on_step(Job& job, const std::string& phase, int done, int total);
  SessionHooks job_hooks(Job& job);  // the session's step and preview hooks of a job
  void serve_asset(const std::string& name, httplib::Response& res) const;
  json progress_json(bool want_image);

  ServeOptions o_;
  std::string models_dir_, temp_root_;
  std::vector<ServedModel> models_;
  ServedLists lists_;  // models_ and the other models of --models, for /dmx/v1
  Session session_;    // the worker's
  std::vector<Route> routes_;
  httplib::Server http_;
  std::thread worker_;

  std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::shared_ptr<Job> running_;
  const ServedModel* current_ = nullptr;
  bool stopping_ = false;
  int job_no_ = 0, job_count_ = 0, step_ = 0, steps_ = 0;
  Clock::time_point job_start_;
  std::string job_stamp_, preview_b64_, job_kind_, phase_;
  std::atomic<bool> want_preview_{false};
};

std::shared_ptr<Job> Server::submit(std::shared_ptr<Job> job, httplib::Response& res) {
  std::lock_guard<std::mutex> lk(mu_);
  if (stopping_) {
    send_json(res, 503, {{"error", "ServiceUnavailable"}, {"detail", "the server is shutting down"}});
    return nullptr;
  }
  const bool starts_now = !running_ && queue_.empty();
  if (!starts_now && static_cast<int>(queue_.size()) >= o_.max_queue) {
    send_json(res, 503,
              {{"error", "ServiceUnavailable"},
               {"detail", "the queue is full (" + std::to_string(queue_.size()) + " waiting, --max-queue " +
                              std::to_string(o_.max_queue) + "); try again later"}});
    return nullptr;
  }
  queue_.push_back(job);
  cv_.notify_all();
  return job;
}

void Server::wait(Job& job, httplib::Response& res) {
  std::unique_lock<std::mutex> lk(job.m);
  job.cv.wait(lk, [&] { return job.done; });
  send_json(res, job.status, job.response);
}

void Server::generation(const httplib::Request& req, httplib::Response& res, bool img2img) {
  json body;
  if (!parse_body(req, res, &body)) return;
  auto job = std::make_shared<Job>();
  try {
    job->files = std::make_unique<JobFiles>(temp_root_);
    RequestContext ctx;
    ctx.models = &models_;
    {
      std::lock_guard<std::mutex> lk(mu_);
      ctx.current = current_;
    }
    ctx.models_dir = models_dir_;
    ctx.threads = o_.threads;
    ctx.uploads = &job->files->uploads;
    ctx.max_image_bytes = o_.max_body_bytes;
    job->request = parse_generation_request(body, img2img, ctx);
  } catch (const RequestError& e) {
    send_json(res, e.status, e.body());
    return;
  } catch (const InvalidArgument& e) {
    send_json(res, 400, error_body("InvalidArgument", e.what()));
    return;
  }
  if (!submit(job, res)) return;
  wait(*job, res);
}

void Server::dmx_job(const DmxEndpoint& e, const httplib::Request& req, httplib::Response& res) {
  json body;
  if (!parse_body(req, res, &body)) return;
  auto job = std::make_shared<Job>();
  job->kind = Job::Kind::kDmx;
  try {
    job->files = std::make_unique<JobFiles>(temp_root_);
    std::string current;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (current_) current = current_->name;
    }
    job->dmx = parse_dmx_request(e, body, lists_, current, job->files->uploads, o_.max_body_bytes, o_.threads);
  } catch (const RequestError& ex) {
    send_json(res, ex.status, ex.body());
    return;
  } catch (const InvalidArgument& ex) {
    send_json(res, 400, error_body("InvalidArgument", ex.what()));
    return;
  }
  if (!submit(job, res)) return;
  wait(*job, res);
}

void Server::on_step(Job& job, const std::string& phase, int done, int total) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    step_ = done;
    steps_ = total;
    phase_ = phase;
  }
  if (job.cancel) throw Cancelled("interrupted");
}

SessionHooks Server::job_hooks(Job& job) {
  SessionHooks hooks;
  hooks.on_step = [this, &job](int done, int total) { on_step(job, "steps", done, total); };
  hooks.want_preview = [this] { return want_preview_.exchange(false); };
  hooks.on_preview = [this](const std::string& png) {
    const std::string b64 = base64_encode(png);
    std::lock_guard<std::mutex> lk(mu_);
    preview_b64_ = b64;
  };
  return hooks;
}

// A /dmx/v1 job: progress from the library's step observer (every phase: mask, inversion, steps, ...) and from the
// session's hooks (generate), interrupted at the next step.
void Server::run_dmx_job(Job& job) {
  const DmxRequest& r = job.dmx;
  const DmxEndpoint& e = *r.endpoint;
  const SessionHooks hooks = job_hooks(job);
  StepObserver observer(
      [this, &job](const std::string& phase, int done, int total) { on_step(job, phase, done, total); });
  const auto t0 = Clock::now();
  const std::string out_dir = job.files->uploads.dir;
  try {
    json body = run_dmx_request(r, session_, out_dir, hooks);
    if (!o_.quiet)
      std::fprintf(stderr, "dmx serve: /dmx/v1/%s on %s in %.2f s\n", e.name, r.model_name.c_str(),
                   std::chrono::duration<double>(Clock::now() - t0).count());
    if (r.model_kind == "sd" && e.command == cli::kGenerate) {
      std::lock_guard<std::mutex> lk(mu_);
      for (const auto& m : models_)
        if (m.path == session_.loaded_model()) current_ = &m;
    }
    job.finish(200, body);
  } catch (const Cancelled&) {
    json info = {{"endpoint", std::string("/dmx/v1/") + e.name},
                 {"model", r.model_name},
                 {"ignored_fields", r.ignored_fields},
                 {"interrupted", true}};
    job.finish(200, {{"images", json::array()}, {"parameters", r.parameters}, {"info", info.dump()}});
  } catch (const RequestError& ex) {
    job.finish(ex.status, ex.body());
  } catch (const InvalidArgument& ex) {
    json b = error_body("InvalidArgument", ex.what());
    b["field"] = dmx_field_of_message(e, ex.what());
    job.finish(400, b);
  } catch (const FormatError& ex) {
    json b = error_body("FormatError", ex.what());
    b["field"] = dmx_field_of_message(e, ex.what());
    job.finish(400, b);
  } catch (const Unsupported& ex) {
    json b = error_body("Unsupported", ex.what());
    b["field"] = dmx_field_of_message(e, ex.what());
    job.finish(400, b);
  } catch (const std::exception& ex) {
    job.finish(500, error_body("Error", ex.what()));
  }
}

json Server::progress_json(bool want_image) {
  std::lock_guard<std::mutex> lk(mu_);
  double progress = 0.0, eta = 0.0;
  if (running_ && job_count_ > 0) {
    progress = (job_no_ + (steps_ > 0 ? static_cast<double>(step_) / steps_ : 0.0)) / job_count_;
    const double elapsed = std::chrono::duration<double>(Clock::now() - job_start_).count();
    if (progress > 0) eta = elapsed / progress - elapsed;
  }
  if (want_image && running_) want_preview_ = true;
  json state = {{"skipped", false},
                {"interrupted", running_ ? running_->cancel.load() : false},
                {"job", running_ ? job_kind_ : ""},
                {"job_count", running_ ? job_count_ : 0},
                {"job_timestamp", job_stamp_},
                {"job_no", running_ ? job_no_ : 0},
                {"sampling_step", running_ ? step_ : 0},
                {"sampling_steps", running_ ? steps_ : 0},
                {"queue_size", static_cast<int>(queue_.size())}};
  return {{"progress", progress},
          {"eta_relative", eta},
          {"state", state},
          {"current_image", want_image && running_ && !preview_b64_.empty() ? json(preview_b64_) : json(nullptr)},
          {"textinfo", running_ ? json((phase_.empty() || phase_ == "steps" ? std::string("step") : phase_) + " " +
                                       std::to_string(step_) + "/" + std::to_string(steps_))
                                : json(nullptr)}};
}

void Server::run_job(Job& job) {
  if (job.kind == Job::Kind::kDmx) {
    run_dmx_job(job);
    return;
  }
  if (job.kind == Job::Kind::kLoad) {
    try {
      GenerateOptions g;
      g.model = job.model->path;
      g.threads = o_.threads;
      const double s = session_.load(g);
      if (!o_.quiet)
        std::fprintf(stderr, "dmx serve: model %s %s in %.3f s\n", job.model->name.c_str(),
                     s > 0 ? "loaded" : "already loaded", s);
      {
        std::lock_guard<std::mutex> lk(mu_);
        current_ = job.model;
      }
      job.finish(200, {{"sd_model_checkpoint", job.model->title}, {"load_seconds", s}});
    } catch (const std::exception& e) {
      job.finish(500, error_body("Error", e.what()));
    }
    return;
  }
  const GenerationRequest& r = job.request;
  std::vector<SessionResult> results;
  double load_seconds = 0.0;
  bool interrupted = false;
  const SessionHooks hooks = job_hooks(job);
  const auto t0 = Clock::now();
  try {
    for (size_t i = 0; i < r.runs.size(); ++i) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        job_no_ = static_cast<int>(i);
        step_ = 0;
        steps_ = r.runs[i].steps;
      }
      SessionResult res = session_.generate(r.runs[i], hooks);
      load_seconds += res.load_seconds;
      if (res.load_seconds > 0 && !o_.quiet)
        std::fprintf(stderr, "dmx serve: model %s loaded in %.3f s\n", res.model_name.c_str(), res.load_seconds);
      results.push_back(std::move(res));
    }
  } catch (const Cancelled&) {
    interrupted = true;
  } catch (const RequestError& e) {
    job.finish(e.status, e.body());
    return;
  } catch (const InvalidArgument& e) {
    job.finish(400, error_body("InvalidArgument", e.what()));
    return;
  } catch (const FormatError& e) {
    job.finish(400, error_body("FormatError", e.what()));
    return;
  } catch (const Unsupported& e) {
    job.finish(400, error_body("Unsupported", e.what()));
    return;
  } catch (const std::exception& e) {
    job.finish(500, error_body("Error", e.what()));
    return;
  }
  json images = json::array();
  if (r.send_images)
    for (const auto& res : results) images.push_back(base64_encode(res.pngs.front()));
  if (!o_.quiet)
    std::fprintf(stderr, "dmx serve: %zu picture(s) of %zu%s in %.2f s\n", results.size(), r.runs.size(),
                 interrupted ? " (interrupted)" : "", std::chrono::duration<double>(Clock::now() - t0).count());
  job.finish(200, {{"images", images},
                   {"parameters", r.parameters},
                   {"info", info_json(r, results, interrupted, load_seconds).dump()}});
}

void Server::worker() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_ || queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
      running_ = job;
      job_no_ = 0;
      job_count_ = job->kind == Job::Kind::kGenerate ? static_cast<int>(job->request.runs.size()) : 1;
      job_kind_ = job->kind == Job::Kind::kDmx    ? std::string("dmx/") + job->dmx.endpoint->name
                  : job->kind == Job::Kind::kLoad ? std::string("load")
                  : job->request.runs.empty() || job->request.runs[0].init_image.empty() ? std::string("txt2img")
                                                                                         : std::string("img2img");
      phase_.clear();
      step_ = 0;
      steps_ = job->kind == Job::Kind::kDmx ? job->dmx.steps : 0;
      job_start_ = Clock::now();
      preview_b64_.clear();
      char stamp[32];
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      gmtime_r(&now, &tm);
      std::strftime(stamp, sizeof stamp, "%Y%m%d%H%M%S", &tm);
      job_stamp_ = stamp;
    }
    run_job(*job);
    job->files.reset();  // the uploads go as soon as the job is done
    std::lock_guard<std::mutex> lk(mu_);
    running_.reset();
  }
}

void Server::shutdown() {
  std::deque<std::shared_ptr<Job>> waiting;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    if (running_) running_->cancel = true;
    waiting.swap(queue_);
    cv_.notify_all();
  }
  for (auto& j : waiting) j->finish(503, {{"error", "ServiceUnavailable"}, {"detail", "the server is shutting down"}});
  if (worker_.joinable()) worker_.join();
  http_.stop();
}

json Server::openapi() const {
  json paths = json::object();
  auto schema_of = [](const std::vector<FieldDoc>& a, const std::vector<FieldDoc>& b) {
    json props = json::object();
    for (const auto* list : {&a, &b})
      for (const auto& f : *list) props[f.name] = {{"type", f.type}, {"description", f.description}};
    return json{{"type", "object"}, {"properties", props}};
  };
  for (const auto& r : routes_) {
    std::string method = r.method;
    for (auto& c : method) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    json op = {{"summary", r.summary},
               {"responses",
                {{"200", {{"description", "OK"}}},
                 {"400", {{"description", "invalid request: {error, field, rule, value, detail}"}}},
                 {"401", {{"description", "missing or wrong bearer token (with --token)"}}}}}};
    const std::string kind = r.request;
    json schema;
    if (kind == "txt2img" || kind == "img2img") {
      schema = schema_of(txt2img_fields(), kind == "img2img" ? img2img_only_fields() : std::vector<FieldDoc>{});
      op["responses"]["413"] = {{"description", "body larger than the limit"}};
      op["responses"]["503"] = {{"description", "the queue is full"}};
    } else if (kind.rfind("dmx:", 0) == 0) {
      for (const auto& e : dmx_endpoints()) {
        if (kind != std::string("dmx:") + e.name) continue;
        json props = json::object();
        for (const auto& f : dmx_fields(e)) {
          const std::string k = f.kind;
          json p = {{"description", f.help}};
          if (k == "flag")
            p["type"] = "boolean";
          else if (k == "values" || k == "pictures" || k == "controlnets" || k == "adapters")
            p["type"] = "array";
          else
            p["type"] = "string";
          if (k == "value") p["description"] = f.help + " (a string or a number)";
          if (k == "picture" || k == "pictures") p["description"] = f.help + " (base64 PNG/JPEG)";
          props[f.field] = p;
        }
        schema = {{"type", "object"}, {"properties", props}};
      }
      op["responses"]["413"] = {{"description", "body larger than the limit"}};
      op["responses"]["503"] = {{"description", "the queue is full"}};
    } else if (kind == "canny") {
      json props = json::object();
      props["image"] = {{"type", "string"}, {"description", "the picture, base64 PNG/JPEG"}};
      props["control_preprocess"] = {{"type", "string"}, {"description", "canny (default) or none"}};
      props["canny_low"] = {{"type", "number"}, {"description", "Canny low threshold (default 100)"}};
      props["canny_high"] = {{"type", "number"}, {"description", "Canny high threshold (default 200)"}};
      schema = {{"type", "object"}, {"properties", props}};
    } else if (kind == "options") {
      json props = json::object();
      props["sd_model_checkpoint"] = {{"type", "string"}, {"description", "a model of /sdapi/v1/sd-models to load"}};
      schema = {{"type", "object"}, {"properties", props}};
    }
    if (!schema.is_null()) op["requestBody"]["content"]["application/json"]["schema"] = schema;
    paths[r.path][method] = op;
  }
  return {{"openapi", "3.0.2"},
          {"info", {{"title", "dmx serve (AUTOMATIC1111-compatible API)"}, {"version", version()}}},
          {"paths", paths}};
}

void Server::add_routes() {
  auto gen = [this](bool img2img) {
    return [this, img2img](const httplib::Request& q, httplib::Response& s) { generation(q, s, img2img); };
  };
  routes_ = {
      {"POST", "/sdapi/v1/txt2img", "text to image (A1111 StableDiffusionTxt2ImgProcessingAPI)", "txt2img", gen(false)},
      {"POST", "/sdapi/v1/img2img",
       "image to image, inpainting with a mask (A1111 StableDiffusionImg2ImgProcessingAPI)", "img2img", gen(true)},
      {"GET", "/sdapi/v1/progress", "progress of the running job, with a preview unless skip_current_image=true", "",
       [this](const httplib::Request& q, httplib::Response& s) {
         const std::string skip = q.get_param_value("skip_current_image");
         send_json(s, 200, progress_json(!(skip == "true" || skip == "1" || skip == "True")));
       }},
      {"POST", "/sdapi/v1/interrupt", "stop the running job (its response says interrupted)", "",
       [this](const httplib::Request&, httplib::Response& s) {
         std::lock_guard<std::mutex> lk(mu_);
         if (running_) running_->cancel = true;
         send_json(s, 200, json::object());
       }},
      {"GET", "/sdapi/v1/sd-models", "the models of --models", "",
       [this](const httplib::Request&, httplib::Response& s) {
         json out = json::array();
         for (const auto& m : models_)
           out.push_back({{"title", m.title},
                          {"model_name", m.name},
                          {"hash", m.hash},
                          {"sha256", nullptr},
                          {"filename", m.path},
                          {"config", nullptr}});
         send_json(s, 200, out);
       }},
      {"GET", "/sdapi/v1/options", "the settings: sd_model_checkpoint", "",
       [this](const httplib::Request&, httplib::Response& s) {
         std::lock_guard<std::mutex> lk(mu_);
         send_json(s, 200,
                   {{"sd_model_checkpoint", current_ ? current_->title : ""},
                    {"sd_checkpoint_hash", current_ ? current_->hash : ""},
                    {"CLIP_stop_at_last_layers", 1},
                    {"samples_format", "png"}});
       }},
      {"POST", "/sdapi/v1/options", "change settings: sd_model_checkpoint loads that model (timed)", "options",
       [this](const httplib::Request& q, httplib::Response& s) {
         json body;
         if (!parse_body(q, s, &body)) return;
         if (!body.is_object()) {
           send_json(s, 400, RequestError(400, "", "the body must be a JSON object", body.type_name()).body());
           return;
         }
         json ignored = json::array();
         const ServedModel* model = nullptr;
         try {
           for (auto it = body.begin(); it != body.end(); ++it) {
             if (it.key() != "sd_model_checkpoint") {
               ignored.push_back(it.key());
               continue;
             }
             if (!it->is_string()) throw RequestError(400, "sd_model_checkpoint", "must be a string", *it);
             model = &find_model(models_, it->get<std::string>(), "sd_model_checkpoint");
           }
         } catch (const RequestError& e) {
           send_json(s, e.status, e.body());
           return;
         }
         if (!model) {
           send_json(s, 200, {{"ignored_fields", ignored}});
           return;
         }
         auto job = std::make_shared<Job>();
         job->kind = Job::Kind::kLoad;
         job->model = model;
         if (!submit(job, s)) return;
         std::unique_lock<std::mutex> lk(job->m);
         job->cv.wait(lk, [&] { return job->done; });
         json r = job->response;
         r["ignored_fields"] = ignored;
         send_json(s, job->status, r);
       }},
      {"GET", "/sdapi/v1/samplers", "the samplers (A1111 labels; aliases: dmx's names)", "",
       [](const httplib::Request&, httplib::Response& s) {
         json out = json::array();
         for (const auto& x : samplers())
           out.push_back({{"name", x.label}, {"aliases", json::array({x.name})}, {"options", json::object()}});
         send_json(s, 200, out);
       }},
      {"GET", "/sdapi/v1/loras", "the LoRA files of --models (<lora:NAME:WEIGHT> in prompts)", "",
       [this](const httplib::Request&, httplib::Response& s) {
         json out = json::array();
         for (const auto& l : list_loras(models_dir_))
           out.push_back({{"name", l.name}, {"alias", l.name}, {"path", l.path}, {"metadata", json::object()}});
         send_json(s, 200, out);
       }},
      {"GET", "/controlnet/model_list", "the ControlNet folders of --models (sd-webui-controlnet's API)", "",
       [this](const httplib::Request&, httplib::Response& s) {
         json out = json::array();
         for (const auto& c : lists_.controlnets) out.push_back(c.name);
         send_json(s, 200, {{"model_list", out}});
       }},
      {"GET", "/controlnet/module_list", "the preprocessors dmx has (sd-webui-controlnet's API)", "",
       [](const httplib::Request&, httplib::Response& s) {
         send_json(s, 200, {{"module_list", json::array({"none", "canny"})}});
       }},
      {"GET", "/dmx/v1/models", "every model of --models by kind, the ControlNets, T2I-Adapters and LoRAs", "",
       [this](const httplib::Request&, httplib::Response& s) {
         json models = json::array(), cn = json::array(), ad = json::array(), lo = json::array();
         for (const auto& m : lists_.models) models.push_back({{"name", m.name}, {"title", m.title}, {"kind", "sd"}});
         for (const auto& p : lists_.pipelines)
           models.push_back({{"name", p.name}, {"title", p.name}, {"kind", p.kind}});
         for (const auto& c : lists_.controlnets) cn.push_back({{"name", c.name}});
         for (const auto& a : lists_.adapters) ad.push_back({{"name", a.name}});
         for (const auto& l : list_loras(models_dir_)) lo.push_back({{"name", l.name}});
         json eps = json::array();
         for (const auto& e : dmx_endpoints())
           eps.push_back(
               {{"path", std::string("/dmx/v1/") + e.name}, {"summary", e.summary}, {"model_kinds", e.model_kinds}});
         std::lock_guard<std::mutex> lk(mu_);
         send_json(s, 200,
                   {{"models", models},
                    {"controlnets", cn},
                    {"adapters", ad},
                    {"loras", lo},
                    {"current", current_ ? current_->name : ""},
                    {"endpoints", eps}});
       }},
      {"POST", "/dmx/v1/canny",
       "the control map a ControlNet run would use (Canny edges, or the picture itself with none): a preview", "canny",
       [this](const httplib::Request& q, httplib::Response& s) {
         json body;
         if (!parse_body(q, s, &body)) return;
         try {
           if (!body.is_object()) throw RequestError(400, "", "the body must be a JSON object", body.type_name());
           const auto img = body.find("image");
           if (img == body.end() || !img->is_string())
             throw RequestError(400, "image", "is required (a base64 picture)", nullptr);
           auto num = [&](const char* name, double def) {
             const auto it = body.find(name);
             if (it == body.end() || it->is_null()) return def;
             if (!it->is_number()) throw RequestError(400, name, "must be a number", *it);
             return it->get<double>();
           };
           const double low = num("canny_low", 100.0), high = num("canny_high", 200.0);
           std::string mode = "canny";
           if (const auto it = body.find("control_preprocess"); it != body.end() && !it->is_null()) {
             if (!it->is_string()) throw RequestError(400, "control_preprocess", "must be canny or none", *it);
             mode = it->get<std::string>();
           }
           JobFiles files(temp_root_);
           const std::string path = files.uploads.save(img->get<std::string>(), "image", o_.max_body_bytes);
           const std::string png = control_map_png(path, mode, low, high);
           send_json(s, 200, {{"image", base64_encode(png)}});
         } catch (const RequestError& e) {
           send_json(s, e.status, e.body());
         } catch (const InvalidArgument& e) {
           const std::string msg = e.what();
           std::string field = msg.find("--canny-low") == 0            ? "canny_low"
                               : msg.find("--canny-high") == 0         ? "canny_high"
                               : msg.find("--control-preprocess") == 0 ? "control_preprocess"
                                                                       : "image";
           json b = error_body("InvalidArgument", msg);
           b["field"] = field;
           send_json(s, 400, b);
         } catch (const FormatError& e) {
           json b = error_body("FormatError", e.what());
           b["field"] = "image";
           send_json(s, 400, b);
         }
       }},
      {"GET", "/openapi.json", "this document", "",
       [this](const httplib::Request&, httplib::Response& s) { send_json(s, 200, openapi()); }},
      {"GET", "/", "the web page", "",
       [this](const httplib::Request&, httplib::Response& s) { serve_asset("index.html", s); }},
      {"GET", "/web/(.+)", "the page's scripts and styles", "",
       [this](const httplib::Request& q, httplib::Response& s) { serve_asset(q.matches[1].str(), s); }},
  };
  for (const auto& e : dmx_endpoints()) {
    const DmxEndpoint* ep = &e;
    routes_.push_back({"POST", std::string("/dmx/v1/") + e.name, e.summary, std::string("dmx:") + e.name,
                       [this, ep](const httplib::Request& q, httplib::Response& s) { dmx_job(*ep, q, s); }});
  }
  for (const auto& r : routes_) {
    if (r.method == "GET")
      http_.Get(r.path, r.handler);
    else
      http_.Post(r.path, r.handler);
  }
}

// The page's files: from --web DIR when given (page development), else the copy embedded in the binary. Names are
// the embedded list's only, so no request reaches another file of DIR or anything outside it.
void Server::serve_asset(const std::string& name, httplib::Response& s) const {
  const WebAsset* a = find_web_asset(name);
  if (!a) {
    send_json(s, 404, {{"error", "NotFound"}, {"detail", "no such file"}});
    return;
  }
  if (!o_.web_dir.empty()) {
    std::ifstream f(o_.web_dir + "/" + a->name, std::ios::binary);
    if (f) {
      std::ostringstream b;
      b << f.rdbuf();
      s.set_content(b.str(), a->mime);
      return;
    }
  }
  s.set_content(std::string(a->data, a->size), a->mime);
}

int Server::run() {
  // SIGINT/SIGTERM/SIGHUP: blocked here, before any thread exists (the threads torch and OpenMP start inherit the
  // mask), and waited for by one thread, which shuts the server down cleanly.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGINT);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  models_dir_ = o_.models_dir.empty() ? default_models_dir() : o_.models_dir;
  DMX_CHECK_ARG(!models_dir_.empty(),
                "--models is required here: no bundled models/ folder was found beside the binary or in the current "
                "folder");
  DMX_CHECK_ARG(std::filesystem::is_directory(models_dir_), "--models must be a folder, got ", models_dir_);
  for (const auto& e : list_models(models_dir_)) {
    ServedModel m{e.name, e.path, model_hash(e.path), ""};
    m.title = m.hash.empty() ? m.name : m.name + " [" + m.hash + "]";
    models_.push_back(m);
  }
  DMX_CHECK_ARG(!models_.empty(), "--models ", models_dir_,
                " holds no Stable Diffusion model folder (a folder with model_index.json)");
  DMX_CHECK_ARG(o_.web_dir.empty() || std::filesystem::is_regular_file(o_.web_dir + "/index.html"), "--web ",
                o_.web_dir, " must be a folder holding index.html (the page's files, web/ in the repository)");
  lists_.models = models_;
  lists_.pipelines = list_pipelines(models_dir_);
  lists_.controlnets = list_controlnets(models_dir_);
  lists_.adapters = list_adapters(models_dir_);
  lists_.models_dir = models_dir_;
  DMX_CHECK_ARG(is_loopback(o_.host) || !o_.token.empty(), "--host ", o_.host,
                " is not a loopback address: --token is required to listen on it (every request then needs "
                "'Authorization: Bearer <token>')");
  DMX_CHECK_ARG(o_.max_queue >= 0, "--max-queue must be >= 0, got ", o_.max_queue);
  const ServedModel* first = &models_.front();
  if (!o_.model.empty()) {
    try {
      first = &find_model(models_, o_.model, "--model");
    } catch (const RequestError&) {
      std::string list;
      for (const auto& m : models_) list += (list.empty() ? "" : ", ") + m.name;
      throw InvalidArgument("--model must be a model of --models " + models_dir_ + " (" + list + "), got '" + o_.model +
                            "'");
    }
  }
  // Every uploaded picture goes to a private folder removed at exit.
  {
    const char* t = std::getenv("TMPDIR");
    std::string tmpl = std::string(t && *t ? t : "/tmp") + "/dmx-serve-XXXXXX";
    DMX_CHECK_ARG(::mkdtemp(tmpl.data()) != nullptr, "cannot create a temporary folder: ", tmpl);
    temp_root_ = tmpl;
  }
  struct RemoveRoot {
    std::string dir;
    ~RemoveRoot() {
      std::error_code ec;
      std::filesystem::remove_all(dir, ec);
    }
  } remove_root{temp_root_};

  GenerateOptions g;
  g.model = first->path;
  g.threads = o_.threads;
  const double load_s = session_.load(g);
  current_ = first;

  const int pool = o_.max_queue + 16;
  http_.new_task_queue = [pool] { return new httplib::ThreadPool(static_cast<size_t>(pool)); };
  http_.set_payload_max_length(static_cast<size_t>(o_.max_body_bytes));
  http_.set_read_timeout(30, 0);
  http_.set_write_timeout(30, 0);
  const std::string token = o_.token;
  http_.set_pre_routing_handler([token](const httplib::Request& q, httplib::Response& s) {
    if (token.empty() || q.path == "/" || q.path.rfind("/web/", 0) == 0)
      return httplib::Server::HandlerResponse::Unhandled;
    const std::string want = "Bearer " + token, got = q.get_header_value("Authorization");
    unsigned diff = want.size() == got.size() ? 0u : 1u;  // constant time in the token
    for (size_t i = 0; i < want.size(); ++i) diff |= static_cast<unsigned>(want[i] ^ (i < got.size() ? got[i] : 0));
    if (diff == 0) return httplib::Server::HandlerResponse::Unhandled;
    s.set_header("WWW-Authenticate", "Bearer");
    send_json(s, 401,
              {{"error", "Unauthorized"}, {"detail", "Not authenticated: send 'Authorization: Bearer <token>'"}});
    return httplib::Server::HandlerResponse::Handled;
  });
  http_.set_error_handler([](const httplib::Request&, httplib::Response& s) {
    if (!s.body.empty()) return;
    const std::string kind = s.status == 413 ? "PayloadTooLarge" : s.status == 404 ? "NotFound" : "Error";
    const std::string detail = s.status == 413   ? "the body is larger than the server's limit"
                               : s.status == 404 ? "no such endpoint (GET /openapi.json lists them)"
                                                 : "HTTP " + std::to_string(s.status);
    send_json(s, s.status, json{{"error", kind}, {"detail", detail}});
  });
  add_routes();

  int port = o_.port;
  if (port == 0) {
    port = http_.bind_to_any_port(o_.host);
    if (port <= 0) throw IoError("cannot listen on " + o_.host + " (any port)");
  } else if (!http_.bind_to_port(o_.host, port)) {
    throw IoError("cannot listen on " + o_.host + ":" + std::to_string(port) + " (in use, or not an address here)");
  }
  worker_ = std::thread([this] { worker(); });
  std::thread signals([this, sigs] {
    int sig = 0;
    sigwait(&sigs, &sig);
    std::fprintf(stderr, "dmx serve: signal %d: stopping (the running job is interrupted)\n", sig);
    shutdown();
  });
  std::printf("dmx serve: model %s loaded in %.3f s; %zu model(s) in %s\n", first->name.c_str(), load_s, models_.size(),
              models_dir_.c_str());
  std::printf("dmx serve: listening on http://%s:%d%s\n", o_.host.c_str(), port,
              o_.token.empty() ? "" : " (requests need 'Authorization: Bearer <token>')");
  std::fflush(stdout);
  const bool ok = http_.listen_after_bind();
  // listen returns after shutdown() (a signal) stopped it, or on a socket failure.
  bool stopped = false;
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopped = stopping_;
  }
  if (!ok || !stopped) pthread_kill(signals.native_handle(), SIGTERM);  // the signal thread shuts down
  signals.join();
  if (worker_.joinable()) worker_.join();
  std::printf("dmx serve: stopped\n");
  std::fflush(stdout);
  if (!ok) throw IoError("the server's socket failed");
  return 0;
}
}  // namespace

int run_server(const ServeOptions& o) {
  Server s(o);
  return s.run();
}
}  // namespace dmx::serve
