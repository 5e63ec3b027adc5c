"""A stage of the cascade is a value: `Stage`, and the builders that make one for the prior, the decoder,
each upsampler and DDIM inversion.

A builder draws the stage's random numbers as it is built (initial latents, then one draw per stochastic
step, the order diffusers' `UnCLIPPipeline` uses), so building the stages in cascade order consumes a
generator exactly as diffusers does, and a runner never draws anything. What happens between stages
(prior post-processing and candidate selection, text_proj, the decoder clamp, the upsampler's resize) is
plain tensor code in engine/cascade.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import samplers

KINDS = ("prior", "decoder", "super_res")


@dataclass(frozen=True, eq=False)
class KnownRegion:
    """RePaint's per-step data (Lugmayr et al. 2022): what the loop pastes into x after every step, and the
    optional resampling jumps, all precomputed so the loop stays one capturable loop.

    After step i (x_t → x_s):   x = where(mask, x, known[i])          known[i] = √ā_s·x0 + √(1−ā_s)·ε_i
                                                                      (x0 itself where the step lands on x0)
    and where jump_noise[i] is not None (a resampling jump, the next step repeats step i):
                                x = jump_scale[i]·x + jump_std[i]·jump_noise[i]   (q(x_t | x_s): √(ā_t/ā_s),
                                                                      √(1 − ā_t/ā_s))
    mask: bool (rows or 1, 1, S, S), True where the image is generated (repainted), False where it is known.
    known, jump_noise: one entry per step (float32, shaped like the latents); jump_scale, jump_std: (N,) float32.
    """

    mask: torch.Tensor
    known: list
    jump_noise: list
    jump_scale: torch.Tensor
    jump_std: torch.Tensor

    def tensors(self) -> dict:
        """Every tensor by a stable name (what a captured loop holds as static buffers)."""
        out = {"mask": self.mask, "jump_scale": self.jump_scale, "jump_std": self.jump_std}
        out.update({f"known.{i}": k for i, k in enumerate(self.known)})
        out.update({f"jump_noise.{i}": n for i, n in enumerate(self.jump_noise) if n is not None})
        return out

    def replace_tensors(self, tensors: dict) -> "KnownRegion":
        """The same region reading `tensors` (keys as in `tensors()`) instead of its own."""
        return KnownRegion(tensors["mask"], [tensors[f"known.{i}"] for i in range(len(self.known))],
                           [None if n is None else tensors[f"jump_noise.{i}"] for i, n in enumerate(self.jump_noise)],
                           tensors["jump_scale"], tensors["jump_std"])


@dataclass(frozen=True, eq=False)
class Stage:
    """Everything one sampling loop needs (see docs/architecture.md for the step it describes).

    name: "prior", "decoder", "super_res", "super_res_2", ... or "inversion".
    kind: which network signature the loop calls: "prior", "decoder" or "super_res".
    plan: the sampler's timesteps and per-step coefficients (engine/samplers.py; x0 clipping is plan.clip_range).
    latents: initial latents, float32. noise: one entry per step, float32, None where a step draws none.
    conditioning: the tensors the network reads, in the model dtype ([uncond; cond] rows when guided).
    networks: names of the networks called; for "super_res" (first, last): the last runs the final step only.
    guidance: classifier-free guidance scale, or None (unguided).
    learned_variance_channels: C for a decoder with learned variance (only ε is guided), else None.
    model_dtype: the dtype the networks run in.
    candidates: prior only: k embeddings drawn per image, the best aligned one kept after the loop.
    known_region: a `KnownRegion` (inpainting: the known pixels pasted back after every step), or None.
    """

    name: str
    kind: str
    plan: samplers.Plan
    latents: torch.Tensor
    noise: list
    conditioning: dict
    networks: tuple
    guidance: float | None
    model_dtype: torch.dtype
    learned_variance_channels: int | None = None
    candidates: int = 1
    known_region: KnownRegion | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if len(self.noise) != self.plan.num_steps:
            raise ValueError(f"stage {self.name!r}: noise must hold one entry per step ({self.plan.num_steps}), "
                             f"got {len(self.noise)}")
        k = self.known_region
        if k is not None and not (len(k.known) == len(k.jump_noise) == self.plan.num_steps):
            raise ValueError(f"stage {self.name!r}: known_region must hold one known image and one jump entry per "
                             f"step ({self.plan.num_steps}), got {len(k.known)} and {len(k.jump_noise)}")

    @property
    def rows(self) -> int:
        return self.latents.shape[0]

    @property
    def has_known_region(self) -> bool:
        """True for an inpainting stage: after every step the loop pastes the known region back (and may
        re-noise for a resampling jump). A runner with its own loop must run such a stage through
        `unclip.runner.run_loop` (or implement `KnownRegion`), never ignore it."""
        return self.known_region is not None


def initial_latents(shape, latents, generator, device, dtype, name: str) -> torch.Tensor:
    """Given latents (already validated by the request) or a fresh draw, as float32 on `device`."""
    if latents is None:
        return samplers.seeded_randn(shape, generator, device, dtype).float()
    return latents.to(device, dtype).float()


def step_noise(plan, shape, generator, device, dtype) -> list:
    """Every step's noise, drawn now in step order (diffusers draws it step by step in the same order)."""
    return [None if n is None else n.float() for n in samplers.draw_noise(plan, shape, generator, device, dtype)]


