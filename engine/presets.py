"""Random-weight cascades of known shapes: `tiny` (seconds on a CPU), `karlo` (exactly Karlo v1 alpha's
configs, docs/architecture.md) and `dalle2` (the paper's sizes, with a second, 256→1024 upsampler). Plus `toy`, the one
preset with trained weights: a small cascade for the shapes world (`unclip.shapes`), loaded from engine/assets/toy.

Configs are written as the `config.json` dicts the reference libraries use, so a preset goes through the
same validation as a folder on disk, and `Pipeline.save_pretrained` writes a folder diffusers can load.
"""
from __future__ import annotations

import math
import os

import torch

from .config import Config
from .loading import Components, SchedulerConfig, Upsampler, model_classes

PRESETS = ("tiny", "karlo", "dalle2", "toy")
# The embedded default: a small cascade trained on the shapes world (unclip.shapes; training/ in the repo).
TOY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")
# Caption-like English (objects, colours, animals, styles, places) the random-weight presets' tokenizer is
# learned from, and how many BPE merges it learns: a small vocabulary keeps the tiny preset fast.
CORPUS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "preset_corpus.txt")
PRESET_MERGES = 400


def preset_corpus() -> list[str]:
    """The texts of `CORPUS_PATH` (one per line; '#' lines are comments)."""
    with open(CORPUS_PATH, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]


def preset_tokenizer():
    """The random-weight presets' tokenizer: BPE learned from `preset_corpus()` (deterministic)."""
    from .tokenizer import CLIPTokenizer
    return CLIPTokenizer.train(preset_corpus(), num_merges=PRESET_MERGES)


