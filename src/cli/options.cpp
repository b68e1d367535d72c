// The option table of every dmx command (cli/options.h). Each option is one row: its name and, per meaning, the
// commands that use it, the value name, the help text and the fields it writes. A row written with num/text/flag
// reads its help default from the command's default-constructed options struct.
#include "cli/options.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <stdexcept>

#include "dmx/convert.h"
#include "dmx/data.h"
#include "dmx/diffedit.h"
#include "dmx/dmx.h"
#include "dmx/emoji_data.h"
#include "dmx/eval.h"
#include "dmx/p2p.h"
#include "dmx/restore.h"
#include "dmx/scenes.h"
#include "dmx/serve.h"
#include "dmx/train.h"
#include "dmx/unclip.h"
#include "dmx/upscale.h"

namespace dmx::cli {

const std::vector<CommandInfo>& commands() {
  static const std::vector<CommandInfo> list = {
      {kGenerate, "generate", 2},
      {kBench, "bench", 2},
      {kP2P, "p2p", 2},
      {kDiffEdit, "diffedit", 2},
      {kInit, "init", 2},
      {kConvert, "convert", 2},
      {kDataTokenizer, "data tokenizer", 3},
      {kDataEmoji, "data emoji", 3},
      {kDataScenes, "data scenes", 3},
      {kTrainLora, "train lora", 3},
      {kTrainFinetune, "train finetune", 3},
      {kTrainDreambooth, "train dreambooth", 3},
      {kTrainControlnet, "train controlnet", 3},
      {kTrainAdapter, "train adapter", 3},
      {kTrainVae, "train vae", 3},
      {kTrainHypernetwork, "train hypernetwork", 3},
      {kTrainClip, "train clip", 3},
      {kTrainPrior, "train prior", 3},
      {kTrainUnclip, "train unclip", 3},
      {kTrainSpatext, "train spatext", 3},
      {kTrainVqseg, "train vqseg", 3},
      {kTrainScene, "train scene", 3},
      {kTrainBench, "train bench", 3},
      {kTrainClassifier, "train classifier", 3},
      {kEval, "eval", 2},
      {kUpscale, "upscale", 2},
      {kVariations, "variations", 2},
      {kEmbed, "embed", 2},
      {kTrainPalette, "train palette", 3},
      {kRestore, "restore", 2},
      {kServe, "serve", 2},
  };
  return list;
}

const CommandInfo& command_info(Command c) {
  for (const auto& i : commands())
    if (i.id == c) return i;
  throw std::logic_error("cli: unknown command id");
}

const CommandInfo* find_command(const std::string& name) {
  for (const auto& i : commands())
    if (name == i.name) return &i;
  return nullptr;
}

std::string format_number(double v) {
  char buf[64];
  if (v == static_cast<double>(static_cast<long long>(v)) && v > -1e15 && v < 1e15) {  // whole: "200", not "2e2"
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v));
    return buf;
  }
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s = buf;  // "1e-08" -> "1e-8", "1e+30" -> "1e30"
  const size_t e = s.find('e');
  if (e != std::string::npos) {
    size_t d = e + 1;
    if (s[d] == '+')
      s.erase(d, 1);
    else if (s[d] == '-')
      ++d;
    while (d + 1 < s.size() && s[d] == '0') s.erase(d, 1);
  }
  return s;
}

namespace {

// ---------------------------------------------------------------- reading and showing one value

template <class T>
T read_value(const Args& a, const std::string& name, T min, T max) {
  if constexpr (std::is_same_v<T, double>)
    return a.real(name, 0, min, max);
  else
    return static_cast<T>(a.integer(name, 0, min, max));
}

template <class T>
std::string show_value(const T& v) {
  if constexpr (std::is_same_v<T, double>)
    return format_number(v);
  else if constexpr (std::is_same_v<T, std::string>)
    return v;
  else if constexpr (std::is_same_v<T, std::optional<uint64_t>>)
    return v ? std::to_string(*v) : "";
  else
    return std::to_string(v);
}

// Writes v into the first member the target has; false when it has none of them.
template <class T, class... S>
bool write_member(const Target& t, const T& v, T S::*... m) {
  return ([&] {
    S* s = t.part<S>();
    if (s) s->*m = v;
    return s != nullptr;
  }() || ...);
}

template <class T, class... S>
std::string show_member(const Target& t, const std::string& unset, T S::*... m) {
  std::string out;
  const bool found = ([&] {
    const S* s = t.part<S>();
    if (s) out = (!unset.empty() && s->*m == T{}) ? std::string() : show_value(s->*m);
    return s != nullptr;
  }() || ...);
  if (!found)
    throw std::logic_error("cli option table: a row names no field of " + std::string(command_info(t.command).name));
  return out;
}

void no_field(const Target& t, const std::string& name) {
  throw std::logic_error("cli option table: --" + name + " has no field in the options of dmx " +
                         command_info(t.command).name);
}

// ---------------------------------------------------------------- row builders

// A number in [min, max] written into the members (one per options struct); help default from the struct.
template <class T, class... S>
Use num(Commands c, std::string value_name, std::string help, std::string unset, T min, T max, T S::*... m) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  u.unset = unset;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    if (!write_member<T, S...>(t, read_value<T>(a, name, min, max), m...)) no_field(t, name);
  };
  u.show = [=](const Target& t) { return show_member<T, S...>(t, unset, m...); };
  return u;
}

// A text value.
template <class... S>
Use text(Commands c, std::string value_name, std::string help, std::string unset, std::string S::*... m) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  u.unset = unset;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    if (!write_member<std::string, S...>(t, a.str(name), m...)) no_field(t, name);
  };
  u.show = [=](const Target& t) { return show_member<std::string, S...>(t, unset, m...); };
  return u;
}

// A 64-bit seed (any value in [0, 2^64-1]).
template <class T, class... S>
Use seed(Commands c, std::string help, std::string unset, T S::*... m) {
  Use u;
  u.commands = c;
  u.value_name = "N";
  u.help = std::move(help);
  u.unset = unset;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    if (!write_member<T, S...>(t, T(a.u64(name)), m...)) no_field(t, name);
  };
  u.show = [=](const Target& t) { return show_member<T, S...>(t, unset, m...); };
  return u;
}

// A flag: given, it sets the members to `value`.
template <class... S>
Use flag(Commands c, std::string help, bool value, bool S::*... m) {
  Use u;
  u.commands = c;
  u.help = std::move(help);
  u.set = [=](const Target& t, const Args&, const std::string& name) {
    if (!write_member<bool, S...>(t, value, m...)) no_field(t, name);
  };
  return u;
}

// An option the command reads itself (a.has / a.str): --help, --json, --from, the file metrics of eval.
Use own(Commands c, std::string value_name, std::string help) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  return u;
}

// A repeatable text value: every occurrence, in order, replaces the member's default list.
template <class S>
Use texts(Commands c, std::string value_name, std::string help, std::vector<std::string> S::*m) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  u.repeatable = true;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    S* s = t.part<S>();
    if (!s) no_field(t, name);
    s->*m = a.all(name);
  };
  return u;
}

// A repeatable number (no range: the API checks each against its rule).
Use reals(Commands c, std::string value_name, std::string help, std::vector<double> GenerateOptions::*m) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  u.repeatable = true;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    GenerateOptions* s = t.part<GenerateOptions>();
    if (!s) no_field(t, name);
    std::vector<double> out;
    for (const std::string& v : a.all(name)) out.push_back(parse_number(v, "--" + name));
    s->*m = out;
  };
  return u;
}

// A number parsed as any value, then checked by `check` (open intervals, whose rule the message states).
template <class S>
Use checked(Commands c, std::string value_name, std::string help, double S::*m,
            std::function<void(double, const std::string& flag)> check) {
  Use u = num<double, S>(c, std::move(value_name), std::move(help), "", -std::numeric_limits<double>::max(),
                         std::numeric_limits<double>::max(), m);
  auto set = u.set;
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    set(t, a, name);
    check(t.part<S>()->*m, "--" + name);
  };
  return u;
}

// Comma-separated integers ("64,128,192") into a list (each checked by the API).
Use int_list(Commands c, std::string value_name, std::string help, std::string unset,
             std::vector<int> TrainOptions::*m) {
  Use u;
  u.commands = c;
  u.value_name = std::move(value_name);
  u.help = std::move(help);
  u.unset = std::move(unset);
  u.set = [=](const Target& t, const Args& a, const std::string& name) {
    TrainOptions* s = t.part<TrainOptions>();
    if (!s) no_field(t, name);
    const std::string text = a.str(name);
    std::vector<int> out;
    size_t i = 0;
    for (;;) {
      const size_t j = std::min(text.find(',', i), text.size());
      const std::string w = text.substr(i, j - i);
      char* end = nullptr;
      errno = 0;
      const long v = w.empty() ? 0 : std::strtol(w.c_str(), &end, 10);
      DMX_CHECK_ARG(!w.empty() && end && *end == '\0' && errno == 0 && v >= 1 && v <= 1 << 20, "--", name,
                    " must be comma-separated positive integers (e.g. 64,128,192), got '", text, "'");
      out.push_back(static_cast<int>(v));
      if (j == text.size()) break;
      i = j + 1;
    }
    s->*m = out;
  };
  u.show = [=](const Target& t) {
    std::string out;
    for (int v : t.part<TrainOptions>()->*m) out += (out.empty() ? "" : ",") + std::to_string(v);
    return out;
  };
  return u;
}

// Comma-separated words ("a,b,c") into a list.
std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i <= s.size();) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    out.push_back(s.substr(i, j - i));
    i = j + 1;
  }
  return out;
}

// "ddim|ddpm|...": the scheduler registry's samplers.
std::string scheduler_choices() {
  std::string s;
  for (const auto& n : scheduler_names()) s += (s.empty() ? "" : "|") + n;
  return s;
}

