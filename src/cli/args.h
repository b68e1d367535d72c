// A small strict command-line parser: every value is checked and every error names the option,
// the rule and the value received.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dmx::cli {

struct OptionSpec {
  std::string name;        // without dashes: "steps"
  std::string value_name;  // empty = a flag without a value
  std::string help;
  bool repeatable = false;
};

class Args {
 public:
  Args(std::string command, std::vector<OptionSpec> specs);
  // Parses argv[first..argc). Throws dmx::InvalidArgument on unknown options or missing values.
  void parse(int argc, char** argv, int first);
  bool has(const std::string& name) const;
  std::string str(const std::string& name, const std::string& def = "") const;
  std::vector<std::string> all(const std::string& name) const;
  int64_t integer(const std::string& name, int64_t def, int64_t min, int64_t max) const;
  uint64_t u64(const std::string& name) const;
  double real(const std::string& name, double def, double min, double max) const;
  std::string help() const;
  const std::string& command() const { return command_; }

 private:
  const OptionSpec* find(const std::string& name) const;
  std::string command_;
  std::vector<OptionSpec> specs_;
  std::map<std::string, std::vector<std::string>> values_;
};
}  // namespace dmx::cli
