"""Stage 1: the CLIP text and image towers, trained contrastively on the shapes world.

A caption that leaves attributes out is true of many images, so the loss is contrastive with several
positives: in a batch, image i's target distribution over captions is uniform over every caption that
describes it (and the same the other way). A small penalty keeps embedding norms near 1, so the raw
embeddings the prior and decoder use are (almost) the unit vectors CLIP compares.

    python training/train_clip.py --work /tmp/toy-work [--steps N --batch B --seed S]
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


def init_position_table(image) -> None:
    """2-D sine/cosine start values for the image tower's position table (class token: zeros), at the scale
    of the patch embeddings, so position is visible from the first step."""
    table = image.vision_model.embeddings.position_embedding.weight
    side = int(round(math.sqrt(table.shape[0] - 1)))
    width = table.shape[1]
    quarter = width // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter) / quarter)
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    feats = [f(c.reshape(-1, 1) * freqs) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    with torch.no_grad():
        table.zero_()
        table[1:, :4 * quarter] = 0.5 * torch.cat(feats, dim=1)


def attribute_loss(logits, codes, sizes):
    """Cross-entropy of each attribute's slice of `logits` (codes of -1 = not named: ignored)."""
    total, start = 0.0, 0
    for k, n in enumerate(sizes):
        named = (codes[:, k] >= 0).sum().clamp(min=1)
        total = total + F.cross_entropy(logits[:, start:start + n], codes[:, k], ignore_index=-1,
                                        reduction="sum") / named
        start += n
    return total / len(sizes)


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


def train(work: str, steps: int, batch: int, seed: int, lr: float, image_overrides: dict | None = None) -> dict:
    log = C.Log(os.path.join(work, "train.log"), "clip")
    rng = C.seed_everything(seed)
    tokenizer = C.build_tokenizer()
    table = C.CaptionTable(tokenizer)
    text = C.build("text_encoder", C.text_encoder_config(tokenizer.vocab_size), seed)
    image_cfg = {**C.image_encoder_config(), **(image_overrides or {})}
    image = C.build("image_encoder", image_cfg, seed + 1)
    log(f"text tower {C.count_params(text)/1e6:.2f}M params, image tower {C.count_params(image)/1e6:.2f}M, "
        f"vocab {tokenizer.vocab_size}, {len(table.captions)} captions of <= {table.text_length} tokens")
    init_position_table(image)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))
    # Auxiliary linear read-outs of every attribute from each embedding (discarded after training): they make
    # the embeddings encode the attributes linearly and early, which the short schedule needs.
    sizes = [len(C.ATTR_VALUES[a]) for a in shapes.ATTRIBUTES]
    heads = torch.nn.ModuleList([torch.nn.Linear(C.CLIP_DIM, sum(sizes)) for _ in range(2)])
    params = list(text.parameters()) + list(image.parameters()) + list(heads.parameters())
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
        codes_i, codes_t = C.scene_codes(scenes), table.codes[captions]
        # (cosine classifiers: unit embeddings, logits scaled by 10)
        aux = attribute_loss(10 * heads[0](i_emb), codes_i, sizes) + attribute_loss(10 * heads[1](t_emb), codes_t, sizes)
        loss = (loss_images + loss_texts) / 2 + 0.1 * norm_penalty + 0.5 * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step} loss {loss.item():.4f} (images {loss_images.item():.3f} texts {loss_texts.item():.3f}"
                f" norm {norm_penalty.item():.4f} aux {aux.item():.3f}) scale {log_scale.exp().item():.1f}")
    text.eval(), image.eval()
    metrics = evaluate(text, image, table, seed + 1000)
    log(f"zero-shot attribute accuracy {metrics}")
    C.save_checkpoint(os.path.join(work, "clip.pt"), text=text.state_dict(), image=image.state_dict(),
                      image_config=image_cfg,
                      metrics=metrics, seconds=log.elapsed)
    log(f"done in {log.elapsed:.0f}s")
    return metrics


def main(argv=None):
    p = C.stage_parser(__doc__, "clip")
    p.add_argument("--patch", type=int, default=None, help="image tower patch size (default: common.py's)")
    p.add_argument("--width", type=int, default=None, help="image tower width")
    p.add_argument("--layers", type=int, default=None, help="image tower layers")
    a = p.parse_args(argv)
    overrides = {}
    if a.patch:
        overrides["patch_size"] = a.patch
    if a.width:
        overrides.update(hidden_size=a.width, intermediate_size=4 * a.width)
    if a.layers:
        overrides["num_hidden_layers"] = a.layers
    train(a.work, a.steps, a.batch, a.seed, a.lr, overrides)


if __name__ == "__main__":
    main()
