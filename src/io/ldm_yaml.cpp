// The YAML subset of LDM configs (parse_ldm_yaml, ldm_names.h): block mappings and sequences by indentation,
// `key: value`, flow lists and maps, quoted strings, numbers, booleans, null, comments.
#include <cctype>
#include <sstream>
#include <string>
#include <vector>

#include "core/text.h"
#include "dmx/error.h"
#include "io/ldm_names.h"

namespace dmx::io {

using nlohmann::json;

namespace {

struct YamlLine {
  int indent;
  std::string text;
  int number;
};

class YamlReader {
 public:
  YamlReader(const std::string& text, const std::string& what) : what_(what) {
    std::istringstream in(text);
    std::string line;
    int number = 0;
    while (std::getline(in, line)) {
      ++number;
      if (!line.empty() && line.back() == '\r') line.pop_back();
      line = strip_comment(line);
      size_t indent = 0;
      while (indent < line.size() && line[indent] == ' ') ++indent;
      if (indent < line.size() && line[indent] == '\t') fail(number, "tabs are not allowed for indentation");
      std::string body = trim(line.substr(indent));
      if (body.empty() || body == "---" || body == "...") continue;
      lines_.push_back({static_cast<int>(indent), body, number});
    }
  }

  json parse() {
    if (lines_.empty()) return json::object();
    size_t pos = 0;
    json j = node(pos, lines_[0].indent);
    if (pos < lines_.size()) fail(lines_[pos].number, "unexpected indentation");
    return j;
  }

 private:
  [[noreturn]] void fail(int line, const std::string& why) const {
    throw FormatError(detail::concat(what_, ": line ", line, ": ", why, " (dmx reads a YAML subset)"));
  }

  // A '#' at the start or after a space, outside quotes, starts a comment.
  static std::string strip_comment(const std::string& s) {
    char quote = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (quote) {
        if (c == quote) quote = 0;
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '#' && (i == 0 || s[i - 1] == ' ' || s[i - 1] == '\t')) {
        return s.substr(0, i);
      }
    }
    return s;
  }

  // Position of the ':' that ends a mapping key (followed by a space or the end), outside quotes and
  // brackets; npos when the text is not `key: value`.
  static size_t key_colon(const std::string& s) {
    char quote = 0;
    int depth = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      const char c = s[i];
      if (quote) {
        if (c == quote) quote = 0;
      } else if (c == '"' || c == '\'') {
        quote = c;
      } else if (c == '[' || c == '{') {
        ++depth;
      } else if (c == ']' || c == '}') {
        --depth;
      } else if (c == ':' && depth == 0 && (i + 1 == s.size() || s[i + 1] == ' ')) {
        return i;
      }
    }
    return std::string::npos;
  }

  static bool is_seq_item(const std::string& s) { return s == "-" || s.compare(0, 2, "- ") == 0; }

  json node(size_t& pos, int indent) {
    return is_seq_item(lines_[pos].text) ? sequence(pos, indent) : mapping(pos, indent);
  }

  // The value of a key (or sequence item) whose text after ':' / '-' is empty: a nested block or null.
  json nested(size_t& pos, int parent_indent, bool allow_same_indent_seq) {
    if (pos < lines_.size() && lines_[pos].indent > parent_indent) return node(pos, lines_[pos].indent);
    if (allow_same_indent_seq && pos < lines_.size() && lines_[pos].indent == parent_indent &&
        is_seq_item(lines_[pos].text))
      return sequence(pos, parent_indent);
    return nullptr;
  }

  json mapping(size_t& pos, int indent) {
    json obj = json::object();
    while (pos < lines_.size() && lines_[pos].indent == indent && !is_seq_item(lines_[pos].text)) {
      const YamlLine& ln = lines_[pos];
      const size_t colon = key_colon(ln.text);
      if (colon == std::string::npos) fail(ln.number, "expected 'key: value', got '" + ln.text + "'");
      std::string key = trim(ln.text.substr(0, colon));
      if (key.size() >= 2 && (key[0] == '"' || key[0] == '\'') && key.back() == key[0])
        key = key.substr(1, key.size() - 2);
      const std::string value = trim(ln.text.substr(colon + 1));
      const int number = ln.number;
      ++pos;
      obj[key] = value.empty() ? nested(pos, indent, true) : scalar_or_flow(value, number);
    }
    if (pos < lines_.size() && lines_[pos].indent > indent) fail(lines_[pos].number, "unexpected indentation");
    return obj;
  }

