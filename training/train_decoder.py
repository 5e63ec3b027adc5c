"""Stage 3: the decoder (32×32 base images from a CLIP image embedding and the caption), with text_proj.

Conditioned through `text_proj` exactly as the pipeline conditions it, with CFG dropout as in DALL-E 2: the
image embedding is replaced by text_proj's learned embedding 10 % of the time and the caption by the empty
caption 30 % of the time (independently; both are dropped in 3 % of samples, the unconditional half of
guidance). The shipped weights are an exponential moving average.

What made this small decoder learn in minutes rather than hours (see training/README.md):
- it predicts x0 ("sample"; the scheduler config says so), weighted by clamp(SNR, 1, 20): the layout of an
  image (background, position, size) is decided at the noisiest steps, where ε-prediction barely learns it;
- 40 % of every batch is drawn at t >= 700, the steps where only the conditioning can tell the layout;
- the four-level U-Net (down to 4×4) sees its zero padding well enough to learn absolute position.
Its 3 variance channels (learned_range, kept for Karlo's layout) are trained to select the posterior variance
(v = -1); ε-prediction with improved DDPM's variational bound is still available (--prediction epsilon).

    python training/train_decoder.py --work /tmp/toy-work [--steps N --batch B --seed S]
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from train_prior import load_clip, text_features  # noqa: E402
from unclip import shapes  # noqa: E402

IMAGE_DROP, TEXT_DROP = 0.1, 0.3


def condition(text_proj, z, captions, features, image_dropped):
    """(context tokens, context mask, additive time embedding) for a training batch."""
    t_embeds, t_hidden, t_mask = features
    learned = text_proj.learned_classifier_free_guidance_embeddings.expand_as(z)
    z = torch.where(image_dropped[:, None], learned, z)
    context, time_embed = text_proj(z, t_embeds[captions], t_hidden[captions], False)
    mask = F.pad(t_mask[captions], (context.shape[1] - t_mask.shape[1], 0), value=True)
    return context, mask, time_embed


@torch.no_grad()
def evaluate(decoder, text_proj, image, table, features, seed: int, n: int = 32, steps: int = 25,
             scale: float = 8.0, prediction: str = "epsilon") -> dict:
    """Decode the true images' embeddings with their full captions (engine sampler, CFG), judge the 32×32
    results: per-attribute accuracy of the decoder alone."""
    from unclip import samplers
    from unclip.loading import SchedulerConfig
    from unclip.runner import Networks, denoiser, run_loop
    from unclip.stages import Stage
    scenes = shapes.sample_scenes(n, seed)
    _, im32 = C.render_batch(scenes)
    z = image(im32)[0]
    captions = torch.tensor([table.index[shapes.caption(s)] for s in scenes])
    t_embeds, t_hidden, t_mask = features
    rows = torch.cat([torch.zeros(n, dtype=torch.long), captions])
    context, time_embed = text_proj(z, t_embeds[rows], t_hidden[rows], True)
    mask = F.pad(t_mask[rows], (context.shape[1] - t_mask.shape[1], 0), value=True)
    plan = samplers.make_plan(SchedulerConfig(**{**C.DECODER_SCHEDULER, "prediction_type": prediction}), steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, C.BASE_SIZE, C.BASE_SIZE, generator=g)
    noise = [torch.randn(x.shape, generator=g) if d else None for d in plan.draws_noise]
    stage = Stage("decoder", "decoder", plan, x, noise, {"context": context, "time_embed": time_embed, "mask": mask},
                  ("decoder",), scale, torch.float32, learned_variance_channels=3)
    x = run_loop(stage, denoiser(stage, Networks({"decoder": decoder}))).clamp(-1, 1)
    images = ((x + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    judged = shapes.judge_batch(images)
    acc = {a: sum(getattr(j, a) == getattr(s, a) for j, s in zip(judged, scenes)) / n for a in shapes.ATTRIBUTES}
    return {a: round(v, 4) for a, v in acc.items()}, images


def train(work: str, steps: int, batch: int, seed: int, lr: float, ema_decay: float, prediction: str = "epsilon",
          max_weight: float | None = 20.0, high_noise: float = 0.0) -> dict:
    log = C.Log(os.path.join(work, "train.log"), "decoder")
    rng = C.seed_everything(seed)
    tokenizer = C.build_tokenizer()
    table = C.CaptionTable(tokenizer)
    text, image = load_clip(work, tokenizer)
    features = text_features(text, table)

    text_proj = C.build("text_proj", C.text_proj_config(), seed)
    with torch.no_grad():
        # CLIP embeddings are unit vectors (components ~0.1): start their projections 4x larger than PyTorch's
        # default so the conditioning is not drowned by the time embedding at first.
        for layer in (text_proj.clip_image_embeddings_project_to_time_embeddings, text_proj.embedding_proj,
                      text_proj.clip_extra_context_tokens_proj):
            layer.weight.mul_(4.0)
    decoder = C.build("decoder", C.decoder_config(), seed + 1)
    log(f"decoder {C.count_params(decoder)/1e6:.2f}M params, text_proj {C.count_params(text_proj)/1e6:.2f}M")
    modules = torch.nn.ModuleDict({"decoder": decoder, "text_proj": text_proj})
    params = list(modules.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = C.cosine_lr(opt, steps)
    ema = C.EMA(modules, ema_decay)
    schedule = C.Schedule()
    modules.train()
    for step in range(steps):
        scenes = shapes.sample_scenes(batch, rng)
        _, x0 = C.render_batch(scenes)
        with torch.no_grad():
            z = image(x0)[0]
        captions = table.sample(scenes, rng)
        captions[torch.from_numpy(rng.random(batch) < TEXT_DROP)] = 0
        image_dropped = torch.from_numpy(rng.random(batch) < IMAGE_DROP)
        t = torch.from_numpy(rng.integers(0, schedule.num_steps, size=batch))
        if high_noise:
            # A share of each batch at the noisiest steps (t >= 700), where the layout is decided.
            high = torch.from_numpy(rng.random(batch) < high_noise)
            t = torch.where(high, torch.from_numpy(rng.integers(700, schedule.num_steps, size=batch)), t)
        noise = torch.randn(x0.shape)
        x_t = schedule.add_noise(x0, noise, t)
        context, mask, time_embed = condition(text_proj, z, captions, features, image_dropped)
        out = decoder(x_t, t, context, time_embed, mask)
        pred, v = out[:, :3], out[:, 3:]
        if prediction == "sample":
            # x0-MSE weighted by clamp(SNR, 1, Γ): plain x0-MSE where the noise is strong (the layout: background,
            # position, size, which only the conditioning can tell), ε-MSE-like weight (up to Γ) where it is weak
            # (sharp edges)
            per_sample = ((pred - x0) ** 2).flatten(1).mean(1)
            if max_weight:
                per_sample = per_sample * torch.clamp(schedule.snr(t), min=1.0, max=max_weight)
            # The variance channels select the posterior variance β̃ (v = -1): the bound-optimal learned variance
            # of an x0 model this briefly trained is far too large for 25-step sampling (it adds noise the model
            # then reads as content).
            vb = ((v + 1) ** 2).mean()
        else:
            # ε-MSE weighted by clamp(1/SNR, 1, Γ): at low noise plain ε-MSE (sharp details); at high noise the
            # x0-MSE (ε-MSE/SNR), capped at Γ. Plain ε-MSE gives the noisiest steps almost no weight, yet those
            # decide the layout (background, position, size), and only the conditioning can tell it there.
            per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
            if max_weight:
                per_sample = per_sample * torch.clamp(1.0 / schedule.snr(t), min=1.0, max=max_weight)
            vb = schedule.variance_loss(schedule.x0_from_eps(x_t, pred, t), v, x0, x_t, t)
        mse = per_sample.mean()
        loss = mse + vb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update(modules, step)
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} (mse {mse.item():.4f} vb {vb.item():.4f}) "
                f"lr {sched.get_last_lr()[0]:.2e}")
        if (step + 1) % 1000 == 0 and step + 1 < steps:
            C.save_checkpoint(os.path.join(work, "decoder.partial.pt"), ema=ema.shadow, step=step + 1)
    ema.copy_to(modules)
    modules.eval()
    metrics, images = evaluate(decoder, text_proj, image, table, features, seed + 3000, prediction=prediction)
    log(f"decoder-alone attribute accuracy (32×32, true embeddings) {metrics}")
    from PIL import Image
    import numpy as np
    Image.fromarray(np.concatenate([np.concatenate(list(images[r * 8:(r + 1) * 8]), 1) for r in range(4)], 0)
                    ).resize((512, 256), Image.NEAREST).save(os.path.join(work, "decoder_samples.png"))
    C.save_checkpoint(os.path.join(work, "decoder.pt"), decoder=decoder.state_dict(), text_proj=text_proj.state_dict(),
                      scheduler={**C.DECODER_SCHEDULER, "prediction_type": prediction}, metrics=metrics,
                      seconds=log.elapsed)
    log(f"done in {log.elapsed:.0f}s")
    return metrics


def main(argv=None):
    p = C.stage_parser(__doc__, "decoder")
    p.add_argument("--ema", type=float, default=0.998)
    recipe = C.RECIPE["decoder"]
    p.add_argument("--prediction", choices=("epsilon", "sample"), default=recipe["prediction"])
    p.add_argument("--max-weight", type=float, default=recipe["max-weight"],
                   help="loss weight: x0-MSE × clamp(SNR, 1, MAX), or ε-MSE × clamp(1/SNR, 1, MAX) (0 = unweighted)")
    p.add_argument("--high-noise", type=float, default=recipe["high-noise"],
                   help="share of samples drawn at t >= 700 instead of uniformly")
    a = p.parse_args(argv)
    train(a.work, a.steps, a.batch, a.seed, a.lr, a.ema, a.prediction, a.max_weight or None, a.high_noise)


if __name__ == "__main__":
    main()
