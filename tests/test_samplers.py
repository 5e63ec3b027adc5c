"""Samplers: parity with diffusers' UnCLIPScheduler / DDIMScheduler, independent float64 references,
capturable-form invariants and argument validation."""
import math
from functools import partial

import pytest
import torch
from diffusers import DDIMScheduler, UnCLIPScheduler
from diffusers.utils.torch_utils import randn_tensor
from helpers import max_rel_err

from unclip import samplers as S


class FakeModel:
    """A fixed, deterministic 'denoiser': scale·tanh(W·x + b·t/1000), mixing channels (dim 1)."""

    def __init__(self, c_in: int, c_out: int, scale: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(c_out, c_in, generator=g) / c_in ** 0.5
        self.b = torch.randn(c_out, generator=g)
        self.scale = scale

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t)
        h = torch.einsum("oc,bc...->bo...", self.w.to(x.dtype), x)
        bias = (self.b * (t.float() / 1000)).to(x.dtype).reshape((1, -1) + (1,) * (x.dim() - 2))
        return self.scale * torch.tanh(h + bias)


# name: (schedule, sample shape, model output channels, model output scale). The prior's scale 6 makes the
# x0 clip at ±5 bite; the decoder's ε at high t makes x0 far exceed ±1.
STAGES = {
    "prior": (S.ScheduleConfig(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0),
              (2, 16), 16, 6.0),
    "decoder": (S.ScheduleConfig(variance_type="learned_range", prediction_type="epsilon", clip_sample_range=1.0),
                (2, 3, 6, 6), 6, 1.0),
    "super_res": (S.ScheduleConfig(variance_type="fixed_small_log", prediction_type="epsilon"),
                  (2, 3, 6, 6), 3, 1.0),
}



def plain_loop(plan, denoise, x, noise):
    """The textbook loop, written here: model output at (x, t), then the sampler step with that step's noise."""
    assert len(noise) == plan.num_steps
    for i in range(plan.num_steps):
        x = S.step(plan, i, x, denoise(x, plan.timesteps[i]), noise[i])
    return x

def stage(name):
    schedule, shape, c_out, scale = STAGES[name]
    return schedule, shape, FakeModel(shape[1], c_out, scale, seed=list(STAGES).index(name))


def diffusers_unclip_loop(schedule, shape, model, steps, seed):
    """The loop of diffusers' UnCLIPPipeline for one stage (initial latents, then scheduler steps)."""
    sched = UnCLIPScheduler(num_train_timesteps=schedule.num_train_timesteps, variance_type=schedule.variance_type,
                            clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
                            prediction_type=schedule.prediction_type)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = randn_tensor(shape, generator=gen, device=torch.device("cpu"), dtype=torch.float32)
    ts = sched.timesteps
    for i, t in enumerate(ts):
        prev_t = None if i + 1 == len(ts) else ts[i + 1]
        x = sched.step(model(x, t), t, x, prev_timestep=prev_t, generator=gen).prev_sample
    return x, ts, gen


def our_loop(plan, shape, model, seed, index_as_tensor=False):
    gen = torch.Generator().manual_seed(seed)
    x = S.seeded_randn(shape, gen)
    noise = S.draw_noise(plan, shape, gen)
    for i in range(plan.num_steps):
        idx = torch.tensor(i) if index_as_tensor else i
        x = S.step(plan, idx, x, model(x, plan.timesteps[i]), noise[i])
    return x, gen


# ---------------------------------------------------------------------------------------------- schedules

def test_schedules_match_diffusers_bit_for_bit():
    ref = UnCLIPScheduler()
    betas = S.betas_for("squaredcos_cap_v2", 1000)
    assert betas.dtype == torch.float32
    assert torch.equal(betas, ref.betas)
    assert torch.equal(S.alphas_cumprod_for(betas), ref.alphas_cumprod)
    ddim = DDIMScheduler(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=500)
    lin = S.betas_for("linear", 500, 0.00085, 0.012)
    assert torch.equal(lin, ddim.betas)
    assert torch.equal(S.alphas_cumprod_for(lin), ddim.alphas_cumprod)


