"""Stage 5: assemble the trained networks into a diffusers-layout folder (fp16 safetensors).

The folder holds Karlo's components (tokenizer, text_encoder, prior, text_proj, decoder, super_res_first,
super_res_last and the three schedulers) plus the image tower and its processor config (for variations),
and `training.json` with the recipe, per-stage times and metrics.

    python training/assemble.py --work /tmp/toy-work [--out engine/assets/toy]
"""
from __future__ import annotations

import argparse
import os

import torch

if __package__ in (None, ""):
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402
from unclip.loading import Components, SchedulerConfig, Upsampler, save_components  # noqa: E402


def components(work: str) -> Components:
    tokenizer = C.build_tokenizer()
    clip = C.load_checkpoint(os.path.join(work, "clip.pt"))
    prior_ck = C.load_checkpoint(os.path.join(work, "prior.pt"))
    decoder_ck = C.load_checkpoint(os.path.join(work, "decoder.pt"))
    sr_ck = C.load_checkpoint(os.path.join(work, "upsampler.pt"))

    def load(kind, cfg, state):
        module = C.build(kind, cfg, 0)
        module.load_state_dict(state)
        return module.eval().requires_grad_(False)

    sr = load("super_res", C.super_res_config(), sr_ck["super_res"])
    return Components(
        tokenizer=tokenizer,
        text_encoder=load("text_encoder", C.text_encoder_config(tokenizer.vocab_size), clip["text"]),
        image_encoder=load("image_encoder", clip.get("image_config", C.image_encoder_config()), clip["image"]),
        image_processor_config=dict(C.IMAGE_PROCESSOR_CONFIG),
        prior=load("prior", C.prior_config(), prior_ck["prior"]),
        prior_scheduler=SchedulerConfig(**C.PRIOR_SCHEDULER),
        text_proj=load("text_proj", C.text_proj_config(), decoder_ck["text_proj"]),
        decoder=load("decoder", C.decoder_config(), decoder_ck["decoder"]),
        decoder_scheduler=SchedulerConfig(**decoder_ck.get("scheduler", C.DECODER_SCHEDULER)),
        upsamplers=[Upsampler("super_res", sr, sr, SchedulerConfig(**sr_ck.get("scheduler", C.SUPER_RES_SCHEDULER)))],
        call_defaults=dict(C.CALL_DEFAULTS),
    )


def assemble(work: str, out: str, recipe: dict | None = None) -> None:
    log = C.Log(os.path.join(work, "train.log"), "assemble")
    c = components(work)
    save_components(c, out, dtype=torch.float16)
    # The shipped folder keeps Karlo's tokenizer form (vocab.json + merges.txt, no tokenizer.json): the engine
    # reads both forms, and tests/test_tokenizer.py checks the older one through this folder.
    os.remove(os.path.join(out, "tokenizer", "tokenizer.json"))
    stages = {}
    for name in ("clip", "prior", "decoder", "upsampler"):
        ck = C.load_checkpoint(os.path.join(work, f"{name}.pt"))
        stages[name] = {"seconds": round(ck["seconds"], 1), "metrics": ck["metrics"]}
    params = {name: C.count_params(m) for name, m in (
        ("text_encoder", c.text_encoder), ("image_encoder", c.image_encoder), ("prior", c.prior),
        ("text_proj", c.text_proj), ("decoder", c.decoder), ("super_res", c.upsamplers[0].first))}
    C.write_json(os.path.join(out, "training.json"), {"recipe": recipe or {}, "stages": stages, "parameters": params})
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    log(f"wrote {out}: {size / 1e6:.2f} MB, parameters {params}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", default=C.ASSET_DIR)
    a = p.parse_args(argv)
    assemble(a.work, a.out)


if __name__ == "__main__":
    main()
