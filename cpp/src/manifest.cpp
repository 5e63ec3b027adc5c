#include <fstream>
#include <set>
#include <sstream>
#include <sys/stat.h>

#include <torch/headeronly/version.h>

#include "unclip/native.h"
#include "unclip/sha256.h"

namespace unclip {

namespace {
constexpr const char* kFormat = "unclip-native";
constexpr int64_t kFormatVersion = 1;

std::string join(const std::string& root, const std::string& rel) { return root + "/" + rel; }

std::vector<FileEntry> read_files(const Json& files, const std::string& what) {
  std::vector<FileEntry> out;
  for (const auto& [rel, meta] : files.as_object(what)) {
    FileEntry f;
    f.path = rel;
    f.sha256 = meta.at("sha256", what + "." + rel).as_string(what + "." + rel + ".sha256");
    f.bytes = meta.at("bytes", what + "." + rel).as_int(what + "." + rel + ".bytes");
    if (rel.empty() || rel[0] == '/' || rel.find("..") != std::string::npos)
      throw Error(what + ": file path '" + rel + "' must be relative to the export folder");
    out.push_back(f);
  }
  return out;
}

// "2.13.0+cpu" -> "2.13.0": the C++ side knows libtorch's numeric version only.
std::string numeric_version(const std::string& v) {
  size_t end = v.find_first_not_of("0123456789.");
  return v.substr(0, end);
}
}  // namespace

std::string libtorch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

bool cpu_has_flag(const std::string& flag) {
  static const std::set<std::string> flags = [] {
    std::set<std::string> out;
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line)) {
      if (line.rfind("flags", 0) == 0) {
        std::istringstream words(line.substr(line.find(':') + 1));
        std::string w;
        while (words >> w) out.insert(w);
        break;
      }
    }
    return out;
  }();
  return flags.count(flag) > 0;
}