def _clip_text(vocab_size, width, layers, heads, projection_dim, max_positions=77):
    return {"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model",
            "vocab_size": vocab_size, "hidden_size": width, "intermediate_size": 4 * width,
            "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": max_positions,
            "projection_dim": projection_dim, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            # Legacy CLIP ids (eos_token_id 2): pooling takes the argmax of the ids, i.e. the eos token.
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def _clip_vision(width, layers, heads, projection_dim, image_size, patch_size):
    return {"architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
            "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
            "num_attention_heads": heads, "projection_dim": projection_dim, "image_size": image_size,
            "patch_size": patch_size, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


# openai/clip-vit-large-patch14's preprocessor_config.json, which Karlo's image-variation release ships as
# feature_extractor/ (legacy keys: int sizes, CLIPFeatureExtractor).
CLIP_VIT_L14_PREPROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def _clip_preprocessor(size):
    """CLIP's recipe (shortest side to `size`, bicubic, center crop, OpenAI mean/std) in current keys."""
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _prior(heads, head_dim, layers, embedding_dim):
    return {"_class_name": "PriorTransformer", "num_attention_heads": heads, "attention_head_dim": head_dim,
            "num_layers": layers, "embedding_dim": embedding_dim, "num_embeddings": 77, "additional_embeddings": 4,
            "dropout": 0.0}


def _text_proj(clip_dim, time_embed_dim, cross_attention_dim):
    return {"_class_name": "UnCLIPTextProjModel", "clip_extra_context_tokens": 4,
            "clip_embeddings_dim": clip_dim, "time_embed_dim": time_embed_dim,
            "cross_attention_dim": cross_attention_dim}


def _decoder(size, channels, layers, cross_attention_dim, head_dim, groups=32):
    n = len(channels)
    return {"_class_name": "UNet2DConditionModel", "sample_size": size, "in_channels": 3, "out_channels": 6,
            "layers_per_block": layers, "block_out_channels": list(channels),
            "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * (n - 1),
            "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
            "up_block_types": ["SimpleCrossAttnUpBlock2D"] * (n - 1) + ["ResnetUpsampleBlock2D"],
            "cross_attention_dim": cross_attention_dim, "attention_head_dim": head_dim,
            "class_embed_type": "identity", "resnet_time_scale_shift": "scale_shift", "norm_num_groups": groups}


def _super_res(size, channels, layers, groups=32):
    n = len(channels)
    return {"_class_name": "UNet2DModel", "sample_size": size, "in_channels": 6, "out_channels": 3,
            "layers_per_block": layers, "block_out_channels": list(channels),
            "down_block_types": ["ResnetDownsampleBlock2D"] * n, "up_block_types": ["ResnetUpsampleBlock2D"] * n,
            "add_attention": False, "norm_num_groups": groups}


PRIOR_SCHEDULER = SchedulerConfig(variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0)
DECODER_SCHEDULER = SchedulerConfig(variance_type="learned_range", prediction_type="epsilon")
SUPER_RES_SCHEDULER = SchedulerConfig(variance_type="fixed_small_log", prediction_type="epsilon")


def preset_configs(name: str) -> dict:
    """The config dicts of every network of preset `name` (keys are component names)."""
    if name == "tiny":
        return {
            "text_encoder": _clip_text(None, 32, 2, 2, 32),
            "prior": _prior(2, 16, 2, 32),
            "text_proj": _text_proj(32, 128, 64),
            "decoder": _decoder(16, (32, 64), 1, 64, 16, groups=8),
            "super_res": [_super_res(32, (32, 64), 1, groups=8)],
            "image_encoder": _clip_vision(32, 2, 2, 32, 32, 8),
            "feature_extractor": _clip_preprocessor(32),
        }
    if name == "karlo":
        return {
            "text_encoder": _clip_text(49408, 768, 12, 12, 768),
            "prior": _prior(32, 64, 20, 768),
            "text_proj": _text_proj(768, 1280, 1536),  # time_embed_dim = 4 × the decoder's 320 base channels
            "decoder": _decoder(64, (320, 640, 960, 1280), 3, 1536, 64),
            "super_res": [_super_res(256, (320, 640, 960, 1280), 3)],
            "image_encoder": _clip_vision(1024, 24, 16, 768, 224, 14),  # CLIP ViT-L/14 (docs/architecture.md)
            "feature_extractor": dict(CLIP_VIT_L14_PREPROCESSOR),
        }
    if name == "dalle2":
        # Paper sizes: prior ~1B, decoder ~3.5B, 64→256 ~700M, 256→1024 ~300M (the last two conv-only).
        return {
            "text_encoder": _clip_text(49408, 768, 12, 12, 768),
            "prior": _prior(32, 64, 20, 768),
            "text_proj": _text_proj(768, 2560, 2048),
            "decoder": _decoder(64, (640, 1280, 1920, 2560), 3, 2048, 64),
            "super_res": [_super_res(256, (320, 640, 960, 1280), 3), _super_res(1024, (224, 448, 672, 896), 2)],
            "image_encoder": _clip_vision(1024, 24, 16, 768, 224, 14),
            "feature_extractor": dict(CLIP_VIT_L14_PREPROCESSOR),
        }
    if name == "toy":
        raise ValueError("preset 'toy' is trained weights, not a random-weight config: load it with "
                         "build_preset('toy') or Pipeline.from_preset('toy')")
    raise ValueError(f"preset name must be one of {', '.join(PRESETS)}; got {name!r}")


_OUTPUT_HEADS = ("conv_out.", "proj_to_clip_embeddings.")


def randomize_weights_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Deterministic, scale-aware random weights (never zeros), drawn on the CPU in state-dict order."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.is_meta:
                continue
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if p.dim() >= 2:  # linear/conv/embedding: unit-variance outputs
                fan_in = max(1, p[0].numel()) if p.shape[0] > 1 else p.shape[-1]
                value = noise / math.sqrt(fan_in)
            elif "norm" in name and leaf == "weight" or leaf == "clip_std":
                value = 1.0 + 0.05 * noise
            else:
                value = 0.02 * noise
            if name.startswith(_OUTPUT_HEADS):
                # Keep outputs in the range trained nets produce (ε ~ unit scale, learned-variance v in
                # [-1, 1], embeddings inside the clip range); larger ones make sampling chaotic.
                value = value * 0.1
            p.copy_(value.to(p.dtype))


def toy_installed() -> bool:
    """Whether this installation has the trained `toy` weights (engine/assets/toy)."""
    return os.path.isfile(os.path.join(TOY_PATH, "model_index.json"))


def default_preset() -> str:
    """The CLI's model when none is named: the trained `toy` cascade if this installation has its weights."""
    return "toy" if toy_installed() else "tiny"


def build_preset(name: str, *, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> Components:
    """A random-weight cascade. `device="meta"` builds the structure only (for sizes of the large presets).
    "toy" is the exception: the trained shapes-world cascade shipped in engine/assets/toy (`seed` is unused)."""
    if name == "toy":
        from .loading import load_components
        if not toy_installed():
            raise ValueError(f"preset 'toy' needs the trained weights in {TOY_PATH}, which this installation "
                             "does not have (see training/); use a random-weight preset: tiny, karlo, dalle2")
        return load_components(TOY_PATH, device=device, dtype=dtype)
    return build_components(preset_configs(name), seed=seed, device=device, dtype=dtype, label=f"preset '{name}'")


def build_components(configs: dict, *, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32,
                     label: str = "config") -> Components:
    """A random-weight cascade from config dicts shaped like `preset_configs`' result."""
    classes = model_classes()
    generator = torch.Generator().manual_seed(seed)

    def build(kind, cfg_dict, what):
        cls = classes[kind][1]
        config = cls.config_class.from_config(Config(cfg_dict, f"{label}: {what}"))
        with torch.device("meta"):
            module = cls(config).to(dtype)  # free on meta: later storage is allocated in `dtype` directly
        if device != "meta":
            module = module.to_empty(device=device)
            randomize_weights_(module, generator)
        return module.eval().requires_grad_(False)

    tokenizer = preset_tokenizer()
    text_cfg = dict(configs["text_encoder"])
    if text_cfg["vocab_size"] is None:
        text_cfg["vocab_size"] = tokenizer.vocab_size
    sr_schedulers = [SUPER_RES_SCHEDULER] * len(configs["super_res"])
    upsamplers = []
    for i, sr_cfg in enumerate(configs["super_res"]):
        name = "super_res" if i == 0 else f"super_res_{i + 1}"
        first = build("super_res", sr_cfg, f"{name}_first")
        # Karlo's first upsampler has a separate last-step network; later upsamplers reuse one.
        last = build("super_res", sr_cfg, f"{name}_last") if i == 0 else first
        upsamplers.append(Upsampler(name, first, last, sr_schedulers[i]))
    has_prior = configs.get("prior") is not None  # None: an image-variation cascade (no prior)
    return Components(
        tokenizer=tokenizer,
        text_encoder=build("text_encoder", text_cfg, "text_encoder"),
        prior=build("prior", configs["prior"], "prior") if has_prior else None,
        prior_scheduler=PRIOR_SCHEDULER if has_prior else None,
        text_proj=build("text_proj", configs["text_proj"], "text_proj"),
        decoder=build("decoder", configs["decoder"], "decoder"),
        decoder_scheduler=DECODER_SCHEDULER,
        upsamplers=upsamplers,
        # Built last, so adding it left every other network's random weights as they were.
        image_encoder=(build("image_encoder", configs["image_encoder"], "image_encoder")
                       if configs.get("image_encoder") is not None else None),
        image_processor_config=(dict(configs["feature_extractor"])
                                if configs.get("feature_extractor") is not None else None),
    )
