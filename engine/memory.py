"""How much memory one call needs, from the cascade's configs alone, and how many images fit.

`estimate_call_bytes(components, rows, dtype)` estimates the peak memory, beyond the loaded weights, of one
call that produces `rows` images: the largest stage's working set, stages being run one after another.
For each stage it counts, per network row (the decoder and the prior run two rows per image under
classifier-free guidance, the prior k per image with k candidates):

- U-Nets: the skip activations the down path keeps for the up path (every resnet and downsampler output),
  plus a working set of a few feature maps at the widest level (a resnet's input, normalised input, conv
  outputs and the skip concatenation of the up path), plus attention scores and probabilities where a
  block attends (heads × pixels × (pixels + context tokens)), all in the model dtype;
- the prior and the text tower: a transformer layer's activations and attention scores;
- the sampler's float32 state: latents, model output, and the noise of every step (drawn up front);
- the images passed between stages and the float32 output.

It does not model allocator caching or fragmentation, and it counts attention scores that flash /
memory-efficient attention kernels never materialise (an overestimate there). Tolerance: within a factor
of 2 of the measured peak; tests/test_memory.py checks this on the tiny preset against the growth of the
process's peak resident memory (fp32, CPU), where the estimate comes out at about 0.9x, the rest being
memory the allocator keeps from earlier stages. It is exactly linear in `rows`.

`max_images_per_call` turns it into a limit against a memory budget: by default `BUDGET_FRACTION` of the
memory available now on the cascade's device (CUDA: free device memory plus what PyTorch's allocator holds
unused; CPU: MemAvailable from /proc/meminfo, capped by a cgroup limit, or os.sysconf elsewhere).
"""
from __future__ import annotations

import math
import os

import torch

BUDGET_FRACTION = 0.75  # leave room for the allocator, other processes and what the estimate misses
WORKING_MAPS = 8        # feature maps of the widest level alive at once inside a U-Net block
DEFAULT_STEPS = {"prior": 25, "decoder": 25, "super_res": 7}  # Karlo's defaults (noise is drawn up front)
_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_F32 = 4


def _element_bytes(dtype) -> int:
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype must be a torch dtype or one of {', '.join(_DTYPE_NAMES)}; got {dtype!r}")
        dtype = _DTYPE_NAMES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype or a name such as 'fp16'; got {type(dtype).__name__}")
    return torch.empty((), dtype=dtype).element_size()


def _square(size) -> int:
    if isinstance(size, (tuple, list)):
        return int(size[0]) * int(size[1])
    return int(size) ** 2


