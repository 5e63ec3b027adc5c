"""Cascade behaviour beyond diffusers parity: the loop vs a plain reference loop, DDIM, prior candidates,
validation, callbacks, threads, non-finite detection and the CLI."""
import threading

import numpy as np
import pytest
import torch

import unclip
from unclip.samplers import alphas_cumprod_for, betas_for, karlo_timesteps

STEPS = dict(prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=2)


@pytest.fixture(scope="module")
def pipe():
    return unclip.Pipeline.from_preset("tiny", seed=0)


def _call(pipe, seed=0, **kw):
    args = dict(prompt="a blue square", output_type="pt", progress=False, **STEPS)
    args.update(kw)
    return pipe(generator=torch.Generator().manual_seed(seed), **args)


def test_prior_loop_equals_plain_reference_loop(pipe):
    """The plan-based, pre-drawn-noise loop equals a textbook DDPM loop written here with python floats."""
    c = pipe.components
    steps, scale = 4, 3.0
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(1, c.prior.config.embedding_dim, generator=g)
    out = pipe("a green circle", prior_num_inference_steps=steps, prior_guidance_scale=scale, prior_latents=latents,
               generator=torch.Generator().manual_seed(5), output_type="pt", progress=False,
               decoder_num_inference_steps=1, super_res_num_inference_steps=1)

    # Reference: same text features, then the DDPM posterior step by step with fp32 scalars computed on the
    # fly (the schedule's own precision: in float64 the t=999 step differs, as ā_999/ā_666 ≈ 1e-8 rounds).
    embeds, hidden, mask = pipe.encode_prompt("a green circle", 1, guidance=True)
    betas = betas_for("squaredcos_cap_v2", 1000)
    ac = alphas_cumprod_for(betas)
    ts = karlo_timesteps(steps)
    gen = torch.Generator().manual_seed(5)
    x = latents.clone()
    with torch.no_grad():
        for i, t in enumerate(ts):
            out2 = c.prior(torch.cat([x, x]), torch.tensor(t), embeds, hidden, mask)
            u, cnd = out2.chunk(2)
            x0 = (u + scale * (cnd - u)).clamp(-5, 5)  # x0-prediction, guided, clipped to the prior's range
            prev = ts[i + 1] if i + 1 < len(ts) else -1
            a_t, a_prev = ac[t], (ac[prev] if prev >= 0 else torch.tensor(1.0))
            # Adjacent timesteps (here the last step, 0 -> -1) use the training β_t, as Karlo's scheduler does.
            beta = betas[t] if prev == t - 1 else 1 - a_t / a_prev
            mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
            if prev >= 0:  # fixed_small_log: sigma = exp(log(posterior variance) / 2)
                var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
                x = mean + torch.exp(0.5 * torch.log(var)) * torch.randn(x.shape, generator=gen)
            else:
                x = mean
    expected = c.prior.post_process_latents(x)
    torch.testing.assert_close(out.image_embeddings, expected, rtol=1e-5, atol=1e-5)


def test_ddim_eta0_is_deterministic_and_eta_varies(pipe):
    c = pipe.components
    g = torch.Generator().manual_seed(0)
    dec, sr = c.decoder.config, c.upsamplers[0].first.config
    latents = dict(prior_latents=torch.randn(1, c.prior.config.embedding_dim, generator=g),
                   decoder_latents=torch.randn(1, 3, dec.sample_size, dec.sample_size, generator=g),
                   super_res_latents=torch.randn(1, 3, sr.sample_size, sr.sample_size, generator=g))
    a = _call(pipe, seed=1, sampler="ddim", eta=0.0, **latents).images
    b = _call(pipe, seed=2, sampler="ddim", eta=0.0, **latents).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no noise beyond the given latents
    c1 = _call(pipe, seed=1, sampler="ddim", eta=1.0, **latents).images
    c2 = _call(pipe, seed=2, sampler="ddim", eta=1.0, **latents).images
    c1b = _call(pipe, seed=1, sampler="ddim", eta=1.0, **latents).images
    assert (c1 - c2).abs().max() > 1e-3
    torch.testing.assert_close(c1, c1b, rtol=0, atol=0)
    # DDIM differs from DDPM, and per-stage choice works.
    d = _call(pipe, seed=1, sampler={"decoder": "ddim"}, **latents).images
    assert (d - a).abs().max() > 1e-4


