"""Reading user images: CLIP's preprocessing (for the image encoder) and the decoder's pixel space.

`preprocess(images, config)` gives the image encoder's `pixel_values` exactly as the reference CLIP image
processor does (transformers' `CLIPImageProcessor`, PIL backend), for PIL images of any mode, numpy arrays and
torch tensors:

1. RGB: PIL images with transparency (an alpha band, or a palette/`transparency` entry) are composited onto
   white, others are converted with PIL's `convert("RGB")`. Arrays may be channels-first or -last; the channel
   axis is the first one of size 1, 3 or 4 (the first axis wins when both qualify); 1 channel is repeated, 4
   channels are composited onto white (integers: rounded back to the input dtype).
2. Resize (PIL, bicubic by default) so that the shorter side is `shortest_edge`; the longer side is
   `int(shortest_edge * long / short)` (truncated). PIL works on 8 bits, so non-uint8 arrays go through it as
   the reference sends them: integer-valued floats/ints must lie in 0..255 and are cast; other floats must lie
   in [0, 1], are scaled by 255 and truncated to uint8, and come back divided by 255.
3. Center crop: offsets `(size - crop) // 2` (rounding down, so an odd excess leaves one more row/column on
   the bottom/right); an image smaller than the crop is zero-padded, the extra going to the bottom/right.
4. Rescale: `x * rescale_factor` (float64 product, stored as float32); then normalise `(x - mean) / std` in
   float32.

Float images in [0, 1] follow the reference literally: step 2 brings them back to [0, 1] and step 4 scales
them by 1/255 again, which CLIP does not expect. We keep that for parity and warn; pass uint8 (or PIL) images.

`decoder_pixels(images, size)` reads images for the decoder instead (DDIM inversion): the same RGB conversion,
resize and crop to `size`, then [-1, 1]; here float images in [0, 1] are taken at face value.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's resampling filter codes, as stored in preprocessor_config.json ("resample").
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_CHANNEL_COUNTS = (1, 3, 4)

# Keys of preprocessor_config.json that do not change the pixels (class names written by transformers).
_IGNORED_KEYS = ("image_processor_type", "feature_extractor_type", "processor_class")


# ----------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ImageProcessorConfig:
    """What `preprocess` does, read from a `preprocessor_config.json` (transformers' CLIPImageProcessor keys).

    shortest_edge: resize so the shorter side has this length (aspect ratio kept), or
    resize_to: resize to exactly (height, width) instead; None for both = no resize.
    """

    shortest_edge: int | None = 224
    resize_to: tuple[int, int] | None = None
    resample: int = 3
    crop_size: tuple[int, int] | None = (224, 224)
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] | None = OPENAI_CLIP_STD

    @classmethod
    def for_size(cls, size: int) -> "ImageProcessorConfig":
        """CLIP's recipe (shortest edge = crop = `size`, OpenAI mean/std) for an encoder of input size `size`."""
        return cls(shortest_edge=size, crop_size=(size, size))

    @classmethod
    def from_config(cls, cfg: Config) -> "ImageProcessorConfig":
        def flag(key):
            return cfg.get(key, True, types=(bool, type(None))) is not False

        def positive_int(value, key):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise cfg.error(key, f"= {cfg.data[key]!r}: sizes must be positive ints")
            return value

        def height_width(key, value):
            if isinstance(value, dict) and set(value) == {"height", "width"}:
                return positive_int(value["height"], key), positive_int(value["width"], key)
            if isinstance(value, (list, tuple)) and len(value) == 2:
                return positive_int(value[0], key), positive_int(value[1], key)
            return None

        shortest_edge = resize_to = None
        if flag("do_resize"):
            size = cfg.get("size", {"shortest_edge": 224}, types=(int, dict, list))
            square = cfg.get("default_to_square", False, types=bool)
            if isinstance(size, int):
                size = positive_int(size, "size")
                shortest_edge, resize_to = (None, (size, size)) if square else (size, None)
            elif isinstance(size, dict) and set(size) == {"shortest_edge"}:
                shortest_edge = positive_int(size["shortest_edge"], "size")
            else:
                resize_to = height_width("size", size)
                if resize_to is None:
                    raise cfg.error("size", f"= {size!r} is not supported (supported: an int, "
                                            "{'shortest_edge': n} or {'height': h, 'width': w})")
        resample = cfg.get("resample", 3, types=int, choices=tuple(RESAMPLE_NAMES))

        crop_size = None
        if flag("do_center_crop"):
            crop = cfg.get("crop_size", 224, types=(int, dict, list))
            if isinstance(crop, int):
                crop_size = (positive_int(crop, "crop_size"),) * 2
            else:
                crop_size = height_width("crop_size", crop)
            if crop_size is None:
                raise cfg.error("crop_size", f"= {crop!r} is not supported (supported: an int or "
                                             "{'height': h, 'width': w})")

        rescale_factor = None
        if flag("do_rescale"):
            rescale_factor = cfg.get("rescale_factor", 1 / 255, types=(int, float))
            if isinstance(rescale_factor, bool) or not (math.isfinite(rescale_factor) and rescale_factor > 0):
                raise cfg.error("rescale_factor", f"= {rescale_factor!r} must be a finite number > 0")
            rescale_factor = float(rescale_factor)

        mean = std = None
        if flag("do_normalize"):
            mean = _three_floats(cfg, "image_mean", OPENAI_CLIP_MEAN, positive=False)
            std = _three_floats(cfg, "image_std", OPENAI_CLIP_STD, positive=True)
        # Without RGB conversion, RGBA/grey inputs would reach the encoder with the wrong channel count.
        cfg.expect("do_convert_rgb", (True, None))
        cfg.expect("do_pad", (False, None))
        known = ["do_resize", "size", "default_to_square", "resample", "do_center_crop", "crop_size", "do_rescale",
                 "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad"]
        cfg.reject_unknown(known, _IGNORED_KEYS)
        return cls(shortest_edge=shortest_edge, resize_to=resize_to, resample=resample, crop_size=crop_size,
                   rescale_factor=rescale_factor, image_mean=mean, image_std=std)

    def to_dict(self) -> dict:
        """A preprocessor_config.json that transformers' CLIPImageProcessor reads to the same processing."""
        d = {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
             "do_resize": self.shortest_edge is not None or self.resize_to is not None,
             "resample": self.resample, "do_center_crop": self.crop_size is not None,
             "do_rescale": self.rescale_factor is not None, "do_normalize": self.image_mean is not None}
        if self.shortest_edge is not None:
            d["size"] = {"shortest_edge": self.shortest_edge}
        elif self.resize_to is not None:
            d["size"] = {"height": self.resize_to[0], "width": self.resize_to[1]}
        if self.crop_size is not None:
            d["crop_size"] = {"height": self.crop_size[0], "width": self.crop_size[1]}
        if self.rescale_factor is not None:
            d["rescale_factor"] = self.rescale_factor
        if self.image_mean is not None:
            d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every output image, when the config fixes it (crop or exact resize)."""
        return self.crop_size or self.resize_to


def _three_floats(cfg: Config, key: str, default, *, positive: bool) -> tuple[float, float, float]:
    value = cfg.get(key, default, types=(int, float, list, tuple))
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    ok = len(values) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                  and (v > 0 or not positive) for v in values)
    if not ok:
        need = "positive " if positive else ""
        raise cfg.error(key, f"= {value!r} must be one {need}number or a list of 3 {need}numbers (R, G, B)")
    return tuple(float(v) for v in values)


# ---------------------------------------------------------------------------------------- reading inputs

def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a dependency
        return False
    return isinstance(x, Image.Image)


def as_image_list(images, name: str = "images") -> list:
    """Split `images` into single images: PIL images and (H, W[, C]) / (C, H, W) numpy arrays.

    Accepts one image or a list/tuple of them; a 4-D array or tensor is a batch (B, C, H, W) or (B, H, W, C).
    Tensors become numpy arrays (bfloat16 as float32). Every problem raises a TypeError/ValueError naming
    `name` (and the index of the offending image)."""
    return [image for _, image in _named_images(images, name)]


def _named_images(images, name: str) -> list[tuple[str, object]]:
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"{name} is empty: give at least one image")
        out = []
        for i, item in enumerate(images):
            out.extend(_split_batch(item, f"{name}[{i}]"))
        return out
    return _split_batch(images, name)


def _split_batch(x, name: str) -> list[tuple[str, object]]:
    if _is_pil(x):
        if x.width < 1 or x.height < 1:
            raise ValueError(f"{name} is an empty image (size {x.width}x{x.height})")
        return [(name, x)]
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must hold real numbers (uint8 or float pixels); got a {x.dtype} tensor")
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a PIL.Image, a numpy array or a torch.Tensor (or a list of them); "
                        f"got {type(x).__name__}")
    if x.dtype.kind not in "uif":
        raise TypeError(f"{name} must hold real numbers (uint8 or float pixels); got dtype {x.dtype}")
    if x.ndim == 4:
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {x.shape})")
        return [(f"{name}[{i}]", _check_array(a, f"{name}[{i}]")) for i, a in enumerate(x)]
    if x.ndim in (2, 3):
        return [(name, _check_array(x, name))]
    raise ValueError(f"{name} must be an image of 2 dims (H, W), 3 dims (C, H, W) or (H, W, C), or a batch of "
                     f"4 dims; got {x.ndim} dims (shape {x.shape})")


def _check_array(a: np.ndarray, name: str) -> np.ndarray:
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if a.ndim == 3 and a.shape[0] not in _CHANNEL_COUNTS and a.shape[-1] not in _CHANNEL_COUNTS:
        raise ValueError(f"{name} has shape {a.shape}: cannot tell the channel axis (need 1, 3 or 4 channels "
                         "first or last)")
    return a


def to_rgb(image, name: str = "image") -> np.ndarray:
    """One image (from `as_image_list`) as an (H, W, 3) array, transparency composited onto white.

    PIL images give uint8; arrays keep their dtype (the reference keeps it too)."""
    if _is_pil(image):
        from PIL import Image
        try:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.array(image.convert("RGB"))
        except (ValueError, OSError) as e:
            raise ValueError(f"{name}: PIL cannot convert a mode {image.mode!r} image to RGB ({e})") from None
    a = image
    if a.ndim == 2:
        a = a[:, :, None]
    elif a.shape[0] in _CHANNEL_COUNTS:  # channels first (wins when both ends could be channels)
        a = np.moveaxis(a, 0, -1)
    channels = a.shape[-1]
    if channels == 1:
        return np.repeat(a, 3, axis=-1)
    if channels == 4:
        if a.dtype.kind == "f":
            if a.min() < 0.0 or a.max() > 1.0:
                raise ValueError(f"a 4-channel float image must lie in [0, 1] to composite its alpha; got "
                                 f"[{a.min()}, {a.max()}]")
            alpha = a[..., 3:4] / 1.0
            return (alpha * a[..., :3] + (1 - alpha) * 1.0).astype(a.dtype)
        alpha = a[..., 3:4] / 255  # float64, as numpy promotes integer / int
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(a.dtype)
    return a


def _to_uint8(rgb: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
    """The 8-bit image PIL resizes, and whether it was scaled up from [0, 1] (then scaled back after)."""
    if rgb.dtype == np.uint8:
        return rgb, False
    if np.allclose(rgb, rgb.astype(int)):
        if rgb.min() < 0 or rgb.max() > 255:
            raise ValueError(f"{name}: integer-valued pixels must lie in 0..255; got [{rgb.min()}, {rgb.max()}]")
        return rgb.astype(np.uint8), False
    if rgb.min() < 0 or rgb.max() > 1:
        raise ValueError(f"{name}: float pixels must lie in [0, 1] (or be integers in 0..255); got "
                         f"[{rgb.min()}, {rgb.max()}]")
    return (rgb.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True


def _resize(rgb: np.ndarray, config: ImageProcessorConfig, name: str) -> tuple[np.ndarray, bool]:
    from PIL import Image

    h, w = rgb.shape[:2]
    if config.resize_to is not None:
        new_h, new_w = config.resize_to
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = config.shortest_edge, int(config.shortest_edge * long / short)
        new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
    pixels, scaled = _to_uint8(rgb, name)
    resized = np.array(Image.fromarray(pixels).resize((new_w, new_h), resample=config.resample))
    if scaled:
        return (resized.astype(np.float64) * (1 / 255)).astype(np.float32), True
    return resized, False


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop an (H, W, C) array to (height, width) around its centre, zero-padding where it is smaller."""
    h, w = image.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[top:top + height, left:left + width]
    big_h, big_w = max(h, height), max(w, width)
    pad_top, pad_left = math.ceil((big_h - h) / 2), math.ceil((big_w - w) / 2)
    canvas = np.zeros((big_h, big_w) + image.shape[2:], dtype=image.dtype)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(big_h, top + height), max(0, left):min(big_w, left + width)]


