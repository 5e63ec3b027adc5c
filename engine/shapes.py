"""A procedural shapes world (images + captions) and a judge that reads its images back by pixel analysis.

The world is what the embedded `toy` cascade was trained on: one flat-coloured shape on a plain background,
64×64 pixels (the decoder's 32×32 base images are 2×2 averages of these).

    colour      red, yellow, green, cyan, blue, purple        (hues about 60 degrees apart)
    shape       circle, square, triangle (apex up)
    size        small (12-16 px across), large (24-28 px across)
    position    left, right, top, bottom, center              (±2 px of jitter around each anchor)
    background  white, gray, black

Captions read "a small red circle on the left on a white background"; any attribute may be left out
("a red circle"), and the model then chooses it. `judge(image)` reports every attribute of an image of this
world without any learned model: background from the border, the object as the largest connected region that
differs from it, colour from its hue, size from its extent, position from its centre, shape from the best
overlap with ideal circle / square / triangle masks of the same bounding box.
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "yellow": (235, 200, 30), "green": (40, 170, 60),
    "cyan": (30, 190, 200), "blue": (40, 70, 220), "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (128, 128, 128),
                                                "black": (20, 20, 20)}
ATTRIBUTES = ("colour", "shape", "size", "position", "background")

# Geometry, as fractions of the image side (64 px: anchors at 18 / 32 / 46 px, sizes 12-16 and 24-28 px).
_ANCHORS = {"left": (0.28125, 0.5), "right": (0.71875, 0.5), "top": (0.5, 0.28125), "bottom": (0.5, 0.71875),
            "center": (0.5, 0.5)}
_EXTENTS = {"small": (0.1875, 0.25), "large": (0.375, 0.4375)}
_JITTER = 0.03125
_SIZE_THRESHOLD = 0.3125          # extent between the two ranges
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                     "center": "in the center"}


@dataclass(frozen=True)
class Scene:
    """One image of the world: the discrete attributes plus the continuous layout (fractions of the side)."""
    colour: str
    shape: str
    size: str
    position: str
    background: str
    extent: float     # width = height of the shape's bounding box
    cx: float         # centre of the bounding box
    cy: float

    def attributes(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class Judgement:
    """What `judge` read from an image; attributes are None when no object was found."""
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None
    background: str
    found: bool
    hue: float | None = field(default=None, compare=False)  # of the object's mean colour, in [0, 1)

    def attributes(self) -> dict[str, str | None]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------- sampling

def sample_scenes(n: int, rng: np.random.Generator | int = 0, **fixed: str) -> list[Scene]:
    """`n` random scenes (uniform over every attribute not given in `fixed`, e.g. colour="red")."""
    if isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(int(rng))
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0; got {n!r}")
    choices = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "position": POSITIONS,
               "background": tuple(BACKGROUNDS)}
    for key, value in fixed.items():
        if key not in choices:
            raise ValueError(f"unknown attribute {key!r}; attributes are {', '.join(ATTRIBUTES)}")
        if value not in choices[key]:
            raise ValueError(f"{key} must be one of {', '.join(choices[key])}; got {value!r}")
    scenes = []
    for _ in range(int(n)):
        # Draw every attribute (even fixed ones) so that a scene's layout does not depend on what is fixed.
        attrs = {k: v[rng.integers(len(v))] for k, v in choices.items()}
        attrs.update(fixed)
        lo, hi = _EXTENTS[attrs["size"]]
        extent = float(rng.uniform(lo, hi))
        ax, ay = _ANCHORS[attrs["position"]]
        dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
        scenes.append(Scene(**attrs, extent=extent, cx=float(ax + dx), cy=float(ay + dy)))
    return scenes


def caption(scene: Scene | dict, keep=ATTRIBUTES) -> str:
    """The caption of `scene` naming only the attributes in `keep` ("a red shape" when the shape is left out)."""
    attrs = scene.attributes() if isinstance(scene, Scene) else dict(scene)
    keep = set(keep)
    words = ["a"]
    if "size" in keep:
        words.append(attrs["size"])
    if "colour" in keep:
        words.append(attrs["colour"])
    words.append(attrs["shape"] if "shape" in keep else "shape")
    if "position" in keep:
        words.append(_POSITION_PHRASES[attrs["position"]])
    if "background" in keep:
        words.append(f"on a {attrs['background']} background")
    return " ".join(words)


def all_captions() -> list[str]:
    """Every caption the world can produce (every attribute subset of every scene), sorted."""
    out = set()
    for colour in (*COLOURS, None):
        for shape in (*SHAPES, None):
            for size in (*SIZES, None):
                for position in (*POSITIONS, None):
                    for background in (*BACKGROUNDS, None):
                        attrs = {"colour": colour, "shape": shape or "circle", "size": size,
                                 "position": position, "background": background}
                        keep = [a for a in ATTRIBUTES if attrs[a] is not None and (a != "shape" or shape)]
                        out.add(caption(attrs, keep))
    return sorted(out)


_WORDS = {
    "colour": {c: c for c in COLOURS}, "shape": {s: s for s in SHAPES}, "size": {s: s for s in SIZES},
    "background": {}, "position": {"left": "left", "right": "right", "top": "top", "bottom": "bottom",
                                   "center": "center", "centre": "center", "middle": "center"},
}


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption names, e.g. {"colour": "red", "shape": "circle"} (unnamed ones are absent)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    text = text.lower()
    found: dict[str, str] = {}
    bg = re.search(r"\b(" + "|".join(BACKGROUNDS) + r")\s+background\b", text)
    if bg:
        found["background"] = bg.group(1)
        text = text[:bg.start()] + text[bg.end():]
    for word in re.findall(r"[a-z]+", text):
        for attr in ("colour", "shape", "size", "position"):
            if word in _WORDS[attr] and attr not in found:
                found[attr] = _WORDS[attr][word]
    return found


# ----------------------------------------------------------------------------------------------- rendering

def _inside(shape: str, u: np.ndarray, v: np.ndarray, cx, cy, half_w, half_h) -> np.ndarray:
    """Which points (u, v) lie inside `shape` with the given bounding box (all in the same units)."""
    du, dv = (u - cx) / half_w, (v - cy) / half_h  # the box becomes [-1, 1]²
    if shape == "circle":
        return du * du + dv * dv <= 1.0
    if shape == "square":
        return (np.abs(du) <= 1.0) & (np.abs(dv) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (dv >= -1.0) & (dv <= 1.0) & (np.abs(du) <= (dv + 1.0) / 2.0)
    raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")


def render(scenes: Scene | list[Scene], size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """uint8 images (N, size, size, 3) of `scenes`, anti-aliased by averaging supersample² points per pixel."""
    single = isinstance(scenes, Scene)
    scenes = [scenes] if single else list(scenes)
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an integer >= 8; got {size!r}")
    n = size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / n
    u, v = coords[None, :], coords[:, None]
    out = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, s in enumerate(scenes):
        inside = _inside(s.shape, u, v, s.cx, s.cy, s.extent / 2, s.extent / 2)
        cover = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))[..., None]
        fg, bg = np.array(COLOURS[s.colour], np.float64), np.array(BACKGROUNDS[s.background], np.float64)
        out[i] = np.round(bg * (1 - cover) + fg * cover).astype(np.uint8)
    return out[0] if single else out


def downsample(images: np.ndarray, factor: int = 2) -> np.ndarray:
    """Area-average images (N, H, W, 3) by `factor` (the decoder's base images are these of the 64×64 renders)."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}×{w} is not a multiple of factor {factor}")
    x = images.astype(np.float64).reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return np.round(x).astype(np.uint8) if images.dtype == np.uint8 else x.astype(images.dtype)


# ----------------------------------------------------------------------------------------------- judge

def _as_rgb255(image) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image, uint8 array or float array in [0, 1]."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB; got shape {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        return np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0
    raise TypeError(f"image must be uint8 or float in [0, 1]; got dtype {array.dtype}")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (label propagation: each pixel takes the minimum
    label of its neighbours until nothing changes)."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


_PALETTE_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}