@pytest.mark.parametrize("steps", [2, 7, 25, 64, 250, 1000])
def test_karlo_timesteps_match_unclip_scheduler(steps):
    ref = UnCLIPScheduler()
    ref.set_timesteps(steps)
    assert S.karlo_timesteps(steps) == ref.timesteps.tolist()
    plan = S.make_plan(None, steps, sampler="ddpm")
    assert plan.timesteps.dtype == torch.long and plan.timesteps.tolist() == ref.timesteps.tolist()
    assert plan.num_steps == steps and plan.draws_noise == [True] * (steps - 1) + [False]


# ---------------------------------------------------------------------------------- (a) diffusers parity

@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("steps", [2, 7, 25])
def test_ddpm_trajectory_matches_unclip_scheduler(name, steps):
    schedule, shape, model = stage(name)
    expected, ref_timesteps, ref_gen = diffusers_unclip_loop(schedule, shape, model, steps, seed=steps)
    plan = S.make_plan(schedule, steps, sampler="ddpm")
    actual, gen = our_loop(plan, shape, model, seed=steps)
    assert plan.timesteps.tolist() == ref_timesteps.tolist()
    assert max_rel_err(actual, expected) <= 1e-6
    # The generator was consumed identically, so a following stage would draw the same numbers.
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_ddpm_adjacent_timesteps_match_unclip_scheduler():
    # 40 of 50 training steps: some steps are adjacent (s = t-1), where the reference uses β_t itself.
    schedule = S.ScheduleConfig(num_train_timesteps=50, variance_type="learned_range", clip_sample_range=1.0)
    shape = (2, 3, 4, 4)
    model = FakeModel(3, 6, 1.0, seed=5)
    expected, _, ref_gen = diffusers_unclip_loop(schedule, shape, model, 40, seed=1)
    plan = S.make_plan(schedule, 40, sampler="ddpm")
    assert any(s == t - 1 for t, s in zip(plan.timestep_values, plan.prev_timestep_values))
    actual, gen = our_loop(plan, shape, model, seed=1)
    assert max_rel_err(actual, expected) <= 1e-6
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_one_step_goes_straight_to_clipped_x0():
    # diffusers' UnCLIPScheduler cannot do 1 step (its stride divides by N-1); ours uses t = T-1 -> x0.
    schedule, shape, model = stage("decoder")
    plan = S.make_plan(schedule, 1, sampler="ddpm")
    assert plan.timestep_values == [999] and plan.draws_noise == [False]
    assert S.draw_noise(plan, shape, torch.Generator().manual_seed(0)) == [None]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    out = model(x, 999)
    a = S.alphas_cumprod_for(S.betas_for())[999].double()
    x0 = ((x.double() - (1 - a).sqrt() * out[:, :3].double()) / a.sqrt()).clamp(-1, 1)
    got = S.step(plan, 0, x, out, None)
    assert max_rel_err(got, x0) <= 1e-6
    assert torch.isfinite(S.step(plan, 0, x, out, torch.zeros(shape))).all()


# ------------------------------------------------------------------- (b) plain float64 reference loop

def schedule_values(schedule):
    betas = S.betas_for(schedule.beta_schedule, schedule.num_train_timesteps)
    return betas.tolist(), S.alphas_cumprod_for(betas).tolist()


def reference_ddpm_step(schedule, t, s, x, out, noise):
    """One strided DDPM step t -> s written from the equations, in float64 from the float32 β and ā.

    The posterior between t and s uses β_t,s = 1 - ā_t/ā_s, except between adjacent timesteps, where it
    is the training β_t (textbook DDPM). In float32 these differ near t = 0: the last step's x0
    coefficient is β_0/(1 - ā_0) ≈ 0.99947, not 1, and the reference scheduler has exactly that.
    """
    betas, ac = schedule_values(schedule)
    a_t, a_s = ac[t], (ac[s] if s >= 0 else 1.0)
    beta = betas[t] if s == t - 1 else 1 - a_t / a_s
    x, out = x.double(), out.double()
    c = x.shape[1]
    pred, v = out[:, :c], out[:, c:]
    x0 = (x - math.sqrt(1 - a_t) * pred) / math.sqrt(a_t) if schedule.prediction_type == "epsilon" else pred
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
    if s < 0:
        return mean
    posterior_var = (1 - a_s) / (1 - a_t) * beta
    if schedule.variance_type == "fixed_small_log":
        std = math.sqrt(posterior_var)
    else:
        frac = (v + 1) / 2
        std = torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(posterior_var)))
    return mean + std * noise.double()


