// unclip-native: draw images from token ids with the native runtime, no Python interpreter involved.
//
//   unclip tokenize "a red circle" --out ids.json          (Python side: the tokenizer)
//   unclip-native DIR --ids ids.json --seed 0 --out img.png
#include <ATen/Parallel.h>

#include <cstdlib>
#include <iostream>

#include "unclip/native.h"

namespace {

const char* kUsage =
    "usage: unclip-native DIR --ids FILE --out IMAGE.png [--seed N] [--prior-steps N] [--decoder-steps N]\n"
    "                     [--super-res-steps N] [--prior-guidance S] [--decoder-guidance S] [--sampler ddpm|ddim]\n"
    "                     [--eta E] [--candidates K] [--threads N] [--no-verify]\n"
    "DIR: an `unclip export --format native` folder; FILE: ids written by `unclip tokenize`.\n"
    "With several prompts, IMAGE.png becomes IMAGE-0.png, IMAGE-1.png, ...\n";

int64_t to_int(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end) throw unclip::Error(flag + " must be an integer, got '" + v + "'");
  return x;
}

double to_double(const std::string& flag, const std::string& v) {
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw unclip::Error(flag + " must be a number, got '" + v + "'");
  return x;
}

// The ids file: {"format": "unclip-ids", "input_ids": [[...], ...], "attention_mask": [[...], ...]}.
std::pair<at::Tensor, at::Tensor> read_ids(const std::string& path) {
  unclip::Json j = unclip::Json::parse_file(path);
  if (!j.has("format") || j.at("format", path).as_string(path + ": format") != "unclip-ids")
    throw unclip::Error(path + ": not an ids file (write one with `unclip tokenize PROMPT --out " + path + "`)");
  auto rows = [&](const char* key) {
    std::vector<int64_t> flat;
    int64_t width = -1, count = 0;
    for (const auto& row : j.at(key, path).as_array(path + ": " + key)) {
      const auto& values = row.as_array(path + ": " + key + "[]");
      if (width >= 0 && static_cast<int64_t>(values.size()) != width)
        throw unclip::Error(path + ": " + key + " rows differ in length");
      width = static_cast<int64_t>(values.size());
      for (const auto& v : values) flat.push_back(v.as_int(path + ": " + key + "[][]"));
      ++count;
    }
    if (count == 0) throw unclip::Error(path + ": " + key + " is empty");
    return at::tensor(flat, at::TensorOptions().dtype(at::kLong)).reshape({count, width});
  };
  return {rows("input_ids"), rows("attention_mask")};
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, ids, out;
  uint64_t seed = 0;
  unclip::Settings settings;
  std::string sampler = "ddpm";
  double eta = 0.0;
  int64_t sr_steps = 7, threads = 0;
  bool verify = true;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw unclip::Error(a + " needs a value");
        return argv[++i];
      };
      if (a == "-h" || a == "--help") { std::cout << kUsage; return 0; }
      else if (a == "--ids") ids = value();
      else if (a == "--out") out = value();
      else if (a == "--seed") seed = static_cast<uint64_t>(to_int(a, value()));
      else if (a == "--prior-steps") settings.prior.steps = to_int(a, value());
      else if (a == "--decoder-steps") settings.decoder.steps = to_int(a, value());
      else if (a == "--super-res-steps") sr_steps = to_int(a, value());
      else if (a == "--prior-guidance") settings.prior_guidance = to_double(a, value());
      else if (a == "--decoder-guidance") settings.decoder_guidance = to_double(a, value());
      else if (a == "--sampler") sampler = value();
      else if (a == "--eta") eta = to_double(a, value());
      else if (a == "--candidates") settings.prior_candidates = to_int(a, value());
      else if (a == "--threads") threads = to_int(a, value());
      else if (a == "--no-verify") verify = false;
      else if (!a.empty() && a[0] == '-') throw unclip::Error("unknown option " + a);
      else if (dir.empty()) dir = a;
      else throw unclip::Error("unexpected argument " + a);
    }
    if (dir.empty() || ids.empty() || out.empty()) {
      std::cerr << kUsage;
      return 2;
    }
    if (threads > 0) at::set_num_threads(static_cast<int>(threads));
    for (unclip::StageSettings* s : {&settings.prior, &settings.decoder}) {
      s->sampler = sampler;
      s->eta = eta;
    }
    auto [input_ids, mask] = read_ids(ids);
    unclip::Cascade cascade = unclip::Cascade::load(dir, verify);
    settings.super_res.assign(cascade.manifest().upsamplers.size(), unclip::StageSettings{sr_steps, sampler, eta});
    at::Tensor images = cascade.generate(input_ids, mask, settings, seed);
    std::string stem = out, ext;
    if (out.size() > 4 && out.substr(out.size() - 4) == ".png") { stem = out.substr(0, out.size() - 4); ext = ".png"; }
    for (int64_t b = 0; b < images.size(0); ++b) {
      std::string path = images.size(0) == 1 ? out : stem + "-" + std::to_string(b) + (ext.empty() ? ".png" : ext);
      unclip::write_png(images[b], path);
      std::cout << path << "\n";
    }
    return 0;
  } catch (const unclip::Error& e) {
    std::cerr << "unclip-native: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "unclip-native: error: " << e.what() << "\n";
    return 1;
  }
}
