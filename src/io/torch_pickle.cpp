// The restricted pickle machine and the torch.save containers around it. Opcode meanings follow
// CPython's Lib/pickle.py and Lib/pickletools.py (the documented opcode table); what torch puts in
// a pickle follows torch/serialization.py and torch/_utils.py. This is an independent
// implementation: nothing is imported or called by name, so the only "functions" are the few
// rebuild steps below, each checking its arguments. Values live in one arena (TorchFile::nodes_)
// and refer to each other by index: no recursion while unpickling, no reference cycles to leak,
// and one iterative pass afterwards that refuses cycles, over-deep nesting and exponential sharing.
#include "io/torch_pickle.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <string_view>
#include <unordered_map>

#include "core/fs.h"
#include "core/utf8.h"
#include "dmx/error.h"
#include "io/zip_archive.h"

namespace dmx::io {
namespace {

using Kind = PickleValue::Kind;
using L = PickleLimits;
using Node = TorchFile::Node;

constexpr uint8_t kSpecialGlobal = 1, kSpecialStorage = 2;

// Globals a weights-only pickle may name. Storage types carry their dtype.
enum GlobalId : int64_t {
  kOrderedDict = 1,
  kRebuildTensorV2,
  kRebuildParameter,
  kRebuildParameterWithState,
  kCodecsEncode,
  kBytes,
  kStorageType,
};
struct AllowedGlobal {
  const char* module;
  const char* name;
  GlobalId id;
  at::ScalarType dtype;
};
const AllowedGlobal kAllowed[] = {
    {"collections", "OrderedDict", kOrderedDict, at::kByte},
    {"torch._utils", "_rebuild_tensor_v2", kRebuildTensorV2, at::kByte},
    {"torch._utils", "_rebuild_parameter", kRebuildParameter, at::kByte},
    {"torch._utils", "_rebuild_parameter_with_state", kRebuildParameterWithState, at::kByte},
    {"_codecs", "encode", kCodecsEncode, at::kByte},  // bytes in protocol 2: encode(str, 'latin1')
    {"__builtin__", "bytes", kBytes, at::kByte},      // b'' in protocol 2: bytes()
    {"builtins", "bytes", kBytes, at::kByte},
    {"torch", "FloatStorage", kStorageType, at::kFloat},
    {"torch", "HalfStorage", kStorageType, at::kHalf},
    {"torch", "BFloat16Storage", kStorageType, at::kBFloat16},
    {"torch", "DoubleStorage", kStorageType, at::kDouble},
    {"torch", "LongStorage", kStorageType, at::kLong},
    {"torch", "IntStorage", kStorageType, at::kInt},
    {"torch", "ShortStorage", kStorageType, at::kShort},
    {"torch", "CharStorage", kStorageType, at::kChar},
    {"torch", "ByteStorage", kStorageType, at::kByte},
    {"torch", "BoolStorage", kStorageType, at::kBool},
};

const char* kAllowedSummary =
    "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter[_with_state], "
    "torch.<Float|Half|BFloat16|Double|Long|Int|Short|Char|Byte|Bool>Storage, _codecs.encode and builtins.bytes";

// Python 2 module names that Python 3's unpickler maps (fix_imports), for messages.
std::string python3_name(const std::string& module, const std::string& name) {
  static const std::pair<const char*, const char*> kMap[] = {
      {"__builtin__", "builtins"}, {"copy_reg", "copyreg"}, {"commands", "subprocess"},
      {"exceptions", "builtins"},  {"cPickle", "pickle"},   {"UserDict", "collections"},
  };
  for (const auto& [py2, py3] : kMap)
    if (module == py2) return std::string(py3) + "." + name;
  return "";
}

const char* global_name(const Node& n) {
  for (const auto& g : kAllowed)
    if (g.id == n.i && (g.id != kStorageType || static_cast<int64_t>(g.dtype) == static_cast<int64_t>(n.f)))
      return g.name;
  return "?";
}

// Opcode names (pickletools), for messages.
const char* opcode_name(uint8_t op) {
  switch (op) {
    case '(':
      return "MARK";
    case '.':
      return "STOP";
    case '0':
      return "POP";
    case '1':
      return "POP_MARK";
    case '2':
      return "DUP";
    case 'F':
      return "FLOAT";
    case 'I':
      return "INT";
    case 'J':
      return "BININT";
    case 'K':
      return "BININT1";
    case 'L':
      return "LONG";
    case 'M':
      return "BININT2";
    case 'N':
      return "NONE";
    case 'P':
      return "PERSID";
    case 'Q':
      return "BINPERSID";
    case 'R':
      return "REDUCE";
    case 'S':
      return "STRING";
    case 'T':
      return "BINSTRING";
    case 'U':
      return "SHORT_BINSTRING";
    case 'V':
      return "UNICODE";
    case 'X':
      return "BINUNICODE";
    case 'a':
      return "APPEND";
    case 'b':
      return "BUILD";
    case 'c':
      return "GLOBAL";
    case 'd':
      return "DICT";
    case '}':
      return "EMPTY_DICT";
    case 'e':
      return "APPENDS";
    case 'g':
      return "GET";
    case 'h':
      return "BINGET";
    case 'i':
      return "INST";
    case 'j':
      return "LONG_BINGET";
    case 'l':
      return "LIST";
    case ']':
      return "EMPTY_LIST";
    case 'o':
      return "OBJ";
    case 'p':
      return "PUT";
    case 'q':
      return "BINPUT";
    case 'r':
      return "LONG_BINPUT";
    case 's':
      return "SETITEM";
    case 't':
      return "TUPLE";
    case ')':
      return "EMPTY_TUPLE";
    case 'u':
      return "SETITEMS";
    case 'G':
      return "BINFLOAT";
    case 0x80:
      return "PROTO";
    case 0x81:
      return "NEWOBJ";
    case 0x82:
      return "EXT1";
    case 0x83:
      return "EXT2";
    case 0x84:
      return "EXT4";
    case 0x85:
      return "TUPLE1";
    case 0x86:
      return "TUPLE2";
    case 0x87:
      return "TUPLE3";
    case 0x88:
      return "NEWTRUE";
    case 0x89:
      return "NEWFALSE";
    case 0x8a:
      return "LONG1";
    case 0x8b:
      return "LONG4";
    case 'B':
      return "BINBYTES";
    case 'C':
      return "SHORT_BINBYTES";
    case 0x8c:
      return "SHORT_BINUNICODE";
    case 0x8d:
      return "BINUNICODE8";
    case 0x8e:
      return "BINBYTES8";
    case 0x8f:
      return "EMPTY_SET";
    case 0x90:
      return "ADDITEMS";
    case 0x91:
      return "FROZENSET";
    case 0x92:
      return "NEWOBJ_EX";
    case 0x93:
      return "STACK_GLOBAL";
    case 0x94:
      return "MEMOIZE";
    case 0x95:
      return "FRAME";
    case 0x96:
      return "BYTEARRAY8";
    case 0x97:
      return "NEXT_BUFFER";
    case 0x98:
      return "READONLY_BUFFER";
    default:
      return nullptr;
  }
}

const char* kind_name_of(Kind k) {
  switch (k) {
    case Kind::None:
      return "None";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::BigInt:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::String:
      return "str";
    case Kind::Bytes:
      return "bytes";
    case Kind::List:
      return "list";
    case Kind::Tuple:
      return "tuple";
    case Kind::Dict:
      return "dict";
    case Kind::OrderedDict:
      return "OrderedDict";
    case Kind::Tensor:
      return "tensor";
  }
  return "?";
}

std::string describe(const TorchFile& f, uint32_t idx) {
  const Node& n = f.nodes_[idx];
  if (n.special == kSpecialGlobal) return std::string("the global ") + global_name(n);
  if (n.special == kSpecialStorage) return "a storage";
  const std::string k = kind_name_of(n.kind);
  return (k == "int" || k == "OrderedDict" ? "an " : "a ") + k;
}

// Two's-complement little-endian bytes as a decimal string.
std::string decimal_of(const std::string& le) {
  std::vector<uint8_t> mag(le.begin(), le.end());
  const bool neg = !mag.empty() && (mag.back() & 0x80);
  if (neg) {  // negate: invert and add one
    int carry = 1;
    for (auto& b : mag) {
      const int v = static_cast<uint8_t>(~b) + carry;
      b = static_cast<uint8_t>(v);
      carry = v >> 8;
    }
  }
  std::string digits;
  while (std::any_of(mag.begin(), mag.end(), [](uint8_t b) { return b != 0; })) {
    int rem = 0;
    for (size_t k = mag.size(); k-- > 0;) {
      const int cur = (rem << 8) | mag[k];
      mag[k] = static_cast<uint8_t>(cur / 10);
      rem = cur % 10;
    }
    digits.push_back(static_cast<char>('0' + rem));
  }
  if (digits.empty()) digits = "0";
  if (neg) digits.push_back('-');
  return std::string(digits.rbegin(), digits.rend());
}

// Element count of a tensor view, or -1 on int64 overflow.
int64_t checked_numel(const std::vector<int64_t>& sizes) {
  int64_t n = 1;
  for (int64_t s : sizes)
    if (__builtin_mul_overflow(n, s, &n)) return -1;
  return n;
}

// Two's-complement little-endian integer bytes (LONG1/LONG4) that fit in int64.
bool long_fits(const uint8_t* p, size_t n, int64_t* out) {
  if (n == 0) {
    *out = 0;
    return true;
  }
  const bool neg = p[n - 1] & 0x80;
  for (size_t k = 8; k < n; ++k)
    if (p[k] != (neg ? 0xFF : 0x00)) return false;
  if (n > 8 && (((p[7] & 0x80) != 0) != neg)) return false;
  uint64_t v = neg ? ~uint64_t{0} : 0;
  for (size_t k = 0; k < n && k < 8; ++k) {
    v &= ~(uint64_t{0xFF} << (8 * k));
    v |= uint64_t{p[k]} << (8 * k);
  }
  std::memcpy(out, &v, 8);
  return true;
}

// Zip: ('storage', type, key, location, numel); Legacy: the same + view metadata; Bare: zip ids with
// zero-filled storages (tests, fuzzing); Refuse: the legacy header pickles, which hold no storages.
enum class PidMode { Zip, Legacy, Bare, Refuse };

// One pickle stream run into the file's arena.
class Machine {
 public:
  Machine(TorchFile& f, const uint8_t* data, size_t size, std::string stream, PidMode mode)
      : f_(f), d_(data), n_(size), stream_(std::move(stream)), mode_(mode) {}

