#include "unclip/json.h"

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "unclip/error.h"

namespace unclip {

class JsonParser {
 public:
  JsonParser(const std::string& text, const std::string& source) : s_(text), source_(source) {}

  Json document() {
    Json v = value(0);
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the JSON value");
    return v;
  }

 private:
  const std::string& s_;
  const std::string& source_;
  size_t pos_ = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(source_ + ": malformed JSON at byte " + std::to_string(pos_) + ": " + why);
  }
  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) ++pos_;
  }
  char peek() {
    skip_space();
    if (pos_ >= s_.size()) fail("unexpected end of input");
    return s_[pos_];
  }
  void expect(const char* word) {
    for (const char* c = word; *c; ++c, ++pos_)
      if (pos_ >= s_.size() || s_[pos_] != *c) fail(std::string("expected '") + word + "'");
  }

  Json value(int depth) {
    if (depth > 256) fail("nesting deeper than 256 levels");
    Json v;
    char c = peek();
    if (c == '{') {
      v.type_ = Json::Type::Object;
      ++pos_;
      if (peek() == '}') { ++pos_; return v; }
      while (true) {
        if (peek() != '"') fail("expected a string key");
        std::string key = string();
        if (peek() != ':') fail("expected ':'");
        ++pos_;
        v.object_[key] = value(depth + 1);
        char d = peek();
        ++pos_;
        if (d == '}') return v;
        if (d != ',') fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      v.type_ = Json::Type::Array;
      ++pos_;
      if (peek() == ']') { ++pos_; return v; }
      while (true) {
        v.array_.push_back(value(depth + 1));
        char d = peek();
        ++pos_;
        if (d == ']') return v;
        if (d != ',') fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      v.type_ = Json::Type::String;
      v.string_ = string();
      return v;
    }
    if (c == 't') { expect("true"); v.type_ = Json::Type::Bool; v.bool_ = true; return v; }
    if (c == 'f') { expect("false"); v.type_ = Json::Type::Bool; return v; }
    if (c == 'n') { expect("null"); return v; }
    if (c == 'N') { expect("NaN"); v.type_ = Json::Type::Number; v.number_ = NAN; return v; }  // Python's json
    if (c == 'I') { expect("Infinity"); v.type_ = Json::Type::Number; v.number_ = INFINITY; return v; }
    if (c == '-' || (c >= '0' && c <= '9')) {
      if (c == '-' && pos_ + 1 < s_.size() && s_[pos_ + 1] == 'I') {
        ++pos_; expect("Infinity"); v.type_ = Json::Type::Number; v.number_ = -INFINITY; return v;
      }
      const char* begin = s_.c_str() + pos_;
      char* end = nullptr;
      v.number_ = std::strtod(begin, &end);  // the manifest is written by Python's json: C-locale numbers
      if (end == begin) fail("bad number");
      pos_ += static_cast<size_t>(end - begin);
      v.type_ = Json::Type::Number;
      return v;
    }
    fail(std::string("unexpected character '") + c + "'");
  }

  void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= static_cast<uint32_t>(h - '0');
      else if (h >= 'a' && h <= 'f') v |= static_cast<uint32_t>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= static_cast<uint32_t>(h - 'A' + 10);
      else fail("bad \\u escape");
    }
    return v;
  }

  std::string string() {
    ++pos_;  // opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) fail("unterminated string");
      char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') { out += c; continue; }
      if (pos_ >= s_.size()) fail("unterminated escape");
      char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') fail("lone surrogate");
            pos_ += 2;
            uint32_t low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default: fail(std::string("bad escape '\\") + e + "'");
      }
    }
  }
};

Json Json::parse(const std::string& text, const std::string& source) { return JsonParser(text, source).document(); }

Json Json::parse_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot be opened");
  std::stringstream buf;
  buf << f.rdbuf();
  return parse(buf.str(), path);
}

static const char* type_name(Json::Type t) {
  switch (t) {
    case Json::Type::Null: return "null";
    case Json::Type::Bool: return "a bool";
    case Json::Type::Number: return "a number";
    case Json::Type::String: return "a string";
    case Json::Type::Array: return "an array";
    case Json::Type::Object: return "an object";
  }
  return "?";
}

static void need(const Json& v, Json::Type t, const std::string& what) {
  if (v.type() != t)
    throw Error(what + " must be " + type_name(t) + ", got " + type_name(v.type()));
}

bool Json::as_bool(const std::string& what) const { need(*this, Type::Bool, what); return bool_; }
double Json::as_number(const std::string& what) const { need(*this, Type::Number, what); return number_; }
int64_t Json::as_int(const std::string& what) const {
  need(*this, Type::Number, what);
  if (!(std::floor(number_) == number_) || std::fabs(number_) > 9.007199254740992e15)
    throw Error(what + " must be an integer, got " + std::to_string(number_));
  return static_cast<int64_t>(number_);
}
const std::string& Json::as_string(const std::string& what) const { need(*this, Type::String, what); return string_; }
const std::vector<Json>& Json::as_array(const std::string& what) const { need(*this, Type::Array, what); return array_; }
const std::map<std::string, Json>& Json::as_object(const std::string& what) const {
  need(*this, Type::Object, what);
  return object_;
}
bool Json::has(const std::string& key) const { return type_ == Type::Object && object_.count(key) > 0; }
const Json& Json::at(const std::string& key, const std::string& what) const {
  need(*this, Type::Object, what);
  auto it = object_.find(key);
  if (it == object_.end()) throw Error(what + " has no key '" + key + "'");
  return it->second;
}

}  // namespace unclip