// Command sets.
constexpr Commands kSampling = kGenerate | kP2P | kDiffEdit;  // embed ModelOptions, SamplingOptions, RunOptions
constexpr Commands kModel = kSampling | kTrainRecipes;        // embed ModelOptions
constexpr Commands kDevice = kGenerate | kDiffEdit | kBench;  // embed DeviceOptions
constexpr Commands kLoraRecipes = kTrainLora | kTrainDreambooth;
constexpr Commands kTrainLoop =
    kTrainRecipes | kTrainClip | kTrainPrior | kTrainVqseg;             // the trainer's loop options (TrainOptions)
constexpr Commands kImage = kUpscale | kVariations;                     // model, image, prompt, output of their own
constexpr Commands kSamplingGroup = kSampling | kImage;                 // embed SamplingOptions
constexpr Commands kRunGroup = kSampling | kImage | kEmbed | kRestore;  // embed RunOptions
constexpr Commands kDeviceGroup = kDevice | kImage;                     // embed DeviceOptions
using UO = UpscaleOptions;
using VO = VariationsOptions;
using RO = RestoreOptions;

const char* kModelHelp =
    "diffusers folder or single-file checkpoint (.safetensors, or a .ckpt pickle read weights-only) (required)";
const char* kCaptionFolder = "images with captions: name.png + name.txt, or metadata.jsonl (required)";

using TO = TrainOptions;
using GO = GenerateOptions;
using EO = EvalOptions;
using DE = EmojiDataOptions;
using SD = SceneDataOptions;
using I64 = int64_t;
constexpr I64 kI64Max = std::numeric_limits<I64>::max();
constexpr I64 kI64Min = std::numeric_limits<I64>::min();
constexpr int kI32Max = std::numeric_limits<int>::max();
constexpr int kI32Min = std::numeric_limits<int>::min();

