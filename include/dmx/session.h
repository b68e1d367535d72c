// dmx public API: a generation session that keeps its model in memory (what `dmx serve` runs on). The same
// checks, loading, pipelines and metadata as dmx::generate (include/dmx/dmx.h), but the model stays loaded between
// runs (a run on the model already loaded does not reload it; another model replaces it, timed), the pictures come
// back as PNG bytes instead of files, and a run reports each step and can be cancelled. Torch-free.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "dmx/dmx.h"
#include "dmx/error.h"

namespace dmx {

// Thrown by a hook to stop a run (an interrupt, a shutdown); the session stays usable.
class Cancelled : public Error {
 public:
  using Error::Error;
};

// Every long loop of the library (denoising steps, inversions, null-text optimisation, decoder fine-tuning, the
// prior) reports each step to the observer installed on the calling thread, whether or not its progress bar is
// drawn (while one is installed, none is). A server shows it as progress; a callback that throws (Cancelled)
// stops the run at that step, outputs unwritten. One per thread at a time; installing another replaces it until
// the newer one is gone.
class StepObserver {
 public:
  using Callback = std::function<void(const std::string& phase, int done, int total)>;
  explicit StepObserver(Callback cb);
  ~StepObserver();
  StepObserver(const StepObserver&) = delete;
  StepObserver& operator=(const StepObserver&) = delete;
  static bool active();  // one is installed on this thread
  // Called by the library's loops: phase "steps", "invert", "null-text", ...; done in [0, total].
  static void report(const std::string& phase, int done, int total);

 private:
  Callback cb_;
  StepObserver* previous_;
};

struct SessionHooks {
  // After each denoising step: `done` steps of `total` (total is the run's, img2img's strength included). May
  // throw Cancelled to stop the run.
  std::function<void(int done, int total)> on_step;
  // Asked after each step; when it returns true, on_preview receives the first picture's current latents
  // decoded by the model's VAE, as a PNG (a cheap preview at the tiny sizes of the emoji models).
  std::function<bool()> want_preview;
  std::function<void(const std::string& png)> on_preview;
};

struct SessionResult {
  std::vector<std::string> pngs;  // PNG bytes, each with the A1111 "parameters" text chunk
  std::string parameters;         // that text
  uint64_t seed = 0;
  int width = 0, height = 0;
  std::string model_name, model_hash;
  std::string scheduler;      // the sampler run (the model's own when GenerateOptions::scheduler was "")
  double seconds = 0.0;       // the whole run, a model load included
  double load_seconds = 0.0;  // the model load this run made (0 when the model was already loaded)
};

class Session {
 public:
  Session();
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // dmx::generate's run without files: GenerateOptions::output, save_latents, save_control_image and
  // upscale_model must be empty (InvalidArgument), Stable unCLIP folders are Unsupported. Not thread-safe: one
  // run at a time.
  SessionResult generate(const GenerateOptions& o, const SessionHooks& hooks = {});
  // Loads (or keeps) the model of `o` (model, config_dir, tokenizer_dir, dtype, device) without generating;
  // returns the seconds the load took (0 when it was loaded already).
  double load(const GenerateOptions& o);
  std::string loaded_model() const;  // the path of the model in memory, "" = none
  int loads() const;                 // how many times a model was loaded

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The samplers of the scheduler registry: the GenerateOptions::scheduler name and A1111's label ("Euler a").
struct SamplerInfo {
  std::string name, label;
};
std::vector<SamplerInfo> samplers();
// The sampler name of an A1111 label or of a name; "" when none matches.
std::string sampler_for_label(const std::string& label_or_name);

// What a models folder holds, for a server's lists (no file is loaded): diffusers Stable Diffusion folders
// (model_index.json) directly inside `dir`, and the LoRA files (.safetensors with LoRA tensor names) there.
struct ModelEntry {
  std::string name;  // the folder or file name, without extension for files
  std::string path;
};
std::vector<ModelEntry> list_models(const std::string& dir);
std::vector<ModelEntry> list_loras(const std::string& dir);
// ControlNet folders (config.json with _class_name ControlNetModel) directly inside `dir`.
std::vector<ModelEntry> list_controlnets(const std::string& dir);
// T2I-Adapter folders (config.json with _class_name T2IAdapter or MultiAdapter) directly inside `dir`.
std::vector<ModelEntry> list_adapters(const std::string& dir);
// The diffusers pipeline folders of `dir` that are not plain Stable Diffusion (list_models): "upscaler"
// (StableDiffusionUpscalePipeline, for dmx upscale) and "unclip" (Stable unCLIP; "unclip-img2img" makes variations).
struct PipelineEntry {
  std::string name, path, kind;  // kind: "upscaler" | "unclip" | "unclip-img2img"
};
std::vector<PipelineEntry> list_pipelines(const std::string& dir);

// The control map a ControlNet or T2I-Adapter run would use for this picture (what `dmx generate
// --save-control-image` writes), as PNG bytes: preprocess "canny" (cv2.Canny thresholds low/high, the
// generate flags' ranges) or "none" (the picture as RGB). InvalidArgument naming the option otherwise.
std::string control_map_png(const std::string& image_path, const std::string& preprocess, double low, double high);
}  // namespace dmx
