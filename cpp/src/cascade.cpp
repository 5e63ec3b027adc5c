// The cascade loop over AOTInductor packages: the same row layout, guidance, noise order and between-stage
// tensor work as engine/cascade.py + engine/stages.py + engine/runner.py (see the comments there for why).
#include <fstream>

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include "unclip/native.h"

namespace unclip {

namespace {

// The graph inputs of each network kind, in call order (export/onnx.py `graph_specs`).
struct InputSpec {
  const char* name;
  at::ScalarType dtype;  // kFloat stands for "the model dtype"
};
const std::map<std::string, std::vector<InputSpec>>& graph_inputs() {
  static const std::map<std::string, std::vector<InputSpec>> specs = {
      {"text_encoder", {{"input_ids", at::kInt}}},
      {"prior",
       {{"hidden_states", at::kFloat}, {"timestep", at::kFloat}, {"proj_embedding", at::kFloat},
        {"encoder_hidden_states", at::kFloat}, {"attention_mask", at::kBool}}},
      {"text_proj",
       {{"image_embeddings", at::kFloat}, {"is_uncond", at::kBool}, {"prompt_embeds", at::kFloat},
        {"text_encoder_hidden_states", at::kFloat}}},
      {"decoder",
       {{"sample", at::kFloat}, {"timestep", at::kFloat}, {"encoder_hidden_states", at::kFloat},
        {"class_labels", at::kFloat}, {"attention_mask", at::kBool}}},
      {"super_res", {{"sample", at::kFloat}, {"timestep", at::kFloat}}},
  };
  return specs;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

at::Tensor timesteps(int64_t t, int64_t batch) {
  return at::full({batch}, static_cast<double>(t), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor normalize(const at::Tensor& x) {  // F.normalize(x, dim=-1)
  return x / x.norm(2, {-1}, true).clamp_min(1e-12).expand_as(x);
}

}  // namespace

struct Cascade::Package {
  std::string name, kind, path;
  std::vector<std::vector<int64_t>> shapes;  // per input: static sizes after the batch axis
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
};

Cascade Cascade::load(const std::string& root, bool verify_hashes) {
  auto manifest = std::make_shared<Manifest>(Manifest::read(root));
  manifest->check_compatible();
  manifest->verify_files(verify_hashes);
  Cascade c;
  c.manifest_ = manifest;
  // Per-input static shapes, from the manifest (checked before each call so a wrong shape is an error
  // naming the input, never a crash inside a compiled kernel).
  Json j = Json::parse_file(manifest->root + "/manifest.json");
  for (const auto& [name, net] : manifest->networks) {
    auto p = std::make_shared<Package>();
    p->name = name;
    p->kind = net.kind;
    p->path = manifest->root + "/" + net.package;
    if (!graph_inputs().count(net.kind))
      throw Error(manifest->root + "/manifest.json: networks." + name + ".kind '" + net.kind + "' is not supported");
    const std::string w = manifest->root + "/manifest.json: networks." + name + ".inputs";
    const auto& inputs = j.at("networks", "manifest").at(name, "networks").at("inputs", w).as_array(w);
    if (inputs.size() != graph_inputs().at(net.kind).size())
      throw Error(w + " lists " + std::to_string(inputs.size()) + " inputs, a " + net.kind + " graph takes " +
                  std::to_string(graph_inputs().at(net.kind).size()));
    for (const Json& in : inputs) {
      std::vector<int64_t> dims;
      const auto& shape = in.at("shape", w).as_array(w + "[].shape");
      for (size_t d = 1; d < shape.size(); ++d) dims.push_back(shape[d].as_int(w + "[].shape[]"));
      p->shapes.push_back(dims);
    }
    try {
      p->loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(p->path, "model");
    } catch (const c10::Error& e) {
      throw Error(p->path + ": cannot be loaded as an AOTInductor package: " + e.what_without_backtrace());
    }
    c.packages_[name] = p;
  }
  // clip_mean then clip_std, raw little-endian float32.
  const std::string stats = manifest->root + "/" + manifest->clip_stats_file;
  std::ifstream f(stats, std::ios::binary);
  std::vector<float> buf(static_cast<size_t>(2 * manifest->prior_dim));
  f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(buf.size() * sizeof(float)));
  if (!f) throw Error(stats + ": expected " + std::to_string(2 * manifest->prior_dim) + " float32 values");
  at::Tensor all = at::tensor(buf, at::TensorOptions().dtype(at::kFloat));
  c.clip_mean_ = all.slice(0, 0, manifest->prior_dim).clone();
  c.clip_std_ = all.slice(0, manifest->prior_dim).clone();
  return c;
}

std::vector<at::Tensor> Cascade::call(const std::string& network, const std::vector<at::Tensor>& inputs) const {
  auto it = packages_.find(network);
  if (it == packages_.end()) {
    std::string names;
    for (const auto& [n, _] : packages_) names += (names.empty() ? "" : ", ") + n;
    throw Error("no network '" + network + "' in this export; it has " + names);
  }
  const Package& p = *it->second;
  const auto& spec = graph_inputs().at(p.kind);
  if (inputs.size() != spec.size())
    throw Error(network + ": expected " + std::to_string(spec.size()) + " inputs, got " + std::to_string(inputs.size()));
  const int64_t batch = inputs[0].dim() > 0 ? inputs[0].size(0) : -1;
  if (batch < 1 || batch > manifest_->max_batch)
    throw Error(network + ": batch " + std::to_string(batch) + " is outside the compiled range 1.." +
                std::to_string(manifest_->max_batch) + " of " + p.path +
                " (export with a larger --max-batch; guidance doubles the batch)");
  std::vector<at::Tensor> feeds;
  for (size_t k = 0; k < spec.size(); ++k) {
    const at::Tensor& x = inputs[k];
    const std::string what = network + ": input '" + spec[k].name + "'";
    if (!x.defined()) throw Error(what + " is undefined");
    std::vector<int64_t> want = {batch};
    want.insert(want.end(), p.shapes[k].begin(), p.shapes[k].end());
    if (x.sizes().vec() != want)
      throw Error(what + " has shape " + shape_str(x.sizes()) + ", the package " + p.path + " takes " + shape_str(want));
    if (x.scalar_type() != spec[k].dtype)
      throw Error(what + " has dtype " + std::string(c10::toString(x.scalar_type())) + ", the package takes " +
                  c10::toString(spec[k].dtype));
    feeds.push_back(x.contiguous());
  }
  try {
    return p.loader->run(feeds);
  } catch (const c10::Error& e) {
    throw Error(network + " (" + p.path + ") failed: " + e.what_without_backtrace());
  }
}

at::Tensor Cascade::run_stage(const std::string& name, const std::string& kind, const std::vector<std::string>& nets,
                              const Plan& plan, const at::Tensor& latents,
                              const std::vector<std::optional<at::Tensor>>& noise,
                              const std::map<std::string, at::Tensor>& cond, std::optional<double> guidance,
                              std::optional<int64_t> learned, const StepCallback& callback) const {
  if (static_cast<int64_t>(noise.size()) != plan.num_steps())
    throw Error("stage '" + name + "': noise must hold one entry per step (" + std::to_string(plan.num_steps()) +
                "), got " + std::to_string(noise.size()));
  if (nets.empty()) throw Error("stage '" + name + "': no networks given");
  auto need = [&](const char* key) -> const at::Tensor& {
    auto it = cond.find(key);
    if (it == cond.end()) throw Error("stage '" + name + "': conditioning has no '" + key + "'");
    return it->second;
  };
  if (latents.scalar_type() != at::kFloat) throw Error("stage '" + name + "': latents must be float32");
  at::Tensor x = latents;
  const int64_t last_step = plan.num_steps() - 1;
  for (int64_t i = 0; i < plan.num_steps(); ++i) {
    const int64_t t = plan.timesteps[static_cast<size_t>(i)];
    at::Tensor xin = x;  // the model dtype is float32 (checked by the manifest)
    if (guidance) xin = at::cat({xin, xin});
    const int64_t rows = xin.size(0);
    at::Tensor out;
    if (kind == "prior") {
      out = call(nets[0], {xin, timesteps(t, rows), need("text_embeds"), need("text_hidden"), need("text_mask")})[0];
    } else if (kind == "decoder") {
      out = call(nets[0], {xin, timesteps(t, rows), need("context"), need("time_embed"), need("mask")})[0];
    } else if (kind == "super_res") {
      const std::string& net = i == last_step ? nets.back() : nets.front();
      out = call(net, {at::cat({xin, need("upscaled")}, 1), timesteps(t, rows)})[0];
    } else {
      throw Error("stage kind must be prior, decoder or super_res; got '" + kind + "'");
    }
    if (guidance) {
      auto halves = out.chunk(2);
      const at::Tensor &u = halves[0], &c = halves[1];
      if (!learned) {
        out = u + *guidance * (c - u);
      } else {
        const int64_t ch = *learned;
        at::Tensor eps = u.slice(1, 0, ch) + *guidance * (c.slice(1, 0, ch) - u.slice(1, 0, ch));
        out = at::cat({eps, c.slice(1, ch)}, 1);
      }
    }
    x = step(plan, i, x, out.to(at::kFloat), noise[static_cast<size_t>(i)]);
    if (callback) callback(name, i, t, x);
  }
  return x;
}

at::Tensor Cascade::generate(const at::Tensor& input_ids, const at::Tensor& attention_mask, const Settings& s,
                             uint64_t seed, const StepCallback& callback) const {
  const Manifest& m = *manifest_;
  // ---- validate everything before any work
  if (input_ids.dim() != 2 || input_ids.size(1) != m.tokens)
    throw Error("input_ids must have shape (B, " + std::to_string(m.tokens) + "), got " + shape_str(input_ids.sizes()));
  if (attention_mask.sizes() != input_ids.sizes())
    throw Error("attention_mask must have input_ids' shape " + shape_str(input_ids.sizes()) + ", got " +
                shape_str(attention_mask.sizes()));
  const int64_t batch = input_ids.size(0);
  if (batch < 1) throw Error("input_ids must hold at least one row");
  if (s.num_images_per_prompt < 1) throw Error("num_images_per_prompt must be >= 1");
  if (s.prior_candidates < 1 || s.prior_candidates > 64)
    throw Error("prior_candidates must be in 1..64, got " + std::to_string(s.prior_candidates));
  std::vector<StageSettings> sr = s.super_res;
  if (sr.empty()) sr.assign(m.upsamplers.size(), StageSettings{7});
  if (sr.size() != m.upsamplers.size())
    throw Error("super_res settings: give one per upsampler (" + std::to_string(m.upsamplers.size()) + "), got " +
                std::to_string(sr.size()));
  const double prior_scale = s.prior_guidance.value_or(m.default_prior_guidance);
  const double decoder_scale = s.decoder_guidance.value_or(m.default_decoder_guidance);
  if (!std::isfinite(prior_scale) || !std::isfinite(decoder_scale)) throw Error("guidance scales must be finite");
  const bool cfg = prior_scale > 1.0 || decoder_scale > 1.0;
  const int64_t n = s.num_images_per_prompt, k = s.prior_candidates, rows = batch * n;
  const int64_t widest = rows * k * (cfg ? 2 : 1);
  if (widest > m.max_batch)
    throw Error("this request needs network batches of " + std::to_string(widest) + " rows (" + std::to_string(batch) +
                " prompts x " + std::to_string(n) + " images x " + std::to_string(k) + " candidates" +
                (cfg ? " x 2 for guidance" : "") + "), above the compiled maximum " + std::to_string(m.max_batch) +
                " of " + m.root + " (export with a larger --max-batch)");
  Plan prior_plan = make_plan(m.prior_schedule, s.prior.steps, s.prior.sampler, s.prior.eta);
  Plan decoder_plan = make_plan(m.decoder_schedule, s.decoder.steps, s.decoder.sampler, s.decoder.eta);
  std::vector<Plan> sr_plans;
  for (size_t u = 0; u < sr.size(); ++u) sr_plans.push_back(make_plan(m.upsamplers[u].schedule, sr[u].steps, sr[u].sampler, sr[u].eta));

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto randn = [&](at::IntArrayRef shape) { return at::randn(shape, gen, f32); };
  auto noise_for = [&](const Plan& plan, at::IntArrayRef shape) {
    std::vector<std::optional<at::Tensor>> out;
    for (bool draws : plan.draws_noise) out.push_back(draws ? std::optional<at::Tensor>(randn(shape)) : std::nullopt);
    return out;
  };

  // ---- text: prompt rows, then the empty caption encoded at the prompt batch size
  at::Tensor mask = attention_mask.to(at::kBool);
  auto encode = [&](const at::Tensor& ids) { return call("text_encoder", {ids.to(at::kInt)}); };
  auto text = encode(input_ids);
  at::Tensor embeds = text[0].repeat_interleave(n, 0), hidden = text[1].repeat_interleave(n, 0);
  mask = mask.repeat_interleave(n, 0);
  if (cfg) {
    at::Tensor empty_ids = at::tensor(m.empty_ids, at::TensorOptions().dtype(at::kLong)).unsqueeze(0).repeat({batch, 1});
    at::Tensor empty_mask = at::tensor(m.empty_mask, at::TensorOptions().dtype(at::kLong)).to(at::kBool)
                                .unsqueeze(0).repeat({batch, 1});
    auto u = encode(empty_ids);
    embeds = at::cat({u[0].repeat_interleave(n, 0), embeds});
    hidden = at::cat({u[1].repeat_interleave(n, 0), hidden});
    mask = at::cat({empty_mask.repeat_interleave(n, 0), mask});
  }

  // ---- prior (k candidates per image)
  at::Tensor p_embeds = embeds, p_hidden = hidden, p_mask = mask;
  if (k > 1) {
    p_embeds = embeds.repeat_interleave(k, 0);
    p_hidden = hidden.repeat_interleave(k, 0);
    p_mask = mask.repeat_interleave(k, 0);
  }
  std::vector<int64_t> prior_shape = {rows * k, m.prior_dim};
  at::Tensor x = randn(prior_shape);
  auto prior_noise = noise_for(prior_plan, prior_shape);
  x = run_stage("prior", "prior", {"prior"}, prior_plan, x, prior_noise,
                {{"text_embeds", p_embeds}, {"text_hidden", p_hidden}, {"text_mask", p_mask}},
                cfg ? std::optional<double>(prior_scale) : std::nullopt, std::nullopt, callback);
  at::Tensor image_embeds = x * clip_std_ + clip_mean_;
  if (k > 1) {
    at::Tensor c = p_embeds.slice(0, p_embeds.size(0) - rows * k).reshape({rows, k, -1}).select(1, 0);
    at::Tensor cand = image_embeds.reshape({rows, k, -1});
    at::Tensor score = (normalize(cand.to(at::kFloat)) * normalize(c.to(at::kFloat)).unsqueeze(1)).sum(-1);
    image_embeds = cand.index({at::arange(rows, at::TensorOptions().dtype(at::kLong)), score.argmax(1)});
  }

  // ---- text_proj: the unconditional rows take the learned embedding (the graph's is_uncond input)
  at::Tensor ie = image_embeds, is_uncond = at::zeros({rows}, at::TensorOptions().dtype(at::kBool));
  if (cfg) {
    ie = at::cat({at::zeros_like(image_embeds), image_embeds});
    is_uncond = at::cat({is_uncond.logical_not(), is_uncond});
  }
  auto proj = call("text_proj", {ie, is_uncond, embeds, hidden});
  at::Tensor context = proj[0], time_embed = proj[1];
  const int64_t extra = context.size(1) - mask.size(1);
  at::Tensor dmask = at::cat({at::ones({mask.size(0), extra}, at::TensorOptions().dtype(at::kBool)), mask}, 1);

  // ---- decoder
  std::vector<int64_t> dshape = {rows, m.decoder_channels, m.decoder_size, m.decoder_size};
  x = randn(dshape);
  auto dnoise = noise_for(decoder_plan, dshape);
  x = run_stage("decoder", "decoder", {"decoder"}, decoder_plan, x, dnoise,
                {{"context", context}, {"time_embed", time_embed}, {"mask", dmask}},
                cfg ? std::optional<double>(decoder_scale) : std::nullopt,
                m.learned_variance ? std::optional<int64_t>(m.decoder_channels) : std::nullopt, callback);
  x = x.clamp(-1, 1);

  // ---- upsamplers
  for (size_t u = 0; u < m.upsamplers.size(); ++u) {
    const UpsamplerEntry& up = m.upsamplers[u];
    std::vector<int64_t> shape = {rows, up.channels, up.sample_size, up.sample_size};
    at::Tensor latents = randn(shape);
    auto unoise = noise_for(sr_plans[u], shape);
    std::vector<int64_t> size = {up.sample_size, up.sample_size};
    at::Tensor upscaled = at::_upsample_bicubic2d_aa(x.to(at::kFloat), at::IntArrayRef(size), false, std::nullopt);
    x = run_stage(up.name, "super_res", {up.first, up.last}, sr_plans[u], latents, unoise, {{"upscaled", upscaled}},
                  std::nullopt, std::nullopt, callback);
  }
  at::Tensor images = (x * 0.5 + 0.5).clamp(0, 1);
  if (!at::isfinite(images).all().item<bool>())
    throw Error("the cascade produced non-finite values");
  return images;
}

}  // namespace unclip
