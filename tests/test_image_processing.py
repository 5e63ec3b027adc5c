"""CLIP image preprocessing vs transformers' CLIPImageProcessor (the PIL backend, which is what transformers
uses without torchvision): every size, mode and input type, every supported config, and clear errors."""
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from unclip import ConfigError
from unclip.config import Config
from unclip.image_processing import (ImageProcessorConfig, as_image_list, center_crop, decoder_pixels, preprocess,
                                     processor_config_for)

TOL = 1e-5
# openai/clip-vit-large-patch14's preprocessor_config.json (Karlo's feature_extractor/), legacy keys.
OPENAI_L14 = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor",
              "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
              "resample": 3, "size": 224}


def _reference(config: dict, tmp_path):
    """transformers' processor, loaded from a preprocessor_config.json as a pipeline would load it."""
    import transformers
    transformers.logging.set_verbosity_error()
    folder = tmp_path / "feature_extractor"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return transformers.CLIPImageProcessor.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(OPENAI_L14, tmp_path_factory.mktemp("l14"))


def _rng_pixels(seed, shape, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return (rng.random(shape) * 255).astype(dtype)


def _paletted_with_transparency():
    image = Image.fromarray(_rng_pixels(5, (61, 47, 3))).convert("P")
    image.info["transparency"] = 3
    return image


def _rgba_random_alpha():
    return Image.fromarray(np.concatenate([_rng_pixels(6, (100, 80, 3)), _rng_pixels(7, (100, 80, 1))], -1))


BASE = Image.fromarray(_rng_pixels(0, (123, 157, 3)))
CASES = {
    # PIL, RGB, sizes: square, one pixel off, portrait, landscape, extreme aspect ratios, tiny, odd excess
    **{f"rgb-{h}x{w}": (lambda h=h, w=w: Image.fromarray(_rng_pixels(h * w, (h, w, 3))))
       for h, w in [(224, 224), (225, 224), (300, 200), (200, 301), (17, 999), (1000, 13), (7, 5), (1, 1),
                    (223, 225), (512, 384)]},
    # PIL modes
    **{f"mode-{m}": (lambda m=m: BASE.convert(m)) for m in
       ["L", "RGBA", "LA", "P", "PA", "1", "CMYK", "YCbCr", "I", "F", "HSV", "LAB", "RGBX"]},
    "mode-I;16": lambda: Image.fromarray((np.random.default_rng(1).random((90, 120)) * 65535).astype(np.uint16)),
    "P-with-transparency": _paletted_with_transparency,
    "RGBA-random-alpha": _rgba_random_alpha,
    # numpy
    "np-uint8-HWC": lambda: _rng_pixels(2, (150, 99, 3)),
    "np-uint8-CHW": lambda: _rng_pixels(2, (150, 99, 3)).transpose(2, 0, 1).copy(),
    "np-uint8-HWC-rgba": lambda: np.asarray(_rgba_random_alpha()),
    "np-uint8-HW1": lambda: _rng_pixels(3, (80, 60, 1)),
    "np-float32-unit": lambda: np.random.default_rng(4).random((77, 130, 3)).astype(np.float32),
    "np-float64-unit": lambda: np.random.default_rng(4).random((77, 130, 3)),
    "np-float32-0-255-integers": lambda: np.floor(np.random.default_rng(4).random((77, 130, 3)) * 256).astype(
        np.float32),
    "np-float32-unit-rgba": lambda: np.random.default_rng(8).random((60, 50, 4)).astype(np.float32),
    "np-int64": lambda: _rng_pixels(9, (70, 70, 3)).astype(np.int64),
    "np-batch-BHWC": lambda: _rng_pixels(10, (2, 90, 70, 3)),
    # torch
    "pt-CHW-float": lambda: torch.rand(3, 40, 90, generator=torch.Generator().manual_seed(0)),
    "pt-BCHW-float": lambda: torch.rand(2, 3, 230, 300, generator=torch.Generator().manual_seed(1)),
    "pt-CHW-uint8": lambda: torch.randint(0, 256, (3, 50, 61), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(2)),
    "pt-HWC-uint8": lambda: torch.randint(0, 256, (50, 61, 3), dtype=torch.uint8,
                                          generator=torch.Generator().manual_seed(3)),
    "pt-1-channel": lambda: torch.rand(1, 33, 44, generator=torch.Generator().manual_seed(4)),
    # a list mixing everything
    "list-mixed": lambda: [Image.fromarray(_rng_pixels(11, (40, 90, 3))), _rng_pixels(12, (300, 20, 3)),
                           torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(5))],
}