def _hue_name(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(rgb / 255.0))[0]
    def distance(h):  # circular
        d = abs(hue - h)
        return min(d, 1.0 - d)
    return min(_PALETTE_HUES, key=lambda name: distance(_PALETTE_HUES[name]))


def judge(image) -> Judgement:
    """Read background, colour, shape, size and position of one image of the shapes world (any square size)."""
    rgb = _as_rgb255(image)
    h, w, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    bg_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda k: float(np.sum((np.array(BACKGROUNDS[k]) - bg_rgb) ** 2)))
    distance = np.sqrt(((rgb - bg_rgb) ** 2).sum(-1))
    strength = float(np.percentile(distance, 99.5))
    if strength < 40.0:  # nothing differs clearly from the background
        return Judgement(None, None, None, None, background, False)
    mask = _largest_component(distance > 0.5 * strength)
    ys, xs = np.nonzero(mask)
    if len(ys) < 4:
        return Judgement(None, None, None, None, background, False)

    core = mask & (distance > 0.75 * strength)
    object_rgb = rgb[core if core.any() else mask].mean(axis=0)
    colour, hue = _hue_name(object_rgb), float(colorsys.rgb_to_hsv(*(object_rgb / 255.0))[0])

    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # bounding box, pixel edges
    extent = max(x1 - x0, y1 - y0) / max(h, w)
    size = "large" if extent > _SIZE_THRESHOLD else "small"
    cx, cy = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h
    position = min(_ANCHORS, key=lambda k: (_ANCHORS[k][0] - cx) ** 2 + (_ANCHORS[k][1] - cy) ** 2)

    # Shape: the best soft overlap (sum of minima / sum of maxima) between the object's coverage and ideal
    # anti-aliased circle / square / triangle masks centred on the bounding box. The box from the half-coverage
    # mask is only accurate to about a pixel (a circle's tangent columns fall below half coverage, a square's
    # edges do not), so each ideal shape also tries widths and heights up to a pixel either way.
    region = _dilate(mask)
    alpha = np.where(region, np.clip(distance / strength, 0.0, 1.0), 0.0)
    shape = max(SHAPES, key=lambda s: _best_overlap(s, alpha, x0, x1, y0, y1))
    return Judgement(colour, shape, size, position, background, True, hue)


