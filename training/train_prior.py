"""Stage 2: the diffusion prior (caption -> CLIP image embedding), predicting x0 with CFG dropout.

The prior works on image embeddings normalised per dimension by their dataset mean and standard deviation
(stored in the model's `clip_mean` / `clip_std`, which `post_process_latents` undoes); the scheduler clips
its x0 predictions to ±5 in that space. 10 % of captions are replaced by the empty caption, the
unconditional half of classifier-free guidance.

    python training/train_prior.py --work /tmp/toy-work [--steps N --batch B --seed S]
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from unclip import shapes  # noqa: E402

CFG_DROP = 0.1


def load_clip(work: str, tokenizer):
    state = C.load_checkpoint(os.path.join(work, "clip.pt"))
    text = C.build("text_encoder", C.text_encoder_config(tokenizer.vocab_size), 0)
    image = C.build("image_encoder", state.get("image_config", C.image_encoder_config()), 0)
    text.load_state_dict(state["text"])
    image.load_state_dict(state["image"])
    return text.eval().requires_grad_(False), image.eval().requires_grad_(False)


@torch.no_grad()
def image_embeddings(image, pixels: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return torch.cat([image(pixels[i:i + chunk])[0] for i in range(0, len(pixels), chunk)])


@torch.no_grad()
def text_features(text, table):
    embeds, hidden = text(table.ids)
    return embeds, hidden, table.mask


@torch.no_grad()
def evaluate(prior, text, image, table, tokenizer, seed: int, n: int = 60) -> dict:
    """Sample embeddings for full captions with the engine's own sampler (full 77-token forward, CFG 4,
    25 steps) and classify them zero-shot against every full caption: per-attribute agreement."""
    from unclip import samplers
    from unclip.loading import SchedulerConfig
    from unclip.runner import Networks, denoiser, run_loop
    from unclip.stages import Stage
    scenes = shapes.sample_scenes(n, seed)
    prompts = [shapes.caption(s) for s in scenes]
    tok = tokenizer(prompts + [""])
    emb, hid = text(tok.input_ids)
    mask = tok.attention_mask
    cond = (emb[:n], hid[:n], mask[:n])
    uncond = (emb[n:].expand(n, -1), hid[n:].expand(n, -1, -1), mask[n:].expand(n, -1))
    both = [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    plan = samplers.make_plan(SchedulerConfig(**C.PRIOR_SCHEDULER), 25)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, prior.config.embedding_dim, generator=g)
    noise = [torch.randn(x.shape, generator=g) if d else None for d in plan.draws_noise]
    stage = Stage("prior", "prior", plan, x, noise, dict(zip(("text_embeds", "text_hidden", "text_mask"), both)),
                  ("prior",), 4.0, torch.float32)
    x = run_loop(stage, denoiser(stage, Networks({"prior": prior})))
    z = F.normalize(prior.post_process_latents(x), dim=-1)
    full = [i for i, codes in enumerate(table.codes.tolist()) if -1 not in codes]
    t_full = F.normalize(text(table.ids[full])[0], dim=-1)
    predicted = table.codes[full][(z @ t_full.T).argmax(1)]
    acc = (predicted == C.scene_codes(scenes)).float().mean(0)
    # The same for the embeddings of the true images: the ceiling this check can reach.
    _, im32 = C.render_batch(scenes)
    z_true = F.normalize(image(im32)[0], dim=-1)
    ceiling = (table.codes[full][(z_true @ t_full.T).argmax(1)] == C.scene_codes(scenes)).float().mean(0)
    return {"sampled": {a: round(float(v), 4) for a, v in zip(shapes.ATTRIBUTES, acc)},
            "true_images": {a: round(float(v), 4) for a, v in zip(shapes.ATTRIBUTES, ceiling)},
            "cosine_to_true": round(float((z * z_true).sum(-1).mean()), 4)}


def train(work: str, steps: int, batch: int, seed: int, lr: float, num_images: int) -> dict:
    log = C.Log(os.path.join(work, "train.log"), "prior")
    rng = C.seed_everything(seed)
    tokenizer = C.build_tokenizer()
    table = C.CaptionTable(tokenizer)
    text, image = load_clip(work, tokenizer)

    scenes = shapes.sample_scenes(num_images, rng)
    _, pixels = C.render_batch(scenes)
    z = image_embeddings(image, pixels)
    mean, std = z.mean(0, keepdim=True), z.std(0, keepdim=True)
    t_embeds, t_hidden, t_mask = text_features(text, table)
    log(f"{num_images} image embeddings (mean norm {z.norm(dim=-1).mean():.3f}), text features of "
        f"{len(table.captions)} captions")

    prior = C.build("prior", C.prior_config(), seed)
    with torch.no_grad():
        prior.clip_mean.copy_(mean)
        prior.clip_std.copy_(std)
    prior.clip_mean.requires_grad_(False)
    prior.clip_std.requires_grad_(False)
    log(f"prior {C.count_params(prior)/1e6:.2f}M params")
    params = [p for p in prior.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    schedule = C.Schedule()
    prior.train()
    for step in range(steps):
        idx = torch.from_numpy(rng.integers(0, num_images, size=batch))
        captions = table.sample([scenes[i] for i in idx.tolist()], rng)
        captions[torch.from_numpy(rng.random(batch) < CFG_DROP)] = 0
        x0 = (z[idx] - mean) / std
        t = torch.from_numpy(rng.integers(0, schedule.num_steps, size=batch))
        noise = torch.randn(x0.shape)
        x_t = schedule.add_noise(x0, noise, t)
        pred = C.prior_forward(prior, x_t, t, t_embeds[captions], t_hidden[captions], t_mask[captions])
        loss = F.mse_loss(pred, x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e}")
    prior.eval()
    metrics = evaluate(prior, text, image, table, tokenizer, seed + 2000)
    log(f"sampled-embedding attribute accuracy {metrics}")
    C.save_checkpoint(os.path.join(work, "prior.pt"), prior=prior.state_dict(), metrics=metrics, seconds=log.elapsed)
    log(f"done in {log.elapsed:.0f}s")
    return metrics


def main(argv=None):
    p = C.stage_parser(__doc__, "prior")
    p.add_argument("--num-images", type=int, default=20000)
    a = p.parse_args(argv)
    train(a.work, a.steps, a.batch, a.seed, a.lr, a.num_images)


if __name__ == "__main__":
    main()
