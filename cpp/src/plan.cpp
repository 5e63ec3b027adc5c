// The samplers of engine/samplers.py, operation for operation: the same float32 tensors are computed by
// the same ATen kernels in the same order, so a plan here equals the Python plan bit for bit (checked by
// cpp/tests against values the Python reference writes during the test run).
#include <cmath>

#include "unclip/native.h"

namespace unclip {

namespace {
void check_choice(const std::string& what, const std::string& value, std::initializer_list<const char*> choices) {
  std::string list;
  for (const char* c : choices) {
    if (value == c) return;
    list += (list.empty() ? "" : ", ") + std::string("'") + c + "'";
  }
  throw Error(what + " must be one of " + list + ", got '" + value + "'");
}
}  // namespace

Schedule Schedule::from_json(const Json& j, const std::string& what) {
  Schedule s;
  s.num_train_timesteps = j.at("num_train_timesteps", what).as_int(what + ".num_train_timesteps");
  s.beta_schedule = j.at("beta_schedule", what).as_string(what + ".beta_schedule");
  if (j.has("beta_start")) s.beta_start = j.at("beta_start", what).as_number(what + ".beta_start");
  if (j.has("beta_end")) s.beta_end = j.at("beta_end", what).as_number(what + ".beta_end");
  s.variance_type = j.at("variance_type", what).as_string(what + ".variance_type");
  s.prediction_type = j.at("prediction_type", what).as_string(what + ".prediction_type");
  s.clip_sample = j.at("clip_sample", what).as_bool(what + ".clip_sample");
  s.clip_sample_range = j.at("clip_sample_range", what).as_number(what + ".clip_sample_range");
  if (s.num_train_timesteps < 1)
    throw Error(what + ".num_train_timesteps must be >= 1, got " + std::to_string(s.num_train_timesteps));
  check_choice(what + ".beta_schedule", s.beta_schedule, {"squaredcos_cap_v2", "linear"});
  check_choice(what + ".variance_type", s.variance_type, {"fixed_small_log", "learned_range"});
  check_choice(what + ".prediction_type", s.prediction_type, {"epsilon", "sample"});
  if (!(s.clip_sample_range > 0) || !std::isfinite(s.clip_sample_range))
    throw Error(what + ".clip_sample_range must be a finite number > 0");
  return s;
}

const at::Tensor& Plan::at_name(const std::string& name) const {
  auto it = coef.find(name);
  if (it == coef.end() || !it->second.defined())
    throw Error("plan (" + sampler + ") has no coefficient '" + name + "'");
  return it->second;
}

at::Tensor betas_for(const Schedule& s) {
  const int64_t T = s.num_train_timesteps;
  if (s.beta_schedule == "linear")
    return at::linspace(s.beta_start, s.beta_end, T, at::TensorOptions().dtype(at::kFloat));
  // Python floats are IEEE doubles and math.cos is the C library's cos: the same doubles here.
  auto alpha_bar = [](double u) {
    double c = std::cos((u + 0.008) / 1.008 * M_PI / 2);
    return std::pow(c, 2.0);
  };
  std::vector<float> betas(static_cast<size_t>(T));
  for (int64_t i = 0; i < T; ++i) {
    double b = 1 - alpha_bar(double(i + 1) / double(T)) / alpha_bar(double(i) / double(T));
    betas[static_cast<size_t>(i)] = static_cast<float>(std::min(b, 0.999));
  }
  return at::tensor(betas, at::TensorOptions().dtype(at::kFloat));
}

at::Tensor alphas_cumprod_for(const at::Tensor& betas) { return at::cumprod(1.0 - betas, 0); }

std::vector<int64_t> karlo_timesteps(int64_t N, int64_t T) {
  if (T < 1) throw Error("num_train_timesteps must be >= 1, got " + std::to_string(T));
  if (N < 1 || N > T)
    throw Error("num_inference_steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(N));
  if (N == 1) return {T - 1};
  const double stride = double(T - 1) / double(N - 1);
  std::vector<int64_t> out;
  // Python's round() rounds halves to even: nearbyint in the default rounding mode does the same.
  for (int64_t k = N - 1; k >= 0; --k) out.push_back(static_cast<int64_t>(std::nearbyint(double(k) * stride)));
  return out;
}

Plan make_plan(const Schedule& schedule, int64_t num_inference_steps, const std::string& sampler, double eta,
               bool use_clipped_model_output) {
  check_choice("sampler", sampler, {"ddpm", "ddim"});
  if (!std::isfinite(eta) || eta < 0) throw Error("eta must be a finite number >= 0, got " + std::to_string(eta));
  if (sampler == "ddpm" && eta != 0)
    throw Error("eta applies to the 'ddim' sampler only (the DDPM sampler's noise is fixed), got " +
                std::to_string(eta));
  const int64_t T = schedule.num_train_timesteps;
  Plan plan;
  plan.sampler = sampler;
  plan.timesteps = karlo_timesteps(num_inference_steps, T);
  plan.prev_timesteps.assign(plan.timesteps.begin() + 1, plan.timesteps.end());
  plan.prev_timesteps.push_back(-1);
  plan.prediction_type = schedule.prediction_type;
  plan.variance_type = schedule.variance_type;
  if (schedule.clip_sample) plan.clip_range = schedule.clip_sample_range;
  plan.eta = eta;
  plan.use_clipped_model_output = use_clipped_model_output;

  at::Tensor betas = betas_for(schedule);
  at::Tensor alpha_bar = alphas_cumprod_for(betas);
  auto lopts = at::TensorOptions().dtype(at::kLong);
  at::Tensor t = at::tensor(plan.timesteps, lopts);
  at::Tensor s = at::tensor(plan.prev_timesteps, lopts);
  at::Tensor lands_on_x0 = s < 0;
  at::Tensor a_t = alpha_bar.index({t});
  at::Tensor a_s = at::where(lands_on_x0, at::ones_like(a_t), alpha_bar.index({s.clamp_min(0)}));
  at::Tensor b_t = 1 - a_t;
  at::Tensor b_s = 1 - a_s;
  at::Tensor sqrt_a_t = at::pow(a_t, 0.5);
  at::Tensor sqrt_b_t = at::pow(b_t, 0.5);
  plan.coef["sqrt_alpha_bar"] = sqrt_a_t;
  plan.coef["sqrt_one_minus_alpha_bar"] = sqrt_b_t;

  if (sampler == "ddpm") {
    at::Tensor adjacent = s == t - 1;
    at::Tensor beta = at::where(adjacent, betas.index({t}), 1 - a_t / a_s);
    at::Tensor alpha = at::where(adjacent, (1.0 - betas).index({t}), 1 - beta);
    plan.coef["mean_coef_x0"] = at::pow(a_s, 0.5) * beta / b_t;
    plan.coef["mean_coef_xt"] = at::pow(alpha, 0.5) * b_s / b_t;
    at::Tensor posterior_var = b_s / b_t * beta;
    at::Tensor noisy = lands_on_x0.logical_not();
    at::Tensor zero = at::zeros_like(a_t);
    plan.coef["noise_std"] = at::where(noisy, at::exp(0.5 * at::log(posterior_var.clamp_min(1e-20))), zero);
    plan.coef["log_var_min"] = at::where(noisy, at::log(at::where(noisy, posterior_var, 1.0)), zero);
    plan.coef["log_var_max"] = at::where(noisy, at::log(at::where(noisy, beta, 1.0)), zero);
    plan.coef["noise_gate"] = noisy.to(at::kFloat);
    auto acc = noisy.accessor<bool, 1>();
    for (int64_t i = 0; i < acc.size(0); ++i) plan.draws_noise.push_back(acc[i]);
    return plan;
  }
  at::Tensor variance = (b_s / b_t) * (1 - a_t / a_s);
  at::Tensor sigma = eta * at::pow(variance, 0.5);
  at::Tensor radicand = 1 - a_s - at::pow(sigma, 2);
  if ((radicand < -1e-6).any().item<bool>())
    throw Error("eta=" + std::to_string(eta) +
                " is too large for this schedule: sigma^2 exceeds 1 - alpha_bar at some step (eta <= 1 is always valid)");
  plan.coef["sqrt_alpha_bar_prev"] = at::pow(a_s, 0.5);
  plan.coef["direction_coef"] = at::pow(radicand.clamp_min(0), 0.5);
  plan.coef["noise_std"] = sigma;
  at::Tensor draws = sigma > 0;
  auto acc = draws.accessor<bool, 1>();
  for (int64_t i = 0; i < acc.size(0); ++i) plan.draws_noise.push_back(acc[i]);
  return plan;
}

namespace {
at::Tensor predict_x0(const Plan& p, int64_t i, const at::Tensor& sample, const at::Tensor& out) {
  if (p.prediction_type == "sample") return out;
  return (sample - p.at_name("sqrt_one_minus_alpha_bar")[i] * out) / p.at_name("sqrt_alpha_bar")[i];
}
}  // namespace

at::Tensor step(const Plan& p, int64_t i, const at::Tensor& sample, const at::Tensor& model_output,
                const std::optional<at::Tensor>& noise) {
  if (i < 0 || i >= p.num_steps())
    throw Error("step index must be in 0.." + std::to_string(p.num_steps() - 1) + ", got " + std::to_string(i));
  const int64_t c = sample.dim() > 1 ? sample.size(1) : -1;
  const int64_t have = model_output.dim() > 1 ? model_output.size(1) : -1;
  if (c < 0 || (have != c && have != 2 * c))
    throw Error("model_output must have the sample's " + std::to_string(c) + " channels (or twice that with "
                "learned variance) in dim 1, got " + std::to_string(have));
  at::Tensor out = model_output, var;
  if (have == 2 * c) {
    out = model_output.slice(1, 0, c);
    var = model_output.slice(1, c);
  }
  const bool has_noise = noise.has_value() && noise->defined();
  if (p.sampler == "ddpm") {
    const bool learned = p.variance_type == "learned_range";
    if (learned && !var.defined())
      throw Error("variance_type 'learned_range' needs a model_output with 2x" + std::to_string(c) + " channels");
    at::Tensor x0 = predict_x0(p, i, sample, out);
    if (p.clip_range) x0 = x0.clamp(-*p.clip_range, *p.clip_range);
    at::Tensor mean = p.at_name("mean_coef_x0")[i] * x0 + p.at_name("mean_coef_xt")[i] * sample;
    if (!has_noise) return mean;
    at::Tensor std;
    if (!learned) {
      std = p.at_name("noise_std")[i];
    } else {
      at::Tensor frac = (var + 1) / 2;
      at::Tensor log_var = frac * p.at_name("log_var_max")[i] + (1 - frac) * p.at_name("log_var_min")[i];
      std = at::exp(0.5 * log_var) * p.at_name("noise_gate")[i];
    }
    return mean + std * *noise;
  }
  at::Tensor sqrt_a_t = p.at_name("sqrt_alpha_bar")[i], sqrt_b_t = p.at_name("sqrt_one_minus_alpha_bar")[i];
  at::Tensor x0 = predict_x0(p, i, sample, out);
  at::Tensor eps = p.prediction_type == "epsilon" ? out : (sample - sqrt_a_t * x0) / sqrt_b_t;
  if (p.clip_range) {
    x0 = x0.clamp(-*p.clip_range, *p.clip_range);
    if (p.use_clipped_model_output) eps = (sample - sqrt_a_t * x0) / sqrt_b_t;
  }
  at::Tensor prev = p.at_name("sqrt_alpha_bar_prev")[i] * x0 + p.at_name("direction_coef")[i] * eps;
  if (!has_noise) return prev;
  return prev + p.at_name("noise_std")[i] * *noise;
}

}  // namespace unclip
