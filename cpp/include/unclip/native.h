// unclip native runtime: the unCLIP cascade (text encoder -> prior -> text_proj -> decoder -> upsamplers)
// sampled in C++ over AOTInductor packages written by `unclip export --format native`.
//
//   unclip::Cascade cascade = unclip::Cascade::load("karlo-native");
//   at::Tensor ids = ..., mask = ...;                 // (B, 77) int64 / bool, from `unclip tokenize`
//   unclip::Settings settings;                         // steps, guidance, sampler/eta per stage
//   at::Tensor images = cascade.generate(ids, mask, settings, /*seed=*/0);   // (B, 3, H, W) in [0, 1]
//
// The same seed draws the same images as the Python backends: noise comes from libtorch's CPU generator in
// the order the Python cascade draws it (per stage: initial latents, then one draw per stochastic step), and
// the samplers repeat engine/samplers.py's float32 operations in the same order.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "unclip/error.h"
#include "unclip/json.h"

namespace unclip {

// ---------------------------------------------------------------------------------------------- samplers

// How a stage's model was trained (the scheduler config of the export manifest).
struct Schedule {
  int64_t num_train_timesteps = 1000;
  std::string beta_schedule = "squaredcos_cap_v2";  // or "linear"
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string variance_type = "fixed_small_log";    // or "learned_range"
  std::string prediction_type = "epsilon";          // or "sample"
  bool clip_sample = true;
  double clip_sample_range = 1.0;

  static Schedule from_json(const Json& j, const std::string& what);
};

// Every per-step coefficient of one sampler run, float32 (N,) CPU tensors (see engine/samplers.py).
struct Plan {
  std::string sampler;  // "ddpm" | "ddim"
  std::vector<int64_t> timesteps;
  std::vector<int64_t> prev_timesteps;  // -1 = lands on x0
  std::vector<bool> draws_noise;
  std::string prediction_type;
  std::string variance_type;  // ddpm only
  std::optional<double> clip_range;
  double eta = 0.0;
  bool use_clipped_model_output = true;
  // Coefficients; the ones a sampler does not use are undefined tensors.
  std::map<std::string, at::Tensor> coef;

  int64_t num_steps() const { return static_cast<int64_t>(timesteps.size()); }
  const at::Tensor& at_name(const std::string& name) const;
};

at::Tensor betas_for(const Schedule& schedule);
at::Tensor alphas_cumprod_for(const at::Tensor& betas);
std::vector<int64_t> karlo_timesteps(int64_t num_inference_steps, int64_t num_train_timesteps);
// `unclip.samplers.make_plan(schedule, steps, sampler=..., eta=...)`, with the same float32 values.
Plan make_plan(const Schedule& schedule, int64_t num_inference_steps, const std::string& sampler = "ddpm",
               double eta = 0.0, bool use_clipped_model_output = true);
// One sampler step x_t -> x_s (`unclip.samplers.step`). `noise` may be empty where the step draws none.
at::Tensor step(const Plan& plan, int64_t i, const at::Tensor& sample, const at::Tensor& model_output,
                const std::optional<at::Tensor>& noise);

// ---------------------------------------------------------------------------------------------- manifest

struct FileEntry {
  std::string path;  // relative to the export folder, '/'-separated
  std::string sha256;
  int64_t bytes = 0;
};

struct NetworkEntry {
  std::string name;  // text_encoder | prior | text_proj | decoder | super_res_first | ...
  std::string kind;
  std::string package;  // relative path of the .pt2
  std::vector<FileEntry> files;
};

struct UpsamplerEntry {
  std::string name;  // super_res | super_res_2 | ...
  std::string first, last;  // network names
  Schedule schedule;
  int64_t sample_size = 0, channels = 0;
};

struct Manifest {
  std::string root;
  std::string dtype;          // "fp32"
  std::string device;         // "cpu" | "cuda"
  std::string torch_version;  // e.g. "2.13.0+cpu"
  std::string cpu_isa;        // inductor's vector ISA the CPU packages were compiled for, e.g. "avx512"
  std::vector<std::string> cpu_flags;  // /proc/cpuinfo flags that ISA needs
  std::string cuda_arch;      // e.g. "sm_90" for CUDA packages
  int64_t max_batch = 0;
  int64_t tokens = 77;
  std::vector<int64_t> empty_ids;   // the empty caption, tokenized (unconditional rows)
  std::vector<int64_t> empty_mask;
  std::map<std::string, NetworkEntry> networks;
  std::vector<FileEntry> other_files;  // tokenizer, clip stats
  Schedule prior_schedule, decoder_schedule;
  std::vector<UpsamplerEntry> upsamplers;
  int64_t prior_dim = 0;
  int64_t decoder_size = 0, decoder_channels = 0, extra_context_tokens = 0;
  bool learned_variance = false;
  std::string clip_stats_file;  // raw float32: clip_mean then clip_std, prior_dim each
  double default_prior_guidance = 4.0, default_decoder_guidance = 8.0;

