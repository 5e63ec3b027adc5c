"""Helpers shared by the tests: a numerical error measure, thread-count control and a diffusers peer."""
import contextlib

import torch

# Parity with diffusers must hold at every intra-op thread count (services pin it), not only at the default:
# MKL and PyTorch pick kernels and split work by it, so tests compare at 1, 2 and the default count.
THREAD_COUNTS = sorted({1, 2, torch.get_num_threads()})


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with `n` intra-op threads (both peers then use the same count), restoring the old one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (norm-wise relative error, robust to near-zero entries)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def diffusers_unclip_pipeline(path: str, variations: bool = False):
    """diffusers' UnCLIPPipeline (or, with `variations`, UnCLIPImageVariationPipeline) over a saved cascade
    folder, in fp32. Built from the component folders, so that it also takes folders whose model_index.json
    diffusers cannot load (Karlo's `unclip` text_proj entry, or the one diffusers 0.42 itself writes)."""
    import transformers
    from diffusers import (PriorTransformer, UnCLIPImageVariationPipeline, UnCLIPPipeline, UnCLIPScheduler,
                           UNet2DConditionModel, UNet2DModel)
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    transformers.logging.set_verbosity_error()

    sub = lambda name: f"{path}/{name}"  # noqa: E731
    parts = dict(
        decoder=UNet2DConditionModel.from_pretrained(sub("decoder")),
        text_encoder=transformers.CLIPTextModelWithProjection.from_pretrained(sub("text_encoder")),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(sub("tokenizer")),
        text_proj=UnCLIPTextProjModel.from_pretrained(sub("text_proj")),
        super_res_first=UNet2DModel.from_pretrained(sub("super_res_first")),
        super_res_last=UNet2DModel.from_pretrained(sub("super_res_last")),
        decoder_scheduler=UnCLIPScheduler.from_pretrained(sub("decoder_scheduler")),
        super_res_scheduler=UnCLIPScheduler.from_pretrained(sub("super_res_scheduler")),
    )
    if variations:
        pipe = UnCLIPImageVariationPipeline(
            feature_extractor=transformers.CLIPImageProcessor.from_pretrained(sub("feature_extractor")),
            image_encoder=transformers.CLIPVisionModelWithProjection.from_pretrained(sub("image_encoder")), **parts)
    else:
        pipe = UnCLIPPipeline(prior=PriorTransformer.from_pretrained(sub("prior")),
                              prior_scheduler=UnCLIPScheduler.from_pretrained(sub("prior_scheduler")), **parts)
    pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