std::vector<Option> build_table() {
  auto unit_ratio = [](double v, const std::string& flag) {
    DMX_CHECK_ARG(v > 0 && v <= 1, flag, " must be in (0, 1], got ", v);
  };
  return {
      // ---------------------------------------------------------------- the model (ModelOptions, DeviceOptions)
      {"model",
       {text(kSampling, "PATH", kModelHelp, "", &ModelOptions::model),
        text(kTrainRecipes & ~kTrainPalette, "PATH",
             "diffusers folder (or single-file checkpoint for lora) to start from (required)", "",
             &ModelOptions::model),
        text(kTrainPalette, "DIR", "a Palette folder to continue training from", "a new denoiser",
             &ModelOptions::model),
        text(kTrainClip, "DIR", "a CLIP folder (dmx train clip) to continue training from", "a new CLIP",
             &ModelOptions::model),
        text(kTrainVqseg, "DIR", "a VQ-SEG folder (dmx train vqseg) to continue training from", "a new VQ-SEG",
             &ModelOptions::model),
        text(kTrainPrior, "DIR",
             "a prior folder (dmx train prior) to continue training from (its architecture; clip_mean/clip_std are "
             "recomputed on --data)",
             "a new prior", &ModelOptions::model),
        text(kRestore, "DIR", "a Palette folder (dmx train palette) (required)", "", &RO::model),
        text(kServe, "NAME", "the model of --models to load at start-up (a name of GET /sdapi/v1/sd-models)",
             "the first one", &ServeOptions::model),
        text(kEval, "DIR", "diffusers folder of the text-to-image model (required unless a file metric is asked)", "",
             &EO::model),
        text(kUpscale, "DIR",
             "a diffusers StableDiffusionUpscalePipeline folder (stabilityai/stable-diffusion-x4-upscaler) (required)",
             "", &UO::model),
        text(kVariations, "DIR",
             "a diffusers StableUnCLIPImg2ImgPipeline folder (feature_extractor + image_encoder) (required)", "",
             &VO::model),
        texts(kEmbed, "DIR",
              "Stable unCLIP folder, or a CLIP folder (dmx train clip); give it twice to take the image encoder from a "
              "StableUnCLIPImg2ImgPipeline folder and the text encoder from a StableUnCLIPPipeline one (required)",
              &EmbedOptions::models)}},
      {"config",
       {text(kModel, "DIR", "diffusers folder supplying configs and tokenizer for a single-file checkpoint", "",
             &ModelOptions::config_dir),
        text(kTrainPrior, "DIR", "a prior folder whose prior/config.json (the architecture) a new prior takes",
             "--layers, --heads, --attention-head-dim", &ModelOptions::config_dir),
        text(kTrainVqseg, "DIR", "a VQModel folder whose config.json (the architecture) a new VQ-SEG takes",
             "--vq-factor, --codebook-size", &ModelOptions::config_dir),
        text(kTrainClip, "DIR",
             "a CLIP folder whose architecture (text_encoder/, image_encoder/ config.json) and tokenizer a new CLIP "
             "takes",
             "--width, --layers, --heads, ...", &ModelOptions::config_dir),
        text(kInit, "DIR", "configs: model_index.json, unet/ vae/ text_encoder/ scheduler/ (required)", "",
             &InitModelOptions::config)}},
      {"tokenizer",
       {text(kModel, "DIR", "folder with vocab.json and merges.txt", "", &ModelOptions::tokenizer_dir),
        text(kTrainPrior, "DIR",
             "not taken: the prior tokenizes with the CLIP's own tokenizer/ (--clip), whose text tower makes its "
             "features",
             "", &ModelOptions::tokenizer_dir),
        text(kTrainVqseg, "DIR", "not taken: VQ-SEG reads scene maps, no text", "", &ModelOptions::tokenizer_dir),
        text(kTrainClip, "DIR",
             "the text tower's tokenizer: a folder with vocab.json and merges.txt (required for a new CLIP without "
             "--config)",
             "", &ModelOptions::tokenizer_dir),
        text(kInit, "DIR", "tokenizer folder", "<config>/tokenizer", &InitModelOptions::tokenizer),
        text(kUpscale, "DIR", "folder with vocab.json and merges.txt", "the folder's tokenizer/", &UO::tokenizer_dir)}},
      {"dtype",
       {text(kDeviceGroup, "T", "fp32|bf16|fp16 (fp16: CUDA only)", "", &DeviceOptions::dtype),
        text(kConvert, "T", "fp16|bf16|fp32|keep", "", &ConvertOptions::dtype),
        [] {
          Use u = text(kTrainBench, "T", "fp32|bf16", "", &TrainBenchOptions::dtype);
          auto set = u.set;
          u.set = [set](const Target& t, const Args& a, const std::string& name) {
            set(t, a, name);
            const std::string& d = t.part<TrainBenchOptions>()->dtype;
            DMX_CHECK_ARG(d == "fp32" || d == "bf16", "--dtype must be fp32 or bf16, got '", d, "'");
          };
          return u;
        }()}},
      {"device",
       {text(kDeviceGroup, "D", "cpu|cuda[:N]", "", &DeviceOptions::device),
        text(kEmbed, "D", "cpu|cuda[:N]", "", &EmbedOptions::device)}},
      {"preset",
       {text(kBench | kTrainBench, "NAME", "sd15|sd21|tiny: architecture built with random weights", "",
             &BenchOptions::preset, &TrainBenchOptions::preset)}},

      // ---------------------------------------------------------------- prompts, inputs and outputs
      {"prompt",
       {text(kGenerate, "TEXT", "what to draw (required)", "", &GO::prompt),
        text(kP2P, "A", "the source prompt (required; with --image: what the image shows)", "", &P2POptions::prompt),
        text(kUpscale, "TEXT", "what the picture shows (required)", "", &UO::prompt),
        text(kVariations, "TEXT", "text to steer the variations", "empty, as diffusers", &VO::prompt),
        texts(kEmbed, "TEXT", "a text to embed with the text encoder (a Stable unCLIP's prior's) (repeatable)",
              &EmbedOptions::prompts)}},
      {"edit-prompt", {text(kP2P, "B", "the edited prompt (required)", "", &P2POptions::edit_prompt)}},
      {"source-prompt",
       {text(kDiffEdit, "TEXT", "what the image shows (required)", "", &DiffEditOptions::source_prompt)}},
      {"target-prompt",
       {text(kDiffEdit, "TEXT", "what the edited image should show (required)", "", &DiffEditOptions::target_prompt)}},
      {"negative-prompt",
       {text(kSamplingGroup, "TEXT", "what to steer away from", "none", &SamplingOptions::negative_prompt)}},
      {"input",
       {text(kConvert, "PATH",
             "diffusers / ControlNet folder, .safetensors file, or torch.save file (.ckpt .pt .pth .bin, read without "
             "executing anything) (required)",
             "", &ConvertOptions::input)}},
      {"image",
       {text(kP2P, "IMG", "edit this real image: DDIM-invert it under --prompt first", "", &P2POptions::image),
        text(kDiffEdit, "IMG", "the image to edit, PNG or JPEG, sides multiples of 8 (required)", "",
             &DiffEditOptions::image),
        text(kUpscale, "LOW.png", "the low-resolution picture, PNG or JPEG; the output is 4x its size (required)", "",
             &UO::image),
        text(kVariations, "IMG", "the picture to make variations of, PNG or JPEG, any size (required)", "", &VO::image),
        texts(kEmbed, "IMG", "a picture (PNG/JPEG) to embed with the image encoder (repeatable)",
              &EmbedOptions::images),
        text(kRestore, "IMG", "the picture to restore, PNG or JPEG, sides multiples of 8 up to 512 (required)", "",
             &RO::image)}},
      {"interpolate-to",
       {text(kVariations, "IMG",
             "a second picture: --num-images N (>= 2) pictures along the slerp from --image's CLIP embedding to this "
             "one's, one seed; OUT.png is their strip, OUT-0.png ... each",
             "", &VO::interpolate_to)}},
      {"from",
       {own(kGenerate | kUpscale, "IMAGE",
            "re-run the parameters stored in a PNG made by dmx (or A1111); flags given override")}},
      {"data",
       {texts(kDataTokenizer, "DIR", "caption folder (metadata.jsonl or *.txt); repeatable (required)",
              &TokenizerTrainOptions::data),
        text(kTrainLora | kTrainFinetune | kTrainHypernetwork, "DIR", kCaptionFolder, "", &TO::data),
        text(kTrainControlnet | kTrainAdapter, "DIR",
             "metadata.jsonl rows {file_name, text, conditioning_image} (required)", "", &TO::data),
        text(kTrainSpatext, "DIR", "a `dmx data scenes` folder: its canvases, captions and instance maps (required)",
             "", &TO::data),
        text(kTrainVqseg, "DIR", "a `dmx data scenes` folder: its category and edge maps (required)", "", &TO::data),
        text(kTrainScene, "DIR",
             "a `dmx data scenes` folder: its canvases, captions, category and edge maps (required)", "", &TO::data),
        text(kTrainVae | kTrainPalette, "DIR",
             "images (captions are not used): metadata.jsonl or a folder of images (required)", "", &TO::data),
        text(kTrainClassifier, "DIR", "`dmx data emoji` folder: every real image of every style is used (required)", "",
             &ClassifierTrainOptions::data),
        text(kEval, "DIR", "`dmx data emoji` folder", "$DMX_EMOJI_DATA, ~/.cache/dmx/emoji-data, /tmp/emoji_ds",
             &EO::data),
        texts(kTrainClip | kTrainUnclip, "DIR",
              "image-caption folder (metadata.jsonl or name.png + name.txt); repeatable: the folders are "
              "concatenated (required)",
              &TO::clip_data),
        texts(kTrainPrior, "DIR",
              "image-caption folder (metadata.jsonl or name.png + name.txt): its pictures' CLIP image embeddings are "
              "the targets of its captions; repeatable: the folders are concatenated (required)",
              &TO::clip_data)}},
      {"output",
       {text(kGenerate, "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)", "", &GO::output),
        text(kP2P, "OUT.png", "writes OUT.png (source | edit side by side), OUT-source.png and OUT-edit.png (required)",
             "", &P2POptions::output),
        text(kDiffEdit, "OUT.png", "edited image (required)", "", &DiffEditOptions::output),
        text(kImage, "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)", "", &UO::output,
             &VO::output),
        text(kEmbed, "F",
             "also write the embeddings and the matrix: .safetensors (image_embeds, text_embeds, cosine) or .json", "",
             &EmbedOptions::output),
        text(kInit, "DIR", "diffusers folder to create (required)", "", &InitModelOptions::output),
        text(kConvert, "PATH", "where to write the converted copy (required)", "", &ConvertOptions::output),
        text(kDataTokenizer, "DIR", "tokenizer folder to write (required)", "", &TokenizerTrainOptions::output),
        text(kTrainRecipes & ~kTrainPalette & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "PATH",
             "lora: FILE.safetensors; hypernetwork: FILE.pt (A1111's) or FILE.safetensors; finetune / full "
             "dreambooth: a diffusers folder; adapter: a T2IAdapter folder (required)",
             "", &TO::output),
        text(kTrainPalette, "DIR", "the Palette folder to write (palette.json, config.json, weights) (required)", "",
             &TO::output),
        text(kTrainClip, "DIR",
             "the CLIP folder to write (text_encoder/, image_encoder/, tokenizer/, feature_extractor/) (required)", "",
             &TO::output),
        text(kTrainPrior, "DIR",
             "the prior half of a StableUnCLIPPipeline folder to write (prior/, prior_scheduler/, prior_text_encoder/, "
             "prior_tokenizer/) (required)",
             "", &TO::output),
        text(kTrainUnclip, "DIR", "the StableUnCLIPImg2ImgPipeline folder to write (for dmx variations) (required)", "",
             &TO::output),
        text(kTrainSpatext, "DIR",
             "the SpaText folder to write (the base's parts, spatext.json, spatext.safetensors, the prior's parts) "
             "(required)",
             "", &TO::output),
        text(kTrainVqseg, "DIR",
             "the VQ-SEG folder to write (a diffusers VQModel: config.json, weights, vqseg.json) (required)", "",
             &TO::output),
        text(kTrainScene, "DIR",
             "the scene folder to write (the base's parts, vqseg/, scene.json, scene.safetensors) (required)", "",
             &TO::output),
        text(kRestore, "OUT.png", "output PNG; with --num-images N: OUT-0.png ... (required)", "", &RO::output),
        text(kTrainClassifier, "DIR", "folder for config.json + model.safetensors (required)", "",
             &ClassifierTrainOptions::output)}},
      {"out",
       {text(kDataEmoji, "DIR", "folder to create (required)", "", &DE::out),
        text(kDataScenes, "DIR", "folder to create (required)", "", &SD::out),
        text(kEval, "DIR", "write the generated images and grids here", "", &EO::out_dir)}},
      {"output-dir",
       {text(kTrainLoop, "DIR", "checkpoints, train_log.jsonl, validation images", "<output>.train", &TO::output_dir)}},

      // ---------------------------------------------------------------- sampling (SamplingOptions and the like)
      {"width",
       {num<int>(kGenerate, "W", "image width, a multiple of 8", "the model's size", 8, 1 << 20, &GO::width),
        num<int>(kP2P, "W", "image width, a multiple of 8", "the model's size, or the --image size", 8, 1 << 20,
                 &P2POptions::width),
        num<int>(kBench, "W", "image width", "the preset's size", 8, 1 << 14, &BenchOptions::width),
        num<int>(kVariations, "W", "image width, a multiple of 8", "the model's size", 8, 1 << 20, &VO::width),
        num<int>(kTrainClip, "N", "hidden size of both towers of a new CLIP (MLP 4x)", "", 8, 4096, &TO::clip_width)}},
      {"height",
       {num<int>(kGenerate, "H", "image height, a multiple of 8", "the model's size", 8, 1 << 20, &GO::height),
        num<int>(kP2P, "H", "image height, a multiple of 8", "the model's size, or the --image size", 8, 1 << 20,
                 &P2POptions::height),
        num<int>(kBench, "H", "image height", "the preset's size", 8, 1 << 14, &BenchOptions::height),
        num<int>(kVariations, "H", "image height, a multiple of 8", "the model's size", 8, 1 << 20, &VO::height)}},
      {"steps",
       {num<int>(kSamplingGroup | kEval, "N", "denoising steps", "", 1, 1000, &SamplingOptions::steps, &EO::steps),
        num<I64>(kTrainLoop, "N", "optimizer steps", "", kI64Min, kI64Max, &TO::steps),
        num<I64>(kTrainClassifier, "N", "optimizer steps", "", 1, 10000000, &ClassifierTrainOptions::steps),
        num<int>(kTrainBench, "N", "timed steps after one warm-up step", "", 1, 100000, &TrainBenchOptions::steps),
        num<int>(kRestore, "N", "sampling steps: the model's test schedule respaced to N (its length = exact)", "", 1,
                 100000, &RO::steps)}},
      {"guidance-scale",
       {num<double>(kSamplingGroup | kEval, "G", "classifier-free guidance scale; <= 1 disables guidance", "", 0, 100,
                    &SamplingOptions::guidance_scale, &EO::guidance_scale)}},
      {"scheduler",
       {text(kGenerate | kEval | kImage, "NAME", scheduler_choices(), "the model's", &GO::scheduler, &EO::scheduler,
             &UO::scheduler, &VO::scheduler)}},
      {"eta", {num<double>(kGenerate | kImage, "E", "DDIM eta in [0, 1]", "", 0.0, 1.0, &GO::eta, &UO::eta, &VO::eta)}},
      {"seed",
       {seed(kSamplingGroup,
             "random seed, any 64-bit value; same seed = same draws as diffusers' torch.Generator(seed)", "random",
             &SamplingOptions::seed),
        seed(kTrainLoop | kTrainClassifier, "seed of every random draw", "", &TO::seed, &ClassifierTrainOptions::seed),
        seed(kInit, "seed of the initialisation", "", &InitModelOptions::seed),
        seed(kEval, "prompt i uses seed + i", "", &EO::seed),
        seed(kDataScenes, "seed of the canvases: canvas i depends only on the seed, i and the options", "", &SD::seed),
        seed(kRestore, "seed of every random draw (noise, the hole's noise, each step)", "random", &RO::seed)}},
      {"num-images",
       {num<int>(kGenerate, "N", "images per prompt", "", 1, 64, &GO::num_images),
        num<int>(kUpscale, "N", "pictures to make from the one low-res picture", "", 1, 64, &UO::num_images),
        num<int>(kVariations, "N", "variations to make", "", 1, 64, &VO::num_images),
        num<int>(kRestore, "N", "samples of the one picture (Palette is diverse)", "", 1, 64, &RO::num_images)}},
      {"clip-skip", {num<int>(kGenerate, "N", "skip the last N text-encoder layers", "", 0, 64, &GO::clip_skip)}},

      // ---------------------------------------------------------------- generate: img2img and blended editing
      {"init-image", {text(kGenerate, "IMG", "start from this image (img2img)", "", &GO::init_image)}},
      {"strength",
       {num<double>(kGenerate, "S",
                    "img2img: how much to change the image, in [0, 1]; with --mask and no --strength: 1.0", "", 0.0,
                    1.0, &GO::strength)}},
      {"mask",
       {text(kGenerate, "MASK",
             "edit only inside this mask of --init-image (8-bit gray/RGB, white = edit): blended latents", "",
             &GO::mask),
        own(kEval, "MASK", "mask of --background-error (white = edited region, left out)"),
        text(kRestore, "MASK", "inpaint/uncrop: the region to fill, white = unknown, the picture's size",
             "a centred box (inpaint), the right half (uncrop)", &RO::mask)}},
      {"task",
       {text(kTrainPalette, "T", "colorize|inpaint|uncrop|jpeg (required)", "", &TO::task),
        text(kRestore, "T", "colorize|inpaint|uncrop|jpeg; must be the model's", "the model's", &RO::task)}},
      {"loss", {text(kTrainPalette, "L", "l1|l2: the loss on the predicted noise", "", &TO::loss)}},
      {"palette-channels",
       {num<int>(kTrainPalette, "C", "first block width of a new denoiser, a multiple of 32", "", 32, 512,
                 &TO::palette_channels)}},
      {"jpeg-quality",
       {num<int>(kRestore, "Q", "jpeg task: compress --image at quality Q first (1..100)", "it already is", 0, 100,
                 &RO::jpeg_quality)}},
      {"save-input",
       {text(kRestore, "IN.png", "also write the degraded picture the model is conditioned on", "", &RO::save_input)}},
      {"background",
       {text(kGenerate, "MODE", "with --mask: latent|pixel|poisson|optimize-latents|finetune-decoder", "",
             &GO::background),
        num<int>(kDataEmoji, "GRAY", "gray level of the plain background, 0..255", "", 0, 255, &DE::background)}},
      {"blend-start",
       {num<double>(kGenerate, "F", "with --mask: fraction of steps before blending starts, in [0, 1)", "", 0.0, 1.0,
                    &GO::blend_start)}},
      {"mask-dilation",
       {num<int>(kGenerate, "N", "with --mask: progressive mask shrinking from N dilations", "", 0, 64,
                 &GO::mask_dilation)}},
      {"blend-variant",
       {text(kGenerate, "V", "with --mask: inpaint (diffusers' inpaint) | legacy (InpaintPipelineLegacy)", "",
             &GO::blend_variant)}},
      {"rank",
       {flag(kGenerate, "with --mask: write the samples best first by a diffusion-classifier score", true, &GO::rank),
        num<int>(kTrainLora, "R", "LoRA rank", "", kI32Min, kI32Max, &TO::rank),
        num<int>(kTrainSpatext | kTrainScene, "R",
                 "rank of the LoRA adapters on every linear and conv of the UNet's blocks", "", 1, 1024, &TO::rank),
        num<int>(kTrainBench, "R", "LoRA rank", "", 1, 4096, &TrainBenchOptions::rank)}},
      {"init-latents",
       {text(kGenerate, "F.safetensors", "initial noise (tensor 'latents', before init_noise_sigma)", "",
             &GO::init_latents)}},
      {"save-latents",
       {text(kGenerate | kDiffEdit | kImage, "F.safetensors", "write the final latents (tensor 'latents')", "",
             &GO::save_latents, &DiffEditOptions::save_latents, &UO::save_latents, &VO::save_latents)}},

      // ---------------------------------------------------------------- generate: LoRA and ControlNet
      {"lora",
       {[] {
          Use u = own(kGenerate, "FILE[:SCALE]",
                      "apply a LoRA (diffusers, PEFT, kohya/A1111, LyCORIS); repeatable; scale default 1");
          u.repeatable = true;
          u.set = [](const Target& t, const Args& a, const std::string& name) {
            for (const auto& l : a.all(name)) t.part<GO>()->loras.push_back(l);
          };
          return u;
        }(),
        text(kEval, "FILE", "also score this style LoRA: share of images classified twitter, with and without it", "",
             &EO::lora)}},
      {"lora-mode", {text(kGenerate, "MODE", "runtime|merged (both give the same result)", "", &GO::lora_mode)}},
      {"lora-dir",
       {text(kGenerate, "DIR", "folder for <lora:NAME:WEIGHT> tags in the prompt (NAME.safetensors)", "",
             &GO::lora_dir)}},
      {"lora-allow-unmatched",
       {flag(kGenerate, "skip LoRA keys that match no layer (counted warning) instead of failing", true,
             &GO::lora_allow_unmatched)}},
      {"controlnet",
       {texts(kGenerate, "PATH", "ControlNet: diffusers folder or control_model.* .safetensors (repeatable)",
              &GO::controlnets),
        text(kTrainControlnet, "PATH", "start from this ControlNet instead of a copy of the UNet encoder", "",
             &TO::controlnet),
        text(kEval, "DIR", "also score this Canny ControlNet: edge F1 with and without it", "", &EO::controlnet)}},
      {"control-image",
       {texts(kGenerate, "IMG", "conditioning map for the n-th --controlnet (repeatable, one per net)",
              &GO::control_images)}},
      {"control-scale",
       {reals(kGenerate, "X", "conditioning scale per net (repeatable; default 1.0)", &GO::control_scales)}},
      {"control-start",
       {reals(kGenerate, "A", "fraction of steps before which the net is off (repeatable; default 0)",
              &GO::control_starts)}},
      {"control-end",
       {reals(kGenerate, "B", "fraction of steps after which the net is off (repeatable; default 1)",
              &GO::control_ends)}},
      {"control-preprocess",
       {texts(kGenerate, "MODE", "none|canny: turn --control-image into the map (once, or per net)",
              &GO::control_preprocess)}},
      {"canny-low",
       {num<double>(kGenerate | kDataEmoji, "L", "Canny low threshold (of the control or edge maps)", "", 0, 2040,
                    &GO::canny_low, &DE::canny_low)}},
      {"canny-high",
       {num<double>(kGenerate | kDataEmoji, "H", "Canny high threshold", "", 0, 2040, &GO::canny_high,
                    &DE::canny_high)}},
      {"guess-mode",
       {flag(kGenerate, "ControlNet guess mode (nets see the conditional half only)", true, &GO::guess_mode)}},
      {"save-control-image",
       {text(kGenerate, "OUT.png", "write the prepared control map(s) (several nets: OUT-0.png ...)", "",
             &GO::save_control_image)}},

      // ---------------------------------------------------------------- generate: T2I-Adapters and hypernetworks
      {"adapter",
       {texts(kGenerate, "PATH", "T2I-Adapter: diffusers folder, TencentARC .pth or .safetensors (repeatable)",
              &GO::adapters),
        text(kTrainAdapter, "PATH", "continue training this adapter instead of a fresh one", "", &TO::adapter),
        text(kEval, "DIR", "also score this Canny T2I-Adapter: edge F1 with and without it", "", &EO::adapter)}},
      {"adapter-type",
       {text(kTrainAdapter, "T", "full_adapter|light_adapter (a fresh adapter)", "", &TO::adapter_type)}},
      {"adapter-channels",
       {int_list(kTrainAdapter, "C1,C2,...", "widths of the adapter's blocks (a fresh adapter)",
                 "the UNet's down-block widths", &TO::adapter_channels)}},
      {"adapter-num-res-blocks",
       {num<int>(kTrainAdapter, "N", "res blocks per adapter block (a fresh adapter)", "", kI32Min, kI32Max,
                 &TO::adapter_num_res_blocks)}},
      {"adapter-downscale-factor",
       {num<int>(kTrainAdapter, "F", "pixel-unshuffle factor (a fresh adapter)", "the VAE's", kI32Min, kI32Max,
                 &TO::adapter_downscale_factor)}},
      {"adapter-in-channels",
       {num<int>(kTrainAdapter, "C", "1 (gray control picture) or 3 (RGB) (a fresh adapter)", "", kI32Min, kI32Max,
                 &TO::adapter_in_channels)}},
      {"timestep-sampling",
       {text(kTrainAdapter, "S", "cubic (the T2I-Adapter paper's) | uniform", "", &TO::timestep_sampling)}},
      {"adapter-image",
       {texts(kGenerate, "IMG", "control picture of the n-th --adapter (repeatable, one per adapter)",
              &GO::adapter_images)}},
      {"adapter-scale",
       {reals(kGenerate, "X", "scale per adapter (repeatable; default 1; several: sum of scale x features)",
              &GO::adapter_scales),
        num<double>(kEval, "S", "scale of --adapter", "", -100, 100, &EO::adapter_scale)}},
      {"adapter-end",
       {reals(kGenerate, "F",
              "cond_tau: features only during the first fraction F of the steps (repeatable; default 1)",
              &GO::adapter_ends)}},
      {"adapter-preprocess",
       {texts(kGenerate, "MODE", "none|canny: turn --adapter-image into the map (once, or per adapter)",
              &GO::adapter_preprocess)}},
      {"hypernetwork",
       {texts(kGenerate, "FILE[:MULT]", "A1111 hypernetwork (.pt or .safetensors); repeatable, chained in order",
              &GO::hypernetworks),
        text(kEval, "FILE[:MULT]", "also score this style hypernetwork: share classified twitter, with and without it",
             "", &EO::hypernetwork)}},
      {"hypernetwork-dir",
       {text(kGenerate, "DIR", "folder for <hypernet:NAME:MULT> tags in the prompt (NAME.pt / .safetensors)", "",
             &GO::hypernetwork_dir)}},

      // ---------------------------------------------------------------- generate: layouts (docs/regional.md)
      {"layout",
       {text(kGenerate, "MAP.png",
             "layout map: RGB PNG, each --region colour one region, other colours background; the output size or "
             "an integer multiple or fraction of it",
             "", &GO::layout_path)}},
      {"region", {[] {
         Use u = own(kGenerate, "COLOR=TEXT", "a region of --layout: #rrggbb=its text (repeatable)");
         u.repeatable = true;
         u.set = [](const Target& t, const Args& a, const std::string& name) {
           std::vector<LayoutRegion> regions;
           for (const std::string& v : a.all(name)) {
             const size_t eq = v.find('=');
             DMX_CHECK_ARG(eq != std::string::npos, "--", name,
                           " must be COLOR=TEXT (e.g. '#ff0000=a red apple'), got '", v, "'");
             regions.push_back({v.substr(0, eq), v.substr(eq + 1)});
           }
           t.part<GO>()->regions = regions;
         };
         return u;
       }()}},
      {"layout-method",
       {text(kGenerate, "M",
             "regional (DenseDiffusion, training-free) | spatext (a SpaText folder) | scene (a scene folder)", "",
             &GO::layout_method),
        text(kEval, "NAME",
             "with --layouts: text (the caption only), regional (DenseDiffusion), spatext, scene or real (the canvases "
             "themselves)",
             "", &EO::layout_method)}},
      {"layout-guidance-scale",
       {num<double>(kGenerate, "S",
                    "with --layout: strength of the layout, 0 = text only (regional: the modulation's weight; spatext: "
                    "the map's guidance scale over --guidance-scale; scene: 1 or 0)",
                    "", 0.0, 10.0, &GO::layout_guidance_scale),
        num<double>(kEval, "S",
                    "with --layouts and --layout-method spatext: the map's guidance scale over "
                    "--guidance-scale",
                    "", 0.0, 10.0, &EO::layout_guidance_scale)}},

      // ---------------------------------------------------------------- generate: Stable unCLIP folders
      {"prior-steps",
       {[] {
          Use u = own(kGenerate, "N", "unCLIP: prior denoising steps (default: diffusers' 25)");
          u.set = [](const Target& t, const Args& a, const std::string& name) {
            t.part<GO>()->prior_steps = static_cast<int>(a.integer(name, 0, 1, 1000));
          };
          return u;
        }(),
        num<int>(kEval, "N", "with an unCLIP --model: prior denoising steps", "", 1, 1000, &EO::prior_steps)}},
      {"prior-guidance-scale",
       {[] {
          Use u = own(kGenerate, "G",
                      "unCLIP: the prior's classifier-free guidance; <= 1 disables it (default: "
                      "diffusers' 4)");
          u.set = [](const Target& t, const Args& a, const std::string& name) {
            t.part<GO>()->prior_guidance_scale = a.real(name, 0, 0, 100);
          };
          return u;
        }(),
        num<double>(kEval, "G", "with an unCLIP --model: the prior's guidance", "", 0, 100,
                    &EO::prior_guidance_scale)}},
      {"noise-level",
       {[] {
          Use u = own(kGenerate, "N",
                      "unCLIP: noise added to the image embedding, in [0, T-1] of its scheduler "
                      "(default 0)");
          u.set = [](const Target& t, const Args& a, const std::string& name) {
            t.part<GO>()->noise_level = static_cast<int>(a.integer(name, 0, -1000000, 1000000));
          };
          return u;
        }(),
        // The upper bound is the model's max_noise_level, checked against model_index.json before anything loads.
        num<int>(kUpscale, "N", "noise added to the picture before upscaling, 0 .. the model's max_noise_level", "", 0,
                 kI32Max, &UO::noise_level),
        num<int>(kVariations, "N", "noise added to the image embedding, in [0, T-1] of its scheduler", "", -1000000,
                 1000000, &VO::noise_level),
        num<int>(kEval, "N", "unCLIP --model / --variations: noise added to the image embedding", "", -1000000, 1000000,
                 &EO::noise_level)}},

      // ---------------------------------------------------------------- upscale: the VAE decode and memory
      {"vae-tiling",
       {text(kUpscale, "MODE",
             "auto|on|off: decode the output in overlapping tiles (diffusers' enable_vae_tiling); auto = when the "
             "whole picture would not fit in memory",
             "", &UO::vae_tiling)}},
      {"vae-tile-size",
       {num<int>(kUpscale, "PX", "output pixels per tile", "the VAE's sample_size", 16, 4096, &UO::vae_tile_size)}},
      {"memory-limit",
       {num<I64>(kUpscale, "MIB", "memory the run may plan for, MiB", "the machine's physical memory", 1, I64{1} << 30,
                 &UO::memory_limit_mb)}},

      // ---------------------------------------------------------------- generate: the x4 upscaler after it
      {"upscale-model",
       {text(kGenerate, "DIR",
             "then upscale each picture 4x with this StableDiffusionUpscalePipeline folder (same prompts, same seed)",
             "", &GO::upscale_model)}},
      {"upscale-noise-level",
       {num<int>(kGenerate, "N", "with --upscale-model: noise added to the base picture", "", 0, 1 << 30,
                 &GO::upscale_noise_level)}},
      {"upscale-steps",
       {num<int>(kGenerate, "N", "with --upscale-model: the upscaler's steps", "", 1, 1000, &GO::upscale_steps)}},
      {"upscale-guidance-scale",
       {num<double>(kGenerate, "G", "with --upscale-model: the upscaler's guidance", "", 0, 100,
                    &GO::upscale_guidance_scale)}},

      // ---------------------------------------------------------------- p2p
      {"mode",
       {text(kP2P, "MODE", "replace (swap words; same word count) | refine (add words) | reweight", "",
             &P2POptions::mode)}},
      {"cross-replace-steps",
       {num<double>(kP2P, "X", "fraction of steps whose cross attention follows the source, [0, 1]", "", 0.0, 1.0,
                    &P2POptions::cross_replace_steps)}},
      {"self-replace-steps",
       {num<double>(kP2P, "Y", "fraction of steps whose self attention is the source's, [0, 1]", "", 0.0, 1.0,
                    &P2POptions::self_replace_steps)}},
      {"reweight",
       {texts(kP2P, "WORD=SCALE", "mode reweight: scale the attention to a word of the edit prompt (repeatable)",
              &P2POptions::reweight)}},
      {"local-blend", {[] {
         Use u = own(kP2P, "WORDS", "comma-separated words whose attention maps bound the edited region");
         u.set = [](const Target& t, const Args& a, const std::string& name) {
           const std::string words = a.str(name);
           std::vector<std::string> list = split_commas(words);
           for (const auto& w : list)
             DMX_CHECK_ARG(!w.empty(), "--local-blend must be comma-separated words, got '", words, "'");
           t.part<P2POptions>()->local_blend = list;
         };
         return u;
       }()}},
      {"local-blend-threshold",
       {num<double>(kP2P, "T", "local blend mask threshold in [0, 1]", "", 0.0, 1.0,
                    &P2POptions::local_blend_threshold)}},
      {"null-text-inversion",
       {flag(kP2P, "with --image: null-text inversion (Mokady et al.) for a faithful source", true,
             &P2POptions::null_text_inversion)}},
      {"null-text-inner-steps",
       {num<int>(kP2P, "N", "Adam iterations per step for null-text inversion", "", 1, 1000,
                 &P2POptions::null_text_inner_steps)}},
      {"save-attention-maps",
       {text(kP2P, "MAPS.png", "write per-token cross-attention maps of both prompts as one grid", "",
             &P2POptions::save_attention_maps)}},

      // ---------------------------------------------------------------- diffedit
      {"mask-output",
       {text(kDiffEdit, "MASK.png", "also write the mask, at image size (latent size x VAE factor); white = edited", "",
             &DiffEditOptions::mask_output)}},
      {"encode-ratio",
       {checked(kDiffEdit, "R", "share of the schedule inverted and re-generated, in (0, 1]",
                &DiffEditOptions::encode_ratio, unit_ratio)}},
      {"mask-threshold",
       {checked(kDiffEdit, "T", "mask_thresholding_ratio: clip the difference map at T x its mean, > 0",
                &DiffEditOptions::mask_threshold,
                [](double v, const std::string& flag) { DMX_CHECK_ARG(v > 0, flag, " must be > 0, got ", v); })}},
      {"inversion-guidance-scale",
       {num<double>(kDiffEdit, "G", "guidance of the inversion (diffusers' invert; 1: conditional only)", "", 0, 100,
                    &DiffEditOptions::inversion_guidance_scale)}},
      {"num-maps",
       {num<int>(kDiffEdit, "N", "num_maps_per_mask: noise maps averaged for the mask", "", 1, 1000,
                 &DiffEditOptions::num_maps)}},
      {"mask-encode-strength",
       {checked(kDiffEdit, "S", "noise level of the mask estimate, in (0, 1]", &DiffEditOptions::mask_encode_strength,
                unit_ratio)}},

      // ---------------------------------------------------------------- bench
      {"runs",
       {num<int>(kBench, "N", "timed runs per stage after one warm-up; the median is reported", "", 1, 1000,
                 &BenchOptions::runs)}},
      {"json", {own(kBench | kTrainClassifier | kEval, "", "print one JSON object on one line")}},
      {"nchw",
       {flag(kBench, "run convolutions NCHW instead of the default channels-last (for comparison)", false,
             &BenchOptions::channels_last)}},
      {"profile",
       {text(kBench, "PREFIX", "also write op traces of one step and one decode: PREFIX.unet.json, PREFIX.vae.json", "",
             &BenchOptions::profile)}},
      {"picture-model",
       {text(kBench, "PATH",
             "also time whole pictures on this model (load, text encoding, every step, decode, PNG), e.g. models/emoji",
             "", &BenchOptions::picture_model)}},
      {"picture-scheduler",
       {text(kBench, "NAME", "scheduler of the whole-picture runs", "", &BenchOptions::picture_scheduler)}},
      {"picture-steps",
       {num<int>(kBench, "N", "steps of the whole-picture runs", "", 1, 1000, &BenchOptions::picture_steps)}},
      {"picture-guidance",
       {num<double>(kBench, "G", "guidance scale of the whole-picture runs (<= 1: no CFG branch)", "", 0.0, 100.0,
                    &BenchOptions::picture_guidance)}},
      {"picture-lora",
       {text(kBench, "FILE[:SCALE]", "a LoRA (an LCM-LoRA) for the whole-picture runs", "",
             &BenchOptions::picture_lora)}},
      {"picture-prompt", {text(kBench, "TEXT", "prompt of the whole-picture runs", "", &BenchOptions::picture_prompt)}},
      {"picture-controlnet",
       {text(kBench, "DIR", "a ControlNet (scale 1) on --picture-control-image in the whole-picture runs", "",
             &BenchOptions::picture_controlnet)}},
      {"picture-adapter",
       {text(kBench, "DIR", "a T2I-Adapter (scale 1) on --picture-control-image in the whole-picture runs", "",
             &BenchOptions::picture_adapter)}},
      {"picture-control-image",
       {text(kBench, "IMG", "the control picture of --picture-controlnet / --picture-adapter", "",
             &BenchOptions::picture_control_image)}},

      // ---------------------------------------------------------------- data tokenizer, data emoji
      {"vocab-size",
       {num<int>(kDataTokenizer, "N", "tokens in all, 514..49408", "", 514, 49408,
                 &TokenizerTrainOptions::vocab_size)}},
      {"min-frequency",
       {num<int>(kDataTokenizer, "N", "merge only pairs seen at least N times", "", 1, 1 << 30,
                 &TokenizerTrainOptions::min_frequency)}},
      {"model-max-length",
       {num<int>(kDataTokenizer, "N", "tokens per prompt with BOS/EOS, 2..4096", "", 2, 4096,
                 &TokenizerTrainOptions::model_max_length)}},
      {"caption-column",
       {text(kDataTokenizer | kTrainLoop, "NAME", "metadata.jsonl field holding the caption", "",
             &TokenizerTrainOptions::caption_column, &TO::caption_column)}},
      {"source",
       {text(kDataEmoji, "DIR", "folder with emoji-datasource-<style>/package", "$DMX_EMOJI_DIR or ~/.cache/dmx/emoji",
             &DE::source)}},
      {"style",
       {[] {
          Use u = texts(kDataEmoji, "NAME", "google|twitter|apple|facebook; repeatable", &DE::styles);
          u.show = [](const Target& t) {
            std::string s;
            for (const auto& st : t.part<DE>()->styles) s += (s.empty() ? "" : ",") + st;
            return s;
          };
          return u;
        }(),
        text(kDataScenes, "NAME", "the emoji style drawn (a style folder of --emoji: google|twitter)", "",
             &SD::style)}},
      {"size",
       {num<int>(kDataEmoji, "PX", "output side in pixels, 8..1024", "", 8, 1024, &DE::size),
        num<int>(kDataScenes, "PX", "canvas side in pixels, 64..1024", "", 64, 1024, &SD::size)}},
      {"emoji",
       {text(kDataScenes, "DIR", "a `dmx data emoji` folder (images and alpha masks)",
             "$DMX_EMOJI_DATA, ~/.cache/dmx/emoji-data, /tmp/emoji_ds", &SD::emoji)}},
      {"count", {num<int>(kDataScenes, "N", "canvases, 1..100000", "", 1, 100000, &SD::count)}},
      {"objects", {[] {
         Use u = own(kDataScenes, "A-B", "objects per canvas: N or A-B, 1 <= A <= B <= 8 (default 1-4)");
         u.set = [](const Target& t, const Args& a, const std::string& name) {
           SD* s = t.part<SD>();
           parse_scene_objects(a.str(name), s->min_objects, s->max_objects);
         };
         return u;
       }()}},
      {"split",
       {text(kDataScenes, "NAME", "train (train concepts only) or heldout (held-out concepts only)", "", &SD::split)}},

      {"heldout-fraction",
       {num<double>(kDataEmoji, "F", "share of concepts kept out of training, 0..0.05", "", 0.0, 0.05,
                    &DE::heldout_fraction)}},
      {"caption-format",
       {text(kDataEmoji, "FMT", "caption template with {name} {short_name} {category} {subcategory} {style}", "",
             &DE::caption_format)}},
      {"extra-caption-format",
       {texts(kDataEmoji, "FMT", "one more row per image with this caption; repeatable", &DE::extra_caption_formats)}},
      {"only", {[] {
         Use u = own(kDataEmoji, "NAMES",
                     "build only these concepts: comma-separated short names (e.g. grinning,pizza,cat)");
         u.set = [](const Target& t, const Args& a, const std::string& name) {
           t.part<DE>()->only = split_commas(a.str(name));
         };
         return u;
       }()}},

      // ---------------------------------------------------------------- train
      {"resolution",
       {num<int>(kTrainRecipes | kTrainBench | kTrainVqseg, "PX", "training image side, a multiple of 8", "", 8, 4096,
                 &TO::resolution, &TrainBenchOptions::resolution)}},
      {"random-crop",
       {flag(kTrainRecipes & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "random instead of center crops", false,
             &TO::center_crop)}},
      {"random-flip",
       {flag(kTrainRecipes & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "random horizontal flips", true,
             &TO::random_flip)}},
      {"image-column", {text(kTrainLoop, "NAME", "metadata.jsonl image field", "", &TO::image_column)}},
      {"skip-bad-rows",
       {flag(kTrainLoop, "report bad dataset rows and leave them out instead of failing", true, &TO::skip_bad_rows)}},
      {"batch-size",
       {num<int>(kTrainLoop, "B", "examples per process and micro-step", "", kI32Min, kI32Max, &TO::batch_size),
        num<int>(kTrainBench | kTrainClassifier, "B", "examples per step", "", 1, 4096, &TrainBenchOptions::batch_size,
                 &ClassifierTrainOptions::batch_size)}},
      {"gradient-accumulation-steps",
       {num<int>(kTrainLoop, "N", "micro-steps per optimizer step", "", 1, 1 << 20, &TO::gradient_accumulation_steps)}},
      {"learning-rate",
       {num<double>(kTrainLoop, "LR", "AdamW learning rate",
                    "lora 1e-4, finetune 1e-4, dreambooth 5e-6 / LoRA 5e-4, hypernetwork 1e-5, clip 5e-4, unclip 1e-4, "
                    "spatext 2e-4, scene 2e-4, vqseg 1e-3",
                    0, 1e6, &TO::learning_rate),
        num<double>(kTrainClassifier, "LR", "AdamW peak learning rate, cosine decay", "", 1e-8, 1.0,
                    &ClassifierTrainOptions::learning_rate)}},
      {"lr-scheduler",
       {text(kTrainLoop, "NAME", "constant|constant_with_warmup|linear|cosine", "", &TO::lr_scheduler)}},
      {"lr-warmup-steps", {num<I64>(kTrainLoop, "N", "warm-up steps", "", 0, kI64Max, &TO::lr_warmup_steps)}},
      {"adam-beta1", {num<double>(kTrainLoop, "B", "AdamW beta1", "", 0, 1, &TO::adam_beta1)}},
      {"adam-beta2", {num<double>(kTrainLoop, "B", "AdamW beta2", "", 0, 1, &TO::adam_beta2)}},
      {"adam-weight-decay", {num<double>(kTrainLoop, "W", "AdamW weight decay", "", 0, 1e6, &TO::adam_weight_decay)}},
      {"adam-epsilon", {num<double>(kTrainLoop, "E", "AdamW epsilon", "", 0, 1, &TO::adam_epsilon)}},
      {"max-grad-norm",
       {num<double>(kTrainLoop, "N", "gradient clipping norm; <= 0 disables", "", -1e30, 1e30, &TO::max_grad_norm)}},
      {"prediction-type",
       {text(kTrainRecipes, "T", "epsilon|v_prediction", "the model's scheduler", &TO::prediction_type)}},
      {"snr-gamma",
       {num<double>(kTrainRecipes, "G", "min-SNR-gamma loss weighting, e.g. 5", "off", 0, 1e6, &TO::snr_gamma)}},
      {"noise-offset", {num<double>(kTrainRecipes, "X", "noise offset", "", 0, 1e3, &TO::noise_offset)}},
      {"proportion-empty-prompts",
       {num<double>(kTrainRecipes & ~kTrainUnclip, "P", "share of captions replaced by \"\" (for guidance)", "", 0, 1,
                    &TO::proportion_empty_prompts),
        num<double>(kTrainPrior, "P",
                    "share of rows given the empty prompt's text features, the pipeline's unconditional branch (for "
                    "the prior's guidance)",
                    "", 0, 1, &TO::prior_text_drop),
        num<double>(kTrainUnclip, "P",
                    "share of captions replaced by \"\", so that the image embedding alone makes the picture (dmx "
                    "variations without --prompt)",
                    "", 0, 1, &TO::unclip_proportion_empty_prompts)}},
      {"image-embedding-dropout",
       {num<double>(kTrainUnclip, "P",
                    "share of image embeddings replaced by zeros (the pipelines' unconditional class labels, for "
                    "guidance)",
                    "", 0, 1, &TO::image_embedding_dropout)}},
      {"use-ema", {flag(kTrainLoop, "keep an EMA of the trained weights and save it", true, &TO::use_ema)}},
      {"ema-decay", {num<double>(kTrainLoop, "D", "EMA decay", "", 0, 1, &TO::ema_decay)}},
      {"mixed-precision",
       {text(kTrainRecipes, "P",
             "no|bf16: frozen parts in bf16, trained weights float32 masters (finetune, unclip, spatext: the UNet "
             "runs under bf16 autocast)",
             "", &TO::mixed_precision),
        text(kTrainClip, "P", "no|bf16: both towers run under bf16 autocast, weights float32", "",
             &TO::mixed_precision),
        text(kTrainPrior, "P", "no|bf16: the prior runs under bf16 autocast, weights float32", "",
             &TO::mixed_precision)}},
      {"gradient-checkpointing",
       {flag(kTrainRecipes | kTrainBench, "recompute UNet block activations in backward (less memory)", true,
             &TO::gradient_checkpointing, &TrainBenchOptions::gradient_checkpointing)}},
      {"cache-latents",
       {flag(kTrainRecipes, "encode each image with the VAE once (needs center crop, no --random-flip)", true,
             &TO::cache_latents)}},
      {"checkpoint-every",
       {num<I64>(kTrainLoop, "N", "write a checkpoint every N steps", "only at the end", 0, kI64Max,
                 &TO::checkpoint_every)}},
      {"checkpoints-total-limit",
       {num<int>(kTrainLoop, "N", "keep only the newest N checkpoints", "all", 0, 1 << 20,
                 &TO::checkpoints_total_limit)}},
      {"resume",
       {text(kTrainLoop, "DIR", "continue from a checkpoint folder, or the newest checkpoint of an output dir", "",
             &TO::resume)}},
      {"validation-steps",
       {num<I64>(kTrainRecipes & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "N",
                 "write validation images every N steps", "none", 0, kI64Max, &TO::validation_steps)}},
      {"validation-prompt",
       {text(kTrainRecipes & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "TEXT", "prompt of the validation images",
             "", &TO::validation_prompt)}},
      {"num-validation-images",
       {num<int>(kTrainRecipes & ~kTrainUnclip & ~kTrainSpatext & ~kTrainScene, "N", "validation images per run", "", 1,
                 64, &TO::num_validation_images)}},
      {"conditioning-column",
       {text(kTrainControlnet | kTrainAdapter, "NAME", "metadata.jsonl conditioning image field", "",
             &TO::conditioning_column)}},
      {"validation-image",
       {text(kTrainControlnet | kTrainAdapter, "PATH", "conditioning image of the validation images",
             "the first row's, at --resolution", &TO::validation_image)}},
      {"kl-weight", {num<double>(kTrainVae, "W", "weight of the KL term per pixel value", "", 0, 1e6, &TO::kl_weight)}},
      {"mse-weight",
       {num<double>(kTrainVae, "W", "weight of an added squared-error term", "", 0, 1e6, &TO::mse_weight)}},
      {"vae-crop",
       {num<int>(kTrainVae, "PX", "train on random crops of this side", "whole images", 0, 4096, &TO::vae_crop)}},
      {"save-format", {text(kLoraRecipes, "F", "diffusers|peft|kohya", "", &TO::save_format)}},
      {"alpha",
       {num<double>(kLoraRecipes | kTrainSpatext | kTrainScene, "A", "LoRA alpha; scale = alpha / rank", "rank", 0, 1e9,
                    &TO::alpha)}},
      {"lora-targets",
       {text(kLoraRecipes, "T", "attention (to_q/k/v/out.0) | all (every linear and conv of the blocks)", "",
             &TO::lora_targets)}},
      {"lora-init", {text(kLoraRecipes, "I", "kaiming (peft / kohya default) | gaussian", "", &TO::lora_init)}},
      {"train-text-encoder",
       {flag(kLoraRecipes | kTrainFinetune, "also train the text encoder (LoRA: on q/k/v/out_proj)", true,
             &TO::train_text_encoder)}},
      {"instance-data", {text(kTrainDreambooth, "DIR", "images of the subject (required)", "", &TO::instance_data)}},
      {"instance-prompt",
       {text(kTrainDreambooth, "TEXT", "prompt with the identifier, e.g. \"a photo of sks dog\" (required)", "",
             &TO::instance_prompt)}},
      {"class-data",
       {text(kTrainDreambooth, "DIR", "class images for prior preservation (generated when short)", "",
             &TO::class_data)}},
      {"class-prompt",
       {text(kTrainDreambooth, "TEXT", "prompt of the class images, e.g. \"a photo of a dog\"", "",
             &TO::class_prompt)}},
      {"prior-loss-weight",
       {num<double>(kTrainDreambooth, "W", "weight of the prior-preservation loss", "", 0, 1e6,
                    &TO::prior_loss_weight)}},
      {"num-class-images",
       {num<int>(kTrainDreambooth, "N", "class images wanted in --class-data", "", 1, 1 << 20, &TO::num_class_images)}},
      {"class-inference-steps",
       {num<int>(kTrainDreambooth, "N", "denoising steps of generated class images", "", 1, 10000,
                 &TO::class_inference_steps)}},
      {"lora-rank",
       {num<int>(kTrainDreambooth, "R", "train LoRA adapters of this rank instead of the full UNet (0: full)", "",
                 kI32Min, kI32Max, &TO::lora_rank)}},

      // ---------------------------------------------------------------- train hypernetwork (A1111's options)
      {"layer-structure",
       {text(kTrainHypernetwork, "LIST", "module widths as multiples of the context width, first and last 1", "",
             &TO::layer_structure)}},
      {"activation",
       {text(kTrainHypernetwork, "NAME", "linear|relu|leakyrelu|elu|swish (Hardswish)|tanh|sigmoid|gelu|silu|...", "",
             &TO::activation)}},
      {"weight-init",
       {text(kTrainHypernetwork, "NAME",
             "Normal (std 0.01, zero bias)|XavierUniform|XavierNormal|KaimingUniform|"
             "KaimingNormal",
             "", &TO::weight_init)}},
      {"layer-norm", {flag(kTrainHypernetwork, "LayerNorm after every Linear", true, &TO::layer_norm)}},
      {"use-dropout",
       {flag(kTrainHypernetwork, "dropout 0.3 between hidden layers (without --dropout-structure)", true,
             &TO::use_dropout)}},
      {"dropout-structure",
       {text(kTrainHypernetwork, "LIST", "dropout probability per --layer-structure entry, e.g. 0,0.3,0",
             "from --use-dropout", &TO::dropout_structure)}},
      {"last-layer-dropout",
       {flag(kTrainHypernetwork, "with --use-dropout: also before the last Linear", true, &TO::last_layer_dropout)}},
      {"activate-output",
       {flag(kTrainHypernetwork, "the activation after the last Linear too", true, &TO::activate_output)}},
      {"hypernetwork-widths",
       {text(kTrainHypernetwork, "LIST", "context widths to create module pairs for, e.g. 768,320,640,1280",
             "every attention width of the UNet", &TO::hypernetwork_widths)}},

      // ---------------------------------------------------------------- eval
      {"prompts",
       {text(kEval, "FILE", "one prompt per line, each starting with a lower-cased emoji name", "built-in 300",
             &EO::prompts_file)}},
      {"classifier", {text(kEval, "DIR", "emoji classifier folder", "", &EO::classifier)}},
      {"limit", {num<int>(kEval, "N", "score only the first N prompts", "all", 1, 1 << 20, &EO::limit)}},
      {"lora-scale", {num<double>(kEval, "S", "scale of --lora", "", -100, 100, &EO::lora_scale)}},
      {"aux-prompts",
       {num<int>(kEval, "N", "prompts used for --controlnet, --adapter, --lora and --hypernetwork: the first N", "", 1,
                 1 << 20, &EO::aux_prompts)}},
      {"dreambooth",
       {text(kEval, "FILE", "also score this DreamBooth LoRA: subject similarity with and without it", "",
             &EO::dreambooth)}},
      {"dreambooth-prompt",
       {text(kEval, "TEXT", "prompt with the identifier, e.g. 'sks emoji'", "", &EO::dreambooth_prompt)}},
      {"dreambooth-concept",
       {text(kEval, "NAME", "the emoji name of the subject (its real image is the reference)", "",
             &EO::dreambooth_concept)}},
      {"dreambooth-images",
       {num<int>(kEval, "N", "images generated with and without the DreamBooth LoRA", "", 2, 10000,
                 &EO::dreambooth_images)}},
      {"variations",
       {text(kEval, "DIR",
             "also score image variations of this StableUnCLIPImg2ImgPipeline folder (classifier agreement with the "
             "source, SSIM diversity)",
             "", &EO::variations)}},
      {"variations-per-image",
       {num<int>(kEval, "N", "with --variations: pictures per source emoji", "", 2, 64, &EO::variations_per_image)}},
      {"mask-iou", {own(kEval, "MASK", "print the IoU of MASK and --reference MASK (white = inside), then exit")}},
      {"background-error",
       {own(kEval, "IMAGE", "print the mean |IMAGE - --reference| outside --mask (in [0, 1]), then exit")}},
      {"edge-f1",
       {own(kEval, "IMAGE", "print the edge F1 of Canny(IMAGE) against the edge map --reference, then exit")}},
      {"reference", {own(kEval, "FILE", "second file of --mask-iou, --background-error, --edge-f1")}},
      {"image-size",
       {num<int>(kTrainClip, "PX", "input side of a new CLIP's image tower; pictures are resized to it", "", 8, 512,
                 &TO::clip_image_size)}},
      {"patch-size",
       {num<int>(kTrainClip, "PX", "ViT patch side of a new CLIP (divides --image-size)", "", 1, 512,
                 &TO::clip_patch_size)}},
      {"layers",
       {num<int>(kTrainClip, "N", "transformer layers of each tower of a new CLIP", "", 1, 48, &TO::clip_layers),
        num<int>(kTrainPrior, "N", "transformer blocks of the prior", "", 1, 48, &TO::prior_layers)}},
      {"heads",
       {num<int>(kTrainClip, "N", "attention heads of a new CLIP (divide --width)", "", 1, 64, &TO::clip_heads),
        num<int>(kTrainPrior, "N", "attention heads of the prior (inner width = heads x --attention-head-dim)", "", 1,
                 64, &TO::prior_heads)}},
      {"attention-head-dim",
       {num<int>(kTrainPrior, "N", "width of each of the prior's attention heads", "", 4, 256, &TO::prior_head_dim)}},
      {"projection-dim",
       {num<int>(kTrainClip, "N", "width of a new CLIP's joint embedding", "", 2, 4096, &TO::clip_projection_dim)}},
      {"clip",
       {text(kEval, "DIR",
             "measure this CLIP folder (dmx train clip) on --data's emoji: zero-shot classification of the held-out "
             "concepts and retrieval (docs/evaluation.md); with --layouts: the CLIP of the global similarity (default "
             "models/emoji-clip)",
             "", &EO::clip),
        text(kTrainPrior, "DIR",
             "the frozen CLIP folder (dmx train clip): its text tower conditions the prior, its image tower gives "
             "the targets; copied into prior_text_encoder/ and prior_tokenizer/",
             "models/emoji-clip when it exists", &TO::prior_clip),
        text(kTrainUnclip, "DIR",
             "the image tower (feature_extractor + image_encoder): a CLIP folder (dmx train clip) or a "
             "StableUnCLIPImg2ImgPipeline folder",
             "models/emoji-clip; an unCLIP --model: its own", &TO::clip),
        text(kTrainSpatext, "DIR", "the CLIP folder whose image tower embeds each segment (dmx train clip)",
             "models/emoji-clip", &TO::clip)}},
      {"prior",
       {own(kEval, "DIR",
            "measure this prior folder (dmx train prior) on --data's emoji: cosine of sampled CLIP image embeddings to "
            "the true ones and retrieval, against the text embedding (docs/unclip.md); --clip names the image tower's "
            "CLIP (default models/emoji-clip), --steps and --guidance-scale the prior's (default 25 and 4)"),
        text(kTrainSpatext, "DIR",
             "the prior folder (dmx train prior, of the same CLIP) copied into the output: it maps each region's text "
             "to an image embedding at inference",
             "models/emoji-unclip", &TO::spatext_prior)}},
      {"layout-dropout",
       {num<double>(kTrainSpatext, "P", "share of rows trained without the spatio-textual map (for guidance)", "", 0, 1,
                    &TO::layout_dropout),
        num<double>(kTrainScene, "P", "share of rows trained with the dropped scene (for guidance)", "", 0, 1,
                    &TO::layout_dropout)}},
      {"vqseg",
       {text(kTrainScene, "DIR",
             "the VQ-SEG folder (dmx train vqseg) whose codes are the scene tokens; copied into "
             "the output (required)",
             "", &TO::vqseg)}},
      {"codebook-size", {num<int>(kTrainVqseg, "K", "VQ-SEG's codebook size", "", 2, 16384, &TO::codebook_size)}},
      {"vq-factor",
       {num<int>(kTrainVqseg, "F", "VQ-SEG's downscale factor (2, 4, 8 or 16): a map of side R gives (R / F)^2 tokens",
                 "", 2, 16, &TO::vq_factor)}},
      {"scene-guidance",
       {text(kGenerate, "MODE",
             "with --layout-method scene (or a scene folder): what the unconditional row drops: text (Make-A-Scene's) "
             "| all (text and scene)",
             "", &GO::scene_guidance),
        text(kEval, "MODE", "with --layouts and --layout-method scene: text | all (as dmx generate's)", "",
             &EO::scene_guidance)}},
      {"layouts",
       {text(kEval, "DIR", "score pictures made from the layouts of this `dmx data scenes` folder (docs/layouts.md)",
             "", &EO::layouts)}},

      // ---------------------------------------------------------------- how a run behaves (RunOptions and the like)
      {"threads",
       {num<int>(kRunGroup | kBench | kTrainLoop | kTrainBench | kTrainClassifier | kEval, "N", "CPU threads",
                 "all cores", 1, 1024, &RunOptions::threads, &BenchOptions::threads, &TO::threads,
                 &TrainBenchOptions::threads, &ClassifierTrainOptions::threads, &EO::threads),
        num<int>(kServe, "N", "CPU threads of a generation", "all cores", 1, 1024, &ServeOptions::threads)}},
      // ---------------------------------------------------------------- serve (docs/serve.md)
      {"host",
       {text(kServe, "ADDR", "address to listen on; anything but 127.0.0.1 / localhost / ::1 requires --token", "",
             &ServeOptions::host)}},
      {"port", {num<int>(kServe, "N", "TCP port (0 = any free port, printed)", "", 0, 65535, &ServeOptions::port)}},
      {"web",
       {text(kServe, "DIR", "serve the page's files from DIR (web/ of the repository) instead of the built-in copy",
             "the built-in copy", &ServeOptions::web_dir)}},
      {"models",
       {text(kServe, "DIR", "the folder whose diffusers model folders and LoRA files the server offers",
             "the bundled models/", &ServeOptions::models_dir)}},
      {"token",
       {text(kServe, "T", "require 'Authorization: Bearer T' on every request (401 without)", "none",
             &ServeOptions::token)}},
      {"max-queue",
       {num<int>(kServe, "N", "generations that may wait behind the running one; beyond: 503 at once", "", 0, 1024,
                 &ServeOptions::max_queue)}},
      {"overwrite",
       {flag(kRunGroup | kInit | kConvert | kDataTokenizer | kDataEmoji | kDataScenes | kTrainClassifier,
             "replace outputs that already exist (never an input)", true, &RunOptions::overwrite,
             &InitModelOptions::overwrite, &ConvertOptions::overwrite, &TokenizerTrainOptions::overwrite,
             &DE::overwrite, &SD::overwrite, &ClassifierTrainOptions::overwrite),
        flag(kBench, "replace existing --profile traces", true, &BenchOptions::overwrite),
        flag(kTrainLoop, "replace an existing --output; start over in an --output-dir holding an earlier run", true,
             &TO::overwrite)}},
      {"quiet",
       {flag(kRunGroup | kDataEmoji | kDataScenes | kTrainClassifier | kEval, "no progress output", false,
             &RunOptions::progress, &DE::progress, &SD::progress, &ClassifierTrainOptions::progress, &EO::progress),
        flag(kTrainLoop, "no progress bar", true, &TO::quiet),
        own(kInit | kConvert | kDataTokenizer, "", "print nothing on success"),
        flag(kServe, "no log line per job on stderr (the start-up lines stay)", true, &ServeOptions::quiet)}},
      {"verbose",
       {flag(kRunGroup, "timings and stack traces", true, &RunOptions::verbose),
        own(kAllCommands & ~kRunGroup, "", "stack traces")}},
      {"help", {own(kAllCommands, "", "show this help")}},
  };
}

}  // namespace