  // Reads and validates ROOT/manifest.json (unclip::Error naming the key on anything malformed).
  static Manifest read(const std::string& root);
  // Every listed file exists with its size (and sha256 when `hashes`); Error names the file and both values.
  void verify_files(bool hashes) const;
  // This libtorch and this CPU can run the packages; Error names both values otherwise.
  void check_compatible() const;
};

// The facts `check_compatible` compares: this build's libtorch version ("2.13.0") and whether the running
// CPU has a /proc/cpuinfo flag.
std::string libtorch_version();
bool cpu_has_flag(const std::string& flag);

// ---------------------------------------------------------------------------------------------- cascade

struct StageSettings {
  int64_t steps = 25;
  std::string sampler = "ddpm";
  double eta = 0.0;
};

struct Settings {
  StageSettings prior{25};
  StageSettings decoder{25};
  std::vector<StageSettings> super_res;  // one per upsampler; empty = 7 DDPM steps each
  std::optional<double> prior_guidance;    // empty = the model's default
  std::optional<double> decoder_guidance;
  int64_t num_images_per_prompt = 1;
  int64_t prior_candidates = 1;
};

// A per-step hook: (stage name, step index, timestep, latents after the step).
using StepCallback = std::function<void(const std::string&, int64_t, int64_t, const at::Tensor&)>;

class Cascade {
 public:
  // Loads the export folder `root`: checks the manifest, file sizes (and sha256 if `verify_hashes`),
  // the torch version and CPU instruction set, then loads every package.
  static Cascade load(const std::string& root, bool verify_hashes = true);

  const Manifest& manifest() const { return *manifest_; }

  // Token ids (B, L) int64 and attention mask (B, L) bool/int -> images (B·n, 3, H, W) float32 in [0, 1].
  at::Tensor generate(const at::Tensor& input_ids, const at::Tensor& attention_mask, const Settings& settings,
                      uint64_t seed, const StepCallback& callback = nullptr) const;

  // One sampling loop (what the Python runner hands over): `kind` prior|decoder|super_res, `networks` the
  // manifest network names (super_res: first, last), float32 latents and per-step noise, conditioning by
  // name (prior: text_embeds, text_hidden, text_mask; decoder: context, time_embed, mask; super_res:
  // upscaled), guidance scale (empty = unguided), learned-variance channel count (decoder).
  at::Tensor run_stage(const std::string& name, const std::string& kind, const std::vector<std::string>& networks,
                       const Plan& plan, const at::Tensor& latents, const std::vector<std::optional<at::Tensor>>& noise,
                       const std::map<std::string, at::Tensor>& conditioning, std::optional<double> guidance,
                       std::optional<int64_t> learned_variance_channels,
                       const StepCallback& callback = nullptr) const;

  // One network call with the graph's inputs in order (batch checked against the compiled maximum).
  std::vector<at::Tensor> call(const std::string& network, const std::vector<at::Tensor>& inputs) const;

  at::Tensor clip_mean() const { return clip_mean_; }
  at::Tensor clip_std() const { return clip_std_; }

 private:
  struct Package;
  std::shared_ptr<const Manifest> manifest_;
  std::map<std::string, std::shared_ptr<Package>> packages_;
  at::Tensor clip_mean_, clip_std_;
};

// Writes images (B, 3, H, W) in [0, 1] as PNG files (8-bit RGB, value·255 rounded half to even as the Python
// side does); declared here, implemented with libpng in the program's library.
void write_png(const at::Tensor& image, const std::string& path);

}  // namespace unclip
