// dmx error hierarchy (public, torch-free). The library throws these and never exits or aborts.
#pragma once
#include <cstdint>
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

// `s` made safe to print on a terminal: valid UTF-8 text stays as it is, but control characters (other than
// newline and tab: ESC, CR, DEL, the C1 range) and bidirectional overrides are written as \xNN / \uNNNN and
// bytes that are not UTF-8 as \xNN, so that text read from files (metadata, names in error messages) cannot
// send escape sequences to the terminal.
std::string terminal_safe(const std::string& s);

// The one syntax of user-given numbers (command-line options, --from metadata): integers are an optional
// '-' and decimal digits ("20", "-3"; no '+', spaces, fraction, exponent or hex: "1e3" and "20.0" are not
// integers), within [min, max]; numbers are decimal floating point ("7.5", "1e-3") and finite. Otherwise
// InvalidArgument "<what> must be an integer in [min, max], got '<text>'".
int64_t parse_integer(const std::string& text, const std::string& what, int64_t min, int64_t max);
uint64_t parse_unsigned(const std::string& text, const std::string& what);  // [0, 2^64-1]
double parse_number(const std::string& text, const std::string& what);

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
#define DMX_CHECK_T(type, cond, ...)                             \
  do {                                                           \
    if (!(cond)) throw type(::dmx::detail::concat(__VA_ARGS__)); \
  } while (0)
#define DMX_CHECK_ARG(cond, ...) DMX_CHECK_T(::dmx::InvalidArgument, cond, __VA_ARGS__)
#define DMX_CHECK_FORMAT(cond, ...) DMX_CHECK_T(::dmx::FormatError, cond, __VA_ARGS__)
#define DMX_CHECK_IO(cond, ...) DMX_CHECK_T(::dmx::IoError, cond, __VA_ARGS__)
#define DMX_CHECK_SUPPORTED(cond, ...) DMX_CHECK_T(::dmx::Unsupported, cond, __VA_ARGS__)