const std::vector<Option>& option_table() {
  static const std::vector<Option> table = build_table();
  return table;
}

const Use* use_for(const Option& o, Command c) {
  for (const Use& u : o.uses)
    if (u.commands & c) return &u;
  return nullptr;
}

std::string help_line(const Use& u, const Target& defaults) {
  const std::string shown = u.show ? u.show(defaults) : "";
  if (!shown.empty()) return u.help + " (default " + shown + ")";
  if (!u.unset.empty()) return u.help + " (default: " + u.unset + ")";
  return u.help;
}

Args make_args(Command c, const Target& defaults) {
  std::vector<OptionSpec> specs;
  for (const Option& o : option_table())
    if (const Use* u = use_for(o, c)) specs.push_back({o.name, u->value_name, help_line(*u, defaults), u->repeatable});
  return Args(command_info(c).name, std::move(specs));
}

std::optional<Args> parse_args(Command c, int argc, char** argv, const Target& defaults) {
  Args a = make_args(c, defaults);
  a.parse(argc, argv, command_info(c).first);
  if (a.has("help")) {
    std::printf("%s", a.help().c_str());
    return std::nullopt;
  }
  return a;
}

void check_required(const Args& a, const std::vector<Required>& required) {
  for (const Required& r : required)
    DMX_CHECK_ARG(a.has(r.name), "--", r.name, " is required", *r.what ? std::string(" (") + r.what + ")" : "");
}