def prior_stage(plan, text, *, rows: int, candidates: int, guidance: float | None, embedding_dim: int,
                latents, generator, device, dtype) -> Stage:
    """The prior: text features (text_embeds, text_hidden, text_mask), already [uncond; cond] when guided."""
    embeds, hidden, mask = text
    if candidates > 1:  # every text row repeated k times (rows stay grouped per image)
        embeds, hidden, mask = (t.repeat_interleave(candidates, dim=0) for t in (embeds, hidden, mask))
    shape = (rows * candidates, embedding_dim)
    x = initial_latents(shape, latents, generator, device, dtype, "prior_latents")
    return Stage("prior", "prior", plan, x, step_noise(plan, shape, generator, device, dtype),
                 {"text_embeds": embeds, "text_hidden": hidden, "text_mask": mask}, ("prior",), guidance, dtype,
                 candidates=candidates)


def decoder_stage(plan, context, time_embed, mask, *, rows: int, guidance: float | None, channels: int,
                  size: int, learned_variance_channels: int | None, latents, generator, device, dtype,
                  name: str = "decoder") -> Stage:
    """The decoder, conditioned by text_proj's context tokens, additive time embedding and the token mask."""
    shape = (rows, channels, size, size)
    x = initial_latents(shape, latents, generator, device, dtype, "decoder_latents")
    return Stage(name, "decoder", plan, x, step_noise(plan, shape, generator, device, dtype),
                 {"context": context, "time_embed": time_embed, "mask": mask}, ("decoder",), guidance, dtype,
                 learned_variance_channels=learned_variance_channels)


def inversion_stage(plan, image, context, time_embed, mask, *, guidance: float | None,
                    learned_variance_channels: int | None, dtype) -> Stage:
    """DDIM inversion of the decoder: `plan` from `samplers.make_inverse_plan`, starting at the image x0."""
    return Stage("inversion", "decoder", plan, image.float(), [None] * plan.num_steps,
                 {"context": context, "time_embed": time_embed, "mask": mask}, ("decoder",), guidance, dtype,
                 learned_variance_channels=learned_variance_channels)


def super_res_stage(plan, name: str, low_res: torch.Tensor, *, rows: int, channels: int, size: int, latents,
                    generator, device, dtype) -> Stage:
    """One upsampler: its latents, and the low-resolution image resized to its resolution (bicubic,
    antialiased, in float32: the CPU has no half-precision antialiased bicubic)."""
    shape = (rows, channels, size, size)
    x = initial_latents(shape, latents, generator, device, dtype, name)
    upscaled = F.interpolate(low_res.float(), size=[size, size], mode="bicubic", align_corners=False,
                             antialias=True).to(dtype)
    return Stage(name, "super_res", plan, x, step_noise(plan, shape, generator, device, dtype),
                 {"upscaled": upscaled}, (f"{name}.first", f"{name}.last"), None, dtype)


