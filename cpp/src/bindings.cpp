// unclip._native: the native runtime for Python (the "native" backend, engine/runners/native.py).
// Tensors cross as torch tensors (torch's own pybind11 casters), so nothing is copied.
#include <pybind11/functional.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include "unclip/native.h"
#include "unclip/sha256.h"

namespace py = pybind11;
using unclip::Plan;

namespace {

Plan plan_from_dict(const py::dict& d) {
  Plan p;
  p.sampler = d["sampler"].cast<std::string>();
  p.timesteps = d["timesteps"].cast<std::vector<int64_t>>();
  p.prev_timesteps = d["prev_timesteps"].cast<std::vector<int64_t>>();
  p.draws_noise = d["draws_noise"].cast<std::vector<bool>>();
  p.prediction_type = d["prediction_type"].cast<std::string>();
  p.variance_type = d.contains("variance_type") ? d["variance_type"].cast<std::string>() : "";
  if (!d["clip_range"].is_none()) p.clip_range = d["clip_range"].cast<double>();
  p.eta = d.contains("eta") ? d["eta"].cast<double>() : 0.0;
  p.use_clipped_model_output = d.contains("use_clipped_model_output") ? d["use_clipped_model_output"].cast<bool>() : true;
  for (auto item : d["coef"].cast<py::dict>())
    p.coef[item.first.cast<std::string>()] = item.second.cast<at::Tensor>().to(at::kFloat).contiguous();
  if (p.sampler != "ddpm" && p.sampler != "ddim") throw unclip::Error("plan sampler must be 'ddpm' or 'ddim'");
  const size_t n = p.timesteps.size();
  if (n == 0 || p.prev_timesteps.size() != n || p.draws_noise.size() != n)
    throw unclip::Error("plan: timesteps, prev_timesteps and draws_noise must have one entry per step");
  for (const auto& [name, t] : p.coef)
    if (t.dim() != 1 || static_cast<size_t>(t.size(0)) != n)
      throw unclip::Error("plan coefficient '" + name + "' must have shape (" + std::to_string(n) + ",)");
  return p;
}

py::dict plan_to_dict(const Plan& p) {
  py::dict d, coef;
  d["sampler"] = p.sampler;
  d["timesteps"] = p.timesteps;
  d["prev_timesteps"] = p.prev_timesteps;
  d["draws_noise"] = p.draws_noise;
  d["prediction_type"] = p.prediction_type;
  d["variance_type"] = p.variance_type;
  d["clip_range"] = p.clip_range ? py::cast(*p.clip_range) : py::none();
  d["eta"] = p.eta;
  d["use_clipped_model_output"] = p.use_clipped_model_output;
  for (const auto& [name, t] : p.coef) coef[py::str(name)] = t;
  d["coef"] = coef;
  return d;
}

unclip::Schedule schedule_from_dict(const py::dict& d) {
  unclip::Schedule s;
  s.num_train_timesteps = d["num_train_timesteps"].cast<int64_t>();
  s.beta_schedule = d["beta_schedule"].cast<std::string>();
  if (d.contains("beta_start")) s.beta_start = d["beta_start"].cast<double>();
  if (d.contains("beta_end")) s.beta_end = d["beta_end"].cast<double>();
  s.variance_type = d["variance_type"].cast<std::string>();
  s.prediction_type = d["prediction_type"].cast<std::string>();
  s.clip_sample = d["clip_sample"].cast<bool>();
  s.clip_sample_range = d["clip_sample_range"].cast<double>();
  return s;
}

unclip::StageSettings stage_from(const py::handle& h) {
  py::dict d = h.cast<py::dict>();
  unclip::StageSettings s;
  s.steps = d["steps"].cast<int64_t>();
  if (d.contains("sampler")) s.sampler = d["sampler"].cast<std::string>();
  if (d.contains("eta")) s.eta = d["eta"].cast<double>();
  return s;
}

unclip::Settings settings_from_dict(const py::dict& d) {
  unclip::Settings s;
  if (d.contains("prior")) s.prior = stage_from(d["prior"]);
  if (d.contains("decoder")) s.decoder = stage_from(d["decoder"]);
  if (d.contains("super_res"))
    for (auto h : d["super_res"].cast<py::list>()) s.super_res.push_back(stage_from(h));
  if (d.contains("prior_guidance") && !d["prior_guidance"].is_none()) s.prior_guidance = d["prior_guidance"].cast<double>();
  if (d.contains("decoder_guidance") && !d["decoder_guidance"].is_none())
    s.decoder_guidance = d["decoder_guidance"].cast<double>();
  if (d.contains("num_images_per_prompt")) s.num_images_per_prompt = d["num_images_per_prompt"].cast<int64_t>();
  if (d.contains("prior_candidates")) s.prior_candidates = d["prior_candidates"].cast<int64_t>();
  return s;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "unclip native runtime: the cascade loop in C++ over AOTInductor packages";
  py::register_exception<unclip::Error>(m, "NativeError", PyExc_RuntimeError);

  m.def("libtorch_version", &unclip::libtorch_version, "the libtorch version this module was built against");
  m.def("cpu_has_flag", &unclip::cpu_has_flag);
  m.def("sha256_file", &unclip::sha256_file);
  m.def("make_plan",
        [](const py::dict& schedule, int64_t steps, const std::string& sampler, double eta, bool clipped) {
          return plan_to_dict(unclip::make_plan(schedule_from_dict(schedule), steps, sampler, eta, clipped));
        },
        py::arg("schedule"), py::arg("steps"), py::arg("sampler") = "ddpm", py::arg("eta") = 0.0,
        py::arg("use_clipped_model_output") = true);
  m.def("step",
        [](const py::dict& plan, int64_t i, const at::Tensor& x, const at::Tensor& out, std::optional<at::Tensor> noise) {
          return unclip::step(plan_from_dict(plan), i, x, out, noise);
        },
        py::arg("plan"), py::arg("i"), py::arg("sample"), py::arg("model_output"), py::arg("noise") = py::none());

  py::class_<unclip::Cascade, std::shared_ptr<unclip::Cascade>>(m, "Cascade")
      .def(py::init([](const std::string& root, bool verify_hashes) {
             py::gil_scoped_release release;
             return std::make_shared<unclip::Cascade>(unclip::Cascade::load(root, verify_hashes));
           }),
           py::arg("root"), py::arg("verify_hashes") = true)
      .def_property_readonly("root", [](const unclip::Cascade& c) { return c.manifest().root; })
      .def_property_readonly("max_batch", [](const unclip::Cascade& c) { return c.manifest().max_batch; })
      .def_property_readonly("clip_mean", &unclip::Cascade::clip_mean)
      .def_property_readonly("clip_std", &unclip::Cascade::clip_std)
      .def("call", &unclip::Cascade::call, py::arg("network"), py::arg("inputs"),
           py::call_guard<py::gil_scoped_release>())
      .def("run_stage",
           [](const unclip::Cascade& c, const std::string& name, const std::string& kind,
              const std::vector<std::string>& networks, const py::dict& plan, const at::Tensor& latents,
              const std::vector<std::optional<at::Tensor>>& noise, const std::map<std::string, at::Tensor>& cond,
              std::optional<double> guidance, std::optional<int64_t> learned, unclip::StepCallback callback) {
             Plan p = plan_from_dict(plan);
             py::gil_scoped_release release;
             return c.run_stage(name, kind, networks, p, latents, noise, cond, guidance, learned, callback);
           },
           py::arg("name"), py::arg("kind"), py::arg("networks"), py::arg("plan"), py::arg("latents"),
           py::arg("noise"), py::arg("conditioning"), py::arg("guidance") = py::none(),
           py::arg("learned_variance_channels") = py::none(), py::arg("callback") = py::none())
      .def("generate",
           [](const unclip::Cascade& c, const at::Tensor& ids, const at::Tensor& mask, const py::dict& settings,
              uint64_t seed, unclip::StepCallback callback) {
             unclip::Settings s = settings_from_dict(settings);
             py::gil_scoped_release release;
             return c.generate(ids, mask, s, seed, callback);
           },
           py::arg("input_ids"), py::arg("attention_mask"), py::arg("settings"), py::arg("seed") = 0,
           py::arg("callback") = py::none());
}