def _unet_row_elements(config, *, context_tokens: int = 0) -> int:
    """Peak activation elements of one row of a U-Net forward (see the module docstring)."""
    channels = list(config.block_out_channels)
    n = len(channels)
    layers = config.layers_per_block
    layers = list(layers) if isinstance(layers, (tuple, list)) else [layers] * n
    pixels = _square(config.sample_size)
    level_pixels = [max(1, pixels >> (2 * i)) for i in range(n)]

    skips = channels[0] * level_pixels[0]  # conv_in's output
    for i in range(n):
        skips += layers[i] * channels[i] * level_pixels[i]
        if i < n - 1:
            skips += channels[i] * level_pixels[i + 1]  # the downsampler's output
    # Up blocks read [hidden, skip] concatenated: up to twice a level's width.
    working = WORKING_MAPS * max(2 * channels[i] * level_pixels[i] for i in range(n))

    attention = 0
    head_dims = getattr(config, "attention_head_dim", None)
    down_types = getattr(config, "down_block_types", None)
    if down_types is not None:  # the decoder: attention in its cross-attention levels and the mid block
        sites = [i for i, kind in enumerate(down_types) if "Attn" in kind]
        if getattr(config, "mid_block_type", None):
            sites.append(n - 1)
        dims = list(head_dims) if isinstance(head_dims, (tuple, list)) else [head_dims or channels[-1]] * n
        keys_extra = context_tokens
    else:  # an upsampler: one optional self-attention layer in the mid block
        sites = [n - 1] if getattr(config, "add_attention", False) and getattr(config, "mid_block_type", None) else []
        dims = [head_dims or channels[-1]] * n
        keys_extra = 0
    for i in sites:
        heads = max(1, channels[i] // max(1, dims[i]))
        tokens = level_pixels[i]
        keys = tokens + keys_extra
        attention = max(attention, 2 * heads * tokens * keys + channels[i] * (4 * tokens + 2 * keys))
    return skips + working + attention


def _transformer_row_elements(tokens: int, width: int, heads: int, mlp_width: int) -> int:
    """One transformer layer's live activations for one row: residual stream, q/k/v, MLP hidden, scores."""
    return tokens * (6 * width + 2 * mlp_width) + 2 * heads * tokens * tokens


def _config(network):
    return getattr(network, "config", None)


def stage_bytes(components, rows: int, dtype, *, guidance: bool = True, prior_candidates: int = 1,
                steps: dict | None = None) -> dict[str, int]:
    """{stage: estimated peak bytes} of one call producing `rows` images (see the module docstring)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be an int >= 0; got {rows!r}")
    element = _element_bytes(dtype)
    steps = {**DEFAULT_STEPS, **(steps or {})}
    cfg_rows = 2 if guidance else 1
    out: dict[str, int] = {}
    tokens = int(getattr(components.tokenizer, "model_max_length", 77))

    text = _config(components.text_encoder)
    if text is not None:
        text_rows = rows * cfg_rows
        out["text_encoder"] = text_rows * element * (
            _transformer_row_elements(tokens, text.hidden_size, text.num_attention_heads, text.intermediate_size)
            + 2 * tokens * text.hidden_size)  # the hidden states kept for the prior and text_proj

    prior = _config(components.prior) if components.prior is not None else None
    if prior is not None:
        width = prior.num_attention_heads * prior.attention_head_dim
        seq = prior.num_embeddings + prior.additional_embeddings
        prior_rows = rows * prior_candidates * cfg_rows
        out["prior"] = (prior_rows * element * _transformer_row_elements(seq, width, prior.num_attention_heads,
                                                                         4 * width)
                        + rows * prior_candidates * _F32 * prior.embedding_dim * (steps["prior"] + 3))

    decoder = _config(components.decoder)
    proj = _config(components.text_proj)
    context = tokens + (proj.clip_extra_context_tokens if proj is not None else 4)
    previous_image = 0
    if decoder is not None:
        pixels = _square(decoder.sample_size)
        state = rows * _F32 * pixels * (decoder.in_channels * (steps["decoder"] + 2) + decoder.out_channels)
        cond = rows * cfg_rows * element * context * (decoder.cross_attention_dim or 1)
        out["decoder"] = (rows * cfg_rows * element * _unet_row_elements(decoder, context_tokens=context)
                          + state + cond)
        previous_image = rows * _F32 * decoder.in_channels * pixels
    for i, up in enumerate(components.upsamplers):
        config = _config(up.first)
        if config is None:
            continue
        pixels = _square(config.sample_size)
        image = rows * _F32 * config.out_channels * pixels
        state = rows * _F32 * pixels * (config.out_channels * (steps["super_res"] + 2) + config.in_channels)
        out[up.name] = rows * element * _unet_row_elements(config) + state + previous_image + image
        previous_image = image
    # The result: the last stage's float32 images and their uint8 copy for PIL / numpy output.
    out["output"] = previous_image + previous_image // 4
    return out


def estimate_call_bytes(components, rows: int, dtype, *, guidance: bool = True, prior_candidates: int = 1,
                        steps: dict | None = None) -> int:
    """Estimated peak bytes (beyond the weights) of one call producing `rows` images in `dtype`: the
    largest stage's (the output images count as the last one; see the module docstring for what is counted and the
    tolerance). `steps` overrides DEFAULT_STEPS per stage kind ("prior", "decoder", "super_res")."""
    per_stage = stage_bytes(components, rows, dtype, guidance=guidance, prior_candidates=prior_candidates,
                            steps=steps)
    return max(per_stage.values(), default=0)


def available_bytes(device=None) -> int:
    """Memory a new allocation can use now on `device` (None or a CPU device: host memory)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    return _host_available_bytes()


def _host_available_bytes() -> int:
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * 2**30  # unknown platform: assume a modest machine
    # A container's memory limit (cgroup v2, then v1) can be far below what the host reports.
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_path, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_path, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, max(0, int(limit) - usage))
        break
    return int(available)


def _device_of(components) -> torch.device:
    network = components.decoder
    device = getattr(network, "device", None)
    if device is None and isinstance(network, torch.nn.Module):
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else None
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.device("cpu") if device.type == "meta" else device


def max_images_per_call(components, dtype, budget_bytes: int | None = None, *, guidance: bool = True,
                        prior_candidates: int = 1, steps: dict | None = None) -> int:
    """The most images one call may produce within `budget_bytes` (default: BUDGET_FRACTION of the memory
    available now on the cascade's device), by `estimate_call_bytes`. Never below 1: the estimate is
    conservative, so a single image is always attempted."""
    if budget_bytes is None:
        budget_bytes = int(BUDGET_FRACTION * available_bytes(_device_of(components)))
    elif isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes must be an int >= 0 or None; got {budget_bytes!r}")
    kwargs = dict(guidance=guidance, prior_candidates=prior_candidates, steps=steps)
    fixed = estimate_call_bytes(components, 0, dtype, **kwargs)
    per_image = estimate_call_bytes(components, 1, dtype, **kwargs) - fixed
    if per_image <= 0:
        return 1
    return max(1, math.floor((budget_bytes - fixed) / per_image))
