"""The one sampling loop that runs every stage of the cascade, and the pieces a stage is made of.

A stage is data: a `denoise(x, t, i)` function (the network call(s), with classifier-free guidance batched
as [uncond, cond]), a sampler plan (per-step coefficients precomputed as tensors), the initial latents and
the noise for every stochastic step, drawn up front in diffusers' order. The loop itself is branch-free
tensor work per step, so the `fast` backend can capture it whole in a CUDA graph.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import samplers


def guided(model_call: Callable, scale: float, *, learned_variance_channels: int | None = None) -> Callable:
    """Classifier-free guidance around `model_call(x2, t)` (x2 = the latents twice: [uncond, cond]):
    `uncond + scale·(cond − uncond)`. For learned-variance outputs only the first channels (ε) are guided
    and the variance comes from the conditional half, as in Karlo."""
    def denoise(x, t, i):
        out = model_call(torch.cat([x, x]), t, i)
        uncond, cond = out.chunk(2)
        if learned_variance_channels is None:
            return uncond + scale * (cond - uncond)
        c = learned_variance_channels
        eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1)
    return denoise


def run_loop(plan, x: torch.Tensor, denoise: Callable, noise: Sequence[torch.Tensor | None],
             callback: Callable | None = None, progress=None) -> torch.Tensor:
    """Run every step of one stage: model output, then the sampler step with that step's noise."""
    for i in range(plan.num_steps):
        t = plan.timesteps[i]
        out = denoise(x, t, i)
        x = samplers.step(plan, i, x, out.to(x.dtype), noise[i])
        if callback is not None:
            callback(i, t, x)
        if progress is not None:
            progress.update(1)
    return x