void apply_options(const Args& a, const Target& t) {
  for (const Option& o : option_table()) {
    const Use* u = use_for(o, t.command);
    if (u && u->set && a.has(o.name)) u->set(t, a, o.name);
  }
}

std::string help_text(Command c) {
  std::string out;
  with_default_target(c, [&](const Target& t) { out = make_args(c, t).help(); });
  return out;
}

// A named default-constructed struct (a T{} temporary of these aggregates with bases trips GCC 12's -O3
// maybe-uninitialized).
template <class T>
void run_on_default(Command c, const std::function<void(const Target&)>& fn) {
  T o;
  fn(target(c, o));
}

void with_default_target(Command c, const std::function<void(const Target&)>& fn) {
  switch (c) {
    case kGenerate:
      return run_on_default<GenerateOptions>(c, fn);
    case kBench:
      return run_on_default<BenchOptions>(c, fn);
    case kP2P:
      return run_on_default<P2POptions>(c, fn);
    case kDiffEdit:
      return run_on_default<DiffEditOptions>(c, fn);
    case kInit:
      return run_on_default<InitModelOptions>(c, fn);
    case kConvert:
      return run_on_default<ConvertOptions>(c, fn);
    case kDataTokenizer:
      return run_on_default<TokenizerTrainOptions>(c, fn);
    case kDataEmoji:
      return run_on_default<EmojiDataOptions>(c, fn);
    case kDataScenes:
      return run_on_default<SceneDataOptions>(c, fn);
    case kTrainLora:
    case kTrainFinetune:
    case kTrainDreambooth:
    case kTrainControlnet:
    case kTrainAdapter:
    case kTrainVae:
    case kTrainPalette:
    case kTrainHypernetwork:
    case kTrainClip:
    case kTrainPrior:
    case kTrainUnclip:
    case kTrainSpatext:
    case kTrainVqseg:
    case kTrainScene:
      return run_on_default<TrainOptions>(c, fn);
    case kRestore:
      return run_on_default<RestoreOptions>(c, fn);
    case kTrainBench:
      return run_on_default<TrainBenchOptions>(c, fn);
    case kTrainClassifier:
      return run_on_default<ClassifierTrainOptions>(c, fn);
    case kEval:
      return run_on_default<EvalOptions>(c, fn);
    case kUpscale:
      return run_on_default<UpscaleOptions>(c, fn);
    case kVariations:
      return run_on_default<VariationsOptions>(c, fn);
    case kEmbed:
      return run_on_default<EmbedOptions>(c, fn);
    case kServe:
      return run_on_default<ServeOptions>(c, fn);
  }
  throw std::logic_error("cli: unknown command id");
}
}  // namespace dmx::cli
