"""Noise schedules and the two samplers of the cascade: Karlo's strided DDPM and DDIM(η).

Everything a sampling loop needs is split in two:

* `make_plan(...)` runs once on the host. It picks the timesteps and precomputes every per-step
  coefficient as a float32 tensor on the target device, plus static host facts (`num_steps`,
  `draws_noise`). Nothing in a plan depends on data.
* `step(plan, i, sample, model_output, noise)` is pure tensor arithmetic: it indexes the coefficient
  tensors with `i` (a python int or a 0-dim long tensor on the plan's device), never calls `.item()`,
  never syncs, and branches only on static facts (the plan's prediction/variance type, tensor shapes).
  A whole loop of model calls and steps can therefore be captured in one CUDA graph.

Notation: ā_t = alphas_cumprod[t]; a step goes from timestep t to the next, smaller, timestep s (the
"previous" timestep in DDPM terms); the final step goes to s = -1, i.e. to x0, with ā_s = 1.

Compatibility with diffusers (used by the tests as a peer; never imported here):

* `betas_for` / `alphas_cumprod_for` give bit-identical float32 tensors to `UnCLIPScheduler` and
  `DDIMScheduler`: the cosine betas are computed in float64 python floats and stored as float32, the
  linear ones with a float32 `linspace`, and ā is a float32 cumulative product.
* All step coefficients are computed in float32 from those tensors, in the same order of operations as
  `UnCLIPScheduler.step`. This matters: near t = 0, 1 - ā_t and 1 - ā_t/ā_s lose most of their digits
  in float32, so a float64 recomputation would *not* reproduce the reference trajectory.
* Between adjacent timesteps (s = t-1) the reference uses the training β_t rather than 1 - ā_t/ā_s;
  equal in exact arithmetic, not in float32. Visible effect, kept for parity: the last step (0 -> x0)
  scales the clipped x0 by β_0/(1 - ā_0) ≈ 0.99947 instead of 1.
* `karlo_timesteps(N)` is `UnCLIPScheduler.set_timesteps(N)`: round(k·(T-1)/(N-1)) for k = N-1..0,
  always from T-1 down to 0. diffusers divides by zero for N = 1; we use the single timestep T-1, which
  goes straight to x0 (the clipped x0 prediction).
* Noise: the DDPM step draws noise on every step but the last (the reference's rule `t > 0`, which is
  the same thing because Karlo timesteps end at 0), with the sample's shape and dtype. `draw_noise`
  draws all of them up front in that order, the way diffusers' `randn_tensor` does (on a CPU
  generator's device, then moved), so a loop that pre-draws is seed-compatible with `UnCLIPPipeline`.
* DDIM uses the same Karlo timesteps by default (switch sampler alone; `timesteps=` overrides) and the
  same float32 ā. It draws noise only where σ > 0 (η > 0, every step but the last). It re-derives ε from
  the clipped x0 (guided-diffusion's DDIM; diffusers' `DDIMScheduler.step(use_clipped_model_output=True)`),
  which equals the tests' `DDIMScheduler` on its own timesteps; that scheduler also draws (and zeroes)
  noise on the last step, so its generator ends one draw further along.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

SCHEDULES = ("squaredcos_cap_v2", "linear")
VARIANCE_TYPES = ("fixed_small_log", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample")
SAMPLERS = ("ddpm", "ddim")


# --------------------------------------------------------------------------------------------------
# Noise schedules


def betas_for(schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
              beta_start: float = 0.0001, beta_end: float = 0.02) -> torch.Tensor:
    """The training betas, float32 (T,) on the CPU.

    "squaredcos_cap_v2": β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), 0.999) with ᾱ(u) = cos²((u + 0.008)/1.008 · π/2)
    (Nichol & Dhariwal's cosine schedule; beta_start/beta_end are unused). "linear": β evenly spaced from
    beta_start to beta_end.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_int("num_train_timesteps", num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
    if schedule == "linear":
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
                raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)

    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def alphas_cumprod_for(betas: torch.Tensor) -> torch.Tensor:
    """ā_t = Π_{i<=t} (1 - β_i), in the dtype of `betas` (float32 for the reference schedules)."""
    return torch.cumprod(1.0 - betas, dim=0)


def karlo_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Karlo's strided timesteps, descending from T-1 to 0 (see the module docstring; N = 1 gives [T-1])."""
    T = _check_int("num_train_timesteps", num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
    N = _check_int("num_inference_steps", num_inference_steps, 1, T)
    if N == 1:
        return [T - 1]
    stride = (T - 1) / (N - 1)
    # python's round() rounds halves to even, like numpy's, which the reference uses.
    return [round(k * stride) for k in range(N - 1, -1, -1)]


# Schedules are built as Python lists of this length: a bound keeps a corrupt config (10**12) from hanging.
# Published diffusion models train with 1000 steps; 100x that is still instant to build.
MAX_TRAIN_TIMESTEPS = 100_000


# --------------------------------------------------------------------------------------------------
# Schedule settings (one per stage, read from a scheduler_config.json by `ScheduleConfig.from_config`)


@dataclass(frozen=True)
class ScheduleConfig:
    """How a stage's model was trained and how its outputs are read.

    prediction_type: "epsilon" (the model predicts the noise) or "sample" (it predicts x0).
    variance_type: "fixed_small_log" (posterior variance β̃) or "learned_range" (the model's extra C
    channels v interpolate the log variance between log β̃ and log β: frac = (v + 1) / 2).
    clip_sample / clip_sample_range: clamp the x0 prediction to ±range before it is used.
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    variance_type: str = "fixed_small_log"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    def __post_init__(self):
        _check_int("num_train_timesteps", self.num_train_timesteps, 1, MAX_TRAIN_TIMESTEPS)
        _check_choice("beta_schedule", self.beta_schedule, SCHEDULES)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        if not isinstance(self.clip_sample, bool):
            raise TypeError(f"clip_sample must be a bool, got {self.clip_sample!r}")
        r = self.clip_sample_range
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            raise ValueError(f"clip_sample_range must be a finite number > 0, got {r!r}")
        if self.beta_schedule == "linear":
            betas_for("linear", 2, self.beta_start, self.beta_end)  # validates beta_start / beta_end

    @property
    def clip_range(self) -> float | None:
        return float(self.clip_sample_range) if self.clip_sample else None

    @classmethod
    def from_config(cls, cfg) -> "ScheduleConfig":
        """From a `unclip.config.Config` of a diffusers `UnCLIPScheduler` scheduler_config.json; every bad
        value raises ConfigError naming the file and key."""
        cfg.expect("_class_name", ("UnCLIPScheduler",), default="UnCLIPScheduler")
        cfg.reject_unknown(_FILE_FIELDS)
        rng = cfg.get("clip_sample_range", 1.0, types=(int, float))
        if not rng > 0:
            raise cfg.error("clip_sample_range", f"= {rng!r} must be > 0")
        return cls(
            num_train_timesteps=cfg.get_int("num_train_timesteps", 1000, min_value=1,
                                            max_value=MAX_TRAIN_TIMESTEPS),
            beta_schedule=cfg.get("beta_schedule", "squaredcos_cap_v2", choices=("squaredcos_cap_v2", "linear")),
            variance_type=cfg.get("variance_type", "fixed_small_log", choices=VARIANCE_TYPES),
            prediction_type=cfg.get("prediction_type", "epsilon", choices=PREDICTION_TYPES),
            clip_sample=cfg.get("clip_sample", True, types=bool),
            clip_sample_range=float(rng),
        )

    def to_dict(self, diffusers_version: str = "0.42.1") -> dict:
        """The scheduler_config.json diffusers' UnCLIPScheduler reads (beta_start/beta_end are not its keys)."""
        return {"_class_name": "UnCLIPScheduler", "_diffusers_version": diffusers_version,
                **{f: getattr(self, f) for f in _FILE_FIELDS}}

    @classmethod
    def of(cls, schedule) -> "ScheduleConfig":
        """A validated ScheduleConfig from any object with these fields (e.g. `unclip.loading.SchedulerConfig`;
        beta_start/beta_end may be absent), or None for the defaults."""
        if schedule is None or isinstance(schedule, cls):
            return cls() if schedule is None else schedule
        missing = [f for f in _REQUIRED_SCHEDULE_FIELDS if not hasattr(schedule, f)]
        if missing:
            raise TypeError(f"schedule must be a ScheduleConfig or have its fields; {type(schedule).__name__} "
                            f"lacks {', '.join(missing)}")
        fields = {f: getattr(schedule, f) for f in cls.__dataclass_fields__ if hasattr(schedule, f)}
        return cls(**fields)


_FILE_FIELDS = ("num_train_timesteps", "beta_schedule", "variance_type", "prediction_type", "clip_sample",
                "clip_sample_range")
_REQUIRED_SCHEDULE_FIELDS = ("num_train_timesteps", "beta_schedule", "variance_type", "prediction_type",
                             "clip_sample", "clip_sample_range")


# --------------------------------------------------------------------------------------------------
# Plans: every per-step coefficient, precomputed once on the target device


@dataclass(frozen=True, eq=False)
class DDPMPlan:
    """Karlo's strided ancestral DDPM. Coefficient tensors are float32 (N,) on the plan's device.

    x0   = (x_t - sqrt(1-ā_t)·ε) / sqrt(ā_t)            (or the model output, for "sample" prediction)
    mean = mean_coef_x0·clip(x0) + mean_coef_xt·x_t      (the posterior q(x_s | x_t, x0), strided)
    x_s  = mean + std·z,  std = noise_std                     (fixed_small_log)
                          std = exp(½(frac·log_var_max + (1-frac)·log_var_min))·noise_gate   (learned_range)
    where the strided β_t = 1 - ā_t/ā_s, β̃ = (1-ā_s)/(1-ā_t)·β_t, log_var_min = log β̃, log_var_max = log β_t.
    Steps that draw no noise have noise_std = noise_gate = 0 (and log variances 0, so nothing overflows).
    """

    timesteps: torch.Tensor              # (N,) long, the model's timestep input per step
    timestep_values: list[int]           # the same, on the host
    prev_timestep_values: list[int]      # where each step lands; -1 = x0
    num_steps: int
    draws_noise: list[bool]              # static: which steps consume a noise tensor (shaped like the sample)
    prediction_type: str
    variance_type: str
    clip_range: float | None
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    mean_coef_x0: torch.Tensor
    mean_coef_xt: torch.Tensor
    noise_std: torch.Tensor
    log_var_min: torch.Tensor
    log_var_max: torch.Tensor
    noise_gate: torch.Tensor

    sampler = "ddpm"


@dataclass(frozen=True, eq=False)
class DDIMPlan:
    """DDIM with η (Song et al. 2020, eq. 12). Coefficient tensors are float32 (N,) on the plan's device.

    x0  = (x_t - sqrt(1-ā_t)·ε) / sqrt(ā_t)   (or the model output), then clipped
    ε   = the model's ε, or re-derived from x0 as (x_t - sqrt(ā_t)·x0) / sqrt(1-ā_t) for "sample"
          prediction, and after clipping when use_clipped_model_output (guided-diffusion's DDIM)
    σ   = η·sqrt((1-ā_s)/(1-ā_t)·(1 - ā_t/ā_s))       = noise_std
    x_s = sqrt(ā_s)·x0 + sqrt(1 - ā_s - σ²)·ε + σ·z     (sqrt_alpha_bar_prev, direction_coef)
    """

    timesteps: torch.Tensor
    timestep_values: list[int]
    prev_timestep_values: list[int]
    num_steps: int
    draws_noise: list[bool]
    prediction_type: str
    clip_range: float | None
    eta: float
    use_clipped_model_output: bool
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_alpha_bar_prev: torch.Tensor
    direction_coef: torch.Tensor
    noise_std: torch.Tensor

    sampler = "ddim"


@dataclass(frozen=True, eq=False)
class DDIMInversePlan:
    """DDIM (η = 0) run backwards, x0 → x_T: the steps of a `DDIMPlan` in reverse order (step k undoes
    sampling step N-1-k), with that step's coefficient tensors. No clipping (a clip has no inverse), no noise.

    Sampling step i maps x_t to x_s with ε = ε(x_t, t_i): x_s = √ā_s·(x_t − √(1−ā_t)·ε)/√ā_t + √(1−ā_s)·ε.
    Its inverse needs ε(x_t), unknown until x_t is; the standard approximation evaluates ε(x_s, t_i), whose
    error shrinks with the step size: x0 = (x_s − √(1−ā_s)·ε)/√ā_s, then x_t = √ā_t·x0 + √(1−ā_t)·ε.
    An x0 ("sample") model's output m at (x_s, t_i) stands for ε = (x_s − √ā_t·m)/√(1−ā_t).
    """

    timesteps: torch.Tensor              # (N,) long: t_i of the sampling step each inverse step undoes
    timestep_values: list[int]
    num_steps: int
    draws_noise: list[bool]              # all False
    prediction_type: str
    sqrt_alpha_bar: torch.Tensor         # √ā_t (where the inverse step lands)
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_alpha_bar_prev: torch.Tensor    # √ā_s (where it starts)
    direction_coef: torch.Tensor         # √(1 − ā_s)

    sampler = "ddim_inverse"
    clip_range = None


def make_inverse_plan(schedule=None, num_inference_steps: int | None = None, *,
                      device: torch.device | str | None = None) -> DDIMInversePlan:
    """The inverse of `make_plan(schedule, num_inference_steps, sampler="ddim", eta=0)` without clipping."""
    schedule = dataclasses.replace(ScheduleConfig.of(schedule), clip_sample=False)
    forward = make_plan(schedule, num_inference_steps, sampler="ddim", eta=0.0, device=device)
    rev = list(range(forward.num_steps - 1, -1, -1))

    def flip(t: torch.Tensor) -> torch.Tensor:
        return t.flip(0)
    return DDIMInversePlan(
        timesteps=flip(forward.timesteps), timestep_values=[forward.timestep_values[i] for i in rev],
        num_steps=forward.num_steps, draws_noise=[False] * forward.num_steps,
        prediction_type=forward.prediction_type, sqrt_alpha_bar=flip(forward.sqrt_alpha_bar),
        sqrt_one_minus_alpha_bar=flip(forward.sqrt_one_minus_alpha_bar),
        sqrt_alpha_bar_prev=flip(forward.sqrt_alpha_bar_prev), direction_coef=flip(forward.direction_coef))


def make_plan(schedule=None, num_inference_steps: int | None = None, *, sampler: str = "ddpm",
              eta: float = 0.0, use_clipped_model_output: bool = True,
              timesteps: Sequence[int] | torch.Tensor | None = None,
              device: torch.device | str | None = None) -> DDPMPlan | DDIMPlan:
    """Precompute a sampler's timesteps and per-step coefficients on `device`.

    schedule: the stage's schedule: a `ScheduleConfig`, or any object with its fields such as
        `unclip.loading.SchedulerConfig`; None = defaults (cosine, 1000 steps, fixed_small_log, ε, clip ±1).
    num_inference_steps: 1..num_train_timesteps. Both samplers use `karlo_timesteps` by default, so a
        stage can switch sampler alone; `timesteps` (strictly descending ints in [0, T-1]) overrides
        them, e.g. diffusers' DDIM "leading" spacing [(N-1)·T//N, ..., T//N, 0].
    sampler: "ddpm" (Karlo's strided DDPM, diffusers' UnCLIPScheduler) or "ddim".
    eta: DDIM noise scale (0 = deterministic); must be 0 for "ddpm".
    use_clipped_model_output: DDIM only; see `DDIMPlan`.
    """
    _check_choice("sampler", sampler, SAMPLERS)
    schedule = ScheduleConfig.of(schedule)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if sampler == "ddpm" and eta != 0:
        raise ValueError(f"eta applies to the 'ddim' sampler only (the DDPM sampler's noise is fixed), got {eta!r}")
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(f"use_clipped_model_output must be a bool, got {use_clipped_model_output!r}")

    T = schedule.num_train_timesteps
    steps = _resolve_timesteps(num_inference_steps, timesteps, T)
    prev = steps[1:] + [-1]
    betas = betas_for(schedule.beta_schedule, T, schedule.beta_start, schedule.beta_end)
    alpha_bar = alphas_cumprod_for(betas)

    # Gather per-step values as float32 (N,) vectors on the CPU; ā_s = 1 where a step lands on x0.
    t = torch.tensor(steps, dtype=torch.long)
    s = torch.tensor(prev, dtype=torch.long)
    lands_on_x0 = s < 0
    a_t = alpha_bar[t]
    a_s = torch.where(lands_on_x0, torch.ones_like(a_t), alpha_bar[s.clamp(min=0)])
    b_t = 1 - a_t
    b_s = 1 - a_s
    sqrt_a_t = a_t ** 0.5
    sqrt_b_t = b_t ** 0.5
    common = dict(timestep_values=steps, prev_timestep_values=prev, num_steps=len(steps),
                  prediction_type=schedule.prediction_type, clip_range=schedule.clip_range)

    def on_device(x: torch.Tensor) -> torch.Tensor:
        return x.to(device) if device is not None else x

    if sampler == "ddpm":
        # Strided β between t and s; for adjacent timesteps the reference uses the training β_t itself
        # (equal in exact arithmetic, not in float32).
        adjacent = s == t - 1
        beta = torch.where(adjacent, betas[t], 1 - a_t / a_s)
        alpha = torch.where(adjacent, (1.0 - betas)[t], 1 - beta)
        mean_coef_x0 = a_s ** 0.5 * beta / b_t
        mean_coef_xt = alpha ** 0.5 * b_s / b_t
        posterior_var = b_s / b_t * beta
        noisy = ~lands_on_x0
        zero = torch.zeros_like(a_t)
        # std via log/exp rather than sqrt, as the reference does, so the rounding agrees.
        noise_std = torch.where(noisy, torch.exp(0.5 * torch.log(posterior_var.clamp(min=1e-20))), zero)
        log_var_min = torch.where(noisy, torch.log(torch.where(noisy, posterior_var, 1.0)), zero)
        log_var_max = torch.where(noisy, torch.log(torch.where(noisy, beta, 1.0)), zero)
        return DDPMPlan(
            timesteps=on_device(t), draws_noise=noisy.tolist(), variance_type=schedule.variance_type,
            sqrt_alpha_bar=on_device(sqrt_a_t), sqrt_one_minus_alpha_bar=on_device(sqrt_b_t),
            mean_coef_x0=on_device(mean_coef_x0), mean_coef_xt=on_device(mean_coef_xt),
            noise_std=on_device(noise_std), log_var_min=on_device(log_var_min),
            log_var_max=on_device(log_var_max), noise_gate=on_device(noisy.to(torch.float32)), **common)

    variance = (b_s / b_t) * (1 - a_t / a_s)
    sigma = eta * variance ** 0.5
    radicand = 1 - a_s - sigma ** 2
    # eta <= 1 keeps the radicand >= 0 in exact arithmetic; float32 can leave it a rounding error below.
    if bool((radicand < -1e-6).any()):
        raise ValueError(f"eta={eta!r} is too large for this schedule: σ² exceeds 1 - ā at some step "
                         "(eta <= 1 is always valid)")
    return DDIMPlan(
        timesteps=on_device(t), draws_noise=(sigma > 0).tolist(), eta=float(eta),
        use_clipped_model_output=use_clipped_model_output,
        sqrt_alpha_bar=on_device(sqrt_a_t), sqrt_one_minus_alpha_bar=on_device(sqrt_b_t),
        sqrt_alpha_bar_prev=on_device(a_s ** 0.5), direction_coef=on_device(radicand.clamp(min=0) ** 0.5),
        noise_std=on_device(sigma), **common)


# --------------------------------------------------------------------------------------------------
# Steps: pure tensor arithmetic (capturable)


def ddpm_step(plan: DDPMPlan, i: int | torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One strided DDPM step x_t -> x_s. `noise` (shaped like `sample`) may be None where the step draws
    none; for a captured loop pass a tensor (zeros) every step, the coefficient is 0 there.
    `model_output` has C channels, or 2C (prediction, variance); with "fixed_small_log" the variance
    half is ignored."""
    model_output, variance_channels = _split_channels(model_output, sample, plan.variance_type == "learned_range")
    x0 = _predict_x0(plan, i, sample, model_output)
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
    mean = _at(plan.mean_coef_x0, i) * x0 + _at(plan.mean_coef_xt, i) * sample
    if noise is None:
        return mean
    if plan.variance_type == "fixed_small_log":
        std = _at(plan.noise_std, i)
    else:
        frac = (variance_channels + 1) / 2
        log_var = frac * _at(plan.log_var_max, i) + (1 - frac) * _at(plan.log_var_min, i)
        std = torch.exp(0.5 * log_var) * _at(plan.noise_gate, i)
    return mean + std * noise


def ddim_step(plan: DDIMPlan, i: int | torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_s. A learned-variance model's output (2C channels) is read as ε only."""
    model_output, _ = _split_channels(model_output, sample, False)
    sqrt_a_t, sqrt_b_t = _at(plan.sqrt_alpha_bar, i), _at(plan.sqrt_one_minus_alpha_bar, i)
    x0 = _predict_x0(plan, i, sample, model_output)
    eps = model_output if plan.prediction_type == "epsilon" else (sample - sqrt_a_t * x0) / sqrt_b_t
    if plan.clip_range is not None:
        x0 = x0.clamp(-plan.clip_range, plan.clip_range)
        if plan.use_clipped_model_output:
            eps = (sample - sqrt_a_t * x0) / sqrt_b_t
    prev = _at(plan.sqrt_alpha_bar_prev, i) * x0 + _at(plan.direction_coef, i) * eps
    if noise is None:
        return prev
    return prev + _at(plan.noise_std, i) * noise


def ddim_inverse_step(plan: DDIMInversePlan, k: int | torch.Tensor, sample: torch.Tensor,
                      model_output: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One inverse DDIM step x_s -> x_t (see `DDIMInversePlan`); `noise` is ignored (there is none)."""
    eps, _ = _split_channels(model_output, sample, False)
    if plan.prediction_type == "sample":
        eps = (sample - _at(plan.sqrt_alpha_bar, k) * eps) / _at(plan.sqrt_one_minus_alpha_bar, k)
    x0 = (sample - _at(plan.direction_coef, k) * eps) / _at(plan.sqrt_alpha_bar_prev, k)
    return _at(plan.sqrt_alpha_bar, k) * x0 + _at(plan.sqrt_one_minus_alpha_bar, k) * eps


Plan = DDPMPlan | DDIMPlan | DDIMInversePlan


def step(plan: Plan, i: int | torch.Tensor, sample: torch.Tensor, model_output: torch.Tensor,
         noise: torch.Tensor | None = None) -> torch.Tensor:
    """`ddpm_step`, `ddim_step` or `ddim_inverse_step`, by the plan's type: the sample after step i."""
    if isinstance(plan, DDPMPlan):
        return ddpm_step(plan, i, sample, model_output, noise)
    if isinstance(plan, DDIMPlan):
        return ddim_step(plan, i, sample, model_output, noise)
    if isinstance(plan, DDIMInversePlan):
        return ddim_inverse_step(plan, i, sample, model_output)
    raise TypeError(f"plan must come from make_plan or make_inverse_plan, got {type(plan).__name__}")


# --------------------------------------------------------------------------------------------------
# Random numbers, drawn exactly as the reference pipeline draws them


def seeded_randn(shape: Sequence[int], generator: torch.Generator | list[torch.Generator] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise drawn like diffusers' `randn_tensor`.

    A CPU generator draws on the CPU and the result is moved to `device` (so a seed gives the same numbers
    on any device); a generator on another device draws there. A list of generators (one per batch row)
    draws each row with its own generator.
    """
    shape = tuple(shape)
    device = torch.device(device) if device is not None else torch.device("cpu")
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if len(generators) == 0:
        raise ValueError("generator list is empty")
    draw_device = device
    if generators[0] is not None:
        gen_type = generators[0].device.type
        if gen_type == "cpu":
            draw_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"a {gen_type} generator cannot draw noise for device {device}")
    if len(generators) == 1:
        return torch.randn(shape, generator=generators[0], device=draw_device, dtype=dtype).to(device)
    if not shape or len(generators) != shape[0]:
        raise ValueError(f"a list of {len(generators)} generators needs a batch of the same size, got shape {shape}")
    rows = [torch.randn((1,) + shape[1:], generator=g, device=draw_device, dtype=dtype) for g in generators]
    return torch.cat(rows, dim=0).to(device)


def draw_noise(plan: DDPMPlan | DDIMPlan, shape: Sequence[int],
               generator: torch.Generator | list[torch.Generator] | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
               ) -> list[torch.Tensor | None]:
    """Every step's noise, in step order (None where a step draws none), shaped like the sample.

    Drawn right after the stage's initial latents, this consumes the generator exactly as the reference
    loop does step by step. `device` defaults to the plan's device. Pass the sample's `dtype`: the
    reference draws in the model output's dtype, and a float16 draw is not a rounded float32 draw.
    """
    device = plan.timesteps.device if device is None else device
    return [seeded_randn(shape, generator, device, dtype) if draws else None for draws in plan.draws_noise]


# --------------------------------------------------------------------------------------------------
# Internals


def _at(coef: torch.Tensor, i: int | torch.Tensor) -> torch.Tensor:
    """coef[i] as a 0-dim tensor (so it never promotes the sample's dtype), without a host sync."""
    if isinstance(i, torch.Tensor):
        return coef.index_select(0, i.reshape(1)).reshape(())
    return coef[i]


def _predict_x0(plan, i, sample: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
    if plan.prediction_type == "sample":
        return model_output
    return (sample - _at(plan.sqrt_one_minus_alpha_bar, i) * model_output) / _at(plan.sqrt_alpha_bar, i)


def _split_channels(model_output: torch.Tensor, sample: torch.Tensor, need_variance: bool):
    """(prediction, variance channels or None). A 2C-channel output carries learned variance in its second half."""
    c = sample.shape[1] if sample.dim() > 1 else None
    have = model_output.shape[1] if model_output.dim() > 1 else None
    if c is None or have not in (c, 2 * c):
        raise ValueError(f"model_output must have the sample's {c} channels (or {None if c is None else 2 * c} "
                         f"with learned variance) in dim 1, got shape {tuple(model_output.shape)} "
                         f"for sample shape {tuple(sample.shape)}")
    if need_variance and have != 2 * c:
        raise ValueError(f"variance_type 'learned_range' needs a model_output with 2×{c} channels "
                         f"(prediction, variance), got shape {tuple(model_output.shape)}")
    if have == 2 * c:
        return model_output[:, :c], model_output[:, c:]
    return model_output, None


def _as_int(value) -> int | None:
    """`value` as a python int if it is an integer (python, numpy, 0-dim tensor), else None. Bools are not."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_int(name: str, value, low: int, high: int | None) -> int:
    allowed = f"{low}..{high}" if high is not None else f">= {low}"
    number = _as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an int in {allowed}, got {value!r}")
    if number < low or (high is not None and number > high):
        raise ValueError(f"{name} must be in {allowed}, got {number}")
    return number


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _resolve_timesteps(num_inference_steps, timesteps, num_train_timesteps: int) -> list[int]:
    T = num_train_timesteps
    if timesteps is None:
        if num_inference_steps is None:
            raise ValueError("num_inference_steps is required (an int in 1..num_train_timesteps)")
        return karlo_timesteps(num_inference_steps, T)
    values = [_as_int(v) for v in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if not values or any(v is None for v in values):
        raise ValueError(f"timesteps must be a non-empty sequence of ints, got {timesteps!r}")
    if any(not 0 <= v < T for v in values) or any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"timesteps must be strictly descending ints in 0..{T - 1}, got {values}")
    if num_inference_steps is not None and _as_int(num_inference_steps) != len(values):
        raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with len(timesteps)={len(values)}")
    return values
