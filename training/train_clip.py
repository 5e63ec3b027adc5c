"""Stage 1: the CLIP text and image towers, trained contrastively on the shapes world.

A caption that leaves attributes out is true of many images, so the loss is contrastive with several
positives: in a batch, image i's target distribution over captions is uniform over every caption that
describes it (and the same the other way). A small penalty keeps embedding norms near 1, so the raw
embeddings the prior and decoder use are (almost) the unit vectors CLIP compares.

    python training/train_clip.py --work /tmp/toy-work [--steps N --batch B --seed S]
"""
from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from unclip import shapes  # noqa: E402


def evaluate(text, image, table, seed: int, n: int = 512) -> dict:
    """Per-attribute accuracy of zero-shot classification: each image against every full caption."""
    full = [i for i, codes in enumerate(table.codes.tolist()) if -1 not in codes]
    scenes = shapes.sample_scenes(n, seed)
    im64, im32 = C.render_batch(scenes)
    with torch.no_grad():
        t_emb = F.normalize(text(table.ids[full])[0], dim=-1)
        result = {}
        for name, pixels in (("area", im32), ("bicubic", C.clip_pixels(im64))):
            i_emb = F.normalize(image(pixels)[0], dim=-1)
            best = (i_emb @ t_emb.T).argmax(1)
            predicted = table.codes[full][best]
            truth = C.scene_codes(scenes)
            acc = (predicted == truth).float().mean(0)
            result[name] = {a: round(float(v), 4) for a, v in zip(shapes.ATTRIBUTES, acc)}
    return result


def train(work: str, steps: int, batch: int, seed: int, lr: float) -> dict:
    log = C.Log(os.path.join(work, "train.log"), "clip")
    rng = C.seed_everything(seed)
    tokenizer = C.build_tokenizer()
    table = C.CaptionTable(tokenizer)
    text = C.build("text_encoder", C.text_encoder_config(tokenizer.vocab_size), seed)
    image = C.build("image_encoder", C.image_encoder_config(), seed + 1)
    log(f"text tower {C.count_params(text)/1e6:.2f}M params, image tower {C.count_params(image)/1e6:.2f}M, "
        f"vocab {tokenizer.vocab_size}, {len(table.captions)} captions of <= {table.text_length} tokens")
    log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    params = list(text.parameters()) + list(image.parameters())
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.01},
                             {"params": [log_scale], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    text.train(), image.train()
    for step in range(steps):
        scenes = shapes.sample_scenes(batch, rng)
        im64, im32 = C.render_batch(scenes)
        # Half the batches see the processor's bicubic resize (variations), half the 2×2 averages (training).
        pixels = im32 if step % 2 == 0 else C.clip_pixels(im64)
        captions = table.sample(scenes, rng)
        t_raw, _ = text(table.ids[captions])
        i_raw, _ = image(pixels)
        t_emb, i_emb = F.normalize(t_raw, dim=-1), F.normalize(i_raw, dim=-1)
        logits = log_scale.exp().clamp(max=100) * i_emb @ t_emb.T       # (images, captions)
        positive = C.describes(table.codes[captions], C.scene_codes(scenes)).T.float()
        loss_images = -(F.log_softmax(logits, 1) * positive / positive.sum(1, keepdim=True)).sum(1).mean()
        loss_texts = -(F.log_softmax(logits, 0) * positive / positive.sum(0, keepdim=True)).sum(0).mean()
        norm_penalty = ((i_raw.norm(dim=-1) - 1) ** 2).mean() + ((t_raw.norm(dim=-1) - 1) ** 2).mean()
        loss = (loss_images + loss_texts) / 2 + 0.1 * norm_penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} (images {loss_images.item():.3f} texts {loss_texts.item():.3f}"
                f" norm {norm_penalty.item():.4f}) scale {log_scale.exp().item():.1f}")
    text.eval(), image.eval()
    metrics = evaluate(text, image, table, seed + 1000)
    log(f"zero-shot attribute accuracy {metrics}")
    C.save_checkpoint(os.path.join(work, "clip.pt"), text=text.state_dict(), image=image.state_dict(),
                      metrics=metrics, seconds=log.elapsed)
    log(f"done in {log.elapsed:.0f}s")
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    a = p.parse_args(argv)
    train(a.work, a.steps, a.batch, a.seed, a.lr)


if __name__ == "__main__":
    main()
