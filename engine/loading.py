"""The on-disk layout of a cascade: `model_index.json` plus one folder per component (diffusers layout).

Karlo's components: tokenizer, text_encoder, prior, text_proj, decoder, super_res_first, super_res_last and
their schedulers; the image-variation release has image_encoder (+ feature_extractor) and no prior.
Further upsamplers (the paper's 256→1024 stage) are `super_res_{k}_first` / `super_res_{k}_last` /
`super_res_{k}_scheduler` for k = 2, 3, ...; `_last` is optional and defaults to `_first`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from .config import Config, ConfigError, read_json
from .samplers import ScheduleConfig
from .weights import write_json

DIFFUSERS_VERSION_WRITTEN = "0.42.1"  # what our saved model_index.json claims; diffusers loads it as its own


# The one schedule-config class (engine/samplers.py); this name is the one the loaders have always used.
SchedulerConfig = ScheduleConfig


def model_classes():
    # Imported lazily so that `unclip.loading` stays importable while a model module is being edited.
    from .models.clip import CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from .models.prior import PriorTransformer
    from .models.text_proj import TextProj
    from .models.unet import ConditionalUNet, SuperResUNet
    return {
        "text_encoder": (("transformers", "CLIPTextModelWithProjection"), CLIPTextModelWithProjection),
        "image_encoder": (("transformers", "CLIPVisionModelWithProjection"), CLIPVisionModelWithProjection),
        "prior": (("diffusers", "PriorTransformer"), PriorTransformer),
        # diffusers 0.42 resolves this entry from sys.modules (loaded with its UnCLIPPipeline): the one name its
        # from_pretrained loads. It writes ["diffusers", ...] itself, which it cannot load back; Karlo's
        # ["unclip", ...] would name our package. We read any library name and check only the class.
        "text_proj": (("diffusers.pipelines.deprecated.unclip.text_proj", "UnCLIPTextProjModel"), TextProj),
        "decoder": (("diffusers", "UNet2DConditionModel"), ConditionalUNet),
        "super_res": (("diffusers", "UNet2DModel"), SuperResUNet),
    }


_EXTRA_SR = re.compile(r"^super_res_(\d+)_(first|last|scheduler)$")


@dataclass
class Upsampler:
    """One super-resolution stage: a network for the first steps, one for the last step, a scheduler."""
    name: str
    first: torch.nn.Module
    last: torch.nn.Module
    scheduler: SchedulerConfig


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    text_proj: torch.nn.Module
    decoder: torch.nn.Module
    decoder_scheduler: SchedulerConfig
    upsamplers: list[Upsampler] = field(default_factory=list)
    prior: torch.nn.Module | None = None
    prior_scheduler: SchedulerConfig | None = None
    image_encoder: torch.nn.Module | None = None
    image_processor_config: dict | None = None  # feature_extractor/preprocessor_config.json, when present
    # The model's own recommended call settings (model_index.json "_unclip_call_defaults"), e.g. a guidance
    # scale tuned for it; a call's keyword overrides them, and Karlo's values apply where none is given.
    call_defaults: dict = field(default_factory=dict)
    source: str | None = None  # where it came from (a folder, a preset), for reports and reprs

    def networks(self) -> dict:
        """{name: network} for every network slot that is filled: text_encoder, image_encoder, prior, text_proj,
        decoder, and "<upsampler>.first" / "<upsampler>.last" (the last may be the first network itself).
        The one list of a cascade's networks; runners and exporters key their networks by these names."""
        out = {name: getattr(self, name) for name in ("text_encoder", "image_encoder", "prior", "text_proj", "decoder")
               if getattr(self, name) is not None}
        for up in self.upsamplers:
            out[f"{up.name}.first"] = up.first
            out[f"{up.name}.last"] = up.last
        return out


CALL_DEFAULT_KEYS = {"prior_guidance_scale": 4.0, "decoder_guidance_scale": 8.0}
CALL_DEFAULTS_ENTRY = "_unclip_call_defaults"  # private ("_") keys are skipped by diffusers' loader


