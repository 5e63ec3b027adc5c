"""Stage 4: the 32→64 upsampler (predicts the clean 64×64 image from [x_t, bicubic-upsampled low-res image]).

The network is fully convolutional, so it trains on random 32×32 windows of the 64×64 images (and the same
windows of the upsampled low-res input): a quarter of the cost of full images. The low-res input is the
2×2 average of the image, degraded a little (Gaussian blur, noise) so that the upsampler also cleans up
the decoder's imperfect outputs. The same weights serve as Karlo's `super_res_first` and `super_res_last`.

    python training/train_upsampler.py --work /tmp/toy-work [--steps N --batch B --seed S]
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from unclip import shapes  # noqa: E402

CROP = 32


def upsample(low: torch.Tensor) -> torch.Tensor:
    """The pipeline's conditioning: bicubic, antialiased, to 64×64."""
    size = shapes.IMAGE_SIZE
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def degrade(low: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Per image: Gaussian blur with σ in [0, 0.8] px, plus Gaussian noise with σ in [0, 0.04]."""
    out = []
    for img in low:
        sigma = rng.uniform(0.0, 0.8)
        if sigma > 0.05:
            r = torch.arange(-2, 3, dtype=torch.float32)
            k = torch.exp(-r ** 2 / (2 * sigma ** 2))
            k = k / k.sum()
            img = F.conv2d(F.pad(img[:, None], (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5))
            img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1))[:, 0]
        noise = torch.from_numpy(rng.standard_normal(img.shape).astype(np.float32)) * rng.uniform(0.0, 0.04)
        out.append((img + noise).clamp(-1, 1))
    return torch.stack(out)


@torch.no_grad()
def evaluate(sr, seed: int, n: int = 32, steps: int = 7) -> dict:
    """Upsample true 32×32 images with the engine's sampler (7 steps, the same net first and last): judge
    accuracy of the 64×64 results and their PSNR against the true renders."""
    from unclip import samplers
    from unclip.loading import SchedulerConfig
    from unclip.runner import Networks, denoiser, run_loop
    from unclip.stages import Stage
    scenes = shapes.sample_scenes(n, seed)
    x64, x32 = C.render_batch(scenes)
    up = upsample(x32)
    plan = samplers.make_plan(SchedulerConfig(**C.SUPER_RES_SCHEDULER), steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(x64.shape, generator=g)
    noise = [torch.randn(x.shape, generator=g) if d else None for d in plan.draws_noise]
    stage = Stage("super_res", "super_res", plan, x, noise, {"upscaled": up}, ("super_res.first", "super_res.last"),
                  None, torch.float32)
    x = run_loop(stage, denoiser(stage, Networks({"super_res.first": sr, "super_res.last": sr}))).clamp(-1, 1)
    mse = ((x - x64) ** 2).mean().item() / 4  # in [0, 1] units
    images = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    judged = shapes.judge_batch(images)
    acc = {a: round(sum(getattr(j, a) == getattr(s, a) for j, s in zip(judged, scenes)) / n, 4)
           for a in shapes.ATTRIBUTES}
    return {**acc, "psnr": round(10 * np.log10(1 / mse), 2)}, images


def train(work: str, steps: int, batch: int, seed: int, lr: float, ema_decay: float) -> dict:
    log = C.Log(os.path.join(work, "train.log"), "upsampler")
    rng = C.seed_everything(seed)
    sr = C.build("super_res", C.super_res_config(), seed)
    log(f"upsampler {C.count_params(sr)/1e6:.2f}M params")
    opt = torch.optim.AdamW(sr.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = C.cosine_lr(opt, steps)
    ema = C.EMA(sr, ema_decay)
    schedule = C.Schedule()
    sr.train()
    size = shapes.IMAGE_SIZE
    for step in range(steps):
        scenes = shapes.sample_scenes(batch, rng)
        x64, x32 = C.render_batch(scenes)
        up = upsample(degrade(x32, rng))
        # One random window per image (even offsets keep the 2×2 grid of the low-res image aligned).
        oy, ox = (2 * rng.integers(0, (size - CROP) // 2 + 1, size=(2, batch))).tolist()
        x0 = torch.stack([x64[i, :, oy[i]:oy[i] + CROP, ox[i]:ox[i] + CROP] for i in range(batch)])
        cond = torch.stack([up[i, :, oy[i]:oy[i] + CROP, ox[i]:ox[i] + CROP] for i in range(batch)])
        t = torch.from_numpy(rng.integers(0, schedule.num_steps, size=batch))
        noise = torch.randn(x0.shape)
        out = sr(torch.cat([schedule.add_noise(x0, noise, t), cond], 1), t)
        target = x0 if C.SUPER_RES_SCHEDULER["prediction_type"] == "sample" else noise
        loss = F.mse_loss(out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sr.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(sr, step)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
    ema.copy_to(sr)
    sr.eval()
    metrics, images = evaluate(sr, seed + 4000)
    log(f"upsampler-alone accuracy (64×64 from true 32×32) {metrics}")
    from PIL import Image
    Image.fromarray(np.concatenate([np.concatenate(list(images[r * 8:(r + 1) * 8]), 1) for r in range(4)], 0)
                    ).save(os.path.join(work, "upsampler_samples.png"))
    C.save_checkpoint(os.path.join(work, "upsampler.pt"), super_res=sr.state_dict(), metrics=metrics,
                      scheduler=dict(C.SUPER_RES_SCHEDULER),
                      seconds=log.elapsed)
    log(f"done in {log.elapsed:.0f}s")
    return metrics


def main(argv=None):
    p = C.stage_parser(__doc__, "upsampler")
    p.add_argument("--ema", type=float, default=0.995)
    a = p.parse_args(argv)
    train(a.work, a.steps, a.batch, a.seed, a.lr, a.ema)


if __name__ == "__main__":
    main()