Manifest Manifest::read(const std::string& root_in) {
  std::string root = root_in;
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  struct stat st;
  if (stat(root.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw Error(root + ": folder not found");
  const std::string path = join(root, "manifest.json");
  if (stat(path.c_str(), &st) != 0)
    throw Error(root + ": not a native export (no manifest.json); create one with "
                "`unclip export --format native --out " + root + "`");
  Json j = Json::parse_file(path);
  const std::string m = path;
  Manifest out;
  out.root = root;
  const std::string format = j.at("format", m).as_string(m + ": format");
  if (format != kFormat) throw Error(m + ": format is '" + format + "', expected '" + kFormat + "'");
  const int64_t version = j.at("format_version", m).as_int(m + ": format_version");
  if (version != kFormatVersion)
    throw Error(m + ": format_version " + std::to_string(version) + " is not supported (this runtime reads " +
                std::to_string(kFormatVersion) + ")");
  out.dtype = j.at("dtype", m).as_string(m + ": dtype");
  if (out.dtype != "fp32") throw Error(m + ": dtype '" + out.dtype + "' is not supported (this runtime runs fp32)");
  const Json& target = j.at("target", m);
  out.device = target.at("device", m + ": target").as_string(m + ": target.device");
  out.torch_version = target.at("torch", m + ": target").as_string(m + ": target.torch");
  out.cpu_isa = target.at("cpu_isa", m + ": target").as_string(m + ": target.cpu_isa");
  for (const Json& f : target.at("cpu_flags", m + ": target").as_array(m + ": target.cpu_flags"))
    out.cpu_flags.push_back(f.as_string(m + ": target.cpu_flags[]"));
  if (target.has("cuda_arch") && !target.at("cuda_arch", m).is_null())
    out.cuda_arch = target.at("cuda_arch", m).as_string(m + ": target.cuda_arch");
  out.max_batch = j.at("max_batch", m).as_int(m + ": max_batch");
  if (out.max_batch < 1) throw Error(m + ": max_batch must be >= 1");

  const Json& tok = j.at("tokenizer", m);
  out.tokens = tok.at("model_max_length", m + ": tokenizer").as_int(m + ": tokenizer.model_max_length");
  for (const Json& v : tok.at("empty_input_ids", m + ": tokenizer").as_array(m + ": tokenizer.empty_input_ids"))
    out.empty_ids.push_back(v.as_int(m + ": tokenizer.empty_input_ids[]"));
  for (const Json& v : tok.at("empty_attention_mask", m + ": tokenizer").as_array(m + ": tokenizer.empty_attention_mask"))
    out.empty_mask.push_back(v.as_int(m + ": tokenizer.empty_attention_mask[]"));
  if (static_cast<int64_t>(out.empty_ids.size()) != out.tokens || out.empty_mask.size() != out.empty_ids.size())
    throw Error(m + ": tokenizer.empty_input_ids / empty_attention_mask must hold model_max_length = " +
                std::to_string(out.tokens) + " values");
  auto tok_files = read_files(tok.at("files", m + ": tokenizer"), m + ": tokenizer.files");
  out.other_files.insert(out.other_files.end(), tok_files.begin(), tok_files.end());

  for (const auto& [name, net] : j.at("networks", m).as_object(m + ": networks")) {
    const std::string w = m + ": networks." + name;
    NetworkEntry e;
    e.name = name;
    e.kind = net.at("kind", w).as_string(w + ".kind");
    e.package = net.at("package", w).as_string(w + ".package");
    e.files = read_files(net.at("files", w), w + ".files");
    bool listed = false;
    for (const auto& f : e.files) listed = listed || f.path == e.package;
    if (!listed) throw Error(w + ": package '" + e.package + "' is not among its files");
    out.networks[name] = e;
  }
  for (const char* required : {"text_encoder", "prior", "text_proj", "decoder"})
    if (!out.networks.count(required)) throw Error(m + ": networks has no '" + std::string(required) + "' package");

  const Json& cas = j.at("cascade", m);
  const std::string c = m + ": cascade";
  out.prior_dim = cas.at("prior_embedding_dim", c).as_int(c + ".prior_embedding_dim");
  out.decoder_size = cas.at("decoder_sample_size", c).as_int(c + ".decoder_sample_size");
  out.decoder_channels = cas.at("decoder_in_channels", c).as_int(c + ".decoder_in_channels");
  out.extra_context_tokens = cas.at("clip_extra_context_tokens", c).as_int(c + ".clip_extra_context_tokens");
  out.clip_stats_file = cas.at("clip_stats", c).as_string(c + ".clip_stats");
  out.prior_schedule = Schedule::from_json(cas.at("prior_scheduler", c), c + ".prior_scheduler");
  out.decoder_schedule = Schedule::from_json(cas.at("decoder_scheduler", c), c + ".decoder_scheduler");
  out.learned_variance = out.decoder_schedule.variance_type == "learned_range";
  const auto& ups = cas.at("upsamplers", c).as_array(c + ".upsamplers");
  if (ups.empty()) throw Error(c + ".upsamplers is empty (the cascade needs at least one)");
  for (size_t i = 0; i < ups.size(); ++i) {
    const std::string w = c + ".upsamplers[" + std::to_string(i) + "]";
    UpsamplerEntry u;
    u.name = ups[i].at("name", w).as_string(w + ".name");
    u.first = ups[i].at("first", w).as_string(w + ".first");
    u.last = ups[i].at("last", w).as_string(w + ".last");
    u.schedule = Schedule::from_json(ups[i].at("scheduler", w), w + ".scheduler");
    u.sample_size = ups[i].at("sample_size", w).as_int(w + ".sample_size");
    u.channels = ups[i].at("channels", w).as_int(w + ".channels");
    for (const auto& n : {u.first, u.last})
      if (!out.networks.count(n)) throw Error(w + ": network '" + n + "' is not in networks");
    out.upsamplers.push_back(u);
  }
  if (j.has("call_defaults")) {
    const Json& d = j.at("call_defaults", m);
    if (d.has("prior_guidance_scale")) out.default_prior_guidance = d.at("prior_guidance_scale", m).as_number(m + ": call_defaults.prior_guidance_scale");
    if (d.has("decoder_guidance_scale")) out.default_decoder_guidance = d.at("decoder_guidance_scale", m).as_number(m + ": call_defaults.decoder_guidance_scale");
  }
  bool stats_listed = false;
  for (const auto& [name, net] : out.networks)
    for (const auto& f : net.files) stats_listed = stats_listed || f.path == out.clip_stats_file;
  if (!stats_listed) throw Error(c + ".clip_stats '" + out.clip_stats_file + "' is not among the prior's files");
  return out;
}

void Manifest::verify_files(bool hashes) const {
  std::vector<FileEntry> all = other_files;
  for (const auto& [name, net] : networks) all.insert(all.end(), net.files.begin(), net.files.end());
  for (const FileEntry& f : all) {
    const std::string path = join(root, f.path);
    struct stat st;
    if (stat(path.c_str(), &st) != 0)
      throw Error(path + ": missing (listed in manifest.json; the export is incomplete, export again)");
    if (static_cast<int64_t>(st.st_size) != f.bytes)
      throw Error(path + ": has " + std::to_string(st.st_size) + " bytes, manifest.json says " +
                  std::to_string(f.bytes) + " (corrupt or modified; export again)");
    if (hashes) {
      const std::string got = sha256_file(path);
      if (got != f.sha256)
        throw Error(path + ": sha256 " + got + " does not match manifest.json's " + f.sha256 +
                    " (corrupt or modified; export again)");
    }
  }
}

void Manifest::check_compatible() const {
  const std::string want = numeric_version(torch_version), have = libtorch_version();
  if (want != have)
    throw Error(root + "/manifest.json: the packages were compiled for torch " + torch_version +
                ", this runtime is built against libtorch " + have + " (export again with this torch)");
  if (device == "cpu") {
    for (const std::string& flag : cpu_flags)
      if (!cpu_has_flag(flag))
        throw Error(root + "/manifest.json: the packages were compiled for the CPU instruction set '" + cpu_isa +
                    "', which needs CPU flag '" + flag + "'; this CPU lacks it (export again on this machine)");
  } else if (device == "cuda") {
#ifndef UNCLIP_WITH_CUDA
    throw Error(root + "/manifest.json: the packages were compiled for CUDA (" + cuda_arch +
                "); this runtime was built without CUDA (a CPU-only libtorch)");
#endif
  } else {
    throw Error(root + "/manifest.json: target.device '" + device + "' is not 'cpu' or 'cuda'");
  }
}

}  // namespace unclip
