#pragma once

#include <stdexcept>
#include <string>

namespace unclip {

// Every failure the runtime reports: a bad export folder (missing or mismatched file, another torch
// version or instruction set), a bad argument (batch above the compiled maximum, unknown sampler), a
// network that failed inside libtorch. The message names the file or argument and both values.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace unclip