def test_prior_candidates_keep_the_best_aligned_embedding(pipe):
    """k candidates: the kept embedding is the candidate with the highest cosine to the text embedding.
    Each candidate is recomputed alone from its own latents (deterministic DDIM prior) and scored here."""
    k, dim = 3, pipe.components.prior.config.embedding_dim
    cand_latents = torch.randn(k, dim, generator=torch.Generator().manual_seed(4))
    common = dict(prompt="a yellow star", sampler={"prior": "ddim"}, eta=0.0, decoder_num_inference_steps=1,
                  super_res_num_inference_steps=1, prior_num_inference_steps=3, output_type="pt", progress=False)
    chosen = pipe(prior_latents=cand_latents, prior_candidates=k, **common).image_embeddings
    singles = torch.cat([pipe(prior_latents=cand_latents[j:j + 1], **common).image_embeddings for j in range(k)])
    text = pipe.encode_prompt("a yellow star", 1, guidance=False)[0]
    scores = torch.nn.functional.cosine_similarity(singles, text)
    assert len(set(scores.argsort().tolist())) == k and scores.max() - scores.min() > 1e-4  # a real choice
    torch.testing.assert_close(chosen[0], singles[scores.argmax()], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(prompt=3), TypeError, "prompt must be a str or a non-empty list of str"),
    (dict(prompt=[]), TypeError, r"prompt.*\(empty\)"),
    (dict(prompt=["ok", None]), TypeError, "prompt must be"),
    (dict(prior_num_inference_steps=0), ValueError, r"prior_num_inference_steps must be in 1\.\.1000"),
    (dict(decoder_num_inference_steps=1001), ValueError, r"decoder_num_inference_steps must be in 1\.\.1000"),
    (dict(super_res_num_inference_steps=2.5), TypeError, "super_res_num_inference_steps must be an int"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be in"),
    (dict(prior_guidance_scale=float("nan")), ValueError, "prior_guidance_scale must be finite"),
    (dict(decoder_guidance_scale="8"), TypeError, "decoder_guidance_scale must be a finite real"),
    (dict(output_type="jpeg"), ValueError, "output_type must be one of pil, np, pt"),
    (dict(sampler="euler"), ValueError, "sampler must be one of ddpm, ddim"),
    (dict(sampler={"vae": "ddim"}), ValueError, "sampler: unknown stage"),
    (dict(eta=-1.0), ValueError, "eta must be >= 0"),
    (dict(prior_latents=torch.zeros(2, 2)), ValueError, r"prior_latents must have shape \(1, 32\)"),
    (dict(decoder_latents=np.zeros((1, 3, 16, 16))), TypeError, "decoder_latents must be a torch.Tensor"),
    (dict(generator=42), TypeError, "generator must be a torch.Generator"),
])
def test_bad_arguments_are_clear_and_harmless(pipe, kwargs, error, pattern):
    args = dict(prompt="x", progress=False, **STEPS)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        pipe(**args)
    assert _call(pipe).images.shape == (1, 3, 32, 32)  # still usable afterwards


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_runs_on_cpu(dtype):
    half = unclip.Pipeline.from_preset("tiny", seed=0, dtype=dtype)
    images = _call(half).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert half.components.decoder.conv_in.weight.dtype == dtype


def test_long_prompt_is_truncated_with_a_warning(pipe):
    with pytest.warns(UserWarning, match="longer than the 77 tokens"):
        _call(pipe, prompt="red " * 100)


def test_callback_sees_every_step_of_every_stage(pipe):
    seen = []
    _call(pipe, callback=lambda stage, i, t, x: seen.append((stage, i, int(t))))
    assert [s for s, _, _ in seen] == ["prior"] * 3 + ["decoder"] * 3 + ["super_res"] * 2
    assert [t for s, _, t in seen if s == "decoder"] == karlo_timesteps(3)


def test_threads_give_the_same_images_as_sequential_calls(pipe):
    expected = {s: _call(pipe, seed=s).images for s in range(3)}
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _call(pipe, seed=s).images))
               for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(3):
        torch.testing.assert_close(results[s], expected[s], rtol=0, atol=0)


def test_non_finite_output_names_the_stage():
    pipe = unclip.Pipeline.from_preset("tiny", seed=0)
    with torch.no_grad():
        pipe.components.decoder.conv_out.bias.fill_(float("nan"))
    with pytest.raises(unclip.NonFiniteError, match="stage 'decoder'"):
        _call(pipe)
