// C++ unit tests of the native runtime, against values the Python reference wrote during this test run
// (cpp/tests/make_reference.py): sampler plans and steps equal to engine/samplers.py bit for bit, libtorch's
// seeded CPU generator drawing torch.randn's numbers, sha256, the JSON reader, manifest and file checks.
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <cstring>
#include <iostream>

#include "unclip/json.h"
#include "unclip/native.h"
#include "unclip/sha256.h"

namespace {

int failures = 0, checks = 0;

void check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::cerr << "FAIL: " << what << "\n";
  }
}

std::vector<float> as_floats(const unclip::Json& array, const std::string& what) {
  std::vector<float> out;
  for (const auto& v : array.as_array(what)) out.push_back(static_cast<float>(v.as_number(what)));
  return out;
}

at::Tensor tensor_of(const unclip::Json& array, const std::vector<int64_t>& shape, const std::string& what) {
  return at::tensor(as_floats(array, what), at::TensorOptions().dtype(at::kFloat)).reshape(shape);
}

std::vector<int64_t> ints(const unclip::Json& array, const std::string& what) {
  std::vector<int64_t> out;
  for (const auto& v : array.as_array(what)) out.push_back(v.as_int(what));
  return out;
}

// Bitwise equality of float32 values (the claim: the same kernels in the same order).
size_t count_unequal(const at::Tensor& got, const std::vector<float>& want, double* worst) {
  at::Tensor g = got.to(at::kFloat).contiguous().reshape(-1);
  size_t bad = 0;
  *worst = 0;
  if (static_cast<size_t>(g.numel()) != want.size()) return want.size() + 1;
  const float* p = g.data_ptr<float>();
  for (size_t k = 0; k < want.size(); ++k) {
    if (std::memcmp(&p[k], &want[k], sizeof(float)) != 0) {
      ++bad;
      *worst = std::max(*worst, std::fabs(double(p[k]) - double(want[k])));
    }
  }
  return bad;
}

unclip::Schedule schedule_of(const unclip::Json& j) { return unclip::Schedule::from_json(j, "schedule"); }

void test_plans(const std::string& ref) {
  unclip::Json cases = unclip::Json::parse_file(ref + "/plans.json");
  int n_cases = 0, n_steps = 0;
  for (const auto& c : cases.as_array("plans")) {
    const std::string sampler = c.at("sampler", "case").as_string("sampler");
    const double eta = c.at("eta", "case").as_number("eta");
    const int64_t steps = c.at("steps", "case").as_int("steps");
    unclip::Schedule s = schedule_of(c.at("schedule", "case"));
    const std::string label = s.beta_schedule + "/" + s.variance_type + "/T=" + std::to_string(s.num_train_timesteps) +
                              " " + sampler + " eta=" + std::to_string(eta) + " steps=" + std::to_string(steps);
    unclip::Plan plan = unclip::make_plan(s, steps, sampler, eta);
    check(plan.timesteps == ints(c.at("timesteps", "case"), "timesteps"), label + ": timesteps");
    check(plan.prev_timesteps == ints(c.at("prev_timesteps", "case"), "prev"), label + ": prev_timesteps");
    std::vector<bool> draws;
    for (const auto& v : c.at("draws_noise", "case").as_array("draws")) draws.push_back(v.as_bool("draws"));
    check(plan.draws_noise == draws, label + ": draws_noise");
    for (const auto& [name, values] : c.at("coef", "case").as_object("coef")) {
      double worst = 0;
      size_t bad = count_unequal(plan.at_name(name), as_floats(values, name), &worst);
      check(bad == 0, label + ": coefficient " + name + " differs in " + std::to_string(bad) + " values (max |d| " +
                          std::to_string(worst) + ")");
    }
    if (c.has("steps_checked")) {
      for (const auto& st : c.at("steps_checked", "case").as_array("steps_checked")) {
        auto shape = ints(st.at("shape", "step"), "shape");
        auto out_shape = ints(st.at("out_shape", "step"), "out_shape");
        at::Tensor x = tensor_of(st.at("x", "step"), shape, "x");
        at::Tensor mo = tensor_of(st.at("model_output", "step"), out_shape, "mo");
        std::optional<at::Tensor> noise;
        if (!st.at("noise", "step").is_null()) noise = tensor_of(st.at("noise", "step"), shape, "noise");
        const int64_t i = st.at("i", "step").as_int("i");
        double worst = 0;
        size_t bad = count_unequal(unclip::step(plan, i, x, mo, noise), as_floats(st.at("expected", "step"), "y"), &worst);
        check(bad == 0, label + ": step " + std::to_string(i) + " differs in " + std::to_string(bad) +
                            " values (max |d| " + std::to_string(worst) + ")");
        ++n_steps;
      }
    }
    ++n_cases;
  }
  check(n_cases > 40 && n_steps > 50, "enough plan cases were compared");
  std::cout << "plans: " << n_cases << " plans, " << n_steps << " steps compared\n";
}

void test_randn(const std::string& ref) {
  unclip::Json j = unclip::Json::parse_file(ref + "/randn.json");
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(j.at("seed", "randn").as_int("seed")));
  for (const auto& d : j.at("draws", "randn").as_array("draws")) {
    auto shape = ints(d.at("shape", "draw"), "shape");
    at::Tensor got = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
    double worst = 0;
    size_t bad = count_unequal(got, as_floats(d.at("values", "draw"), "values"), &worst);
    check(bad == 0, "randn draw of " + std::to_string(got.numel()) + " values differs in " + std::to_string(bad));
  }
}