def test_enough_cases():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_processor(reference, case):
    images = CASES[case]()
    config = ImageProcessorConfig.from_config(Config(OPENAI_L14))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # float [0, 1] inputs warn (see test_unit_floats_warn)
        ours = preprocess(images, config)
    expected = reference(images=images, return_tensors="pt").pixel_values
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert (ours - expected).abs().max().item() <= TOL
    assert ours.std() > 0.05  # not vacuous: real pixels, not a constant


# Non-default processor configs, each against the reference loaded from the same JSON.
CONFIGS = {
    "current-keys": {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
                     "size": {"shortest_edge": 64}, "resample": 3, "do_center_crop": True,
                     "crop_size": {"height": 64, "width": 64}, "do_rescale": True,
                     "rescale_factor": 0.00392156862745098, "do_normalize": True,
                     "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711]},
    "exact-resize-bilinear": {"size": {"height": 40, "width": 56}, "resample": 2, "crop_size": {"height": 32,
                                                                                               "width": 48}},
    "crop-larger-than-resize (zero padding)": {"size": {"shortest_edge": 30}, "crop_size": {"height": 45,
                                                                                           "width": 37}},
    "no-crop": {"size": {"height": 33, "width": 33}, "do_center_crop": False},
    "no-normalize-scalar-mean": {"size": 48, "crop_size": 40, "do_normalize": False},
    "scalar-mean-std": {"size": 48, "crop_size": 40, "image_mean": 0.5, "image_std": 0.25},
    "no-rescale": {"size": 48, "crop_size": 40, "do_rescale": False},
    "rescale-factor": {"size": 48, "crop_size": 40, "rescale_factor": 0.5},
    "lanczos-odd-crop": {"size": 51, "crop_size": {"height": 49, "width": 50}, "resample": 1},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_other_configs_match_reference(name, tmp_path):
    raw = CONFIGS[name]
    reference = _reference(raw, tmp_path)
    config = ImageProcessorConfig.from_config(Config(raw))
    images = [Image.fromarray(_rng_pixels(20, (70, 53, 3))), _rng_pixels(21, (66, 90, 3)),
              torch.randint(0, 256, (3, 45, 45), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))]
    if name == "no-crop":
        images = [_rng_pixels(22, (70, 53, 3)), _rng_pixels(23, (20, 90, 4))]
    ours = preprocess(images, config)
    expected = reference(images=images, return_tensors="pt").pixel_values
    assert ours.shape == expected.shape
    assert (ours - expected.float()).abs().max().item() <= TOL
    # Our own to_dict describes the same processing to transformers.
    again = _reference(config.to_dict(), tmp_path / "again")
    assert (again(images=images, return_tensors="pt").pixel_values.float() - ours).abs().max().item() <= TOL
    assert ImageProcessorConfig.from_config(Config(config.to_dict())) == config


def test_karlo_feature_extractor_config_reads_as_clip_l14():
    config = ImageProcessorConfig.from_config(Config(OPENAI_L14))
    assert config == ImageProcessorConfig.for_size(224) == ImageProcessorConfig()
    assert config.output_size == (224, 224)


@pytest.mark.parametrize("change, key", [
    (dict(size={"longest_edge": 300}), "size"),
    (dict(size=0), "size"),
    (dict(crop_size={"height": 3}), "crop_size"),
    (dict(resample=9), "resample"),
    (dict(image_std=[0.2, 0.0, 0.2]), "image_std"),
    (dict(image_mean=[0.5, 0.5]), "image_mean"),
    (dict(rescale_factor=-1.0), "rescale_factor"),
    (dict(do_convert_rgb=False), "do_convert_rgb"),
    (dict(do_pad=True), "do_pad"),
    (dict(crop_pct=0.9), "crop_pct"),
])
def test_bad_configs_name_the_key(change, key):
    with pytest.raises(ConfigError, match=rf"preprocessor_config.json.*'{key}'"):
        ImageProcessorConfig.from_config(Config({**OPENAI_L14, **change}, "feature_extractor/preprocessor_config.json"))


@pytest.mark.parametrize("images, error, pattern", [
    ([], ValueError, r"images is empty"),
    (np.zeros((0, 5, 3), np.uint8), ValueError, r"images is empty \(shape"),
    (np.zeros((0, 3, 8, 8), np.uint8), ValueError, r"images is an empty batch"),
    (Image.new("RGB", (0, 0)), ValueError, r"images is an empty image"),
    (np.zeros((8, 8, 3), bool), TypeError, r"images must hold real numbers.*bool"),
    (torch.zeros(3, 8, 8, dtype=torch.complex64), TypeError, r"images must hold real numbers"),
    (np.array([["a"]]), TypeError, r"images must hold real numbers"),
    (np.full((8, 8, 3), np.nan, np.float32), ValueError, r"images contains NaN"),
    ([np.zeros((8, 8, 3), np.uint8), torch.full((3, 8, 8), float("inf"))], ValueError, r"images\[1\] contains NaN"),
    (np.zeros(5), ValueError, r"images must be an image of 2 dims .* got 1 dims"),
    (np.zeros((1, 2, 3, 8, 8)), ValueError, r"got 5 dims"),
    (np.zeros((8, 8, 2), np.uint8), ValueError, r"cannot tell the channel axis"),
    ("cat.png", TypeError, r"images must be a PIL.Image, a numpy array or a torch.Tensor"),
    ([np.zeros((8, 8, 3), np.uint8), 3], TypeError, r"images\[1\] must be a PIL.Image"),
    (np.full((8, 8, 3), 300.0), ValueError, r"integer-valued pixels must lie in 0..255"),
    (np.full((8, 8, 3), 1.5), ValueError, r"float pixels must lie in \[0, 1\]"),
    (np.full((8, 8, 3), -0.5), ValueError, r"float pixels must lie in \[0, 1\]"),
    (Image.new("La", (4, 4)), ValueError, r"cannot convert a mode 'La' image"),
])
def test_bad_images_raise_clear_errors(images, error, pattern):
    with pytest.raises(error, match=pattern):
        preprocess(images, ImageProcessorConfig.for_size(32))


def test_unit_floats_warn_and_match_uint8_only_after_scaling():
    pixels = np.random.default_rng(0).random((40, 40, 3)).astype(np.float32)
    with pytest.warns(UserWarning, match="float pixels in \\[0, 1\\]"):
        as_floats = preprocess(pixels, ImageProcessorConfig.for_size(32))
    as_uint8 = preprocess((pixels * 255).astype(np.uint8), ImageProcessorConfig.for_size(32))
    # The reference reads [0, 1] floats as 0..255 pixels (so they come out near-black); uint8 is the real input.
    assert as_floats.mean() < as_uint8.mean() - 1.0


def test_as_image_list_and_center_crop():
    batch = torch.zeros(3, 3, 8, 8)
    assert len(as_image_list(batch)) == 3 and len(as_image_list([batch, Image.new("L", (5, 5))])) == 4
    image = np.arange(5 * 6).reshape(5, 6, 1)
    # Odd excess: the extra row/column stays on the bottom/right (offsets round down).
    assert center_crop(image, 4, 4)[:, :, 0].tolist() == image[0:4, 1:5, 0].tolist()
    padded = center_crop(image, 7, 6)
    assert padded.shape == (7, 6, 1) and padded[0].sum() == 0 and padded[-1].sum() == 0


def test_decoder_pixels():
    pixels = _rng_pixels(30, (40, 64, 3))
    x = decoder_pixels(Image.fromarray(pixels), 16)
    assert x.shape == (1, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1
    # Float [0, 1] images are read at face value here (no warning, same picture as the uint8 one).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = decoder_pixels(pixels.astype(np.float64) / 255, 16)
    assert (x - y).abs().max() <= 2 / 255 + 1e-6  # at most one 8-bit level ([-1, 1] is 2 wide)
    with pytest.raises(ValueError, match="size must be a positive int"):
        decoder_pixels(pixels, 0)


def test_processor_config_for_components():
    class Encoder:
        class config:
            image_size = 48

    class Parts:
        image_encoder = Encoder()
        image_processor_config = None
    assert processor_config_for(Parts()) == ImageProcessorConfig.for_size(48)
    Parts.image_processor_config = dict(OPENAI_L14, size=99)
    assert processor_config_for(Parts()).shortest_edge == 99
    Parts.image_processor_config, Parts.image_encoder = None, None
    with pytest.raises(ValueError, match="no image encoder"):
        processor_config_for(Parts())