def teacher_forced_errors(plan, reference_step, shape, model, seed):
    """Per-step relative error of `step` against `reference_step(t, s, x, out, noise)` from the same x_t."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    noise = S.draw_noise(plan, shape, gen)
    errors = []
    for i, (t, s) in enumerate(zip(plan.timestep_values, plan.prev_timestep_values)):
        out = model(x, plan.timesteps[i])
        x_next = S.step(plan, i, x, out, noise[i])
        errors.append(max_rel_err(x_next, reference_step(t, s, x, out, noise[i])))
        x = x_next
    return errors


def first_step_tolerance(plan):
    # From t = T-1, ā_t/ā_s ≈ 4e-8, so float32 1 - β_t,s (DDPM) and 1 - ā_s - σ² (DDIM, η > 0) keep no
    # correct digit: the x_t / ε coefficient (~2e-4) is ~30% off, ~2e-5 of the result. The reference
    # scheduler does the same, and parity with it comes first.
    noisy_ddim = isinstance(plan, S.DDIMPlan) and plan.eta > 0
    from_last = plan.timestep_values[0] == 999 and plan.num_steps > 1
    return 1e-4 if from_last and (isinstance(plan, S.DDPMPlan) or noisy_ddim) else 1e-6


# Later steps: float32 coefficients against float64 ones. Most steps agree to ~1e-7; near t = 0 the
# strided 1 - ā_t/ā_s loses a few more digits (~2e-6 on the step 42 -> 0 of 25).
LATER_STEPS_TOLERANCE = 1e-5


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("steps", [1, 2, 7, 25])
def test_ddpm_matches_float64_reference_step_by_step(name, steps):
    schedule, shape, model = stage(name)
    plan = S.make_plan(schedule, steps, sampler="ddpm")
    errors = teacher_forced_errors(plan, partial(reference_ddpm_step, schedule), shape, model, seed=11)
    assert errors[0] <= first_step_tolerance(plan), errors
    assert max(errors[1:], default=0.0) <= LATER_STEPS_TOLERANCE, errors


# ---------------------------------------------------------------------------------------------- (c) DDIM

def diffusers_ddim_loop(schedule, shape, model, steps, eta, seed):
    sched = DDIMScheduler(num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
                          beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                          clip_sample=schedule.clip_sample, clip_sample_range=schedule.clip_sample_range,
                          prediction_type=schedule.prediction_type, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading")
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = randn_tensor(shape, generator=gen, device=torch.device("cpu"), dtype=torch.float32)
    c = shape[1]
    for t in sched.timesteps:
        out = model(x, t)[:, :c]  # diffusers' DDIM cannot read a learned-variance output
        x = sched.step(out, t, x, eta=eta, use_clipped_model_output=True, generator=gen).prev_sample
    return x, sched.timesteps


@pytest.mark.parametrize("name", list(STAGES))
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_ddim_scheduler(name, eta):
    schedule, shape, model = stage(name)
    expected, ref_timesteps = diffusers_ddim_loop(schedule, shape, model, 10, eta, seed=4)
    plan = S.make_plan(schedule, sampler="ddim", eta=eta, timesteps=ref_timesteps)
    assert plan.draws_noise == [eta > 0] * 9 + [False]
    actual, _ = our_loop(plan, shape, model, seed=4)
    assert max_rel_err(actual, expected) <= 1e-6


def test_ddim_linear_schedule_matches_ddim_scheduler():
    schedule = S.ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    shape, model = (2, 3, 4, 4), FakeModel(3, 3, 1.0, seed=9)
    expected, ref_timesteps = diffusers_ddim_loop(schedule, shape, model, 20, 0.0, seed=2)
    plan = S.make_plan(schedule, 20, sampler="ddim", timesteps=ref_timesteps.tolist())
    actual, _ = our_loop(plan, shape, model, seed=2)
    assert max_rel_err(actual, expected) <= 1e-6


def reference_ddim_step(schedule, eta, t, s, x, out, noise):
    """DDIM (Song et al. eq. 12) in float64 from the float32 ā, ε re-derived from the clipped x0."""
    _, ac = schedule_values(schedule)
    a_t, a_s = ac[t], (ac[s] if s >= 0 else 1.0)
    x, c = x.double(), x.shape[1]
    pred = out.double()[:, :c]
    x0 = (x - math.sqrt(1 - a_t) * pred) / math.sqrt(a_t) if schedule.prediction_type == "epsilon" else pred
    if schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s - sigma ** 2) * eps
    return x + sigma * noise.double() if sigma > 0 else x


@pytest.mark.parametrize("name", ["prior", "decoder"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_on_karlo_timesteps_matches_float64_reference(name, eta):
    schedule, shape, model = stage(name)
    plan = S.make_plan(schedule, 25, sampler="ddim", eta=eta)
    assert plan.timestep_values == S.karlo_timesteps(25)  # same timesteps as the DDPM: switch sampler alone
    errors = teacher_forced_errors(plan, partial(reference_ddim_step, schedule, eta), shape, model, seed=8)
    assert errors[0] <= first_step_tolerance(plan), errors
    assert max(errors[1:]) <= LATER_STEPS_TOLERANCE, errors


def test_ddim_eta_zero_is_deterministic_and_eta_positive_is_seeded():
    schedule, shape, model = stage("decoder")
    deterministic = S.make_plan(schedule, 12, sampler="ddim")
    assert deterministic.draws_noise == [False] * 12
    a, _ = our_loop(deterministic, shape, model, seed=0)
    x = S.seeded_randn(shape, torch.Generator().manual_seed(0))
    b = plain_loop(deterministic, model, x, [None] * 12)
    zeros = plain_loop(deterministic, model, x, [torch.randn(shape) for _ in range(12)])  # σ = 0 everywhere
    assert torch.equal(a, b) and torch.equal(a, zeros)

    stochastic = S.make_plan(schedule, 12, sampler="ddim", eta=0.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def run(seed):
        return plain_loop(stochastic, model, x, S.draw_noise(stochastic, shape, torch.Generator().manual_seed(seed)))

    assert torch.equal(run(5), run(5))
    assert max_rel_err(run(5), run(6)) > 1e-3
    assert max_rel_err(run(5), plain_loop(deterministic, model, x, [None] * 12)) > 1e-3


def test_ddim_reads_only_the_epsilon_half_of_a_learned_variance_output():
    schedule, shape, model = stage("decoder")
    plan = S.make_plan(schedule, 5, sampler="ddim")
    x = torch.randn(shape)
    out = model(x, 500)
    assert torch.equal(S.step(plan, 1, x, out), S.step(plan, 1, x, out[:, :3].contiguous()))


# ------------------------------------------------------------------------------- (d) capturable form

@pytest.mark.parametrize("sampler,name", [("ddpm", "prior"), ("ddpm", "decoder"), ("ddpm", "super_res"),
                                          ("ddim", "decoder")])
def test_tensor_index_equals_int_index(sampler, name):
    schedule, shape, model = stage(name)
    plan = S.make_plan(schedule, 7, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0)
    by_int, _ = our_loop(plan, shape, model, seed=3)
    by_tensor, _ = our_loop(plan, shape, model, seed=3, index_as_tensor=True)
    assert torch.equal(by_int, by_tensor)


def test_zero_noise_tensor_on_silent_steps_equals_none():
    # A captured loop passes a (zero) noise tensor to every step; the coefficient there is exactly 0.
    for name in STAGES:
        schedule, shape, model = stage(name)
        plan = S.make_plan(schedule, 4, sampler="ddpm")
        x = torch.randn(shape)
        out = model(x, plan.timesteps[-1])
        assert torch.equal(S.step(plan, 3, x, out, torch.randn(shape)), S.step(plan, 3, x, out, None))


def test_plan_layout_and_dtype_preservation():
    plan = S.make_plan(STAGES["decoder"][0], 7, sampler="ddpm")
    for field in ("mean_coef_x0", "mean_coef_xt", "noise_std", "log_var_min", "log_var_max", "noise_gate",
                  "sqrt_alpha_bar", "sqrt_one_minus_alpha_bar"):
        coef = getattr(plan, field)
        assert coef.shape == (7,) and coef.dtype == torch.float32 and torch.isfinite(coef).all(), field
    assert plan.noise_std[-1] == 0 and plan.noise_gate.tolist() == [1.0] * 6 + [0.0]
    x = torch.randn(1, 3, 4, 4).half()
    out = torch.randn(1, 6, 4, 4).half()
    for i in (2, torch.tensor(2)):  # a coefficient must stay 0-dim, or it would promote fp16 to fp32
        assert S.step(plan, i, x, out, torch.randn(1, 3, 4, 4).half()).dtype == torch.float16


def test_seeded_randn_matches_randn_tensor_including_generator_lists():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    ref_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    assert torch.equal(S.seeded_randn((3, 2, 4), gens), randn_tensor((3, 2, 4), generator=ref_gens,
                                                                     device=torch.device("cpu")))
    a = S.seeded_randn((2, 5), torch.Generator().manual_seed(7), "cpu", torch.float16)
    b = randn_tensor((2, 5), generator=torch.Generator().manual_seed(7), device=torch.device("cpu"),
                     dtype=torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a, b)


# --------------------------------------------------------------------------------------- (e) validation

def test_validation_errors():
    for bad in (0, 1001, -3):
        with pytest.raises(ValueError, match=r"num_inference_steps must be in 1\.\.1000"):
            S.make_plan(None, bad, sampler="ddpm")
    for bad in (2.5, True, "25"):
        with pytest.raises(TypeError, match="num_inference_steps"):
            S.make_plan(None, bad, sampler="ddim")
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.make_plan(None, None, sampler="ddpm")
    for bad in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="eta"):
            S.make_plan(None, 10, sampler="ddim", eta=bad)
    with pytest.raises(ValueError, match="eta"):
        S.make_plan(None, 10, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="eta=5"):
        S.make_plan(None, 10, sampler="ddim", eta=5.0)
    with pytest.raises(ValueError, match="sampler"):
        S.make_plan(None, 10, sampler="euler")
    with pytest.raises(ValueError, match="variance_type"):
        S.ScheduleConfig(variance_type="fixed_large")
    with pytest.raises(ValueError, match="prediction_type"):
        S.ScheduleConfig(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="beta_schedule"):
        S.ScheduleConfig(beta_schedule="scaled_linear")
    with pytest.raises(ValueError, match="clip_sample_range"):
        S.ScheduleConfig(clip_sample_range=0.0)
    with pytest.raises(ValueError, match="timesteps must be strictly descending"):
        S.make_plan(None, sampler="ddim", timesteps=[10, 20, 0])
    with pytest.raises(ValueError, match="timesteps must be strictly descending"):
        S.make_plan(None, sampler="ddim", timesteps=[1000, 0])
    plan = S.make_plan(STAGES["decoder"][0], 5, sampler="ddpm")  # learned_range needs 2C channels
    with pytest.raises(ValueError, match="learned_range"):
        S.step(plan, 0, torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="model_output"):
        S.step(plan, 0, torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="generators"):
        S.seeded_randn((3, 4), [torch.Generator(), torch.Generator()])


def test_make_plan_accepts_any_schedule_with_the_fields():
    class Loaded:  # e.g. unclip.loading.SchedulerConfig: no beta_start/beta_end
        num_train_timesteps, beta_schedule, variance_type = 1000, "squaredcos_cap_v2", "learned_range"
        prediction_type, clip_sample, clip_sample_range = "epsilon", True, 1.0

    a = S.make_plan(Loaded(), 9, sampler="ddpm")
    b = S.make_plan(STAGES["decoder"][0], 9, sampler="ddpm")
    assert a.variance_type == "learned_range" and torch.equal(a.mean_coef_x0, b.mean_coef_x0)
    with pytest.raises(TypeError, match="clip_sample_range"):
        S.make_plan(object(), 9)
    Loaded.variance_type = "learned"
    with pytest.raises(ValueError, match="variance_type"):
        S.make_plan(Loaded(), 9)


@pytest.mark.parametrize("sampler,name", [("ddpm", "decoder"), ("ddpm", "prior"), ("ddim", "decoder")])
def test_step_needs_no_tensor_values_on_the_host(sampler, name):
    # On the meta device a tensor has no data: any .item(), bool(tensor) or data-dependent branch raises.
    schedule, shape, _ = stage(name)
    plan = S.make_plan(schedule, 7, sampler=sampler, eta=0.5 if sampler == "ddim" else 0.0, device="meta")
    assert plan.timesteps.device.type == "meta" and plan.noise_std.device.type == "meta"
    c_out = 2 * shape[1] if schedule.variance_type == "learned_range" else shape[1]
    x = torch.empty(shape, device="meta")
    out = torch.empty((shape[0], c_out) + shape[2:], device="meta")
    for i in (3, torch.tensor(3, device="meta")):
        assert S.step(plan, i, x, out, torch.empty(shape, device="meta")).shape == shape


def test_step_traces_into_one_graph():
    # torch.compile(fullgraph=True) fails on any graph break: host syncs or data-dependent python branches.
    schedule, shape, model = stage("decoder")
    plan = S.make_plan(schedule, 7, sampler="ddpm")
    compiled = torch.compile(lambda i, x, out, z: S.step(plan, i, x, out, z), backend="eager", fullgraph=True)
    x, z = torch.randn(shape), torch.randn(shape)
    out = model(x, 500)
    i = torch.tensor(2)
    assert torch.equal(compiled(i, x, out, z), S.step(plan, 2, x, out, z))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_whole_loop_captures_in_a_cuda_graph():
    schedule, shape, model = stage("decoder")
    dev = torch.device("cuda")
    plan = S.make_plan(schedule, 7, sampler="ddpm", device=dev)
    model.w, model.b = model.w.to(dev), model.b.to(dev)
    gen = torch.Generator().manual_seed(0)
    x0 = S.seeded_randn(shape, gen, dev)
    noise = [z if z is not None else torch.zeros(shape, device=dev) for z in S.draw_noise(plan, shape, gen)]
    eager = plain_loop(plan, model, x0, noise)

    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        plain_loop(plan, model, static_x.clone(), noise)
    torch.cuda.current_stream().wait_stream(stream)
    index = [torch.tensor(i, device=dev) if i % 2 else i for i in range(plan.num_steps)]  # both kinds of i
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            x = static_x
            for i in range(plan.num_steps):
                x = S.step(plan, index[i], x, model(x, plan.timesteps[i]), noise[i])
            static_out = x
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert max_rel_err(static_out, eager) <= 1e-6


@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_ddim_inverse_steps_undo_the_sampling_steps_for_an_x_independent_model(prediction):
    """With ε independent of x the inversion's approximation (ε at x_s for ε at x_t) is exact, so inverting
    x0 and decoding back with DDIM (η = 0, no clipping) returns x0; the plan walks the timesteps upwards."""
    schedule = S.ScheduleConfig(prediction_type=prediction, clip_sample=False)
    forward = S.make_plan(schedule, 6, sampler="ddim")
    inverse = S.make_inverse_plan(schedule, 6)
    assert inverse.timestep_values == forward.timestep_values[::-1] and inverse.draws_noise == [False] * 6
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def model_for(plan):
        def out(x, t):  # an x0 model's output for the same ε: (x − √(1−ā)·ε)/√ā at this step's timestep
            if prediction == "epsilon":
                return eps
            a = S.alphas_cumprod_for(S.betas_for())[t]
            return (x - (1 - a).sqrt() * eps) / a.sqrt()
        return out
    x_T = plain_loop(inverse, model_for(inverse), x0, [None] * 6)
    assert (x_T - x0).abs().max() > 0.1  # it moved
    back = plain_loop(forward, model_for(forward), x_T, [None] * 6)
    # float32 through t = 999, where ā ≈ 2.4e-9 amplifies rounding ~2e4-fold: measured ≈ 6e-4 (a wrong inverse
    # step is off by O(1))
    assert max_rel_err(back, x0) <= 2e-3