def _process(images, config: ImageProcessorConfig, name: str, *, floats_at_face_value: bool) -> torch.Tensor:
    arrays, warned = [], False
    for where, image in _named_images(images, name):
        rgb = to_rgb(image, where)
        # Float pixels in [0, 1] (not integer-valued): the reference still multiplies them by rescale_factor.
        unit_floats = rgb.dtype.kind == "f" and not np.allclose(rgb, rgb.astype(int)) and \
            rgb.min() >= 0 and rgb.max() <= 1
        if config.shortest_edge is not None or config.resize_to is not None:
            rgb, _ = _resize(rgb, config, where)
        if config.crop_size is not None:
            rgb = center_crop(rgb, *config.crop_size)
        if config.rescale_factor is not None and not (unit_floats and floats_at_face_value):
            if unit_floats and not warned:
                warnings.warn(f"{where}: float pixels in [0, 1] are multiplied by rescale_factor "
                              f"({config.rescale_factor:g}) like 0..255 pixels, exactly as the reference CLIP image "
                              "processor does; pass uint8 (or PIL) images for the usual CLIP input", stacklevel=4)
                warned = True
            rgb = (rgb.astype(np.float64) * config.rescale_factor).astype(np.float32)
        if config.image_mean is not None:
            if rgb.dtype.kind != "f":
                rgb = rgb.astype(np.float32)
            mean = np.array(config.image_mean, dtype=rgb.dtype)
            std = np.array(config.image_std, dtype=rgb.dtype)
            rgb = (rgb - mean) / std
        arrays.append(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{name}: images of different sizes {sorted(shapes)} cannot form one batch with this "
                         "processor config (it has no center crop)")
    return torch.from_numpy(np.stack(arrays)).float()


