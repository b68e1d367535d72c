// The scheduler registry: one row per scheduler name, and everything dmx knows about a scheduler's identity
// derives from it: the factory (create_scheduler), the names --scheduler accepts and its help text, the A1111
// "Sampler:" label written into PNG metadata and read back by --from, the name of a model's own scheduler, and
// the README's scheduler table (a test compares them).
//
// Adding a scheduler: its own file (the algorithm and its SchedulerClass: diffusers name, config fields,
// defaults, constructor), one row in registry.cpp, its test.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace dmx::schedulers {

struct SchedulerClass;  // scheduler_impl.h

struct SchedulerEntry {
  std::string name;                // what --scheduler takes: "euler_a"
  const SchedulerClass& (*cls)();  // the diffusers class, defined in the scheduler's own file
  std::string a1111_label;         // A1111's "Sampler:" label; "" = not a sampler (generation does not offer it)
  nlohmann::json overrides;        // config fields set over the model's config (a JSON object)
  std::string use = "";            // rows that are no sampler: what they are for (the README table says it)
  std::string class_name() const;  // the diffusers class name, e.g. "EulerAncestralDiscreteScheduler"
};

// Every row, in table order.
const std::vector<SchedulerEntry>& scheduler_registry();
// The row named `name`, or nullptr.
const SchedulerEntry* find_scheduler(const std::string& name);
// Names of the rows that are samplers (have an A1111 label): what generation accepts, in table order.
std::vector<std::string> sampler_names();
// The A1111 label of a name ("" when the name is no sampler).
std::string sampler_label(const std::string& name);
// The sampler whose A1111 label or name is `label_or_name` ("" when none).
std::string sampler_for_label(const std::string& label_or_name);
// The row that reproduces a model's scheduler_config.json (its _class_name, and every override of the row
// matching the config's effective values; the most specific row wins), so that metadata names a sampler
// --from can re-run. Configs no row reproduces give their _class_name.
std::string scheduler_name_for_config(const nlohmann::json& scheduler_config);
// The registry as the README's Markdown table.
std::string scheduler_table_markdown();
}  // namespace dmx::schedulers
