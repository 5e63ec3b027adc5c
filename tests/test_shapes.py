"""The shapes world (unclip.shapes): deterministic renders and captions, and the pixel-analysis judge, whose
accuracy on ground-truth renders must be >= 99 % per attribute (issue 8)."""
import numpy as np
import pytest
from PIL import Image

from unclip import shapes


@pytest.fixture(scope="module")
def truth():
    scenes = shapes.sample_scenes(600, 123)
    return scenes, shapes.render(scenes)


def _accuracy(scenes, judgements):
    return {a: np.mean([getattr(j, a) == getattr(s, a) for s, j in zip(scenes, judgements)])
            for a in shapes.ATTRIBUTES}


def test_judge_accuracy_on_ground_truth_64(truth):
    scenes, images = truth
    acc = _accuracy(scenes, shapes.judge_batch(images))
    assert min(acc.values()) >= 0.99, acc


def test_judge_accuracy_on_ground_truth_32(truth):
    # The decoder's base resolution: the 2×2 averages of the renders.
    scenes, images = truth
    acc = _accuracy(scenes, shapes.judge_batch(shapes.downsample(images)))
    assert min(acc.values()) >= 0.99, acc


def test_judge_input_kinds_agree(truth):
    scenes, images = truth
    for s, im in zip(scenes[:20], images[:20]):
        a = shapes.judge(im)
        assert shapes.judge(Image.fromarray(im)) == a
        assert shapes.judge(im.astype(np.float32) / 255.0) == a
        assert a.found and a.attributes() == s.attributes()


def test_judge_sees_no_object_on_a_plain_background():
    for rgb in shapes.BACKGROUNDS.values():
        j = shapes.judge(np.full((64, 64, 3), rgb, np.uint8))
        assert not j.found and j.colour is None and j.shape is None
        assert shapes.BACKGROUNDS[j.background] == rgb


def test_judge_reports_each_value():
    # One scene per value of every attribute (the others fixed) is read back exactly.
    base = dict(colour="red", shape="circle", size="large", position="center", background="white")
    for attr, values in (("colour", shapes.COLOURS), ("shape", shapes.SHAPES), ("size", shapes.SIZES),
                         ("position", shapes.POSITIONS), ("background", shapes.BACKGROUNDS)):
        for value in values:
            scene = shapes.sample_scenes(1, 7, **{**base, attr: value})[0]
            assert getattr(shapes.judge(shapes.render(scene)), attr) == value, (attr, value)


def test_judge_rejects_bad_images():
    with pytest.raises(ValueError, match="RGB"):
        shapes.judge(np.zeros((64, 64), np.uint8))
    with pytest.raises(TypeError, match="uint8 or float"):
        shapes.judge(np.zeros((64, 64, 3), np.int32))


def test_rendering_and_sampling_are_deterministic():
    a, b = shapes.sample_scenes(50, 5), shapes.sample_scenes(50, 5)
    assert a == b and a != shapes.sample_scenes(50, 6)
    assert np.array_equal(shapes.render(a), shapes.render(b))
    image = shapes.render(a[0])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    # Fixing an attribute changes nothing else about the draw sequence.
    fixed = shapes.sample_scenes(50, 5, colour="blue")
    assert all(f.colour == "blue" and f.shape == s.shape and f.cx == s.cx for f, s in zip(fixed, a))


def test_sample_scenes_validates():
    with pytest.raises(ValueError, match="colour must be one of"):
        shapes.sample_scenes(1, 0, colour="pink")
    with pytest.raises(ValueError, match="unknown attribute"):
        shapes.sample_scenes(1, 0, texture="wood")
    with pytest.raises(ValueError, match="n must be"):
        shapes.sample_scenes(-1, 0)


def test_captions_round_trip():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 7 * 4 * 3 * 6 * 4  # each attribute named or not
    scene = shapes.Scene("red", "triangle", "small", "left", "gray", 0.2, 0.3, 0.5)
    assert shapes.caption(scene) == "a small red triangle on the left on a gray background"
    assert shapes.caption(scene, ["colour"]) == "a red shape"
    for text in captions[::7]:
        named = shapes.parse_caption(text)
        assert shapes.caption({**dict(colour="red", shape="circle", size="small", position="left",
                                      background="white"), **named}, named) == text


def test_downsample_is_the_2x2_average():
    images = shapes.render(shapes.sample_scenes(3, 1))
    small = shapes.downsample(images)
    assert small.shape == (3, 32, 32, 3)
    expected = images.astype(np.float64).reshape(3, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    assert np.abs(small - expected).max() <= 0.5


def test_match_and_benchmark_prompts():
    j = shapes.Judgement("red", "circle", "small", "left", "white", True)
    assert shapes.match(j, {"colour": "red", "shape": "square"}) == {"colour": True, "shape": False}
    with pytest.raises(ValueError, match="unknown attribute"):
        shapes.match(j, {"texture": "wood"})
    prompts = shapes.benchmark_prompts(40, 0)
    assert prompts == shapes.benchmark_prompts(40, 0)
    for p in prompts:
        assert {"colour", "shape", "position"} <= set(shapes.parse_caption(p))
