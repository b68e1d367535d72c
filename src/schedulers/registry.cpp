// The scheduler registry (registry.h): the one table of scheduler names.
#include "schedulers/registry.h"

#include <memory>
#include <sstream>

#include "core/text.h"
#include "dmx/error.h"
#include "schedulers/scheduler.h"
#include "schedulers/scheduler_impl.h"

namespace dmx::schedulers {

// Each class is defined in its scheduler's own file.
const SchedulerClass& ddpm_class();
const SchedulerClass& ddim_class();
const SchedulerClass& ddim_inverse_class();
const SchedulerClass& pndm_class();
const SchedulerClass& euler_class();
const SchedulerClass& euler_ancestral_class();
const SchedulerClass& heun_class();
const SchedulerClass& lms_class();
const SchedulerClass& dpm_multistep_class();
const SchedulerClass& unclip_class();
const SchedulerClass& lcm_class();

const std::vector<SchedulerEntry>& scheduler_registry() {
  using json = nlohmann::json;
  // name, diffusers class, A1111 sampler label, config over the model's (diffusers' from_config + the row's),
  // and for rows that are no sampler what they are for
  static const std::vector<SchedulerEntry> rows = {
      {"ddim", ddim_class, "DDIM", json::object()},
      {"ddpm", ddpm_class, "DDPM", json::object()},
      {"pndm", pndm_class, "PLMS", json::object()},
      {"euler", euler_class, "Euler", json::object()},
      {"euler_a", euler_ancestral_class, "Euler a", json::object()},
      {"heun", heun_class, "Heun", json::object()},
      {"lms", lms_class, "LMS", json::object()},
      {"dpmpp_2m", dpm_multistep_class, "DPM++ 2M", {{"algorithm_type", "dpmsolver++"}, {"solver_order", 2}}},
      {"dpmpp_2m_karras",
       dpm_multistep_class,
       "DPM++ 2M Karras",
       {{"algorithm_type", "dpmsolver++"}, {"solver_order", 2}, {"use_karras_sigmas", true}}},
      {"lcm", lcm_class, "LCM", json::object()},
      {"ddim_inverse", ddim_inverse_class, "", json::object(), "inversion only"},
      {"unclip", unclip_class, "", json::object(), "unCLIP priors: Karlo, Kandinsky"},
  };
  return rows;
}

std::string SchedulerEntry::class_name() const { return cls().name; }

const SchedulerEntry* find_scheduler(const std::string& name) {
  for (const auto& e : scheduler_registry())
    if (e.name == name) return &e;
  return nullptr;
}

std::vector<std::string> scheduler_names() {
  std::vector<std::string> out;
  for (const auto& e : scheduler_registry()) out.push_back(e.name);
  return out;
}

std::vector<std::string> sampler_names() {
  std::vector<std::string> out;
  for (const auto& e : scheduler_registry())
    if (!e.a1111_label.empty()) out.push_back(e.name);
  return out;
}

std::vector<std::string> scheduler_class_names() {
  std::vector<std::string> out;
  for (const auto& e : scheduler_registry())
    if (!detail::contains(out, e.class_name())) out.push_back(e.class_name());
  return out;
}

const SchedulerClass& find_scheduler_class(const std::string& class_name) {
  for (const auto& e : scheduler_registry())
    if (e.class_name() == class_name) return e.cls();
  throw InvalidArgument("unknown scheduler class '" + class_name +
                        "'; supported classes: " + join(scheduler_class_names(), ", "));
}

std::unique_ptr<Scheduler> create_scheduler(const std::string& name, const nlohmann::json& base_config) {
  nlohmann::json cfg = base_config.is_object() ? base_config : nlohmann::json::object();
  if (const SchedulerEntry* e = find_scheduler(name)) {
    for (const auto& [key, value] : e->overrides.items()) cfg[key] = value;
    return e->cls().make(SchedulerConfig::for_class(e->class_name(), cfg));
  }
  for (const auto& cls : scheduler_class_names())
    if (name == cls) return find_scheduler_class(cls).make(SchedulerConfig::for_class(cls, cfg));
  throw InvalidArgument("unknown scheduler '" + name + "'; valid names: " + join(scheduler_names(), ", ") +
                        " (or a diffusers class: " + join(scheduler_class_names(), ", ") + ")");
}

std::string sampler_label(const std::string& name) {
  const SchedulerEntry* e = find_scheduler(name);
  return e ? e->a1111_label : "";
}

std::string sampler_for_label(const std::string& label_or_name) {
  for (const auto& e : scheduler_registry())
    if (!e.a1111_label.empty() && (e.a1111_label == label_or_name || e.name == label_or_name)) return e.name;
  return "";
}

std::string scheduler_name_for_config(const nlohmann::json& cfg) {
  // Only names: a field of another type (the config is the model's file) is no reason to fail after the run.
  std::string cls;
  if (cfg.is_object())
    if (auto it = cfg.find("_class_name"); it != cfg.end() && it->is_string()) cls = it->get<std::string>();
  nlohmann::json effective;
  try {
    effective = SchedulerConfig::for_class(cls, cfg).to_json();
  } catch (const Error&) {
    return cls;  // an unknown class or a config it does not accept: no row runs it
  } catch (const nlohmann::json::exception&) {
    return cls;
  }
  const SchedulerEntry* best = nullptr;
  for (const auto& e : scheduler_registry()) {
    if (e.class_name() != cls) continue;
    bool match = true;
    for (const auto& [key, value] : e.overrides.items())
      match = match && effective.contains(key) && effective.at(key) == value;
    if (match && (!best || e.overrides.size() > best->overrides.size())) best = &e;
  }
  return best ? best->name : cls;
}

std::string scheduler_table_markdown() {
  std::ostringstream os;
  os << "| `--scheduler` | diffusers class | A1111 sampler (PNG metadata) | config set over the model's |\n"
     << "|---|---|---|---|\n";
  for (const auto& e : scheduler_registry()) {
    std::string overrides;
    for (const auto& [key, value] : e.overrides.items())
      overrides += (overrides.empty() ? "`" : ", `") + key + ": " + value.dump() + "`";
    os << "| `" << e.name << "` | `" << e.class_name() << "` | "
       << (e.a1111_label.empty() ? "— (" + e.use + ")" : e.a1111_label) << " | "
       << (overrides.empty() ? "—" : overrides) << " |\n";
  }
  return os.str();
}
}  // namespace dmx::schedulers
