// A small JSON reader for the export manifest (RFC 8259 values; no writer). Our own code: the runtime
// reads exactly one file format it controls, which does not justify a third-party dependency.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace unclip {

class Json {
 public:
  enum class Type { Null, Bool, Number, String, Array, Object };

  Json() = default;
  // Parses `text`; throws unclip::Error naming `source` and the byte offset on malformed input.
  static Json parse(const std::string& text, const std::string& source);
  static Json parse_file(const std::string& path);

  Type type() const { return type_; }
  bool is_null() const { return type_ == Type::Null; }
  bool is_object() const { return type_ == Type::Object; }
  bool is_array() const { return type_ == Type::Array; }
  bool is_string() const { return type_ == Type::String; }
  bool is_number() const { return type_ == Type::Number; }
  bool is_bool() const { return type_ == Type::Bool; }

  // Typed access; `what` names the value in the error thrown on a type mismatch.
  bool as_bool(const std::string& what) const;
  double as_number(const std::string& what) const;
  int64_t as_int(const std::string& what) const;
  const std::string& as_string(const std::string& what) const;
  const std::vector<Json>& as_array(const std::string& what) const;
  const std::map<std::string, Json>& as_object(const std::string& what) const;

  bool has(const std::string& key) const;
  // Object member; throws naming `what.key` when missing.
  const Json& at(const std::string& key, const std::string& what) const;

 private:
  Type type_ = Type::Null;
  bool bool_ = false;
  double number_ = 0.0;
  std::string string_;
  std::vector<Json> array_;
  std::map<std::string, Json> object_;
  friend class JsonParser;
};

}  // namespace unclip