def _dilate(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    return mask | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


_SIZE_TRIALS = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])


def _best_overlap(shape: str, alpha: np.ndarray, x0: int, x1: int, y0: int, y1: int, supersample: int = 4) -> float:
    h, w = alpha.shape
    # A crop around the box (two pixels more each side), sampled supersample² times per pixel.
    cx0, cx1, cy0, cy1 = max(0, x0 - 2), min(w, x1 + 2), max(0, y0 - 2), min(h, y1 + 2)
    crop = alpha[cy0:cy1, cx0:cx1]
    u = cx0 + (np.arange((cx1 - cx0) * supersample) + 0.5) / supersample
    v = cy0 + (np.arange((cy1 - cy0) * supersample) + 0.5) / supersample
    half_w = ((x1 - x0) + _SIZE_TRIALS[:, None]) / 2          # (trials, 1): every width with every height
    half_h = ((y1 - y0) + _SIZE_TRIALS[None, :]) / 2
    half_w, half_h = (np.maximum(a, 0.25) for a in np.broadcast_arrays(half_w, half_h))
    inside = _inside(shape, u[None, None, :], v[None, :, None], (x0 + x1) / 2, (y0 + y1) / 2,
                     half_w.reshape(-1, 1, 1), half_h.reshape(-1, 1, 1))
    cover = inside.reshape(-1, cy1 - cy0, supersample, cx1 - cx0, supersample).mean(axis=(2, 4))
    score = np.minimum(cover, crop).sum(axis=(1, 2)) / np.maximum(np.maximum(cover, crop).sum(axis=(1, 2)), 1e-9)
    return float(score.max())


def judge_batch(images) -> list[Judgement]:
    """`judge` each image of a batch: (N, H, W, 3) uint8/float array, or a list of images / PIL images."""
    return [judge(im) for im in images]


def match(judgement: Judgement, wanted: dict[str, str]) -> dict[str, bool]:
    """For each attribute in `wanted` (e.g. `parse_caption(prompt)`), whether the judged image has it."""
    unknown = set(wanted) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attribute(s) {sorted(unknown)}; attributes are {', '.join(ATTRIBUTES)}")
    got = judgement.attributes()
    return {a: got[a] == v for a, v in wanted.items()}


def box_mask(scene: Scene, size: int = IMAGE_SIZE, dilate: int = 0) -> np.ndarray:
    """(size, size) bool, True on the scene's shape's bounding box grown by `dilate` pixels each side (an
    inpainting mask that covers the object)."""
    half = scene.extent / 2
    x0, x1 = int(np.floor((scene.cx - half) * size)) - dilate, int(np.ceil((scene.cx + half) * size)) + dilate
    y0, y1 = int(np.floor((scene.cy - half) * size)) - dilate, int(np.ceil((scene.cy + half) * size)) + dilate
    mask = np.zeros((size, size), dtype=bool)
    mask[max(0, y0):y1, max(0, x0):x1] = True
    return mask


# ----------------------------------------------------------------------------------------------- caption match

def benchmark_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` deterministic prompts that always name colour, shape and position, and name size and background
    half of the time each (what the caption-match benchmark and tests generate)."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng(seed + 1)
    prompts = []
    for s in scenes:
        optional = [a for a in ("size", "background") if rng.random() < 0.5]
        prompts.append(caption(s, [a for a in ATTRIBUTES if a in ("colour", "shape", "position") or a in optional]))
    return prompts


def caption_match(pipe, prompts: list[str], *, seed: int = 0, batch_size: int = 16, **call_kwargs) -> dict:
    """Generate one image per prompt with `pipe` (batches of `batch_size`, batch k seeded `seed + k` on a CPU
    generator), judge each image, and score it against the attributes its prompt names.

    Returns {"accuracy": {attribute: fraction of prompts naming it whose image has it}, "counts": {attribute:
    prompts naming it}, "judgements": [Judgement per prompt], "images": (N, H, W, 3) uint8}."""
    import torch

    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of str")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    call_kwargs.setdefault("progress", False)
    images = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        generator = torch.Generator().manual_seed(seed + k)
        out = pipe(prompts[start:start + batch_size], generator=generator, output_type="np", **call_kwargs)
        images.append(np.round(np.asarray(out.images) * 255).astype(np.uint8))
    images = np.concatenate(images)
    judgements = judge_batch(images)
    hits = {a: 0 for a in ATTRIBUTES}
    counts = {a: 0 for a in ATTRIBUTES}
    for prompt, j in zip(prompts, judgements):
        for attr, ok in match(j, parse_caption(prompt)).items():
            counts[attr] += 1
            hits[attr] += int(ok)
    accuracy = {a: hits[a] / counts[a] for a in ATTRIBUTES if counts[a]}
    return {"accuracy": accuracy, "counts": {a: c for a, c in counts.items() if c}, "judgements": judgements,
            "images": images}
