"""Shared pieces of the toy-cascade training: architecture configs, data from the shapes world, the noise
schedule, exact short-sequence forwards, logging and checkpoints.

Every network is the engine's own class (unclip.models.*), built from the same config dicts the engine
loads, so what is trained is exactly what `unclip.Pipeline` runs. Captions are at most 13 tokens, while the
text tower, the prior and the decoder's context keep CLIP's 77 positions. Training therefore runs on the
first `text_length` positions only; this is exact, not an approximation: the text tower is causal (a real
token never sees the padding after it), and the prior and the decoder mask padded tokens out as keys, so
the outputs that matter are the same as with all 77 positions (tests/test_toy.py checks this).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from unclip import shapes
from unclip.config import Config
from unclip.loading import model_classes
from unclip.samplers import alphas_cumprod_for, betas_for
from unclip.tokenizer import CLIPTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET_DIR = os.path.join(REPO, "engine", "assets", "toy")

CLIP_DIM = 64          # CLIP embedding width = text tower width (the prior and text_proj read both)
BASE_SIZE = 32         # decoder resolution; the upsampler goes to shapes.IMAGE_SIZE (64)

# ------------------------------------------------------------------------------------------ architectures

def text_encoder_config(vocab_size: int) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": vocab_size, "hidden_size": CLIP_DIM, "intermediate_size": 4 * CLIP_DIM,
            "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 77,
            "projection_dim": CLIP_DIM, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            # Legacy CLIP ids: pooling takes the argmax of the ids, i.e. the end-of-text token (largest id).
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def image_encoder_config() -> dict:
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_channels": 3, "image_size": BASE_SIZE, "patch_size": 8, "projection_dim": CLIP_DIM,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


def prior_config() -> dict:
    return {"_class_name": "PriorTransformer", "num_attention_heads": 4, "attention_head_dim": 32,
            "num_layers": 4, "embedding_dim": CLIP_DIM, "num_embeddings": 77, "additional_embeddings": 4,
            "dropout": 0.0}


def text_proj_config() -> dict:
    return {"_class_name": "UnCLIPTextProjModel", "clip_extra_context_tokens": 4, "clip_embeddings_dim": CLIP_DIM,
            "time_embed_dim": 64, "cross_attention_dim": 64}


def decoder_config() -> dict:
    # Four levels (32, 16, 8, 4): a U-Net has no position embeddings and learns where "left" is only from its
    # zero padding, which the 4×4 level makes easy to see.
    channels = (16, 32, 64, 64)
    n = len(channels)
    return {"_class_name": "UNet2DConditionModel", "sample_size": BASE_SIZE, "in_channels": 3, "out_channels": 6,
            "layers_per_block": 1, "block_out_channels": list(channels),
            "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
            "cross_attention_dim": 64, "attention_head_dim": 16, "class_embed_type": "identity",
            "resnet_time_scale_shift": "scale_shift", "norm_num_groups": 8}


def super_res_config() -> dict:
    return {"_class_name": "UNet2DModel", "sample_size": shapes.IMAGE_SIZE, "in_channels": 6, "out_channels": 3,
            "layers_per_block": 1, "block_out_channels": [16, 32],
            "down_block_types": ["ResnetDownsampleBlock2D"] * 2, "up_block_types": ["ResnetUpsampleBlock2D"] * 2,
            "add_attention": False, "norm_num_groups": 8}


# Scheduler settings of each stage (Karlo's, docs/architecture.md); written into the assembled folder.
PRIOR_SCHEDULER = {"variance_type": "fixed_small_log", "prediction_type": "sample", "clip_sample": True,
                   "clip_sample_range": 5.0}
DECODER_SCHEDULER = {"variance_type": "learned_range", "prediction_type": "epsilon", "clip_sample": True,
                     "clip_sample_range": 1.0}
# The upsampler predicts the clean image (Karlo's predicts ε): with 7 steps from pure noise, ε-prediction turns
# small errors at the first, noisiest steps into global colour shifts; x0-prediction has no such amplification.
SUPER_RES_SCHEDULER = {"variance_type": "fixed_small_log", "prediction_type": "sample", "clip_sample": True,
                       "clip_sample_range": 1.0}
# Steps, batch sizes and learning rates of the shipped weights (seed 0); each stage script's defaults.
RECIPE = {
    "clip": {"steps": 2000, "batch": 128, "lr": 3e-3},
    "prior": {"steps": 2500, "batch": 64, "lr": 1e-3},
    "decoder": {"steps": 8000, "batch": 16, "lr": 2e-3, "prediction": "sample", "max-weight": 20, "high-noise": 0.4},
    "upsampler": {"steps": 1500, "batch": 32, "lr": 1e-3},
}


def stage_parser(doc: str, stage: str):
    """The arguments every stage script takes (--work, --seed, and --steps/--batch/--lr defaulting to RECIPE)."""
    import argparse
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for checkpoints and logs")
    p.add_argument("--seed", type=int, default=0)
    for key in ("steps", "batch"):
        p.add_argument(f"--{key}", type=int, default=RECIPE[stage][key])
    p.add_argument("--lr", type=float, default=RECIPE[stage]["lr"])
    return p


# Guidance scales the toy model recommends (model_index.json "_unclip_call_defaults"; the pipeline uses them
# when a call gives none). Karlo's decoder scale of 8 over-saturates a decoder this small (caption match on 80
# prompts: colour 94 % / shape 82 % at 8, 100 % / 91 % at 2); chosen by benchmarks/caption_match.py sweeps.
CALL_DEFAULTS = {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 2.0}

# What CLIPImageProcessor does before the image tower: resize to 32, scale to [0, 1], normalise to [-1, 1].
IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor",
    "do_resize": True, "size": {"shortest_edge": BASE_SIZE}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": BASE_SIZE, "width": BASE_SIZE}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
}


def build(kind: str, cfg: dict, seed: int) -> torch.nn.Module:
    """A freshly initialised fp32 network of the engine's class for component `kind`."""
    cls = model_classes()[kind][1]
    torch.manual_seed(seed)
    model = cls(cls.config_class.from_config(Config(cfg, f"toy {kind} config")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Parameters the module leaves at zero (position tables, the prd query, CFG embedding) get small
            # noise, as the reference implementations initialise them; clip_std starts at 1.
            if name.endswith(("positional_embedding", "prd_embedding", "position_embedding.weight", "token_embedding.weight",
                              "class_embedding", "learned_classifier_free_guidance_embeddings")):
                p.normal_(0.0, 0.02)
            elif name == "clip_std":
                p.fill_(1.0)
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ tokenizer, captions

def build_tokenizer():
    """BPE over every caption of the world (every word ends up one token); deterministic.

    The shipped toy's tokenizer (engine/assets/toy/tokenizer) came from the engine's earlier hand-written
    trainer: the same 86 merges' worth of vocabulary (600 ids) but another merge order, so a fresh run here
    numbers the tokens differently and must train every network (train_all.py does)."""
    return CLIPTokenizer.train(shapes.all_captions(), num_merges=4000)


ATTR_VALUES = {"colour": tuple(shapes.COLOURS), "shape": shapes.SHAPES, "size": shapes.SIZES,
                "position": shapes.POSITIONS, "background": tuple(shapes.BACKGROUNDS)}
# How often each attribute is named in a training caption (the rest are left to the model).
KEEP_PROBABILITY = {"colour": 0.9, "shape": 0.9, "size": 0.65, "position": 0.75, "background": 0.65}


class CaptionTable:
    """Every caption of the world (plus "", index 0) tokenised once, truncated to the longest caption."""

    def __init__(self, tokenizer):
        self.captions = [""] + shapes.all_captions()
        self.index = {c: i for i, c in enumerate(self.captions)}
        tokens = tokenizer(self.captions)
        self.text_length = int(tokens.attention_mask.sum(1).max())
        self.ids = tokens.input_ids[:, :self.text_length].clone()
        self.mask = tokens.attention_mask[:, :self.text_length].clone()
        # Attribute codes per caption (-1 = not named), to know which images a caption describes.
        codes = []
        for c in self.captions:
            named = shapes.parse_caption(c)
            codes.append([ATTR_VALUES[a].index(named[a]) if a in named else -1 for a in shapes.ATTRIBUTES])
        self.codes = torch.tensor(codes)

    def sample(self, scenes, rng: np.random.Generator) -> torch.Tensor:
        """A caption index per scene, naming each attribute with its KEEP_PROBABILITY."""
        out = []
        for s in scenes:
            keep = [a for a in shapes.ATTRIBUTES if rng.random() < KEEP_PROBABILITY[a]]
            out.append(self.index[shapes.caption(s, keep)])
        return torch.tensor(out)


def scene_codes(scenes) -> torch.Tensor:
    return torch.tensor([[ATTR_VALUES[a].index(getattr(s, a)) for a in shapes.ATTRIBUTES] for s in scenes])


def describes(caption_codes: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
    """(captions, images) bool: caption i is true of image j (every attribute it names matches)."""
    c, i = caption_codes[:, None, :], image_codes[None, :, :]
    return ((c == -1) | (c == i)).all(-1)


# ------------------------------------------------------------------------------------------ images

def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1] (the cascade's image space)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def render_batch(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """(64×64 images, 32×32 images = their 2×2 averages), both in [-1, 1]."""
    full = shapes.render(scenes)
    return to_tensor(full), to_tensor(shapes.downsample(full))


def clip_pixels(image64: torch.Tensor) -> torch.Tensor:
    """What the image processor gives the image tower for a 64×64 image in [-1, 1]: bicubic (antialiased)
    resize to 32, in [-1, 1]."""
    return F.interpolate(image64, size=(BASE_SIZE, BASE_SIZE), mode="bicubic", align_corners=False,
                         antialias=True).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ exact short forwards

def encode_text(text_encoder, ids: torch.Tensor):
    """(text_embeds (B, D), hidden states (B, L, D)) for truncated ids (B, L): the module's own forward."""
    return text_encoder(ids)


def prior_forward(prior, x_t, t, text_embeds, text_hidden, text_mask):
    """PriorTransformer.forward on a text sequence of any length L <= num_embeddings: text tokens keep their
    positions 0..L-1, the four trailing tokens keep theirs (num_embeddings..+3). Equal to the full forward
    whenever the dropped positions are padding."""
    c = prior.config
    b, length = text_hidden.shape[:2]
    from unclip.models.prior import sinusoidal_timestep_embedding
    time_tokens = prior.time_embedding(sinusoidal_timestep_embedding(t.expand(b), c.inner_dim))
    tokens = torch.cat([prior.encoder_hidden_states_proj(text_hidden), prior.embedding_proj(text_embeds)[:, None],
                        time_tokens[:, None], prior.proj_in(x_t)[:, None], prior.prd_embedding.expand(b, -1, -1)], 1)
    pos = prior.positional_embedding
    x = tokens + torch.cat([pos[:, :length], pos[:, c.num_embeddings:]], dim=1)
    mask = torch.cat([text_mask.bool(), text_mask.new_ones(b, c.additional_embeddings, dtype=torch.bool)], 1)
    if prior.norm_in is not None:
        x = prior.norm_in(x)
    for block in prior.transformer_blocks:
        x = block(x, mask)
    return prior.proj_to_clip_embeddings(prior.norm_out(x[:, -1]))


# ------------------------------------------------------------------------------------------ diffusion

class Schedule:
    """The training noise schedule (squared cosine, 1000 steps), and q(x_t | x_0)."""

    def __init__(self, num_steps: int = 1000):
        self.num_steps = num_steps
        self.betas = betas_for("squaredcos_cap_v2", num_steps).double()
        self.alphas_cumprod = alphas_cumprod_for(self.betas)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.alphas_cumprod_prev = prev
        self.posterior_variance = self.betas * (1 - prev) / (1 - self.alphas_cumprod)
        # log of the posterior variance with its t = 0 value (0) replaced by t = 1's, as improved DDPM does
        self.posterior_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.mean_coef_x0 = self.betas * prev.sqrt() / (1 - self.alphas_cumprod)
        self.mean_coef_xt = (1 - prev) * (1 - self.betas).sqrt() / (1 - self.alphas_cumprod)

    def at(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return values[t].float().view(-1, *([1] * (ndim - 1)))

    def add_noise(self, x0, noise, t):
        ab = self.at(self.alphas_cumprod, t, x0.dim())
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod[t].float()
        return ab / (1 - ab)

    def x0_from_eps(self, x_t, eps, t):
        ab = self.at(self.alphas_cumprod, t, x_t.dim())
        return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()

    def variance_loss(self, x0_pred, v_pred, x0, x_t, t):
        """Improved DDPM's L_vlb term for learned_range variance (KL of the true posterior from the model's
        step, in bits per dimension), with the mean taken from the detached x0 prediction so it only trains
        the variance. Steps t = 0 are left out (the sampler's last step adds no noise)."""
        n = x0.dim()
        c0, ct = self.at(self.mean_coef_x0, t, n), self.at(self.mean_coef_xt, t, n)
        true_mean = c0 * x0 + ct * x_t
        true_log_var = self.at(self.posterior_log_variance, t, n)
        x0_pred = x0_pred.detach()
        model_mean = c0 * x0_pred + ct * x_t
        frac = (v_pred + 1) / 2
        model_log_var = frac * self.at(self.betas.log(), t, n) + (1 - frac) * true_log_var
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        return (kl * (t > 0).float()).mean()


# ------------------------------------------------------------------------------------------ bookkeeping

def seed_everything(seed: int) -> np.random.Generator:
    # One thread: these networks are small, and on a shared 2-core machine two threads that wait for each
    # other run up to 10x slower than one. Stages that are independent run as parallel processes instead.
    torch.set_num_threads(int(os.environ.get("TOY_THREADS", "1")))
    random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


class Log:
    """Prints to stdout and appends to a log file, with the time since the stage started."""

    def __init__(self, path: str, stage: str):
        self.path, self.stage, self.start = path, stage, time.time()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"[{self.stage} {time.time() - self.start:7.1f}s] {message}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")

    @property
    def elapsed(self) -> float:
        return time.time() - self.start


def save_checkpoint(path: str, **items) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(items, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def write_json(path: str, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def ensure_importable() -> None:
    """Let scripts run as `python training/xxx.py` from anywhere."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


class EMA:
    """Exponential moving average of a model's parameters (what is shipped: smoother than the last step)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Warm-up form: early on the average follows the weights closely.
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict(self.shadow)


def cosine_lr(opt, steps: int, floor: float = 0.1):
    """Linear warm-up over 5 % of the steps, then cosine decay to `floor` × the base rate."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup)
        * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