def read_call_defaults(index: Config) -> dict:
    """The validated `_unclip_call_defaults` entry of a model_index.json (or export manifest) config."""
    value = index.data.get(CALL_DEFAULTS_ENTRY, {})
    if not isinstance(value, dict):
        raise index.error(CALL_DEFAULTS_ENTRY, f"= {value!r} must be an object")
    out = {}
    for key, v in value.items():
        if key not in CALL_DEFAULT_KEYS:
            raise index.error(CALL_DEFAULTS_ENTRY, f"has unknown key {key!r}; known: {', '.join(CALL_DEFAULT_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= v <= 100.0:
            raise index.error(CALL_DEFAULTS_ENTRY, f"[{key!r}] = {v!r} must be a number in [1, 100]")
        out[key] = float(v)
    return out


def _entry(index: Config, key: str) -> tuple | None:
    value = index.data.get(key)
    if value is None or value == [None, None]:
        return None
    if not (isinstance(value, list) and len(value) == 2):
        raise index.error(key, f"= {value!r} must be a [library, class] pair")
    return tuple(value)


def load_components(root: str, *, device="cpu", dtype: torch.dtype | None = None) -> Components:
    """Read a whole cascade folder. Every error names the file (and key) at fault; nothing is written."""
    from .models import load_model
    from .tokenizer import CLIPTokenizer

    if not os.path.isdir(root):
        raise ConfigError(f"{root}: model directory not found")
    index = Config.from_file(os.path.join(root, "model_index.json"))
    classes = model_classes()

    def model(key, kind=None):
        expected, cls = classes[kind or key]
        entry = _entry(index, key)
        if entry is None:
            return None
        if entry[1] != expected[1]:
            raise index.error(key, f"= {list(entry)!r}: this engine loads {expected[1]} here")
        return load_model(os.path.join(root, key), cls, device=device, dtype=dtype)

    def scheduler(key):
        if _entry(index, key) is None:
            raise index.error(key, "is required but missing")
        return SchedulerConfig.from_config(Config.from_file(os.path.join(root, key, "scheduler_config.json")))

    for required in ("tokenizer", "text_encoder", "text_proj", "decoder", "super_res_first"):
        if _entry(index, required) is None:
            raise index.error(required, "is required but missing")
    has_prior = _entry(index, "prior") is not None

    first = model("super_res_first", "super_res")
    upsamplers = [Upsampler("super_res", first, model("super_res_last", "super_res") or first,
                            scheduler("super_res_scheduler"))]
    extra = sorted({int(m.group(1)) for k in index.data if (m := _EXTRA_SR.match(k))})
    for k in extra:
        name = f"super_res_{k}"
        first_k = model(f"{name}_first", "super_res")
        if first_k is None:
            raise index.error(f"{name}_first", "is required when other super_res_%d_* entries exist" % k)
        upsamplers.append(Upsampler(name, first_k, model(f"{name}_last", "super_res") or first_k,
                                    scheduler(f"{name}_scheduler")))

    fe_path = os.path.join(root, "feature_extractor", "preprocessor_config.json")
    return Components(
        tokenizer=CLIPTokenizer.from_folder(os.path.join(root, "tokenizer")),
        text_encoder=model("text_encoder"),
        text_proj=model("text_proj"),
        decoder=model("decoder"),
        decoder_scheduler=scheduler("decoder_scheduler"),
        upsamplers=upsamplers,
        prior=model("prior") if has_prior else None,
        prior_scheduler=scheduler("prior_scheduler") if has_prior else None,
        image_encoder=model("image_encoder"),
        image_processor_config=read_json(fe_path) if os.path.isfile(fe_path) else None,
        call_defaults=read_call_defaults(index),
    )


def save_components(c: Components, root: str, dtype: torch.dtype | None = None, *, overwrite: bool = False) -> None:
    """Write `c` in the diffusers layout. Everything goes into a staging sibling folder that replaces `root`
    only when complete (unclip.files.replace_dir), so a failure or Ctrl-C at any point leaves `root` as it
    was: the old model whole, or no folder. An existing model folder (one with model_index.json) is replaced;
    any other non-empty folder only with `overwrite=True`, so a wrong path never deletes someone's files."""
    from .files import discard_dir, make_staging_dir, replace_dir
    from .models import save_model

    root = os.path.abspath(os.fspath(root))
    check_replaceable(root, overwrite)
    tmp = make_staging_dir(root)
    try:
        index = {"_class_name": "UnCLIPPipeline" if c.prior is not None else "UnCLIPImageVariationPipeline",
                 "_diffusers_version": DIFFUSERS_VERSION_WRITTEN}
        classes = model_classes()

        def put(key, module, kind=None):
            index[key] = list(classes[kind or key][0])
            save_model(module, os.path.join(tmp, key), dtype=dtype)

        def put_scheduler(key, sched):
            index[key] = ["diffusers", "UnCLIPScheduler"]
            write_json(os.path.join(tmp, key, "scheduler_config.json"), sched.to_dict(DIFFUSERS_VERSION_WRITTEN))

        c.tokenizer.save(os.path.join(tmp, "tokenizer"))
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
        put("text_encoder", c.text_encoder)
        put("text_proj", c.text_proj)
        put("decoder", c.decoder)
        put_scheduler("decoder_scheduler", c.decoder_scheduler)
        if c.prior is not None:
            put("prior", c.prior)
            put_scheduler("prior_scheduler", c.prior_scheduler)
        if c.image_encoder is not None:
            put("image_encoder", c.image_encoder)
        if c.image_processor_config is not None:
            index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
            write_json(os.path.join(tmp, "feature_extractor", "preprocessor_config.json"), c.image_processor_config)
        for i, up in enumerate(c.upsamplers):
            name = "super_res" if i == 0 else f"super_res_{i + 1}"
            put(f"{name}_first", up.first, "super_res")
            if up.last is not up.first or i == 0:  # diffusers always expects super_res_last
                put(f"{name}_last", up.last, "super_res")
            put_scheduler(f"{name}_scheduler", up.scheduler)
        if c.call_defaults:
            index[CALL_DEFAULTS_ENTRY] = dict(c.call_defaults)
        write_json(os.path.join(tmp, "model_index.json"), index)
        replace_dir(tmp, root)
    except BaseException:
        discard_dir(tmp)
        raise


def check_replaceable(root: str, overwrite: bool) -> None:
    """Refuse to replace `root` when it is a file, or a non-empty folder that is not a model (no
    model_index.json) and `overwrite` is not set. FileExistsError (an OSError) names the path."""
    if not os.path.lexists(root):
        return
    if not os.path.isdir(root) or os.path.islink(root):
        raise FileExistsError(f"{root} exists and is not a folder; choose another path")
    if os.listdir(root) and not os.path.isfile(os.path.join(root, "model_index.json")) and not overwrite:
        raise FileExistsError(f"{root} exists and is not a model folder (no model_index.json): saving would "
                              "delete its files; choose another path, or pass overwrite=True to replace it")