def select_candidates(embeds: torch.Tensor, text_embeds: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """Of k prior embeddings per image, the one whose direction is closest to its text embedding (the
    paper's trick: highest dot product of the unit vectors). `text_embeds` holds the k-repeated cond rows."""
    if k == 1:
        return embeds
    cond = text_embeds[-rows * k:].reshape(rows, k, -1)[:, 0]
    cand = embeds.reshape(rows, k, -1)
    score = (F.normalize(cand.float(), dim=-1) * F.normalize(cond.float(), dim=-1)[:, None]).sum(-1)
    return cand[torch.arange(rows, device=embeds.device), score.argmax(dim=1)]


# --------------------------------------------------------------------------------------------- batching
# A server runs the same stage of several requests as one batch: rows concatenated, the loop run once, the
# final latents split back. Rows never mix in a network call, so each request keeps its own random numbers
# (drawn by its own builder from its own generator); only kernel rounding may differ with the batch size.

def batch_key(stage: Stage) -> tuple:
    """Stages with equal keys can run as one batch (`concat_stages`): the same stage, networks, plan object
    (schedule, steps, sampler, eta: `Cascade.plan` caches one per configuration), guidance scale, dtype,
    candidates, and the same shapes and dtypes except the row count."""
    cond = tuple(sorted((k, tuple(v.shape[1:]), v.dtype) for k, v in stage.conditioning.items()))
    if getattr(stage, "known_region", None) is not None:  # inpainting stages carry per-request regions: alone
        cond += (("known_region", id(stage)),)
    return (stage.name, stage.kind, stage.networks, id(stage.plan), stage.guidance, stage.model_dtype,
            stage.learned_variance_channels, stage.candidates, tuple(stage.latents.shape[1:]), cond)


def _cond_halves(stage: Stage, name: str, t: torch.Tensor) -> tuple:
    """A conditioning tensor as (uncond rows, cond rows) when guided, else (rows,)."""
    per = 2 if stage.guidance is not None else 1
    if t.shape[0] != per * stage.rows:
        raise ValueError(f"stage {stage.name!r}: conditioning {name!r} has {t.shape[0]} rows; expected "
                         f"{per * stage.rows} ({'[uncond; cond] ' if per == 2 else ''}{stage.rows} latents rows)")
    return tuple(t.chunk(2)) if per == 2 else (t,)


def concat_stages(stage_list: list) -> Stage:
    """One stage running every given stage's rows: latents and each step's noise are [x_1; ...; x_B]; guided
    conditioning stays in the guided layout, [uncond_1; ...; uncond_B; cond_1; ...; cond_B]. The stages must
    share a `batch_key` (ValueError otherwise). `split_rows(x, [s.rows for s in stage_list])` undoes it."""
    stage_list = list(stage_list)
    if not stage_list:
        raise ValueError("concat_stages: give at least one stage")
    first = stage_list[0]
    if len(stage_list) == 1:
        return first
    key = batch_key(first)
    for s in stage_list[1:]:
        if batch_key(s) != key:
            raise ValueError(f"concat_stages: stage {s.name!r} cannot be batched with {first.name!r} (they "
                             "differ in plan, guidance, dtype, networks or shapes other than rows)")
    noise = []
    for i in range(first.plan.num_steps):
        entries = [s.noise[i] for s in stage_list]
        if all(n is None for n in entries):
            noise.append(None)
        elif any(n is None for n in entries):  # same plan: cannot happen, but never guess zeros for a draw
            raise ValueError(f"concat_stages: step {i} draws noise in some stages and not in others")
        else:
            noise.append(torch.cat(entries))
    conditioning = {}
    for name in first.conditioning:
        halves = [_cond_halves(s, name, s.conditioning[name]) for s in stage_list]
        conditioning[name] = torch.cat([h[j] for j in range(len(halves[0])) for h in halves])
    return Stage(name=first.name, kind=first.kind, plan=first.plan,
                 latents=torch.cat([s.latents for s in stage_list]), noise=noise, conditioning=conditioning,
                 networks=first.networks, guidance=first.guidance, model_dtype=first.model_dtype,
                 learned_variance_channels=first.learned_variance_channels, candidates=first.candidates)


def split_rows(x: torch.Tensor, rows: list) -> list:
    """`x` (sum(rows), ...) split into consecutive blocks of `rows[i]` rows (a batched stage's final latents
    back per request)."""
    if sum(rows) != x.shape[0]:
        raise ValueError(f"split_rows: {x.shape[0]} rows cannot be split as {list(rows)} (sum {sum(rows)})")
    return list(x.split(list(rows)))


# --------------------------------------------------------------------------------------------- editing

def index_plan(plan, index: list[int]):
    """The plan whose step k is `plan`'s step index[k] (same coefficients, timesteps and noise rule): how a
    schedule is started part-way (img2img strength) or unrolled with repeated steps (resampling jumps)."""
    n = plan.num_steps
    idx = torch.tensor(index, dtype=torch.long, device=plan.timesteps.device)
    changes = {}
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if f.name == "num_steps":
            changes[f.name] = len(index)
        elif isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == n:
            changes[f.name] = value.index_select(0, idx)
        elif isinstance(value, list) and len(value) == n:
            changes[f.name] = [value[i] for i in index]
    return dataclasses.replace(plan, **changes)


def edit_steps(num_steps: int, strength: float, resample_jumps: int) -> tuple[list[int], list[bool]]:
    """(the plan's step index of every step run, whether a resampling jump follows it).

    strength s in (0, 1]: the last max(1, round(s·N)) of the N steps run (1.0: all of them, from pure noise).
    resample_jumps J: every step but the last runs J + 1 times, re-noised back to its start in between."""
    run = max(1, min(num_steps, round(strength * num_steps)))
    index, jump_after = [], []
    for i in range(num_steps - run, num_steps):
        repeats = 1 if i == num_steps - 1 else resample_jumps + 1
        for r in range(repeats):
            index.append(i)
            jump_after.append(r < repeats - 1)
    return index, jump_after


def _noised(x0: torch.Tensor, alpha_bar: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0) = √ā_t·x0 + √(1−ā_t)·ε (x0 itself for t = -1, i.e. a step that lands on x0)."""
    if t < 0:
        return x0
    a = alpha_bar[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def with_source(stage: Stage, source: torch.Tensor, mask: torch.Tensor | None, *, alpha_bar: torch.Tensor,
                jump_after: list[bool] | None, generator, device, dtype) -> Stage:
    """`stage` (its plan already cut/unrolled by `edit_steps`) starting from, and held to, a source image.

    source: x0 (rows, C, S, S) float32 in the stage's pixel space. mask: bool (rows or 1, 1, S, S), True where
    the image is generated; None = no known region (img2img). alpha_bar: the schedule's ā (T,) float32.
    Initial latents: the stage's own draw ε becomes √ā_t0·x0 + √(1−ā_t0)·ε (SDEdit); a plan that starts at the
    schedule's first timestep (strength 1) keeps pure ε in the generated region. Then, with a mask, the
    builder draws (from `generator`, in step order) one ε per step for the known images and the noise of
    every resampling jump."""
    plan = stage.plan
    alpha_bar = alpha_bar.to(device=source.device, dtype=torch.float32)
    from_noise = plan.timestep_values[0] >= alpha_bar.shape[0] - 1
    source = source.float()
    eps = stage.latents
    start = _noised(source, alpha_bar, plan.timestep_values[0], eps)
    if mask is None:
        return dataclasses.replace(stage, latents=start)
    x = torch.where(mask, eps, start) if from_noise else start
    shape = tuple(stage.latents.shape)
    known, jump_noise = [], []
    jump_scale = torch.zeros(plan.num_steps, dtype=torch.float32, device=source.device)
    jump_std = torch.zeros_like(jump_scale)
    jump_after = jump_after or [False] * plan.num_steps
    for k in range(plan.num_steps):
        s = plan.prev_timestep_values[k]
        e = None if s < 0 else samplers.seeded_randn(shape, generator, device, dtype).float()
        known.append(_noised(source, alpha_bar, s, e))
    for k in range(plan.num_steps):
        if jump_after[k]:
            t, s = plan.timestep_values[k], plan.prev_timestep_values[k]
            ratio = alpha_bar[t] / alpha_bar[s]
            jump_scale[k], jump_std[k] = ratio.sqrt(), (1 - ratio).sqrt()
            jump_noise.append(samplers.seeded_randn(shape, generator, device, dtype).float())
        else:
            jump_noise.append(None)
    region = KnownRegion(mask, known, jump_noise, jump_scale, jump_std)
    return dataclasses.replace(stage, latents=x, known_region=region)


def resize_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """A bool mask (B, 1, H, W) at size × size: nearest when enlarging, and when shrinking a pixel is generated
    if any part of it is (area average > 0), so the known region never includes a pixel that was masked."""
    if mask.shape[-1] == size and mask.shape[-2] == size:
        return mask
    m = mask.float()
    if size >= mask.shape[-1]:
        return F.interpolate(m, size=[size, size], mode="nearest") > 0.5
    return F.interpolate(m, size=[size, size], mode="area") > 0
