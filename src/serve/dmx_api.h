// dmx's own endpoints (POST /dmx/v1/<command>): what A1111's API has no call for (blended editing with every
// background, DiffEdit, Prompt-to-Prompt and null-text inversion, layouts, upscaling, variations). A request's
// fields are the options of `dmx <command>` (the CLI's option table, '-' written '_'), so the server accepts and
// checks exactly what the command line does; pictures come as base64, models as names of the server's lists, and
// no field can name a file on the server. docs/serve.md lists them.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/options.h"
#include "dmx/session.h"
#include "serve/a1111.h"

namespace dmx::serve {

struct DmxEndpoint {
  const char* name;  // the path's last part and the command: "generate", "diffedit", ...
  cli::Command command;
  const char* summary;
  const char* model_kinds;  // the served models its `model` field takes: "sd", "upscaler", "unclip-img2img", ...
};
const std::vector<DmxEndpoint>& dmx_endpoints();

// One request field: the option it carries and how its JSON value becomes the option's value.
struct DmxField {
  std::string field, flag;
  // "value" (string or number), "flag" (boolean), "values" (array of values), "picture" (base64),
  // "pictures" (array of base64), "model" (a served model name), "controlnets" / "adapters" (arrays of names)
  std::string kind;
  std::string help;
};
// The fields an endpoint accepts (its command's options, less those that name files on the server).
const std::vector<DmxField>& dmx_fields(const DmxEndpoint& e);  // e: an entry of dmx_endpoints()

// What the server offers (its --models folder).
struct ServedLists {
  std::vector<ServedModel> models;       // Stable Diffusion folders (kind "sd")
  std::vector<PipelineEntry> pipelines;  // upscalers and unCLIP folders
  std::vector<ModelEntry> controlnets, adapters;
  std::string models_dir;
};

struct DmxRequest {
  const DmxEndpoint* endpoint = nullptr;
  std::vector<std::string> args;  // the options as `dmx <command>` takes them (uploads and models as paths)
  std::string model_path, model_name, model_kind;
  std::vector<std::string> ignored_fields;  // fields of no option of the command (reported, as A1111 does)
  nlohmann::json parameters;                // the request as understood (pictures left out)
  int steps = 0;                            // for progress
  int threads = 0;
  std::string models_dir;  // where prompt tags find LoRA and hypernetwork files
};
// Decodes a body; RequestError (400 naming the field, 413 for a picture too large) when it is refused. The
// options are parsed once here by the command's parser, so range and name errors are found before queueing.
DmxRequest parse_dmx_request(const DmxEndpoint& e, const nlohmann::json& body, const ServedLists& lists,
                             const std::string& current_model, Uploads& uploads, int64_t max_image_bytes, int threads);

// Runs a request on the calling thread: `dmx generate` on a Stable Diffusion model through the session (the model
// stays loaded), every other command through its API function, its files written under out_dir and read back.
// Returns the response body: images (base64 PNGs), the command's other pictures, info (a JSON string).
nlohmann::json run_dmx_request(const DmxRequest& r, Session& session, const std::string& out_dir,
                               const SessionHooks& hooks);

// The field of a dmx endpoint that an error message names ("--blend-start must be ..." -> "blend_start").
std::string dmx_field_of_message(const DmxEndpoint& e, const std::string& message);
}  // namespace dmx::serve
