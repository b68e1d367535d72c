// AUTOMATIC1111's web API bodies (modules/api/models.py: StableDiffusionTxt2ImgProcessingAPI,
// StableDiffusionImg2ImgProcessingAPI, TextToImageResponse, ProgressResponse, ...) mapped onto dmx's generate
// options. A request's fields become the `dmx generate` flags of the CLI's option table and go through its parser,
// so the server checks exactly what the CLI checks (ranges, types, names) and a refusal names the A1111 field.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dmx/dmx.h"
#include "dmx/error.h"
#include "dmx/session.h"

namespace dmx::serve {

// A refused request: HTTP status, the A1111 field, the rule and the value received.
struct RequestError : InvalidArgument {
  RequestError(int status, std::string field, std::string rule, nlohmann::json value);
  int status;
  std::string field, rule;
  nlohmann::json value;
  nlohmann::json body() const;  // {"error", "field", "rule", "value", "detail"}
};

// The JSON error body of any dmx error (InvalidArgument and the like): the field is the A1111 field whose CLI flag
// the message names ("--steps must be in [1, 1000], got 5000" -> "steps"), else "".
nlohmann::json error_body(const std::string& kind, const std::string& message);
std::string field_of_message(const std::string& message);
// Where `message` first names the whole flag `--name` (not a longer flag starting with it); npos when it does not.
size_t find_flag(const std::string& message, const std::string& name);

// A model the server offers (list_models of --models), with its A1111 title "name [hash]".
struct ServedModel {
  std::string name, path, hash, title;
};
// The model a request names (A1111 title, name, or name.safetensors-less title); RequestError 400 naming `field`.
const ServedModel& find_model(const std::vector<ServedModel>& models, const std::string& name,
                              const std::string& field);

// Files a request brings (base64 pictures) are written here before the CLI's loaders read them.
struct Uploads {
  std::string dir;  // a private folder of the server's temporary folder
  int count = 0;
  std::string save(const std::string& base64, const std::string& field, int64_t max_bytes);  // -> path
};

// One generation job decoded from a txt2img / img2img body: one GenerateOptions per picture (A1111's seeds: seed + i
// for the i-th of batch_size * n_iter), what was not honoured, and the parameters echoed back.
struct GenerationRequest {
  std::vector<GenerateOptions> runs;
  std::vector<std::string> ignored_fields;  // fields given that dmx does not honour (reported in info)
  nlohmann::json parameters;                // the request with A1111's defaults filled in
  std::string model_name;                   // the served model this request runs on
  int batch_size = 1, n_iter = 1;
  bool send_images = true;
};
struct RequestContext {
  const std::vector<ServedModel>* models = nullptr;
  const ServedModel* current = nullptr;  // the loaded model (override_settings may name another)
  std::string models_dir;                // LoRA and hypernetwork tags of prompts resolve here
  int threads = 0;
  Uploads* uploads = nullptr;
  int64_t max_image_bytes = 0;
};
GenerationRequest parse_generation_request(const nlohmann::json& body, bool img2img, const RequestContext& ctx);

// A1111's Processed.js() text (the response's "info"), with dmx's additions (ignored_fields, interrupted).
nlohmann::json info_json(const GenerationRequest& r, const std::vector<SessionResult>& results, bool interrupted,
                         double load_seconds);

// base64 (RFC 4648, with or without a "data:...;base64," prefix); RequestError 400 naming `field` when malformed.
std::string base64_decode(const std::string& in, const std::string& field);
std::string base64_encode(const std::string& bytes);

// Every A1111 request field the server reads, for the OpenAPI document: name, JSON type, description.
struct FieldDoc {
  const char* name;
  const char* type;  // "string" | "integer" | "number" | "boolean" | "array" | "object"
  const char* description;
};
const std::vector<FieldDoc>& txt2img_fields();
const std::vector<FieldDoc>& img2img_only_fields();
}  // namespace dmx::serve