def preprocess(images, config: ImageProcessorConfig | None = None, *, name: str = "images") -> torch.Tensor:
    """CLIP `pixel_values` (B, 3, H, W) float32 for one image or a list of images, equal to the reference
    CLIP image processor's output (see the module docstring). `config` defaults to CLIP ViT's 224 recipe."""
    config = config or ImageProcessorConfig()
    if not isinstance(config, ImageProcessorConfig):
        raise TypeError(f"config must be an ImageProcessorConfig; got {type(config).__name__}")
    return _process(images, config, name, floats_at_face_value=False)


def decoder_pixels(images, size: int, *, name: str = "image") -> torch.Tensor:
    """Images as the decoder sees them: (B, 3, size, size) in [-1, 1] (shorter side resized to `size` with PIL
    bicubic, center crop). uint8/PIL pixels are 0..255; float pixels in [0, 1] are taken as they are."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise ValueError(f"size must be a positive int; got {size!r}")
    config = ImageProcessorConfig(shortest_edge=int(size), crop_size=(int(size), int(size)),
                                  image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return _process(images, config, name, floats_at_face_value=True)


def processor_config_for(components) -> ImageProcessorConfig:
    """The image processor of a cascade: its feature_extractor config, else CLIP's recipe at the encoder's size."""
    raw = getattr(components, "image_processor_config", None)
    if raw is not None:
        return ImageProcessorConfig.from_config(Config(raw, "feature_extractor/preprocessor_config.json"))
    encoder = getattr(components, "image_encoder", None)
    if encoder is None:
        raise ValueError("this pipeline has no image encoder (image_encoder/ is missing)")
    return ImageProcessorConfig.for_size(encoder.config.image_size)
