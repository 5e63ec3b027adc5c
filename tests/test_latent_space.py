"""The CLIP latent space as an interface: slerp, text diffs, DDIM inversion, interpolation, edits and the CLI.

Random-weight decoders are not denoisers: their DDIM trajectory is chaotic (x0 = (x_t − √(1−ā)·ε)/√ā
divides by √ā_999 ≈ 5e-5 with an ε that does not cancel x_t), so no inversion can reconstruct through
them. The inversion test therefore wraps the random U-Net into the denoiser a trained model approximates:
the posterior mean for Gaussian data whose mean μ = tanh(U-Net output) depends on the input, the timestep and
the image embedding (through text_proj and cross-attention), so every conditioning path is exercised.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import unclip
from unclip import latent_space, samplers
from unclip.cli import main
from unclip.latent_space import Inversion, LatentSeriesOutput, slerp, text_diff_embeddings

STEPS = dict(decoder_num_inference_steps=4, super_res_num_inference_steps=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # small networks (tests/conftest.py)


@pytest.fixture(scope="module")
def pipe():
    return unclip.Pipeline.from_preset("tiny", seed=0)


def _image(seed, h=40, w=52):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


A, B, C = _image(0), _image(1, 60, 30), _image(2)


# ------------------------------------------------------------------------------------------ slerp

def test_slerp_endpoints_norm_and_angle():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    ua, ub = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((ua * ub).sum(-1).double())
    for t in (0.1, 0.25, 0.5, 0.9):
        mid = slerp(ua, ub, t)
        torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)  # stays on the sphere
        # Constant angular speed: the angle to a is t·Ω, to b (1−t)·Ω.
        to_a = torch.arccos((mid.double() * ua.double()).sum(-1).clamp(-1, 1))
        to_b = torch.arccos((mid.double() * ub.double()).sum(-1).clamp(-1, 1))
        torch.testing.assert_close(to_a, t * omega, rtol=0, atol=1e-5)
        torch.testing.assert_close(to_b, (1 - t) * omega, rtol=0, atol=1e-5)
    # Rows are independent; dtype is kept.
    torch.testing.assert_close(slerp(a, b, 0.3)[1], slerp(a[1], b[1], 0.3))
    assert slerp(a.half(), b.half(), 0.3).dtype == torch.float16
    # Parallel vectors fall back to linear interpolation (no 0/0).
    torch.testing.assert_close(slerp(a[0], 2 * a[0], 0.5), 1.5 * a[0])


def test_slerp_errors():
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(torch.ones(4), -torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        slerp(torch.ones(4), torch.ones(5), 0.5)
    with pytest.raises(ValueError, match="t must be a finite real number"):
        slerp(torch.ones(4), torch.zeros(4) + 2, float("nan"))
    with pytest.raises(TypeError, match="must be tensors"):
        slerp([1.0], [2.0], 0.5)


# -------------------------------------------------------------------------------------- text diffs

def test_text_diff_embeddings():
    g = torch.Generator().manual_seed(1)
    z_i, z_t0, z_t = 7 * torch.randn(32, generator=g), torch.randn(32, generator=g), torch.randn(32, generator=g)
    thetas = [0.0, 0.25, 0.5, 1.0]
    z = text_diff_embeddings(z_i, z_t0, z_t, thetas)
    assert z.shape == (4, 32)
    assert torch.equal(z[0], z_i)  # θ = 0 is the image embedding itself
    z_d = (z_t - z_t0) / (z_t - z_t0).norm()
    torch.testing.assert_close(z[-1], z_i.norm() * z_d)  # θ = 1 is the text direction at the image's length
    torch.testing.assert_close(z.norm(dim=-1), z_i.norm().expand(4))  # length kept ...
    unit = z / z.norm(dim=-1, keepdim=True)  # ... direction = slerp(ẑ_i, z_d, θ), unit-norm by construction
    for k, theta in enumerate(thetas):
        torch.testing.assert_close(unit[k], slerp(z_i / z_i.norm(), z_d, theta), rtol=0, atol=1e-6)
    toward = (unit * z_d).sum(-1)
    assert (toward[1:] > toward[:-1]).all()  # monotone rotation toward z_d


@pytest.mark.parametrize("args, pattern", [
    (dict(to_text_embedding=torch.ones(8)), "same CLIP text embedding"),
    (dict(image_embedding=torch.zeros(8)), "image_embedding is zero"),
    (dict(thetas=[0.5, 1.5]), r"thetas must lie in \[0, 1\]"),
    (dict(thetas=[]), "thetas must be a non-empty list"),
    (dict(thetas=[float("nan")]), "thetas must be a finite real number"),
    (dict(image_embedding=torch.ones(2, 8)), "image_embedding must be a 1-D float tensor"),
    (dict(from_text_embedding=torch.ones(9)), "must have the same size"),
    (dict(image_embedding=torch.full((8,), float("inf"))), "image_embedding contains NaN"),
])
def test_text_diff_embeddings_errors(args, pattern):
    kwargs = dict(image_embedding=torch.arange(8.0), from_text_embedding=torch.ones(8),
                  to_text_embedding=torch.arange(8.0) - 2, thetas=[0.0, 0.5]) | args
    with pytest.raises(ValueError, match=pattern):
        text_diff_embeddings(**kwargs)


# ---------------------------------------------------------------------------------------- inversion

class GaussianPosteriorDenoiser(torch.nn.Module):
    """ε of the exact denoiser for x0 ~ N(μ, σ²I), with μ = tanh(random U-Net(x_t, t, conditioning)).

    x0_pred = μ + √ā·σ²/(ā·σ² + 1 − ā)·(x_t − √ā·μ) and ε = (x_t − √ā·x0_pred)/√(1 − ā): smooth in x_t like a
    trained decoder's, while μ carries the U-Net's dependence on the image embedding. With
    `prediction="sample"` it outputs x0_pred instead (an x0 model, like the toy decoder)."""

    def __init__(self, unet, schedule, sigma=0.5, prediction="epsilon"):
        super().__init__()
        self.unet, self.config, self.sigma, self.prediction = unet, unet.config, sigma, prediction
        self.alpha_bar = samplers.alphas_cumprod_for(samplers.betas_for(schedule.beta_schedule,
                                                                        schedule.num_train_timesteps))

    def forward(self, x, t, context, time_embed, mask):
        out = self.unet(x, t, context, time_embed, mask)
        channels = x.shape[1]
        mu = torch.tanh(out[:, :channels])
        ab = self.alpha_bar[t.long()].to(x.dtype)
        s2 = self.sigma ** 2
        x0 = mu + ab.sqrt() * s2 / (ab * s2 + 1 - ab) * (x - ab.sqrt() * mu)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        return torch.cat([eps if self.prediction == "epsilon" else x0, out[:, channels:]], dim=1)


@pytest.fixture(scope="module", params=["epsilon", "sample"])
def denoiser_pipe(pipe, request):
    # The same denoiser as an ε model and as an x0 model: inversion must convert an x0 output to its ε.
    c = pipe.components
    schedule = dataclasses.replace(c.decoder_scheduler, prediction_type=request.param)
    decoder = GaussianPosteriorDenoiser(c.decoder, c.decoder_scheduler, prediction=request.param)
    return unclip.Pipeline(dataclasses.replace(c, decoder=decoder, decoder_scheduler=schedule))


def test_inversion_reconstructs_and_error_falls_with_steps(denoiser_pipe):
    p = denoiser_pipe
    z = p.encode_image(A)
    # The decoder's own output, guidance 1, same embedding: DDIM (η = 0) from known noise x_T*.
    x_T = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x0 = p.reconstruct(Inversion(x_T, z, torch.zeros_like(x_T), 100, 1.0))  # DDIM η = 0, no clipping
    assert 0.2 < x0.std() < 2  # a real image-like signal, not saturated or flat
    errors, latent_errors = {}, {}
    for steps in (5, 10, 25, 50):
        inv = p.invert(decoder_image=x0, num_inference_steps=steps, image_embeddings=z)
        assert isinstance(inv, Inversion) and inv.latents.shape == (1, 3, 16, 16)
        errors[steps] = (p.reconstruct(inv) - x0).abs().max().item()
        latent_errors[steps] = (inv.latents - x_T).abs().max().item()
    # First-order method: the error roughly halves when the steps double.
    assert errors[5] > errors[10] > errors[25] > errors[50], errors
    # Chosen step count 50: max |x0 − DDIM(invert(x0))| ≈ 0.06 (image range ≈ ±1.6); asserted < 0.1.
    assert errors[50] < 0.1, errors
    assert errors[5] > 4 * errors[50], errors
    assert latent_errors[50] < latent_errors[5] and latent_errors[50] < 0.15, latent_errors
    # The embedding is part of the latent: the same x_T decoded with the opposite embedding misses x0 by far
    # more than the reconstruction error (measured ≈ 0.2 vs 0.06).
    inv = p.invert(decoder_image=x0, num_inference_steps=50, image_embeddings=z)
    wrong = p.reconstruct(dataclasses.replace(inv, image_embeddings=-z))
    assert (wrong - x0).abs().max() > 2.5 * errors[50]


def test_invert_images(pipe):
    inv = pipe.invert([A, B], 3)
    assert inv.latents.shape == (2, 3, 16, 16) and inv.image.shape == (2, 3, 16, 16)
    assert inv.image.min() >= -1 and inv.image.max() <= 1
    torch.testing.assert_close(inv.image_embeddings, pipe.encode_image([A, B]))
    assert inv.num_inference_steps == 3 and inv.decoder_guidance_scale == 1.0
    assert torch.isfinite(pipe.reconstruct(inv)).all()
    # Deterministic: the same call gives the same latents.
    assert torch.equal(pipe.invert([A, B], 3).latents, inv.latents)


# ------------------------------------------------------------------------------------ interpolation

def test_interpolate_fixed_noise(pipe):
    out = pipe.interpolate(A, B, 4, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                           **STEPS)
    assert isinstance(out, LatentSeriesOutput) and out.images.shape == (4, 3, 32, 32)
    assert out.thetas == [0.0, 1 / 3, 2 / 3, 1.0]
    za, zb = pipe.encode_image(A)[0], pipe.encode_image(B)[0]
    assert torch.equal(out.image_embeddings[0], za) and torch.equal(out.image_embeddings[-1], zb)
    torch.testing.assert_close(out.image_embeddings[1], slerp(za, zb, 1 / 3))
    assert all(torch.equal(out.latents[0], x) for x in out.latents)  # one decoder noise for every image
    assert (out.images[0] - out.images[-1]).abs().max() > 1e-2
    # The start image depends on the start only: the same seed with another end gives the same first image.
    other = pipe.interpolate(A, C, 3, generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                             **STEPS)
    torch.testing.assert_close(other.images[0], out.images[0], rtol=0, atol=1e-5)
    assert (other.images[-1] - out.images[-1]).abs().max() > 1e-2


def test_interpolate_inverted_noise(pipe):
    out = pipe.interpolate(A, B, 3, noise="inverted", generator=torch.Generator().manual_seed(0), output_type="np",
                           progress=False, **STEPS)
    assert out.images.shape == (3, 32, 32, 3)
    steps = STEPS["decoder_num_inference_steps"]
    ends = [pipe.invert(x, steps) for x in (A, B)]
    # The ends are the two images' own bipartite latents (so they decode to the reconstructions) ...
    torch.testing.assert_close(out.latents[0], ends[0].latents[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.latents[-1], ends[1].latents[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.image_embeddings[0], ends[0].image_embeddings[0])
    # ... and the middle is the slerp of both halves of the latent.
    flat = slerp(ends[0].latents.reshape(1, -1), ends[1].latents.reshape(1, -1), 0.5)
    torch.testing.assert_close(out.latents[1], flat.reshape(3, 16, 16), rtol=0, atol=1e-6)


def test_interpolate_prompts_and_embeddings(pipe):
    prior = dict(prior_num_inference_steps=3, prior_guidance_scale=4.0)
    out = pipe.interpolate("a red cat", "a blue dog", 3, generator=torch.Generator().manual_seed(5),
                           output_type="pt", progress=False, **prior, **STEPS)
    # Text-to-text: the ends are exactly the prior's embeddings for the two prompts (same draws as __call__).
    expected = pipe(["a red cat", "a blue dog"], generator=torch.Generator().manual_seed(5), output_type="pt",
                    progress=False, decoder_num_inference_steps=2, super_res_num_inference_steps=2,
                    **prior).image_embeddings
    torch.testing.assert_close(out.image_embeddings[[0, -1]], expected, rtol=0, atol=1e-6)
    # Mixed ends: a prompt and a given embedding vector.
    z = pipe.encode_image(C)[0]
    mixed = pipe.interpolate("a red cat", z, 2, generator=torch.Generator().manual_seed(5), output_type="pt",
                             progress=False, **prior, **STEPS)
    alone = pipe("a red cat", generator=torch.Generator().manual_seed(5), output_type="pt", progress=False,
                 decoder_num_inference_steps=2, super_res_num_inference_steps=2, **prior).image_embeddings
    torch.testing.assert_close(mixed.image_embeddings[0], alone[0], rtol=0, atol=1e-6)
    assert torch.equal(mixed.image_embeddings[1], z)


# ------------------------------------------------------------------------------------------- edits

def test_text_diff(pipe):
    thetas = [0.0, 0.25, 0.5]
    out = pipe.text_diff(A, "a photo of a cat", "a painting of a cat", thetas,
                         generator=torch.Generator().manual_seed(0), output_type="pt", progress=False, **STEPS)
    assert out.images.shape == (3, 3, 32, 32) and out.thetas == thetas
    z_i = pipe.encode_image(A)[0]
    text, _, _ = pipe.encode_prompt(["a photo of a cat", "a painting of a cat"], guidance=False)
    torch.testing.assert_close(out.image_embeddings, text_diff_embeddings(z_i, text[0], text[1], thetas))
    assert torch.equal(out.image_embeddings[0], z_i)  # θ = 0: the source embedding
    inv = pipe.invert(A, STEPS["decoder_num_inference_steps"])
    assert all(torch.equal(x, inv.latents[0]) for x in out.latents)  # decoded from the image's own x_T
    assert (out.images[0] - out.images[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("call, error, pattern", [
    (lambda p: p.interpolate(A, B, 1), ValueError, r"num must be in 2\.\.1000"),
    (lambda p: p.interpolate(A, B, noise="random"), ValueError, r"noise must be one of fixed, inverted"),
    (lambda p: p.interpolate("a cat", B, noise="inverted"), ValueError, "noise='inverted' needs images"),
    (lambda p: p.interpolate(np.zeros((0, 8, 3)), B), ValueError, r"start is empty"),
    (lambda p: p.interpolate(A, np.full((8, 8, 3), np.nan)), ValueError, r"end contains NaN"),
    (lambda p: p.interpolate(A, [A, B]), ValueError, r"end must be a single image"),
    (lambda p: p.interpolate(A, torch.ones(5)), ValueError, r"end must have shape \(32,\)"),
    (lambda p: p.interpolate(A, B, decoder_guidance_scale=float("nan")), ValueError, "decoder_guidance_scale"),
    (lambda p: p.invert(), ValueError, "exactly one of image and decoder_image"),
    (lambda p: p.invert(A, 0), ValueError, r"num_inference_steps must be in 1..1000"),
    (lambda p: p.invert(np.zeros((8, 8, 3), np.complex64)), TypeError, r"image must hold real numbers"),
    (lambda p: p.invert(decoder_image=torch.zeros(1, 3, 16, 16)), ValueError, "image_embeddings is required"),
    (lambda p: p.invert(decoder_image=torch.zeros(1, 3, 8, 8), image_embeddings=torch.ones(1, 32)), ValueError,
     r"decoder_image must have shape \(B, 3, 16, 16\)"),
    (lambda p: p.invert(A, image_embeddings=torch.ones(2, 32)), ValueError, "has 2 rows but there are 1 images"),
    (lambda p: p.reconstruct("x_T"), TypeError, "inversion must be an Inversion"),
    (lambda p: p.text_diff(A, "a cat", "a cat"), ValueError, "same CLIP text embedding"),
    (lambda p: p.text_diff(A, "a cat", 3), TypeError, "to_caption must be a str"),
    (lambda p: p.text_diff(A, "a", "b", thetas=[2.0]), ValueError, r"thetas must lie in \[0, 1\]"),
    (lambda p: p.text_diff([A, B], "a", "b"), ValueError, "image must be a single image"),
    (lambda p: p.text_diff(np.zeros((3, 3)), "a", "b", output_type="bmp"), ValueError, "output_type must be one of"),
    (lambda p: p.encode_image(), ValueError, "exactly one of images and pixel_values"),
    (lambda p: p.encode_image(pixel_values=torch.zeros(1, 3, 32, 32, dtype=torch.int64)), TypeError, "pixel_values"),
])
def test_bad_arguments_raise_clear_errors(pipe, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(pipe)


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "tiny")
    pipe.save_pretrained(path)
    return path


def _metadata(path):
    with Image.open(path) as image:
        return json.loads(image.text["unclip"])


def test_cli_vary(model_dir, tmp_path, capsys):
    A.save(tmp_path / "in.png")
    out = tmp_path / "out" / "v.png"
    code = main(["vary", str(tmp_path / "in.png"), "--model", model_dir, "-n", "2", "--steps", "2", "2",
                 "--seed", "3", "--out", str(out), "--quiet"])
    assert code == 0
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["v-0.png", "v-1.png", "v-sheet.png"]
    meta = _metadata(tmp_path / "out" / "v-1.png")
    assert meta["command"] == "vary" and meta["seed"] == 3 and meta["index"] == 1 and meta["steps"] == [2, 2]
    assert meta["model"] == os.path.abspath(model_dir)
    with Image.open(tmp_path / "out" / "v-sheet.png") as sheet:
        assert sheet.size == (4 + 3 * (32 + 4), 4 + 32 + 4)  # the input, then the 2 variations
    assert str(out.parent / "v-0.png") in capsys.readouterr().out


def test_cli_interpolate_and_edit(model_dir, tmp_path):
    A.save(tmp_path / "a.png")
    B.save(tmp_path / "b.jpg")
    code = main(["interpolate", str(tmp_path / "a.png"), "a blue dog", "--model", model_dir, "--num", "3",
                 "--steps", "2", "2", "--prior-steps", "2", "--out", str(tmp_path / "i.png"), "--quiet"])
    assert code == 0
    meta = _metadata(tmp_path / "i-2.png")
    assert meta["theta"] == 1.0 and meta["start"] == {"image": str(tmp_path / "a.png")}
    assert meta["end"] == {"prompt": "a blue dog"} and meta["noise"] == "fixed"
    assert os.path.isfile(tmp_path / "i-sheet.png")

    code = main(["edit", str(tmp_path / "b.jpg"), "--from", "a photo", "--to", "a sketch", "--thetas", "0", "0.3",
                 "--model", model_dir, "--steps", "2", "2", "--out", str(tmp_path / "e.png"), "--quiet"])
    assert code == 0
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("e-")) == ["e-0.png", "e-1.png", "e-sheet.png"]
    meta = _metadata(tmp_path / "e-1.png")
    assert meta["theta"] == 0.3 and meta["from"] == "a photo" and meta["to"] == "a sketch"


def test_cli_errors(model_dir, tmp_path, capsys):
    assert main(["vary", str(tmp_path / "missing.png"), "--model", model_dir, "--quiet"]) == 2
    assert "image file not found" in capsys.readouterr().err
    # A missing file name is not silently read as a prompt.
    assert main(["interpolate", "cat.jpg", "a dog", "--model", model_dir, "--quiet"]) == 2
    assert "start: image file not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["vary", str(tmp_path / "bad.png"), "--model", model_dir, "--quiet"]) == 2
    assert main(["edit", str(tmp_path / "bad.png"), "--from", "a", "--to", "a", "--model", model_dir]) == 2
