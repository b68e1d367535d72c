#include "cli/args.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <sstream>

#include "dmx/error.h"

namespace dmx::cli {

Args::Args(std::string command, std::vector<OptionSpec> specs)
    : command_(std::move(command)), specs_(std::move(specs)) {}

const OptionSpec* Args::find(const std::string& name) const {
  for (const auto& s : specs_)
    if (s.name == name) return &s;
  return nullptr;
}

void Args::parse(int argc, char** argv, int first) {
  for (int i = first; i < argc; ++i) {
    std::string a = argv[i];
    DMX_CHECK_ARG(a.size() > 2 && a.compare(0, 2, "--") == 0, "unexpected argument '", a,
                  "' (options start with --; see dmx ", command_, " --help)");
    std::string name = a.substr(2), value;
    bool inline_value = false;
    const size_t eq = name.find('=');
    if (eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      inline_value = true;
    }
    const OptionSpec* s = find(name);
    DMX_CHECK_ARG(s != nullptr, "unknown option --", name, " for dmx ", command_, " (see dmx ", command_, " --help)");
    if (s->value_name.empty()) {
      DMX_CHECK_ARG(!inline_value, "--", name, " takes no value");
      value = "1";
    } else if (!inline_value) {
      DMX_CHECK_ARG(i + 1 < argc, "--", name, " needs a value (", s->value_name, ")");
      value = argv[++i];
    }
    auto& v = values_[name];
    DMX_CHECK_ARG(s->repeatable || v.empty(), "--", name, " given more than once");
    v.push_back(value);
  }
}

bool Args::has(const std::string& name) const { return values_.count(name) != 0; }

std::string Args::str(const std::string& name, const std::string& def) const {
  auto it = values_.find(name);
  return it == values_.end() ? def : it->second.back();
}

std::vector<std::string> Args::all(const std::string& name) const {
  auto it = values_.find(name);
  return it == values_.end() ? std::vector<std::string>{} : it->second;
}

// One syntax for numbers everywhere (dmx/error.h): `--steps 1e3` and `Steps: 1e3` from --from are both refused.
int64_t Args::integer(const std::string& name, int64_t def, int64_t min, int64_t max) const {
  if (!has(name)) return def;
  return parse_integer(str(name), "--" + name, min, max);
}

uint64_t Args::u64(const std::string& name) const { return parse_unsigned(str(name), "--" + name); }

double Args::real(const std::string& name, double def, double min, double max) const {
  if (!has(name)) return def;
  const double v = parse_number(str(name), "--" + name);
  DMX_CHECK_ARG(v >= min && v <= max, "--", name, " must be in [", min, ", ", max, "], got ", v);
  return v;
}

std::string Args::help() const {
  std::ostringstream os;
  os << "usage: dmx " << command_ << " [options]\n\noptions:\n";
  for (const auto& s : specs_) {
    std::string left = "  --" + s.name + (s.value_name.empty() ? "" : " " + s.value_name);
    os << left << std::string(left.size() < 34 ? 34 - left.size() : 1, ' ') << s.help << "\n";
  }
  return os.str();
}
}  // namespace dmx::cli