  json sequence(size_t& pos, int indent) {
    json arr = json::array();
    while (pos < lines_.size() && lines_[pos].indent == indent && is_seq_item(lines_[pos].text)) {
      YamlLine& ln = lines_[pos];
      const std::string item = trim(ln.text.substr(1));
      if (item.empty()) {
        ++pos;
        arr.push_back(nested(pos, indent, false));
      } else if (key_colon(item) != std::string::npos) {
        // "- key: value" opens a mapping whose keys line up with `key`.
        const size_t offset = ln.text.find(item);
        ln.indent = indent + static_cast<int>(offset);
        ln.text = item;
        arr.push_back(mapping(pos, ln.indent));
      } else {
        arr.push_back(scalar_or_flow(item, ln.number));
        ++pos;
      }
    }
    return arr;
  }

  json scalar_or_flow(const std::string& text, int number) {
    size_t i = 0;
    json v = flow(text, i, number, /*top=*/true);
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
    if (i != text.size()) fail(number, "unexpected text after a value: '" + text.substr(i) + "'");
    return v;
  }

  // Parses one value starting at text[i]; inside brackets, plain scalars end at ',' ']' '}'.
  json flow(const std::string& text, size_t& i, int number, bool top) {
    while (i < text.size() && text[i] == ' ') ++i;
    if (i >= text.size()) return nullptr;
    const char c = text[i];
    if (c == '[' || c == '{') {
      const bool list = c == '[';
      const char close = list ? ']' : '}';
      json out = list ? json::array() : json::object();
      ++i;
      while (true) {
        while (i < text.size() && text[i] == ' ') ++i;
        if (i >= text.size()) fail(number, std::string("missing '") + close + "'");
        if (text[i] == close) {
          ++i;
          break;
        }
        if (list) {
          out.push_back(flow(text, i, number, false));
        } else {
          json key = flow(text, i, number, false);
          while (i < text.size() && text[i] == ' ') ++i;
          if (i >= text.size() || text[i] != ':') fail(number, "expected ':' in a flow mapping");
          ++i;
          out[key.is_string() ? key.get<std::string>() : key.dump()] = flow(text, i, number, false);
        }
        while (i < text.size() && text[i] == ' ') ++i;
        if (i < text.size() && text[i] == ',')
          ++i;
        else if (i >= text.size() || text[i] != close)
          fail(number, std::string("expected ',' or '") + close + "'");
      }
      return out;
    }
    if (c == '"' || c == '\'') {
      std::string s;
      ++i;
      while (true) {
        if (i >= text.size()) fail(number, "unterminated string");
        const char d = text[i++];
        if (d == c) {
          if (c == '\'' && i < text.size() && text[i] == '\'') {  // '' is a quote in single quotes
            s += '\'';
            ++i;
            continue;
          }
          break;
        }
        if (c == '"' && d == '\\' && i < text.size()) {
          const char e = text[i++];
          s += e == 'n' ? '\n' : e == 't' ? '\t' : e;
          continue;
        }
        s += d;
      }
      return s;
    }
    size_t end = i;
    if (top) {
      end = text.size();
    } else {
      while (end < text.size() && text[end] != ',' && text[end] != ']' && text[end] != '}' &&
             !(text[end] == ':' && (end + 1 == text.size() || text[end + 1] == ' ')))
        ++end;
    }
    const std::string plain = trim(text.substr(i, end - i));
    i = end;
    return plain_scalar(plain);
  }

  static json plain_scalar(const std::string& s) {
    if (s == "true" || s == "True" || s == "TRUE") return true;
    if (s == "false" || s == "False" || s == "FALSE") return false;
    if (s.empty() || s == "~" || s == "null" || s == "Null" || s == "NULL") return nullptr;
    // Integers and decimals (1.0e-04, 0.0120, -3, .5).
    size_t k = 0;
    if (s[k] == '+' || s[k] == '-') ++k;
    size_t digits = 0, frac = 0;
    while (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) ++k, ++digits;
    bool is_float = false;
    if (k < s.size() && s[k] == '.') {
      is_float = true;
      ++k;
      while (k < s.size() && std::isdigit(static_cast<unsigned char>(s[k]))) ++k, ++frac;
    }
    if (digits + frac > 0 && k < s.size() && (s[k] == 'e' || s[k] == 'E')) {
      size_t e = k + 1;
      if (e < s.size() && (s[e] == '+' || s[e] == '-')) ++e;
      size_t ed = 0;
      while (e < s.size() && std::isdigit(static_cast<unsigned char>(s[e]))) ++e, ++ed;
      if (ed > 0) {
        is_float = true;
        k = e;
      }
    }
    if (digits + frac > 0 && k == s.size()) {
      try {
        if (!is_float) return std::stoll(s);
        return std::stod(s);
      } catch (const std::exception&) {
        return s;  // out of range: keep the text
      }
    }
    return s;
  }

  std::string what_;
  std::vector<YamlLine> lines_;
};

}  // namespace

json parse_ldm_yaml(const std::string& text, const std::string& what) { return YamlReader(text, what).parse(); }

}  // namespace dmx::io