  // Runs from byte 0 to STOP; returns the result and sets *end to the byte after STOP.
  uint32_t run(size_t* end) {
    if (n_ > L::kMaxPickleBytes)
      fail_at(0, "pickle stream of ", n_, " bytes exceeds the limit of ", L::kMaxPickleBytes, " bytes");
    while (true) {
      if (pos_ >= n_) fail_at(pos_, "the pickle ends without a STOP opcode (truncated)");
      op_pos_ = pos_;
      const uint8_t op = d_[pos_++];
      switch (op) {
        case 0x80: {  // PROTO
          const uint8_t proto = u8();
          if (proto > 5) fail("unsupported pickle protocol ", int(proto), " (0 to 5 are defined)");
          break;
        }
        case 0x95: {  // FRAME: a buffering hint; the frame must be there
          const uint64_t len = u64();
          if (len > n_ - pos_) fail("FRAME of ", len, " bytes runs past the end of the pickle (", n_ - pos_, " left)");
          break;
        }
        case '.': {  // STOP
          if (!marks_.empty()) fail("STOP with ", marks_.size(), " MARK(s) still open");
          if (stack_.size() != 1) fail("STOP with ", stack_.size(), " values on the stack (expected 1)");
          *end = pos_;
          return stack_.back();
        }
        case '(':  // MARK
          if (marks_.size() >= L::kMaxMarks) fail("more than ", L::kMaxMarks, " nested MARKs (limit)");
          marks_.push_back(stack_.size());
          break;
        case '0':  // POP: the top value, or the mark when nothing sits above it
          if (stack_.size() > floor())
            stack_.pop_back();
          else
            pop_mark();
          break;
        case '1':
          pop_mark();
          break;  // POP_MARK
        case '2':
          push(top());
          break;  // DUP
        case 'N':
          push(none());
          break;
        case 0x88:
          push(boolean(true));
          break;
        case 0x89:
          push(boolean(false));
          break;
        case 'J': {  // BININT
          const uint32_t v = u32();
          int32_t s;
          std::memcpy(&s, &v, 4);
          push(integer(s));
          break;
        }
        case 'K':
          push(integer(u8()));
          break;
        case 'M':
          push(integer(u16()));
          break;
        case 0x8a:
          long_op(u8());
          break;      // LONG1
        case 0x8b: {  // LONG4
          const uint32_t v = u32();
          if (v & 0x80000000u) fail("LONG4 with a negative byte count");
          long_op(v);
          break;
        }
        case 'G': {  // BINFLOAT: big-endian IEEE double
          const uint8_t* p = take(8);
          uint64_t bits = 0;
          for (int k = 0; k < 8; ++k) bits = (bits << 8) | p[k];
          double v;
          std::memcpy(&v, &bits, 8);
          const uint32_t idx = make(Kind::Float);
          f_.nodes_[idx].f = v;
          push(idx);
          break;
        }
        case 'X':
          push(text(u32(), "BINUNICODE"));
          break;
        case 0x8c:
          push(text(u8(), "SHORT_BINUNICODE"));
          break;
        case 0x8d:
          push(text(u64(), "BINUNICODE8"));
          break;
        case 'T': {  // BINSTRING (a Python 2 str, decoded as UTF-8 as torch.load does)
          const uint32_t v = u32();
          if (v & 0x80000000u) fail("BINSTRING with a negative length");
          push(text(v, "BINSTRING"));
          break;
        }
        case 'U':
          push(text(u8(), "SHORT_BINSTRING"));
          break;
        case 'B':
          push(bytes(u32(), "BINBYTES"));
          break;
        case 'C':
          push(bytes(u8(), "SHORT_BINBYTES"));
          break;
        case 0x8e:
          push(bytes(u64(), "BINBYTES8"));
          break;
        case 0x96:
          push(bytes(u64(), "BYTEARRAY8"));
          break;
        case ')':
          push(make(Kind::Tuple));
          break;
        case 0x85:
          tuple_of(1);
          break;
        case 0x86:
          tuple_of(2);
          break;
        case 0x87:
          tuple_of(3);
          break;
        case 't': {  // TUPLE
          std::vector<uint32_t> items = pop_mark();
          push(container(Kind::Tuple, std::move(items)));
          break;
        }
        case ']':
          push(make(Kind::List));
          break;
        case 'l': {
          std::vector<uint32_t> items = pop_mark();
          push(container(Kind::List, std::move(items)));
          break;
        }
        case '}':
          push(make(Kind::Dict));
          break;
        case 'd': {
          std::vector<uint32_t> items = pop_mark();
          const uint32_t d = make(Kind::Dict);
          set_items(d, items);
          push(d);
          break;
        }
        case 'a': {  // APPEND
          const uint32_t v = pop();
          append(top(), &v, 1);
          break;
        }
        case 'e': {  // APPENDS
          std::vector<uint32_t> items = pop_mark();
          append(top(), items.data(), items.size());
          break;
        }
        case 's': {  // SETITEM
          const uint32_t v = pop(), k = pop();
          const uint32_t kv[2] = {k, v};
          set_items(top(), std::vector<uint32_t>(kv, kv + 2));
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<uint32_t> items = pop_mark();
          set_items(top(), items);
          break;
        }
        case 'h':
          get(u8());
          break;  // BINGET
        case 'j':
          get(u32());
          break;  // LONG_BINGET
        case 'q':
          put(u8());
          break;  // BINPUT
        case 'r':
          put(u32());
          break;  // LONG_BINPUT
        case 0x94:
          put(static_cast<uint64_t>(memo_.size()));
          break;     // MEMOIZE
        case 'c': {  // GLOBAL module\nname\n
          const std::string module = line("GLOBAL");
          const std::string name = line("GLOBAL");
          push(global(module, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          const uint32_t name = pop(), module = pop();
          if (f_.nodes_[name].kind != Kind::String || f_.nodes_[module].kind != Kind::String ||
              f_.nodes_[name].special || f_.nodes_[module].special)
            fail("STACK_GLOBAL needs two str values (module, name), got ", describe(f_, module), " and ",
                 describe(f_, name));
          push(global(str(module), str(name)));
          break;
        }
        case 'R': {  // REDUCE
          const uint32_t args = pop();
          const uint32_t fn = pop();
          push(reduce(fn, args));
          break;
        }
        case 'b': {  // BUILD
          const uint32_t state = pop();
          build(top(), state);
          break;
        }
        case 'Q':
          push(persistent_load(pop()));
          break;     // BINPERSID
        case 'i': {  // INST module\nname\n: name the class it would instantiate
          std::string module, name;
          try {
            module = line("INST");
            name = line("INST");
          } catch (const FormatError&) {
          }
          fail("opcode INST (instantiate ", module.empty() ? "a class" : module + "." + name,
               ") is not allowed in a weights-only pickle; nothing was executed");
        }
        case 'o':
        case 0x81:
        case 0x92:
          fail("opcode ", opcode_name(op),
               " (create an object of a class) is not allowed in a weights-only pickle; nothing was executed");
        case 0x82:
        case 0x83:
        case 0x84:
          fail("opcode ", opcode_name(op),
               " (a global from the copyreg extension registry) is not allowed in a weights-only pickle");
        case 'P':
          fail("opcode PERSID (a text persistent id) is not allowed: torch writes BINPERSID storage ids");
        case 0x8f:
        case 0x90:
        case 0x91:
          fail("opcode ", opcode_name(op), ": sets are not allowed in a weights-only pickle");
        case 0x97:
        case 0x98:
          fail("opcode ", opcode_name(op), ": out-of-band buffers are not allowed in a weights-only pickle");
        case 'F':
        case 'I':
        case 'L':
        case 'S':
        case 'V':
        case 'g':
        case 'p':
          fail("protocol-0 text opcode ", opcode_name(op),
               " is not supported (torch.save writes protocol 2 or higher; re-save the file)");
        default: {
          char hex[8];
          std::snprintf(hex, sizeof(hex), "0x%02x", op);
          fail("unknown pickle opcode ", hex);
        }
      }
    }
  }

 private:
  template <typename... Args>
  [[noreturn]] void fail_at(size_t at, const Args&... args) {
    throw FormatError(detail::concat(f_.what_, ": ", stream_, ", byte ", at, ": ", args...));
  }
  template <typename... Args>
  [[noreturn]] void fail(const Args&... args) {
    const char* name = opcode_name(d_[op_pos_]);
    fail_at(op_pos_, name ? name : "?", ": ", args...);
  }

  // ---- reading
  const uint8_t* take(uint64_t k) {
    if (k > n_ - pos_) fail("needs ", k, " bytes but only ", n_ - pos_, " are left in the pickle");
    const uint8_t* p = d_ + pos_;
    pos_ += k;
    return p;
  }
  uint8_t u8() { return *take(1); }
  uint16_t u16() {
    const uint8_t* p = take(2);
    return static_cast<uint16_t>(p[0] | (p[1] << 8));
  }
  uint32_t u32() {
    const uint8_t* p = take(4);
    return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16) | (uint32_t{p[3]} << 24);
  }
  uint64_t u64() {
    const uint64_t lo = u32();
    return lo | (uint64_t{u32()} << 32);
  }
  std::string line(const char* what) {
    const size_t start = pos_;
    const size_t limit = std::min<size_t>(n_, start + L::kMaxNameBytes + 1);
    for (size_t k = start; k < limit; ++k)
      if (d_[k] == '\n') {
        pos_ = k + 1;
        return std::string(reinterpret_cast<const char*>(d_ + start), k - start);
      }
    if (limit == n_) fail("the ", what, " name line runs past the end of the pickle");
    fail("the ", what, " name line is longer than ", L::kMaxNameBytes, " bytes (limit)");
  }

  // ---- arena
  uint32_t make(Kind k) {
    if (f_.nodes_.size() >= L::kMaxObjects) fail("the pickle creates more than ", L::kMaxObjects, " values (limit)");
    f_.nodes_.emplace_back();
    f_.nodes_.back().kind = k;
    return static_cast<uint32_t>(f_.nodes_.size() - 1);
  }
  uint32_t none() {
    if (none_ == UINT32_MAX) none_ = make(Kind::None);
    return none_;
  }
  uint32_t boolean(bool b) {
    uint32_t& slot = b ? true_ : false_;
    if (slot == UINT32_MAX) {
      slot = make(Kind::Bool);
      f_.nodes_[slot].i = b;
    }
    return slot;
  }
  uint32_t integer(int64_t v) {
    const uint32_t idx = make(Kind::Int);
    f_.nodes_[idx].i = v;
    return idx;
  }
  void long_op(uint64_t nbytes) {
    if (nbytes > L::kMaxIntBytes)
      fail("integer of ", nbytes, " bytes exceeds the limit of ", L::kMaxIntBytes, " bytes");
    const uint8_t* p = take(nbytes);
    int64_t v;
    if (long_fits(p, nbytes, &v)) {
      push(integer(v));
      return;
    }
    const uint32_t idx = make(Kind::BigInt);
    f_.nodes_[idx].i = static_cast<int64_t>(f_.strings_.size());
    f_.strings_.emplace_back(reinterpret_cast<const char*>(p), nbytes);
    push(idx);
  }
  uint32_t text(uint64_t len, const char* op) {
    if (len > n_ - pos_) fail("declares a string of ", len, " bytes but only ", n_ - pos_, " are left in the pickle");
    const char* p = reinterpret_cast<const char*>(take(len));
    const std::string_view sv(p, len);
    uint32_t sidx;
    auto it = interned_.find(sv);
    if (it != interned_.end()) {
      sidx = it->second;
    } else {
      std::string s(sv);
      const size_t bad = find_invalid_utf8(s);
      if (bad != std::string::npos) fail("string is not valid UTF-8 (byte ", bad, " of ", len, ")");
      sidx = static_cast<uint32_t>(f_.strings_.size());
      f_.strings_.push_back(std::move(s));
      interned_.emplace(std::string_view(f_.strings_.back()), sidx);
    }
    const uint32_t idx = make(Kind::String);
    f_.nodes_[idx].i = sidx;
    return idx;
  }
  uint32_t bytes(uint64_t len, const char* op) {
    if (len > n_ - pos_) fail("declares ", len, " bytes but only ", n_ - pos_, " are left in the pickle");
    const char* p = reinterpret_cast<const char*>(take(len));
    const uint32_t idx = make(Kind::Bytes);
    f_.nodes_[idx].i = static_cast<int64_t>(f_.strings_.size());
    f_.strings_.emplace_back(p, len);
    return idx;
  }
  const std::string& str(uint32_t idx) const { return f_.strings_[static_cast<size_t>(f_.nodes_[idx].i)]; }
  bool is_value(uint32_t idx, Kind k) const { return f_.nodes_[idx].kind == k && !f_.nodes_[idx].special; }

  // ---- stack
  size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  void push(uint32_t v) {
    if (stack_.size() >= L::kMaxStack) fail("more than ", L::kMaxStack, " values on the stack (limit)");
    stack_.push_back(v);
  }
  uint32_t pop() {
    if (stack_.size() <= floor())
      fail(marks_.empty() ? "needs a value but the stack is empty" : "needs a value but only a MARK is on the stack");
    const uint32_t v = stack_.back();
    stack_.pop_back();
    return v;
  }
  uint32_t top() {
    if (stack_.size() <= floor()) fail("needs a value but the stack is empty");
    return stack_.back();
  }
  std::vector<uint32_t> pop_mark() {
    if (marks_.empty()) fail("needs a MARK but none is open");
    const size_t m = marks_.back();
    marks_.pop_back();
    std::vector<uint32_t> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  void count_elements(size_t k) {
    elements_ += k;
    if (elements_ > L::kMaxElements) fail("containers hold more than ", L::kMaxElements, " elements in all (limit)");
  }
  uint32_t container(Kind k, std::vector<uint32_t> items) {
    count_elements(items.size());
    const uint32_t idx = make(k);
    f_.nodes_[idx].items = std::move(items);
    return idx;
  }
  void tuple_of(size_t k) {
    if (stack_.size() < floor() + k) fail("needs ", k, " values on the stack");
    std::vector<uint32_t> items(stack_.end() - static_cast<std::ptrdiff_t>(k), stack_.end());
    stack_.resize(stack_.size() - k);
    push(container(Kind::Tuple, std::move(items)));
  }
  void append(uint32_t list, const uint32_t* items, size_t k) {
    if (!is_value(list, Kind::List)) fail("appends to ", describe(f_, list), ", not a list");
    count_elements(k);
    auto& v = f_.nodes_[list].items;
    v.insert(v.end(), items, items + k);
  }
  // Dict keys: str (by interned content) or int; a repeated key replaces the value, as in Python.
  void set_items(uint32_t dict, const std::vector<uint32_t>& kv) {
    if (!(is_value(dict, Kind::Dict) || is_value(dict, Kind::OrderedDict)))
      fail("sets items of ", describe(f_, dict), ", not a dict");
    if (kv.size() % 2) fail("needs key/value pairs but got an odd number (", kv.size(), ") of values");
    DictIndex& index = dict_index_[dict];
    for (size_t k = 0; k < kv.size(); k += 2) {
      const Node& key = f_.nodes_[kv[k]];
      if (key.special || (key.kind != Kind::String && key.kind != Kind::Int))
        fail("dict keys must be str or int, got ", describe(f_, kv[k]));
      auto& map = key.kind == Kind::String ? index.by_str : index.by_int;
      auto& items = f_.nodes_[dict].items;
      auto it = map.find(key.i);
      if (it != map.end()) {
        items[it->second + 1] = kv[k + 1];
        continue;
      }
      count_elements(2);
      map.emplace(key.i, static_cast<uint32_t>(items.size()));
      items.push_back(kv[k]);
      items.push_back(kv[k + 1]);
    }
  }
  void get(uint64_t i) {
    auto it = memo_.find(i);
    if (it == memo_.end()) fail("memo entry ", i, " was never stored");
    push(it->second);
  }
  void put(uint64_t i) {
    const uint32_t v = top();
    auto it = memo_.find(i);
    if (it != memo_.end()) {
      it->second = v;
      return;
    }
    if (memo_.size() >= L::kMaxMemo) fail("more than ", L::kMaxMemo, " memo entries (limit)");
    memo_.emplace(i, v);
  }

  // ---- globals and the few calls they allow
  uint32_t global(const std::string& module, const std::string& name) {
    for (const auto& g : kAllowed) {
      if (module == g.module && name == g.name) {
        const uint32_t idx = make(Kind::None);
        Node& n = f_.nodes_[idx];
        n.special = kSpecialGlobal;
        n.i = g.id;
        n.f = static_cast<double>(static_cast<int>(g.dtype));
        return idx;
      }
    }
    const std::string py3 = python3_name(module, name);
    fail("global '", module, ".", name, "'", py3.empty() ? "" : " (Python 3: " + py3 + ")",
         " is not allowed: a weights-only pickle may name only ", kAllowedSummary,
         " (docs/pickle.md); the file was not loaded and nothing was executed");
  }
  const Node& global_node(uint32_t fn) {
    const Node& n = f_.nodes_[fn];
    if (n.special != kSpecialGlobal) fail("calls ", describe(f_, fn), ", which is not callable");
    return n;
  }
  std::vector<uint32_t> tuple_args(uint32_t args, const char* fn, size_t lo, size_t hi) {
    if (!is_value(args, Kind::Tuple)) fail(fn, ": arguments must be a tuple, got ", describe(f_, args));
    const auto& a = f_.nodes_[args].items;
    if (a.size() < lo || a.size() > hi)
      fail(fn, ": takes ", lo == hi ? std::to_string(lo) : std::to_string(lo) + " to " + std::to_string(hi),
           " arguments, got ", a.size());
    return a;
  }
  bool empty_hooks(uint32_t idx) {
    const Node& n = f_.nodes_[idx];
    if (n.special) return false;
    if (n.kind == Kind::None) return true;
    return (n.kind == Kind::Dict || n.kind == Kind::OrderedDict) && n.items.empty();
  }
  std::vector<int64_t> int_tuple(uint32_t idx, const char* what) {
    if (!is_value(idx, Kind::Tuple) && !is_value(idx, Kind::List))
      fail("_rebuild_tensor_v2: ", what, " must be a tuple of ints, got ", describe(f_, idx));
    const auto& items = f_.nodes_[idx].items;
    if (items.size() > L::kMaxDims)
      fail("_rebuild_tensor_v2: ", what, " has ", items.size(), " dimensions, more than the limit of ", L::kMaxDims);
    std::vector<int64_t> out;
    for (uint32_t it : items) {
      if (!is_value(it, Kind::Int)) fail("_rebuild_tensor_v2: ", what, " must hold ints, got ", describe(f_, it));
      const int64_t v = f_.nodes_[it].i;
      if (v < 0) fail("_rebuild_tensor_v2: ", what, " has a negative entry (", v, ")");
      out.push_back(v);
    }
    return out;
  }

  uint32_t reduce(uint32_t fn, uint32_t args) {
    const Node g = global_node(fn);
    switch (static_cast<GlobalId>(g.i)) {
      case kOrderedDict: {
        const std::vector<uint32_t> a = tuple_args(args, "collections.OrderedDict", 0, 1);
        const uint32_t d = make(Kind::OrderedDict);
        if (!a.empty()) {
          const uint32_t src = a[0];
          if (!is_value(src, Kind::List) && !is_value(src, Kind::Tuple))
            fail("collections.OrderedDict: the argument must be a list of (key, value) pairs, got ", describe(f_, src));
          std::vector<uint32_t> kv;
          for (uint32_t pair : f_.nodes_[src].items) {
            if (!(is_value(pair, Kind::Tuple) || is_value(pair, Kind::List)) || f_.nodes_[pair].items.size() != 2)
              fail("collections.OrderedDict: each item must be a (key, value) pair, got ", describe(f_, pair));
            kv.push_back(f_.nodes_[pair].items[0]);
            kv.push_back(f_.nodes_[pair].items[1]);
          }
          set_items(d, kv);
        }
        return d;
      }
      case kRebuildTensorV2:
        return rebuild_tensor(tuple_args(args, "_rebuild_tensor_v2", 6, 7));
      case kRebuildParameter:
      case kRebuildParameterWithState: {
        const bool with_state = g.i == kRebuildParameterWithState;
        const char* name = with_state ? "_rebuild_parameter_with_state" : "_rebuild_parameter";
        const std::vector<uint32_t> a = tuple_args(args, name, with_state ? 4 : 3, with_state ? 4 : 3);
        if (!is_value(a[0], Kind::Tensor)) fail(name, ": the data must be a tensor, got ", describe(f_, a[0]));
        if (!is_value(a[1], Kind::Bool)) fail(name, ": requires_grad must be a bool, got ", describe(f_, a[1]));
        if (!empty_hooks(a[2])) fail(name, ": backward hooks are not allowed (they are code)");
        if (with_state && !empty_hooks(a[3]))
          fail(name, ": a parameter with extra attributes (state ", describe(f_, a[3]), ") is not supported");
        return a[0];
      }
      case kCodecsEncode: {
        const std::vector<uint32_t> a = tuple_args(args, "_codecs.encode", 2, 2);
        if (!is_value(a[0], Kind::String) || !is_value(a[1], Kind::String))
          fail("_codecs.encode: needs (str, 'latin1'), got ", describe(f_, a[0]), " and ", describe(f_, a[1]));
        const std::string& enc = str(a[1]);
        if (enc != "latin1" && enc != "latin-1")
          fail("_codecs.encode: only the 'latin1' encoding (how protocol 2 stores bytes) is allowed, got '", enc, "'");
        // UTF-8 (validated) to code points, each below 256.
        const std::string& s = str(a[0]);
        std::string out;
        for (size_t k = 0; k < s.size();) {
          const auto c = static_cast<unsigned char>(s[k]);
          if (c < 0x80) {
            out.push_back(static_cast<char>(c));
            ++k;
          } else if ((c & 0xE0) == 0xC0 && k + 1 < s.size()) {
            const int cp = ((c & 0x1F) << 6) | (static_cast<unsigned char>(s[k + 1]) & 0x3F);
            if (cp > 0xFF) fail("_codecs.encode: character U+", cp, " has no latin1 encoding");
            out.push_back(static_cast<char>(cp));
            k += 2;
          } else {
            fail("_codecs.encode: a character above U+07FF has no latin1 encoding");
          }
        }
        const uint32_t idx = make(Kind::Bytes);
        f_.nodes_[idx].i = static_cast<int64_t>(f_.strings_.size());
        f_.strings_.push_back(std::move(out));
        return idx;
      }
      case kBytes: {
        tuple_args(args, "bytes", 0, 0);
        const uint32_t idx = make(Kind::Bytes);
        f_.nodes_[idx].i = static_cast<int64_t>(f_.strings_.size());
        f_.strings_.emplace_back();
        return idx;
      }
      case kStorageType:
        fail("torch.", global_name(g), " may only appear inside a storage persistent id, not be called");
    }
    fail("calls an unknown global");
  }

  uint32_t rebuild_tensor(const std::vector<uint32_t>& a) {
    const Node& s = f_.nodes_[a[0]];
    if (s.special != kSpecialStorage)
      fail("_rebuild_tensor_v2: the first argument must be a storage, got ", describe(f_, a[0]));
    if (!is_value(a[1], Kind::Int) || f_.nodes_[a[1]].i < 0)
      fail("_rebuild_tensor_v2: the storage offset must be an int >= 0, got ", describe(f_, a[1]));
    std::vector<int64_t> sizes = int_tuple(a[2], "size");
    std::vector<int64_t> strides = int_tuple(a[3], "stride");
    if (sizes.size() != strides.size())
      fail("_rebuild_tensor_v2: size has ", sizes.size(), " dimensions but stride has ", strides.size());
    if (!is_value(a[4], Kind::Bool)) fail("_rebuild_tensor_v2: requires_grad must be a bool, got ", describe(f_, a[4]));
    if (!empty_hooks(a[5])) fail("_rebuild_tensor_v2: backward hooks are not allowed (they are code)");
    if (a.size() == 7 &&
        !(is_value(a[6], Kind::None) || is_value(a[6], Kind::Dict) || is_value(a[6], Kind::OrderedDict)))
      fail("_rebuild_tensor_v2: tensor metadata must be a dict, got ", describe(f_, a[6]));
    const TorchFile::StorageRecord& view = f_.storages_[static_cast<size_t>(s.i)];
    const int64_t offset = f_.nodes_[a[1]].i;
    const int64_t numel = checked_numel(sizes);
    if (numel < 0) fail("_rebuild_tensor_v2: the element count of size ", shape(sizes), " overflows int64");
    // The view must lie inside its storage: offset + sum((size_i - 1) * stride_i) < storage elements,
    // and may not have more elements than the storage (no zero-stride inflation of the data).
    if (numel > view.numel)
      fail("_rebuild_tensor_v2: a tensor of size ", shape(sizes), " (", numel,
           " elements) is larger than its storage '", view.key, "' of ", view.numel, " elements");
    if (numel > 0) {
      int64_t last = offset;
      for (size_t k = 0; k < sizes.size(); ++k) {
        int64_t step;
        if (__builtin_mul_overflow(sizes[k] - 1, strides[k], &step) || __builtin_add_overflow(last, step, &last))
          fail("_rebuild_tensor_v2: offset/stride arithmetic overflows int64");
      }
      if (last >= view.numel)
        fail("_rebuild_tensor_v2: a tensor of size ", shape(sizes), ", stride ", shape(strides), " at offset ", offset,
             " reaches element ", last, " of storage '", view.key, "', which holds ", view.numel, " elements");
    } else if (offset > view.numel) {
      fail("_rebuild_tensor_v2: offset ", offset, " lies past the end of storage '", view.key, "' (", view.numel,
           " elements)");
    }
    TorchFile::TensorRecord t;
    t.storage = static_cast<uint32_t>(view.view_numel >= 0 ? root_of(view) : static_cast<size_t>(s.i));
    t.offset = offset + view.view_offset;
    t.sizes = std::move(sizes);
    t.strides = std::move(strides);
    const uint32_t idx = make(Kind::Tensor);
    f_.nodes_[idx].i = static_cast<int64_t>(f_.tensors_.size());
    f_.tensors_.push_back(std::move(t));
    return idx;
  }
  size_t root_of(const TorchFile::StorageRecord& view) {
    auto it = storage_by_key_.find(view.location);  // views record their root key in location
    if (it == storage_by_key_.end()) fail("storage view '", view.key, "' has no root storage");
    return it->second;
  }
  static std::string shape(const std::vector<int64_t>& v) {
    std::string s = "(";
    for (size_t k = 0; k < v.size(); ++k) s += (k ? ", " : "") + std::to_string(v[k]);
    return s + (v.size() == 1 ? ",)" : ")");
  }

  void build(uint32_t inst, uint32_t state) {
    if (!is_value(inst, Kind::OrderedDict))
      fail("BUILD (set the state of an object) is only allowed on an OrderedDict, got ", describe(f_, inst));
    if (!(is_value(state, Kind::Dict) || is_value(state, Kind::None)))
      fail("BUILD on an OrderedDict needs a dict of attributes, got ", describe(f_, state));
    for (size_t k = 0; k < f_.nodes_[state].items.size(); k += 2)
      if (!is_value(f_.nodes_[state].items[k], Kind::String))
        fail("BUILD on an OrderedDict: attribute names must be str");
    Node& n = f_.nodes_[inst];
    if (n.attrs != UINT32_MAX) fail("BUILD applied twice to one OrderedDict");
    if (!is_value(state, Kind::None)) n.attrs = state;
  }

  // ('storage', torch.<T>Storage, key, location, numel) [+ view_metadata in the legacy format]
  uint32_t persistent_load(uint32_t pid) {
    if (mode_ == PidMode::Refuse) fail("a persistent id is not allowed in this pickle");
    const size_t want = mode_ == PidMode::Legacy ? 6 : 5;
    if (!is_value(pid, Kind::Tuple) || f_.nodes_[pid].items.size() != want)
      fail("a persistent id must be a ", want, "-tuple ('storage', type, key, location, numel",
           want == 6 ? ", view" : "", "), got ", describe(f_, pid),
           is_value(pid, Kind::Tuple) ? " of " + std::to_string(f_.nodes_[pid].items.size()) : std::string());
    const std::vector<uint32_t> a = f_.nodes_[pid].items;
    if (!is_value(a[0], Kind::String) || str(a[0]) != "storage")
      fail("a persistent id must start with 'storage', got ", describe(f_, a[0]));
    const Node& type = f_.nodes_[a[1]];
    if (type.special != kSpecialGlobal || type.i != kStorageType)
      fail("the storage type must be one of torch's storage classes, got ", describe(f_, a[1]));
    if (!is_value(a[2], Kind::String)) fail("the storage key must be a str, got ", describe(f_, a[2]));
    if (!is_value(a[3], Kind::String)) fail("the storage location must be a str, got ", describe(f_, a[3]));
    if (!is_value(a[4], Kind::Int) || f_.nodes_[a[4]].i < 0)
      fail("the storage size must be an int >= 0, got ", describe(f_, a[4]));
    const auto dtype = static_cast<at::ScalarType>(static_cast<int>(type.f));
    const std::string key = str(a[2]);
    const int64_t numel = f_.nodes_[a[4]].i;
    const int64_t esize = static_cast<int64_t>(c10::elementSize(dtype));
    if (numel > std::numeric_limits<int64_t>::max() / esize)
      fail("storage '", key, "' declares ", numel, " elements, whose byte size overflows int64");
    if (mode_ == PidMode::Bare && !storage_by_key_.count(key)) {
      bare_numel_ += numel;
      if (numel > (1 << 20) || bare_numel_ > (1 << 20))
        fail("storage '", key, "' declares ", numel, " elements; a bare pickle may use 1048576 in all");
    }
    const size_t root = storage_record(key, dtype, numel, str(a[3]));
    if (mode_ == PidMode::Legacy && !is_value(a[5], Kind::None)) {
      // (view_key, offset, size): a slice of the root storage, in elements.
      const uint32_t v = a[5];
      const auto& vi = f_.nodes_[v].items;
      if (!is_value(v, Kind::Tuple) || vi.size() != 3 || !is_value(vi[0], Kind::String) ||
          !is_value(vi[1], Kind::Int) || !is_value(vi[2], Kind::Int))
        fail("a storage view must be (key, offset, size), got ", describe(f_, v));
      const int64_t off = f_.nodes_[vi[1]].i, len = f_.nodes_[vi[2]].i;
      if (off < 0 || len < 0 || off > numel || len > numel - off)
        fail("storage view [", off, ", +", len, ") lies outside storage '", key, "' of ", numel, " elements");
      const std::string view_key = "view " + str(vi[0]);
      auto it = storage_by_key_.find(view_key);
      size_t vidx;
      if (it == storage_by_key_.end()) {
        TorchFile::StorageRecord r;
        r.key = str(vi[0]);
        r.location = key;  // the root's key
        r.dtype = dtype;
        r.numel = len;
        r.view_offset = off;
        r.view_numel = len;
        vidx = f_.storages_.size();
        f_.storages_.push_back(std::move(r));
        storage_by_key_.emplace(view_key, vidx);
      } else {
        vidx = it->second;
        const auto& r = f_.storages_[vidx];
        if (r.view_offset != off || r.view_numel != len || r.location != key)
          fail("storage view '", str(vi[0]), "' is declared twice with different bounds");
      }
      return storage_node(vidx);
    }
    return storage_node(root);
  }
  size_t storage_record(const std::string& key, at::ScalarType dtype, int64_t numel, const std::string& location) {
    auto it = storage_by_key_.find(key);
    if (it != storage_by_key_.end()) {
      const auto& r = f_.storages_[it->second];
      if (r.dtype != dtype || r.numel != numel)
        fail("storage '", key, "' is referenced as ", c10::toString(r.dtype), "[", r.numel, "] and as ",
             c10::toString(dtype), "[", numel, "]");
      return it->second;
    }
    TorchFile::StorageRecord r;
    r.key = key;
    r.location = location;
    r.dtype = dtype;
    r.numel = numel;
    f_.storages_.push_back(std::move(r));
    storage_by_key_.emplace(key, f_.storages_.size() - 1);
    return f_.storages_.size() - 1;
  }
  uint32_t storage_node(size_t record) {
    const uint32_t idx = make(Kind::None);
    f_.nodes_[idx].special = kSpecialStorage;
    f_.nodes_[idx].i = static_cast<int64_t>(record);
    return idx;
  }

 public:
  // Shared across the streams of one legacy file (storage keys are global to the file).
  std::unordered_map<std::string, size_t> storage_by_key_;

 private:
  TorchFile& f_;
  const uint8_t* d_;
  size_t n_;
  std::string stream_;
  PidMode mode_;
  size_t pos_ = 0, op_pos_ = 0;
  std::vector<uint32_t> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, uint32_t> memo_;
  struct DictIndex {
    std::unordered_map<int64_t, uint32_t> by_str, by_int;  // interned string index / int value -> slot
  };
  std::unordered_map<uint32_t, DictIndex> dict_index_;
  std::unordered_map<std::string_view, uint32_t> interned_;
  uint32_t none_ = UINT32_MAX, true_ = UINT32_MAX, false_ = UINT32_MAX;
  uint64_t elements_ = 0;
  int64_t bare_numel_ = 0;
};

// One pass over the value tree from the root (iterative): every reachable node must be a value
// (not a global or a bare storage), nothing may contain itself, nesting stays within kMaxDepth and
// the tree, with shared values counted once per path, within kMaxExpanded values.
void check_tree(const TorchFile& f) {
  const size_t n = f.nodes_.size();
  std::vector<uint8_t> color(n, 0);  // 0 new, 1 on the path, 2 done
  std::vector<uint64_t> expanded(n, 0);
  struct Frame {
    uint32_t node;
    size_t next;
  };
  std::vector<Frame> path;
  auto children = [&](uint32_t v, size_t k, uint32_t* out) {
    const Node& nd = f.nodes_[v];
    if (k < nd.items.size()) {
      *out = nd.items[k];
      return true;
    }
    if (k == nd.items.size() && nd.attrs != UINT32_MAX) {
      *out = nd.attrs;
      return true;
    }
    return false;
  };
  auto enter = [&](uint32_t v) {
    const Node& nd = f.nodes_[v];
    if (nd.special == kSpecialGlobal)
      throw FormatError(detail::concat(f.what_, ": the pickle returns the global ", global_name(nd),
                                       " as a value; only plain data and tensors are allowed"));
    if (nd.special == kSpecialStorage)
      throw FormatError(detail::concat(f.what_, ": the pickle returns a bare storage; only tensors are supported"));
    if (path.size() >= L::kMaxDepth)
      throw FormatError(detail::concat(f.what_, ": values nest deeper than ", L::kMaxDepth, " levels (limit)"));
    color[v] = 1;
    path.push_back({v, 0});
  };
  enter(f.root_);
  while (!path.empty()) {
    Frame& fr = path.back();
    uint32_t c;
    if (children(fr.node, fr.next, &c)) {
      ++fr.next;
      if (color[c] == 1)
        throw FormatError(detail::concat(f.what_, ": a ", kind_name_of(f.nodes_[c].kind),
                                         " contains itself (recursive structures are not supported)"));
      if (color[c] == 0) enter(c);
      continue;
    }
    uint64_t total = 1;
    const Node& nd = f.nodes_[fr.node];
    for (size_t k = 0; k <= nd.items.size(); ++k) {
      uint32_t ch;
      if (!children(fr.node, k, &ch)) break;
      total += expanded[ch];
      if (total > L::kMaxExpanded)
        throw FormatError(detail::concat(f.what_, ": the value tree expands to more than ", L::kMaxExpanded,
                                         " values through shared references (limit; a 'billion laughs' pickle?)"));
    }
    expanded[fr.node] = total;
    color[fr.node] = 2;
    path.pop_back();
  }
}

// Storages become at::Storage: views into the mapping when aligned and keep_alive owns it, else copies.
at::Storage make_storage(const uint8_t* p, uint64_t nbytes, at::ScalarType dtype, const TorchFile& f,
                         const std::string& key) {
  if (dtype == at::kBool)
    for (uint64_t k = 0; k < nbytes; ++k)
      DMX_CHECK_FORMAT(p[k] <= 1, f.what_, ": bool storage '", key, "' holds the byte ", int(p[k]), " at ", k,
                       " (bools must be 0 or 1)");
  const size_t esize = c10::elementSize(dtype);
  if (f.keep_alive_ && reinterpret_cast<uintptr_t>(p) % esize == 0 && nbytes > 0) {
    auto* ctx = new std::shared_ptr<const void>(f.keep_alive_);
    c10::DataPtr dp(
        const_cast<uint8_t*>(p), ctx, [](void* c) { delete static_cast<std::shared_ptr<const void>*>(c); },
        at::Device(at::kCPU));
    return c10::Storage(c10::Storage::use_byte_size_t(), nbytes, std::move(dp), nullptr, false);
  }
  at::Tensor t = at::empty({static_cast<int64_t>(nbytes)}, at::TensorOptions().dtype(at::kByte));
  if (nbytes) std::memcpy(t.data_ptr(), p, nbytes);
  return t.storage();
}

void make_tensors(TorchFile& f) {
  for (auto& t : f.tensors_) {
    const auto& s = f.storages_[t.storage];
    t.tensor = at::empty({0}, at::TensorOptions().dtype(s.dtype)).set_(s.storage, t.offset, t.sizes, t.strides);
  }
}

std::string stream_prefix_of(const ZipArchive& zip) {
  std::string prefix;
  int found = 0;
  for (const auto& e : zip.entries()) {
    const size_t slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      prefix = e.name.substr(0, slash + 1);
      ++found;
    }
  }
  DMX_CHECK_FORMAT(found == 1, zip.what(), ": ",
                   found == 0 ? "no <folder>/data.pkl entry: not a torch.save archive"
                              : "several <folder>/data.pkl entries: not a torch.save archive");
  return prefix;
}

std::shared_ptr<TorchFile> parse_zip(const uint8_t* data, size_t size, const std::string& what,
                                     std::shared_ptr<const void> keep) {
  ZipArchive zip(data, size, what);
  const std::string prefix = stream_prefix_of(zip);
  DMX_CHECK_FORMAT(!zip.find(prefix + "constants.pkl"), what,
                   ": a TorchScript archive (torch.jit.save) holds code, not a weights file; it is not loaded");
  if (const ZipEntry* bo = zip.find(prefix + "byteorder")) {
    const std::string order(reinterpret_cast<const char*>(zip.bytes(*bo)), bo->size);
    DMX_CHECK_SUPPORTED(order == "little", what, ": byte order '", order.substr(0, 16),
                        "' is not supported (only little-endian files)");
  }
  const ZipEntry* pkl = zip.find(prefix + "data.pkl");
  auto f = std::make_shared<TorchFile>();
  f->what_ = what;
  f->format_ = "zip";
  f->keep_alive_ = std::move(keep);
  Machine m(*f, zip.bytes(*pkl), pkl->size, pkl->name, PidMode::Zip);
  size_t end = 0;
  f->root_ = m.run(&end);
  check_tree(*f);
  for (auto& s : f->storages_) {
    if (s.view_numel >= 0) continue;
    const std::string name = prefix + "data/" + s.key;
    const ZipEntry* e = zip.find(name);
    DMX_CHECK_FORMAT(e, what, ": the pickle refers to storage '", s.key, "', but the archive has no entry ", name);
    const uint64_t nbytes = static_cast<uint64_t>(s.numel) * c10::elementSize(s.dtype);
    DMX_CHECK_FORMAT(e->size == nbytes, what, ": storage '", s.key, "' is ", c10::toString(s.dtype), "[", s.numel,
                     "] = ", nbytes, " bytes, but its entry ", name, " holds ", e->size, " bytes");
    s.storage = make_storage(zip.bytes(*e), nbytes, s.dtype, *f, s.key);
  }
  make_tensors(*f);
  return f;
}

// torch/serialization.py _legacy_save: pickles of the magic number, the protocol version and the
// system info, then the object, then the sorted storage keys; then each storage as an int64
// element count followed by its bytes.
std::shared_ptr<TorchFile> parse_legacy(const uint8_t* data, size_t size, const std::string& what,
                                        std::shared_ptr<const void> keep) {
  auto f = std::make_shared<TorchFile>();
  f->what_ = what;
  f->format_ = "legacy";
  f->keep_alive_ = std::move(keep);
  size_t pos = 0;
  std::unordered_map<std::string, size_t> storage_keys;
  auto run = [&](const char* name, PidMode mode) {
    Machine m(*f, data + pos, size - pos,
              std::string("legacy ") + name + " pickle (from file byte " + std::to_string(pos) + ")", mode);
    m.storage_by_key_ = storage_keys;
    size_t end = 0;
    const uint32_t v = m.run(&end);
    storage_keys = m.storage_by_key_;
    pos += end;
    return v;
  };
  const uint32_t magic = run("magic number", PidMode::Refuse);
  static const uint8_t kMagic[] = {0x6c, 0xfc, 0x9c, 0x46, 0xf9,
                                   0x20, 0x6a, 0xa8, 0x50, 0x19};  // 0x1950a86a20f9469cfc6c
  const Node& mg = f->nodes_[magic];
  DMX_CHECK_FORMAT(mg.kind == Kind::BigInt && !mg.special &&
                       f->strings_[static_cast<size_t>(mg.i)] == std::string(reinterpret_cast<const char*>(kMagic), 10),
                   what, ": a pickle stream without torch's legacy magic number: not a torch.save file");
  const uint32_t proto = run("protocol version", PidMode::Refuse);
  DMX_CHECK_FORMAT(f->nodes_[proto].kind == Kind::Int && f->nodes_[proto].i == 1001 && !f->nodes_[proto].special, what,
                   ": legacy torch file with protocol version other than 1001");
  const uint32_t info = run("system info", PidMode::Refuse);
  const Node& in = f->nodes_[info];
  DMX_CHECK_FORMAT(!in.special && (in.kind == Kind::Dict), what, ": legacy torch file: system info is not a dict");
  bool little = false;
  for (size_t k = 0; k + 1 < in.items.size(); k += 2) {
    const Node& key = f->nodes_[in.items[k]];
    const Node& val = f->nodes_[in.items[k + 1]];
    if (key.kind == Kind::String && !key.special && f->strings_[static_cast<size_t>(key.i)] == "little_endian")
      little = val.kind == Kind::Bool && !val.special && val.i;
  }
  DMX_CHECK_SUPPORTED(little, what, ": a big-endian legacy torch file is not supported");
  f->root_ = run("object", PidMode::Legacy);
  const uint32_t keys = run("storage keys", PidMode::Refuse);
  check_tree(*f);
  const Node& kl = f->nodes_[keys];
  DMX_CHECK_FORMAT(!kl.special && kl.kind == Kind::List, what, ": legacy torch file: the storage keys are not a list");
  size_t roots = 0;
  for (const auto& s : f->storages_) roots += s.view_numel < 0;
  DMX_CHECK_FORMAT(kl.items.size() == roots, what, ": legacy torch file lists ", kl.items.size(),
                   " storages but the object uses ", roots);
  for (uint32_t k : kl.items) {
    const Node& kn = f->nodes_[k];
    DMX_CHECK_FORMAT(!kn.special && kn.kind == Kind::String, what, ": legacy torch file: a storage key is not a str");
    const std::string& key = f->strings_[static_cast<size_t>(kn.i)];
    auto it = storage_keys.find(key);
    DMX_CHECK_FORMAT(it != storage_keys.end(), what, ": legacy storage '", key, "' is not used by the object");
    auto& s = f->storages_[it->second];
    DMX_CHECK_FORMAT(!static_cast<bool>(s.storage), what, ": legacy storage '", key, "' is listed twice");
    DMX_CHECK_FORMAT(size - pos >= 8, what, ": legacy storage '", key, "' is missing (the file is truncated)");
    int64_t count = 0;
    std::memcpy(&count, data + pos, 8);  // little-endian, checked above
    pos += 8;
    DMX_CHECK_FORMAT(count == s.numel, what, ": legacy storage '", key, "' holds ", count,
                     " elements, but the object "
                     "declares ",
                     s.numel);
    const uint64_t nbytes = static_cast<uint64_t>(s.numel) * c10::elementSize(s.dtype);
    DMX_CHECK_FORMAT(nbytes <= size - pos, what, ": legacy storage '", key, "' needs ", nbytes, " bytes but only ",
                     size - pos, " are left (truncated)");
    s.storage = make_storage(data + pos, nbytes, s.dtype, *f, key);
    pos += nbytes;
  }
  for (auto& s : f->storages_)  // views share their root's storage
    if (s.view_numel >= 0) s.storage = f->storages_[storage_keys.at(s.location)].storage;
  make_tensors(*f);
  return f;
}

struct Mapping {
  void* p = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (p) ::munmap(p, size);
  }
};

// ---- flattening and JSON with an output budget
// What flattening may produce: names and JSON up to kMaxOutputBytes, and tensors adding up to at most
// kTensorBytesFactor times the bytes of the file's storages plus kTensorBytesSlack (views and tied
// weights stay far below; one storage referenced thousands of times, which `dmx convert` would write
// out thousands of times, does not).
constexpr uint64_t kMaxOutputBytes = uint64_t{1} << 28, kTensorBytesFactor = 4, kTensorBytesSlack = 16u << 20;
struct Budget {
  explicit Budget(const TorchFile& f) : what(f.what()) {
    uint64_t storage = 0;
    for (const auto& s : f.storages_)
      if (s.view_numel < 0) storage += static_cast<uint64_t>(s.numel) * c10::elementSize(s.dtype);
    tensor_limit = storage * kTensorBytesFactor + kTensorBytesSlack;
    tensor_left = tensor_limit;
  }
  const std::string& what;
  uint64_t left = kMaxOutputBytes;
  uint64_t tensor_limit = 0, tensor_left = 0;
  void spend(uint64_t n) {
    if (n > left)
      throw FormatError(
          detail::concat(what, ": flattening produces more than ", kMaxOutputBytes, " bytes of names/values (limit)"));
    left -= n;
  }
  void spend_tensor(const at::Tensor& t) {
    const uint64_t n = static_cast<uint64_t>(t.numel()) * t.element_size();
    if (n > tensor_left)
      throw FormatError(detail::concat(what, ": its tensors, counted once per path, add up to more than ", tensor_limit,
                                       " bytes (", kTensorBytesFactor,
                                       "x its storages + 16 MiB; limit: one storage repeated many times?)"));
    tensor_left -= n;
  }
};

std::string key_text(const TorchFile& f, uint32_t key) {
  const Node& k = f.nodes_[key];
  return k.kind == Kind::String ? f.strings_[static_cast<size_t>(k.i)] : std::to_string(k.i);
}

void flatten(const TorchFile& f, uint32_t v, const std::string& name, TensorMap* out, Budget* b) {
  const Node& n = f.nodes_[v];
  b->spend(name.size() + 16);
  if (n.kind == Kind::Tensor) {
    const at::Tensor& t = f.tensors_[static_cast<size_t>(n.i)].tensor;
    b->spend_tensor(t);
    DMX_CHECK_FORMAT(out->emplace(name, t).second, f.what_, ": two tensors flatten to the same name '", name, "'");
    return;
  }
  auto join = [&](const std::string& k) { return name.empty() ? k : name + "." + k; };
  if (n.kind == Kind::List || n.kind == Kind::Tuple) {
    for (size_t k = 0; k < n.items.size(); ++k) flatten(f, n.items[k], join(std::to_string(k)), out, b);
  } else if (n.kind == Kind::Dict || n.kind == Kind::OrderedDict) {
    for (size_t k = 0; k + 1 < n.items.size(); k += 2)
      flatten(f, n.items[k + 1], join(key_text(f, n.items[k])), out, b);
  }
}

nlohmann::json to_json_impl(const TorchFile& f, uint32_t v, Budget* b) {
  const Node& n = f.nodes_[v];
  b->spend(16);
  switch (n.kind) {
    case Kind::None:
      return nullptr;
    case Kind::Bool:
      return n.i != 0;
    case Kind::Int:
      return n.i;
    case Kind::BigInt: {
      const std::string& s = f.strings_[static_cast<size_t>(n.i)];
      b->spend(s.size() * 3);
      return {{"int", decimal_of(s)}};
    }
    case Kind::Float:
      return n.f;
    case Kind::String: {
      const std::string& s = f.strings_[static_cast<size_t>(n.i)];
      b->spend(s.size());
      return s;
    }
    case Kind::Bytes: {
      const std::string& s = f.strings_[static_cast<size_t>(n.i)];
      b->spend(s.size() * 2);
      std::string hex;
      for (unsigned char c : s) {
        char h[3];
        std::snprintf(h, sizeof(h), "%02x", c);
        hex += h;
      }
      return {{"bytes_hex", hex}};
    }
    case Kind::List:
    case Kind::Tuple: {
      nlohmann::json a = nlohmann::json::array();
      for (uint32_t c : n.items) a.push_back(to_json_impl(f, c, b));
      return a;
    }
    case Kind::Dict:
    case Kind::OrderedDict: {
      nlohmann::json o = nlohmann::json::object();
      for (size_t k = 0; k + 1 < n.items.size(); k += 2) {
        const std::string key = key_text(f, n.items[k]);
        b->spend(key.size());
        o[key] = to_json_impl(f, n.items[k + 1], b);
      }
      return o;
    }
    case Kind::Tensor: {
      const auto& t = f.tensors_[static_cast<size_t>(n.i)];
      return {{"tensor", c10::toString(t.tensor.scalar_type())}, {"shape", t.sizes}};
    }
  }
  return nullptr;
}

bool has_tensor(const TorchFile& f, uint32_t v, std::vector<int8_t>* memo) {
  int8_t& m = (*memo)[v];
  if (m >= 0) return m;
  const Node& n = f.nodes_[v];
  bool any = n.kind == Kind::Tensor;
  const bool dict = n.kind == Kind::Dict || n.kind == Kind::OrderedDict;
  for (size_t k = dict ? 1 : 0; k < n.items.size() && !any; k += dict ? 2 : 1) any = has_tensor(f, n.items[k], memo);
  m = any;
  return any;
}

void flatten_all(const TorchFile& f, uint32_t v, const std::string& name, uint32_t state_dict, FlatTorchFile* out,
                 Budget* b, std::vector<int8_t>* memo) {
  if (v == state_dict && !name.empty()) {  // the state dict's entries keep their own names
    flatten_all(f, v, "", UINT32_MAX, out, b, memo);
    return;
  }
  const Node& n = f.nodes_[v];
  b->spend(name.size() + 16);
  if (n.kind == Kind::Tensor) {
    const at::Tensor& t = f.tensors_[static_cast<size_t>(n.i)].tensor;
    b->spend_tensor(t);
    DMX_CHECK_FORMAT(out->tensors.emplace(name, t).second, f.what_, ": two tensors flatten to the same name '", name,
                     "'");
    return;
  }
  if (!has_tensor(f, v, memo)) {
    const std::string key = name.empty() ? "value" : name;
    DMX_CHECK_FORMAT(out->metadata.emplace(key, to_json_impl(f, v, b).dump()).second, f.what_,
                     ": two values flatten to the same name '", key, "'");
    return;
  }
  auto join = [&](const std::string& k) { return name.empty() ? k : name + "." + k; };
  if (n.kind == Kind::List || n.kind == Kind::Tuple) {
    for (size_t k = 0; k < n.items.size(); ++k)
      flatten_all(f, n.items[k], join(std::to_string(k)), state_dict, out, b, memo);
  } else {
    for (size_t k = 0; k + 1 < n.items.size(); k += 2)
      flatten_all(f, n.items[k + 1], join(key_text(f, n.items[k])), state_dict, out, b, memo);
  }
}

}  // namespace

// ---------------------------------------------------------------- loading

bool looks_like_torch_file(const uint8_t* data, size_t size) {
  if (looks_like_zip(data, size)) return true;
  return size >= 2 && data[0] == 0x80 && data[1] >= 2 && data[1] <= 5;
}

bool looks_like_torch_file(const std::string& path) {
  // Regular files only (core/fs.h): a FIFO or device given as a model is refused, never read or waited on.
  const int fd = open_regular_file(path, "checkpoint", nullptr);
  uint8_t b[4] = {0, 0, 0, 0};
  const ssize_t got = ::read(fd, b, 4);
  ::close(fd);
  return looks_like_torch_file(b, got > 0 ? static_cast<size_t>(got) : 0);
}

std::shared_ptr<const TorchFile> parse_torch_bytes(const uint8_t* data, size_t size, const std::string& what,
                                                   std::shared_ptr<const void> keep_alive) {
  if (looks_like_zip(data, size)) return parse_zip(data, size, what, std::move(keep_alive));
  if (size >= 2 && data[0] == 0x80) return parse_legacy(data, size, what, std::move(keep_alive));
  DMX_CHECK_FORMAT(!(size > 262 && std::memcmp(data + 257, "ustar", 5) == 0), what,
                   ": a tar-format torch file (torch 0.3 and older) is not supported; re-save it with a newer torch");
  throw FormatError(detail::concat(what, ": not a torch.save file (neither a zip archive nor a pickle stream)"));
}

std::shared_ptr<const TorchFile> parse_bare_pickle(const uint8_t* data, size_t size, const std::string& what) {
  auto f = std::make_shared<TorchFile>();
  f->what_ = what;
  f->format_ = "bare pickle";
  Machine m(*f, data, size, "pickle", PidMode::Bare);
  size_t end = 0;
  f->root_ = m.run(&end);
  check_tree(*f);
  for (auto& s : f->storages_) {
    if (s.view_numel >= 0) continue;
    s.storage = at::zeros({s.numel}, at::TensorOptions().dtype(s.dtype)).storage();
  }
  make_tensors(*f);
  return f;
}

std::shared_ptr<const TorchFile> load_torch_file(const std::string& path) {
  // A regular file only (no device, FIFO or directory, refused without blocking); mapped, so its size costs
  // address space, not memory.
  uint64_t file_size = 0;
  const int fd = open_regular_file(path, "torch.save file", &file_size);
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<size_t>(file_size);
  if (map->size > 0) {
    // Private and writable: tensors over it are copy-on-write, never writing to the file.
    void* p = ::mmap(nullptr, map->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw IoError(detail::concat("cannot map ", path, ": ", std::strerror(errno)));
    }
    map->p = p;
  }
  ::close(fd);
  static const uint8_t kEmpty = 0;
  const uint8_t* data = map->p ? static_cast<const uint8_t*>(map->p) : &kEmpty;
  return parse_torch_bytes(data, map->size, path, map);
}

TensorMap torch_state_dict(const TorchFile& file) {
  PickleValue v = file.root();
  DMX_CHECK_FORMAT(v.is_dict(), file.what(), ": the file holds ", v.kind_name(), ", not a dict of tensors");
  while (v.contains("state_dict") && v.at("state_dict").is_dict()) v = v.at("state_dict");
  return v.tensors();
}

FlatTorchFile flatten_torch_file(const TorchFile& file) {
  uint32_t sd = UINT32_MAX;
  PickleValue v = file.root();
  if (v.is_dict()) {
    while (v.contains("state_dict") && v.at("state_dict").is_dict()) v = v.at("state_dict");
    sd = v.node_index();
  }
  FlatTorchFile out;
  Budget b(file);
  std::vector<int8_t> memo(file.nodes_.size(), -1);
  flatten_all(file, file.root_, "", sd, &out, &b, &memo);
  return out;
}

// ---------------------------------------------------------------- values

PickleValue TorchFile::root() const { return PickleValue(shared_from_this(), root_, ""); }

PickleValue::Kind PickleValue::kind() const { return file_->nodes_[node_].kind; }
const char* PickleValue::kind_name() const { return kind_name_of(kind()); }
std::string PickleValue::where() const { return file_->what() + ": " + (path_.empty() ? "the top level" : path_); }

void PickleValue::mismatch(const char* expected) const {
  throw FormatError(detail::concat(where(), " must be ", expected, ", got a ", kind_name()));
}
PickleValue PickleValue::child(uint32_t node, const std::string& step) const {
  return PickleValue(file_, node, path_ + step);
}

bool PickleValue::as_bool() const {
  if (kind() != Kind::Bool) mismatch("a bool");
  return file_->nodes_[node_].i != 0;
}
int64_t PickleValue::as_int() const {
  if (kind() != Kind::Int && kind() != Kind::Bool) mismatch(kind() == Kind::BigInt ? "an int within int64" : "an int");
  return file_->nodes_[node_].i;
}
double PickleValue::as_float() const {
  if (kind() == Kind::Float) return file_->nodes_[node_].f;
  if (kind() == Kind::Int || kind() == Kind::Bool) return static_cast<double>(file_->nodes_[node_].i);
  mismatch("a number");
}
const std::string& PickleValue::as_string() const {
  if (kind() != Kind::String) mismatch("a str");
  return file_->strings_[static_cast<size_t>(file_->nodes_[node_].i)];
}
const std::string& PickleValue::as_bytes() const {
  if (kind() != Kind::Bytes) mismatch("bytes");
  return file_->strings_[static_cast<size_t>(file_->nodes_[node_].i)];
}
at::Tensor PickleValue::as_tensor() const {
  if (kind() != Kind::Tensor) mismatch("a tensor");
  return file_->tensors_[static_cast<size_t>(file_->nodes_[node_].i)].tensor;
}
size_t PickleValue::size() const {
  if (is_sequence()) return file_->nodes_[node_].items.size();
  if (is_dict()) return file_->nodes_[node_].items.size() / 2;
  mismatch("a list, tuple or dict");
}
PickleValue PickleValue::operator[](size_t i) const {
  if (!is_sequence()) mismatch("a list or tuple");
  const auto& items = file_->nodes_[node_].items;
  DMX_CHECK_FORMAT(i < items.size(), where(), " has ", items.size(), " elements, no element ", i);
  return child(items[i], "[" + std::to_string(i) + "]");
}
namespace {
template <typename Match>
int64_t find_key(const TorchFile& f, uint32_t node, Match match) {
  const auto& items = f.nodes_[node].items;
  for (size_t k = 0; k + 1 < items.size(); k += 2)
    if (match(f.nodes_[items[k]])) return static_cast<int64_t>(k);
  return -1;
}
}  // namespace
bool PickleValue::contains(const std::string& key) const {
  if (!is_dict()) mismatch("a dict");
  return find_key(*file_, node_, [&](const Node& k) {
           return k.kind == Kind::String && file_->strings_[static_cast<size_t>(k.i)] == key;
         }) >= 0;
}
bool PickleValue::contains(int64_t key) const {
  if (!is_dict()) mismatch("a dict");
  return find_key(*file_, node_, [&](const Node& k) { return k.kind == Kind::Int && k.i == key; }) >= 0;
}
PickleValue PickleValue::at(const std::string& key) const {
  if (!is_dict()) mismatch("a dict");
  const int64_t k = find_key(*file_, node_, [&](const Node& n) {
    return n.kind == Kind::String && file_->strings_[static_cast<size_t>(n.i)] == key;
  });
  DMX_CHECK_FORMAT(k >= 0, where(), " has no key '", key, "'");
  return child(file_->nodes_[node_].items[static_cast<size_t>(k) + 1], "['" + key + "']");
}
PickleValue PickleValue::at(int64_t key) const {
  if (!is_dict()) mismatch("a dict");
  const int64_t k = find_key(*file_, node_, [&](const Node& n) { return n.kind == Kind::Int && n.i == key; });
  DMX_CHECK_FORMAT(k >= 0, where(), " has no key ", key);
  return child(file_->nodes_[node_].items[static_cast<size_t>(k) + 1], "[" + std::to_string(key) + "]");
}
std::vector<std::pair<PickleValue, PickleValue>> PickleValue::items() const {
  if (!is_dict()) mismatch("a dict");
  const auto& it = file_->nodes_[node_].items;
  std::vector<std::pair<PickleValue, PickleValue>> out;
  for (size_t k = 0; k + 1 < it.size(); k += 2) {
    const Node& key = file_->nodes_[it[k]];
    const std::string step = key.kind == Kind::String ? "['" + file_->strings_[static_cast<size_t>(key.i)] + "']"
                                                      : "[" + std::to_string(key.i) + "]";
    out.emplace_back(child(it[k], step + "(key)"), child(it[k + 1], step));
  }
  return out;
}
bool PickleValue::has_attributes() const { return file_->nodes_[node_].attrs != UINT32_MAX; }
PickleValue PickleValue::attributes() const {
  DMX_CHECK_FORMAT(has_attributes(), where(), " has no attributes");
  return child(file_->nodes_[node_].attrs, ".__dict__");
}
TensorMap PickleValue::tensors(const std::string& prefix) const {
  TensorMap out;
  Budget b(*file_);
  flatten(*file_, node_, prefix, &out, &b);
  return out;
}
nlohmann::json PickleValue::to_json() const {
  Budget b(*file_);
  return to_json_impl(*file_, node_, &b);
}
}  // namespace dmx::io
