// The CLI's option table: every option of every command declared once (src/cli/options.cpp), with its name,
// its value name, its help text, the commands that use it and a handler that writes the parsed value into the
// command's public options struct (include/dmx). Help defaults are read from a default-constructed struct, so
// they cannot drift from the API. One prologue (parse_options) parses and prints help for every command.
// docs/architecture.md ("The command line") says how to add a flag or a command.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <typeindex>
#include <vector>

#include "cli/args.h"
#include "dmx/options.h"

namespace dmx::cli {

// The commands that take options, one bit each (a Use names a set of them).
enum Command : uint32_t {
  kGenerate = 1u << 0,
  kBench = 1u << 1,
  kP2P = 1u << 2,
  kDiffEdit = 1u << 3,
  kInit = 1u << 4,
  kConvert = 1u << 5,
  kDataTokenizer = 1u << 6,
  kDataEmoji = 1u << 7,
  kTrainLora = 1u << 8,
  kTrainFinetune = 1u << 9,
  kTrainDreambooth = 1u << 10,
  kTrainControlnet = 1u << 11,
  kTrainVae = 1u << 12,
  kTrainBench = 1u << 13,
  kTrainClassifier = 1u << 14,
  kEval = 1u << 15,
  kUpscale = 1u << 16,
  kVariations = 1u << 17,
  kEmbed = 1u << 18,
  kTrainPalette = 1u << 19,
  kRestore = 1u << 20,
  kTrainAdapter = 1u << 21,
  kTrainHypernetwork = 1u << 22,
  kDataScenes = 1u << 23,
  kServe = 1u << 24,
  kTrainClip = 1u << 25,
  kTrainPrior = 1u << 26,
  kTrainUnclip = 1u << 27,
  kTrainSpatext = 1u << 28,
  kTrainVqseg = 1u << 29,
  kTrainScene = 1u << 30,
};
using Commands = uint32_t;
constexpr Commands kTrainRecipes = kTrainLora | kTrainFinetune | kTrainDreambooth | kTrainControlnet | kTrainVae |
                                   kTrainPalette | kTrainAdapter | kTrainHypernetwork | kTrainUnclip | kTrainSpatext |
                                   kTrainScene;
constexpr Commands kAllCommands = (1u << 31) - 1;

struct CommandInfo {
  Command id;
  const char* name;  // as typed and in messages: "generate", "train lora"
  int first;         // argv index of the first option (2, or 3 for a sub-command)
};
// Every command of the table, in the order of `dmx --help`.
const std::vector<CommandInfo>& commands();
const CommandInfo& command_info(Command c);
// The command called `name` ("train lora"); nullptr when none is.
const CommandInfo* find_command(const std::string& name);

// The options struct a command fills, seen through the shared groups (dmx/options.h) it embeds.
struct Target {
  Command command;
  std::type_index type;  // the command's own struct
  void* options;
  ModelOptions* model = nullptr;
  DeviceOptions* device = nullptr;
  SamplingOptions* sampling = nullptr;
  RunOptions* run = nullptr;

  // The part of the target of type S: a group it embeds, or its own struct; nullptr when it has none.
  template <class S>
  S* part() const {
    if constexpr (std::is_same_v<S, ModelOptions>)
      return model;
    else if constexpr (std::is_same_v<S, DeviceOptions>)
      return device;
    else if constexpr (std::is_same_v<S, SamplingOptions>)
      return sampling;
    else if constexpr (std::is_same_v<S, RunOptions>)
      return run;
    else
      return type == std::type_index(typeid(S)) ? static_cast<S*>(options) : nullptr;
  }
};

template <class T>
Target target(Command c, T& o) {
  Target t{c, std::type_index(typeid(T)), &o};
  if constexpr (std::is_base_of_v<ModelOptions, T>) t.model = &o;
  if constexpr (std::is_base_of_v<DeviceOptions, T>) t.device = &o;
  if constexpr (std::is_base_of_v<SamplingOptions, T>) t.sampling = &o;
  if constexpr (std::is_base_of_v<RunOptions, T>) t.run = &o;
  return t;
}

// One meaning of an option for a set of commands.
struct Use {
  Commands commands = 0;
  std::string value_name;  // "" = a flag without a value
  std::string help;        // without the default, which is appended from the struct
  bool repeatable = false;
  // Writes the value given (a.str(name) / a.all(name) / a.has(name)) into the target; empty: the command reads
  // it itself (--help, --json, file metrics).
  std::function<void(const Target&, const Args& a, const std::string& name)> set;
  // The target's current value as help prints it; "" = show `unset` instead (no default printed if that is
  // empty too). Empty function: no default.
  std::function<std::string(const Target&)> show;
  std::string unset;  // what an empty / zero value means ("the model's size", "all cores")
};

// An option: its name (without dashes) and its meanings, at most one per command.
struct Option {
  std::string name;
  std::vector<Use> uses;
};

// The table.
const std::vector<Option>& option_table();

// The use of `o` by command c (nullptr: c does not take it).
const Use* use_for(const Option& o, Command c);

// The help line of an option for a command, default included: "denoising steps (default 50)".
std::string help_line(const Use& u, const Target& defaults);

// The parser of a command, its help text read from `defaults` (a default-constructed options struct).
Args make_args(Command c, const Target& defaults);

// Parses argv[first..argc) of command c. --help: prints the help (defaults read from `defaults`) on stdout and
// returns nullopt. Unknown options, missing values and repeats: InvalidArgument.
std::optional<Args> parse_args(Command c, int argc, char** argv, const Target& defaults);

// Runs the handler of every option given, in table order, on the target.
void apply_options(const Args& a, const Target& t);

// A required option and what it is: "--out is required (the folder to create)".
struct Required {
  const char* name;
  const char* what = "";
};
// The required options the image commands share.
inline const Required kModelRequired{"model", "a diffusers folder or a single-file .safetensors or .ckpt checkpoint"};
inline const Required kPngOutputRequired{"output", "a .png path"};
// InvalidArgument for the first required option not given.
void check_required(const Args& a, const std::vector<Required>& required);

// The prologue of every command: parse, --help, the required options, then every given option's handler on `o`.
// nullopt: the help was printed (exit 0).
template <class T>
std::optional<Args> parse_options(Command c, int argc, char** argv, T& o, const std::vector<Required>& required = {}) {
  T defaults;  // every field has its default initializer
  std::optional<Args> a = parse_args(c, argc, argv, target(c, defaults));
  if (!a) return a;
  check_required(*a, required);
  apply_options(*a, target(c, o));
  return a;
}

// Calls fn with a target holding a default-constructed options struct of command c.
void with_default_target(Command c, const std::function<void(const Target&)>& fn);

// The help text of a command (what `dmx <command> --help` prints), read from a default-constructed struct.
std::string help_text(Command c);

// A number as help prints it: the shortest text that parses back to the same double ("7.5", "1e-08").
std::string format_number(double v);
}  // namespace dmx::cli