void test_sha256(const std::string& ref) {
  unclip::Json j = unclip::Json::parse_file(ref + "/hashes.json");
  for (const auto& [name, want] : j.as_object("hashes")) {
    const std::string got = unclip::sha256_file(ref + "/hashes/" + name);
    check(got == want.as_string("hash"), "sha256 of " + name + ": " + got + " != " + want.as_string("hash"));
  }
}

void test_json(const std::string& ref) {
  unclip::Json j = unclip::Json::parse_file(ref + "/json.json");
  unclip::Json doc = unclip::Json::parse(j.at("document", "json").as_string("document"), "document");
  check(doc.at("s", "doc").as_string("s") == j.at("expected_string", "json").as_string("expected"),
        "JSON string escapes (incl. \\u surrogate pairs) decode like Python's json");
  auto want = j.at("numbers", "json").as_array("numbers");
  auto got = doc.at("n", "doc").as_array("n");
  check(got.size() == want.size(), "JSON number count");
  for (size_t k = 0; k < got.size() && k < want.size(); ++k)
    check(got[k].as_number("n") == want[k].as_number("n"), "JSON number " + std::to_string(k));
  check(doc.at("b", "doc").as_array("b")[2].is_null(), "JSON null");
  bool threw = false;
  try {
    unclip::Json::parse("{\"a\": [1, 2,]}", "bad.json");
  } catch (const unclip::Error& e) {
    threw = std::string(e.what()).find("bad.json") != std::string::npos;
  }
  check(threw, "malformed JSON is an error naming the source");
}

// The message of the Error `fn` throws ("" when it throws none).
template <typename F>
std::string error_of(F fn) {
  try {
    fn();
  } catch (const unclip::Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

void test_manifest(const std::string& ref) {
  const std::string ex = ref + "/exports/";
  unclip::Manifest good = unclip::Manifest::read(ex + "good");
  check(good.max_batch == 8 && good.tokens == 4 && good.upsamplers.size() == 1, "manifest fields read");
  check(good.empty_ids == std::vector<int64_t>({0, 2, 1, 1}), "empty caption ids read");
  check(good.default_prior_guidance == 3.0 && good.default_decoder_guidance == 8.0, "call defaults read");
  check(good.learned_variance, "decoder learned variance read from its scheduler");
  check(error_of([&] { good.verify_files(true); }).empty(), "a good export verifies with hashes");
  check(error_of([&] { good.check_compatible(); }).empty(), "a good export is compatible with this libtorch/CPU");

  std::string e = error_of([&] { unclip::Manifest::read(ex + "other_torch").check_compatible(); });
  check(contains(e, "1.0.0+cpu") && contains(e, unclip::libtorch_version()) && contains(e, "manifest.json"),
        "another torch version: error names the file and both versions (" + e + ")");
  e = error_of([&] { unclip::Manifest::read(ex + "other_isa").check_compatible(); });
  check(contains(e, "future512") && contains(e, "unclip_no_such_flag"),
        "another instruction set: error names the ISA and the missing flag (" + e + ")");
  e = error_of([&] { unclip::Manifest::read(ex + "missing_file").verify_files(false); });
  check(contains(e, "tokenizer/vocab.json") && contains(e, "missing"), "missing file named (" + e + ")");
  auto wrong_hash = unclip::Manifest::read(ex + "wrong_hash");
  check(error_of([&] { wrong_hash.verify_files(false); }).empty(), "same-size change passes the size check");
  e = error_of([&] { wrong_hash.verify_files(true); });
  check(contains(e, "prior/clip_stats.f32") && contains(e, "sha256") &&
            contains(e, unclip::sha256_file(ex + "wrong_hash/prior/clip_stats.f32")),
        "sha256 mismatch: error names the file and both hashes (" + e + ")");
  e = error_of([&] { unclip::Manifest::read(ex + "wrong_size").verify_files(false); });
  check(contains(e, "prior/model.pt2") && contains(e, "21 bytes") && contains(e, "says 20"),
        "size mismatch: error names the file and both sizes (" + e + ")");
  e = error_of([&] { unclip::Manifest::read(ex + "no_decoder"); });
  check(contains(e, "decoder"), "a manifest without a decoder is refused (" + e + ")");
  e = error_of([&] { unclip::Manifest::read(ex + "nowhere"); });
  check(contains(e, "nowhere") && contains(e, "not found"), "a missing folder is named (" + e + ")");
  e = error_of([&] { unclip::Cascade::load(ex + "good", true); });
  check(contains(e, "model.pt2") && contains(e, "AOTInductor"),
        "a file that is not a package: error names it, no crash (" + e + ")");
}

void test_argument_errors() {
  unclip::Schedule s;
  check(contains(error_of([&] { unclip::make_plan(s, 0); }), "1..1000"), "steps 0 refused with the range");
  check(contains(error_of([&] { unclip::make_plan(s, 5, "euler"); }), "'ddpm'"), "unknown sampler refused");
  check(contains(error_of([&] { unclip::make_plan(s, 5, "ddpm", 0.5); }), "ddim"), "eta with ddpm refused");
  check(contains(error_of([&] { unclip::make_plan(s, 5, "ddim", 5.0); }), "too large"), "eta too large refused");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: unclip-native-tests REFERENCE_DIR (written by cpp/tests/make_reference.py)\n";
    return 2;
  }
  const std::string ref = argv[1];
  try {
    test_plans(ref);
    test_randn(ref);
    test_sha256(ref);
    test_json(ref);
    test_manifest(ref);
    test_argument_errors();
  } catch (const std::exception& e) {
    std::cerr << "FAIL: unexpected exception: " << e.what() << "\n";
    return 1;
  }
  std::cout << checks - failures << "/" << checks << " checks passed\n";
  return failures == 0 ? 0 : 1;
}
