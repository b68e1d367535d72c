// dmx error hierarchy (public, torch-free). The library throws these and never exits or aborts.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace dmx {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A caller-supplied value breaks a rule: names the parameter, the rule and the value.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};
// Missing, unexpected or mis-shaped weights; malformed files.
class FormatError : public Error {
 public:
  using Error::Error;
};
// A file cannot be opened, read or written.
class IoError : public Error {
 public:
  using Error::Error;
};
// A feature or configuration dmx does not implement (yet).
class Unsupported : public Error {
 public:
  using Error::Error;
};
// The system failed an operation the input did not cause: the disk or a quota is full, a file grew past
// the process's size limit, an I/O error. Not invalid input: the CLI exits 1 for it (2 is for bad input).
class SystemError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail
}  // namespace dmx

// TORCH_CHECK-style macros: DMX_CHECK_ARG(steps > 0, "steps must be > 0, got ", steps);
#define DMX_CHECK_T(type, cond, ...) \
  do {                               \
    if (!(cond)) throw type(::dmx::detail::concat(__VA_ARGS__)); \
  } while (0)
#define DMX_CHECK_ARG(cond, ...) DMX_CHECK_T(::dmx::InvalidArgument, cond, __VA_ARGS__)
#define DMX_CHECK_FORMAT(cond, ...) DMX_CHECK_T(::dmx::FormatError, cond, __VA_ARGS__)
#define DMX_CHECK_IO(cond, ...) DMX_CHECK_T(::dmx::IoError, cond, __VA_ARGS__)
#define DMX_CHECK_SUPPORTED(cond, ...) DMX_CHECK_T(::dmx::Unsupported, cond, __VA_ARGS__)
