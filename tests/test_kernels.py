"""The Triton kernels (unclip.kernels) against float64 references, the custom ops, and the model wiring.

Without a CUDA device the kernels run in Triton's CPU interpreter. TRITON_INTERPRET is read when a kernel
is decorated (on its first call, since unclip.kernels imports Triton lazily), so setting it here, before
any kernel runs, suffices even if another module imported torch or triton first. With a CUDA device (and
TRITON_INTERPRET not set to 1) the same tests run the compiled kernels on the GPU.
"""
import os

import torch

if not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"):
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from torch import nn  # noqa: E402

import unclip.kernels as K  # noqa: E402
from helpers import max_rel_err  # noqa: E402
from unclip.kernels import _triton_support  # noqa: E402
from unclip.models.layers import Attend, GroupNorm, attention_reference, group_norm_reference  # noqa: E402

pytestmark = pytest.mark.skipif(not K.triton_installed(), reason="triton is not installed")

ROOT = Path(__file__).resolve().parents[1]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------- references

def attention_f64(q, k, v, causal, keep, scale=None):
    """Softmax attention in float64; rows that see no key are zero (the kernels' documented behaviour)."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    visible = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        visible = visible.tril()
    visible = visible.expand(s.shape).clone()
    if keep is not None:
        visible &= keep.cpu()[:, None, None, :]
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def group_norm_f64(x, groups, weight, bias, eps, silu, scale, shift):
    x = x.double().cpu()
    b, c = x.shape[:2]
    xs = x.reshape(b, groups, -1)
    mean = xs.mean(-1, keepdim=True)
    var = ((xs - mean) ** 2).mean(-1, keepdim=True)
    h = ((xs - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.dim() - 2)
    per_batch_channel = (b, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        h = h * weight.double().cpu().reshape(per_channel)
    if bias is not None:
        h = h + bias.double().cpu().reshape(per_channel)
    if scale is not None:
        h = h * (1 + scale.double().cpu().reshape(per_batch_channel)) + shift.double().cpu().reshape(per_batch_channel)
    return h * torch.sigmoid(h) if silu else h


def poisoned_like(t, memory_format=torch.contiguous_format):
    return torch.full_like(t, float("nan"), memory_format=memory_format)


def assert_close(actual, expected, dtype, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite output (an element was not written?)"
    err = max_rel_err(actual, expected)
    assert err <= TOL[dtype], f"{what}: max rel err {err:.3g} > {TOL[dtype]:g}"


# ----------------------------------------------------------------------------------------------- attention

def _qkv(rng, gen, batch, heads, len_q, len_k, dim, dtype, layout):
    """q/k/v in (B, H, L, D); layout "bhld" = contiguous, "blhd" = transposed view of (B, L, H, D) as a
    reshape from a fused projection gives, "dlast" = head dim not unit-stride."""
    def make(length):
        if layout == "blhd":
            t = torch.randn(batch, length, heads, dim, generator=gen).transpose(1, 2)
        elif layout == "dlast":
            t = torch.randn(batch, heads, dim, length, generator=gen).transpose(2, 3)
        else:
            t = torch.randn(batch, heads, length, dim, generator=gen)
        return t.to(dtype).to(DEVICE)
    return make(len_q), make(len_k), make(len_k)


@pytest.mark.parametrize("seed", range(15))
def test_attention_matches_reference_on_random_shapes(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    # structural choices cycle so that 10 seeds cover causal x every block shape; sizes are random
    causal = seed % 2 == 0
    block_m, block_n = [(16, 16), (32, 16), (16, 32), (64, 16), (32, 32)][seed % 5]
    dtype = DTYPES[(seed // 2) % 3]
    dim = (32, 64, 80, 96, 128, 48, 40)[seed % 7]
    layout = ("bhld", "blhd", "dlast")[(seed // 3) % 3]
    batch, heads = rng.choice([1, 2]), rng.choice([1, 2, 3])
    len_q, len_k = rng.randint(1 if seed % 3 == 0 else 40, 75), rng.randint(1, 75)
    if seed % 4 == 0:
        len_k = len_q
    q, k, v = _qkv(rng, gen, batch, heads, len_q, len_k, dim, dtype, layout)
    keep = None
    if rng.random() < 0.7:
        keep = torch.rand(batch, len_k, generator=gen) > 0.3
        if batch > 1:
            keep[0] = False  # a batch element with every key padded: all its rows must be zeros
        if causal:
            keep[-1, 0] = False  # causal with key 0 padded: row 0 of that element sees nothing
        keep = keep.to(DEVICE)
    scale = rng.choice([None, 0.3])
    out = poisoned_like(q)
    got = K.attention(q, k, v, causal=causal, key_padding_mask=keep, scale=scale, out=out, block_m=block_m,
                      block_n=block_n)
    assert got is out
    expected = attention_f64(q, k, v, causal, keep, scale)
    what = f"attention B{batch} H{heads} Lq{len_q} Lk{len_k} D{dim} {dtype} causal={causal} mask={keep is not None}"
    assert_close(got, expected, dtype, what)
    # the PyTorch reference of the custom op's CPU path has the same semantics
    ref = K.attention_reference(q.cpu().float(), k.cpu().float(), v.cpu().float(), causal=causal,
                                key_padding_mask=None if keep is None else keep.cpu(), scale=scale)
    assert max_rel_err(ref, expected) <= 1e-5
    if keep is not None and batch > 1:
        assert (got[0] == 0).all(), "rows with every key padded must be exactly zero"


@pytest.mark.parametrize("causal", [False, True])
def test_attention_rows_whose_first_key_blocks_are_all_padded(causal):
    """Key blocks that are wholly padded before any visible key must not poison the running softmax."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 32, generator=gen).to(DEVICE) for n in (45, 50, 50))
    keep = torch.ones(2, 50, dtype=torch.bool)
    keep[0, :37] = False  # blocks of 16 keys: the first two are entirely padded
    keep[1, 5:40] = False
    keep = keep.to(DEVICE)
    got = K.attention(q, k, v, causal=causal, key_padding_mask=keep, out=poisoned_like(q), block_m=16, block_n=16)
    assert_close(got, attention_f64(q, k, v, causal, keep), torch.float32, "padded prefix")
    if causal:
        assert (got[0, :, :37] == 0).all()  # rows before the first visible key see nothing


@pytest.mark.parametrize("causal", [False, True])
def test_rows_that_see_no_key_are_zero_in_every_consumer(causal):
    """The one attention rule, zeros for a query row that sees no key, holds in the torch modules' path
    (Attend with its default impl, i.e. models.layers.attention_reference), the Triton kernel and the ONNX
    export form alike; every other row is the float64 softmax attention."""
    from unclip.export.onnx import attention_for_export

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 2, 12, 32, generator=gen) for _ in range(3))
    keep = torch.ones(3, 12, dtype=torch.bool)
    keep[0] = False      # every key padded: no row of element 0 sees a key
    keep[1, :5] = False  # causal: rows 0-4 of element 1 see nothing; otherwise they see keys 5..11
    keep[2, 3:7] = False
    visible = keep[:, None, :].expand(3, 12, 12)
    if causal:
        visible = visible & torch.ones(12, 12, dtype=torch.bool).tril()
    empty = ~visible.any(-1)  # (B, Lq)
    assert empty.any() and (~empty).any()
    expected = attention_f64(q, k, v, causal, keep).float()
    outputs = {
        "torch module": Attend()(q, k, v, causal=causal, key_padding_mask=keep),
        "kernel": K.attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), causal=causal,
                              key_padding_mask=keep.to(DEVICE), out=poisoned_like(q.to(DEVICE))).cpu(),
        "export form": attention_for_export(q, k, v, causal=causal, key_padding_mask=keep),
    }
    for name, out in outputs.items():
        assert torch.isfinite(out).all(), name
        assert (out.permute(0, 2, 1, 3)[empty] == 0).all(), f"{name}: a row that sees no key is not zero"
        assert max_rel_err(out, expected) <= 1e-5, name
    # The rule does not touch rows that see a key: those stay exactly PyTorch's SDPA.
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=visible[:, None] if causal else keep[:, None, None, :])
    seen = (~empty)[:, None, :, None].expand_as(sdpa)
    assert torch.equal(outputs["torch module"][seen], sdpa[seen])


def test_attention_default_output_and_strided_out():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 19, 64, generator=gen).to(DEVICE)
    k = torch.randn(2, 2, 23, 64, generator=gen).to(DEVICE)
    v = torch.randn(2, 2, 23, 64, generator=gen).to(DEVICE)
    expected = attention_f64(q, k, v, True, None)
    got = K.attention(q, k, v, causal=True)
    assert got.is_contiguous() and got.shape == q.shape
    assert_close(got, expected, torch.float32, "default out")
    out = torch.full((2, 19, 2, 64), float("nan"), device=DEVICE).transpose(1, 2)  # a (B, L, H, D) buffer
    K.attention(q, k, v, causal=True, out=out)
    assert_close(out, expected, torch.float32, "strided out")


def test_attention_rejects_bad_input():
    q = torch.randn(1, 2, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="4-D"):
        K.attention(q[0], q, q)
    with pytest.raises(ValueError, match="head dim"):
        K.attention(q, torch.randn(1, 2, 4, 16, device=DEVICE), q)
    with pytest.raises(ValueError, match="key_padding_mask"):
        K.attention(q, q, q, key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        K.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="block_m"):
        K.attention(q, q, q, block_m=24)


# ----------------------------------------------------------------------------------------------- group norm

GN_CASES = [
    # shape, groups, path, channels_last, silu, scale-shift, affine, split tiles (block_c, block_s, chunk)
    ((2, 6, 5, 7), 3, "whole_group", False, True, True, True, None),
    ((2, 6, 5, 7), 3, "whole_group", True, False, True, True, None),
    ((1, 8, 13, 3), 4, "auto", True, True, False, False, None),
    ((3, 4, 1, 1), 2, "auto", False, False, True, True, None),
    ((2, 12, 17, 9), 3, "split", False, True, True, True, (4, 16, 64)),
    ((2, 12, 17, 9), 4, "split", True, True, True, True, (8, 8, 40)),
    ((1, 10, 23, 21), 2, "split", False, False, False, True, (2, 64, 128)),
    ((2, 20, 9, 11), 5, "split", True, False, True, False, (16, 16, 32)),
    ((2, 6, 31), 2, "split", False, True, True, True, (2, 8, 16)),  # 3-D (B, C, L)
    ((1, 6, 3, 5, 7), 3, "split", False, True, False, True, (4, 16, 48)),  # 5-D
]


@pytest.mark.parametrize("case", range(len(GN_CASES)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_group_norm_matches_reference(case, dtype):
    shape, groups, path, channels_last, silu, with_scale_shift, affine, tiles = GN_CASES[case]
    gen = torch.Generator().manual_seed(case)
    batch, channels = shape[:2]
    x = (torch.randn(shape, generator=gen) * 2 + 3).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(DEVICE).contiguous(memory_format=fmt)
    weight = (torch.randn(channels, generator=gen) + 1).to(dtype).to(DEVICE) if affine else None
    bias = torch.randn(channels, generator=gen).to(dtype).to(DEVICE) if affine else None
    scale = shift = None
    if with_scale_shift:
        scale = (0.5 * torch.randn(batch, channels, generator=gen)).to(dtype).to(DEVICE)
        shift = torch.randn(batch, channels, generator=gen).to(dtype).to(DEVICE)
    knobs = {} if tiles is None else dict(block_c=tiles[0], block_s=tiles[1], chunk_len=tiles[2])
    out = poisoned_like(x, fmt)
    got = K.group_norm(x, groups, weight, bias, 1e-5, silu=silu, scale=scale, shift=shift, out=out,
                       path=path, **knobs)
    assert got is out
    expected = group_norm_f64(x, groups, weight, bias, 1e-5, silu, scale, shift)
    assert_close(got, expected, dtype, f"group_norm {shape} G{groups} {path} cl={channels_last} {dtype}")
    if len(shape) == 4:  # a fresh output keeps the input's memory format
        fresh = K.group_norm(x, groups, weight, bias, 1e-5, silu=silu, scale=scale, shift=shift, path=path, **knobs)
        assert fresh.is_contiguous(memory_format=fmt)
        assert torch.equal(fresh, got)


def test_group_norm_variance_is_numerically_safe():
    """A large mean over a small spread: E[x²] − E[x]² in fp32 loses the variance (~4e-2 error here)."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 33, 31, generator=gen) + 1000).to(DEVICE)
    expected = group_norm_f64(x, 2, None, None, 1e-5, False, None, None)
    xs = x.reshape(2, 2, -1)
    naive_var = (xs * xs).mean(-1, keepdim=True) - xs.mean(-1, keepdim=True) ** 2
    naive = ((xs - xs.mean(-1, keepdim=True)) / torch.sqrt(naive_var.clamp_min(0) + 1e-5)).reshape(x.shape)
    assert max_rel_err(naive, expected) > 1e-3  # the test can tell a naive variance apart
    for path, knobs in (("whole_group", {}), ("split", dict(block_c=4, block_s=64, chunk_len=256)),
                        ("split", dict(block_c=2, block_s=1024, chunk_len=1024))):
        got = K.group_norm(x, 2, None, None, 1e-5, out=poisoned_like(x), path=path, **knobs)
        assert max_rel_err(got, expected) <= 1e-4, path


def test_group_norm_accepts_non_flat_strides_and_4d_scale():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 4, 9, 14, generator=gen).to(DEVICE)
    x = base[:, :, :, ::2]  # spatial dims do not flatten to one stride: copied, still correct
    scale = torch.randn(2, 4, 1, 1, generator=gen).to(DEVICE)
    shift = torch.randn(2, 4, 1, 1, generator=gen).to(DEVICE)
    got = K.group_norm(x, 2, None, None, 1e-5, silu=True, scale=scale, shift=shift)
    expected = group_norm_f64(x, 2, None, None, 1e-5, True, scale.reshape(2, 4), shift.reshape(2, 4))
    assert_close(got, expected, torch.float32, "non-flat strides")


def test_group_norm_rejects_bad_input():
    x = torch.randn(2, 6, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="num_groups"):
        K.group_norm(x, 4, None, None, 1e-5)
    with pytest.raises(ValueError, match="scale"):
        wrong = torch.ones(2, 5, device=DEVICE)
        K.group_norm(x, 3, None, None, 1e-5, scale=wrong, shift=wrong)
    with pytest.raises(ValueError, match="together"):
        K.group_norm(x, 3, None, None, 1e-5, scale=torch.ones(2, 6, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        K.group_norm(x, 3, torch.ones(5, device=DEVICE), None, 1e-5)
    with pytest.raises(TypeError, match="float32"):
        K.group_norm(x.double(), 3, None, None, 1e-5)


# ----------------------------------------------------------------------------------------------- wiring

class TinyBlock(nn.Module):
    """A resnet-ish block + attention, shaped like the U-Nets' use of the two swap points."""

    def __init__(self, channels=8, heads=2):
        super().__init__()
        self.norm1 = GroupNorm(4, channels)
        self.norm2 = GroupNorm(2, channels)
        self.time = nn.Linear(4, 2 * channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attend = Attend()
        self.heads = heads

    def forward(self, x, t, keep):
        scale, shift = self.time(t).chunk(2, dim=1)
        h = self.norm1(x, silu=True)
        h = self.norm2(h, silu=True, scale=scale, shift=shift) + x
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2)  # (B, L, C)
        q, k, v = self.qkv(tokens).reshape(b, hh * ww, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attend(q, k, v, key_padding_mask=keep)  # non-contiguous q/k/v views
        return h + a.transpose(1, 2).reshape(b, hh * ww, c).transpose(1, 2).reshape(b, c, hh, ww)


def test_use_kernels_swaps_every_instance_and_matches_the_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ModuleDict({"a": TinyBlock()}), TinyBlock()).to(DEVICE)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    blocks = [model[0]["a"], model[1]]
    x = torch.randn(2, 8, 5, 3, device=DEVICE)
    t = torch.randn(2, 4, device=DEVICE)
    keep = torch.tensor([[True] * 15, [True] * 11 + [False] * 4], device=DEVICE)

    def run():
        h = x
        for blk in blocks:
            h = blk(h, t, keep)
        return h

    with torch.no_grad():
        expected = run()
        assert K.use_kernels(model) is model
        impls = [m.impl for m in model.modules() if isinstance(m, (Attend, GroupNorm))]
        assert len(impls) == 6
        assert all(i in (K.kernel_attention, K.kernel_group_norm) for i in impls)
        got = run()
    assert max_rel_err(got, expected) <= 1e-5


def test_tiny_pipeline_with_kernels_equals_the_torch_backend():
    """The whole tiny cascade (CLIP, prior, decoder, both super-res U-Nets) with the kernels swapped in.
    Every kernel call is checked against the reference on the very inputs the pipeline feeds it; the
    images are compared too, with a tolerance that allows for the tiny random cascade amplifying fp32
    rounding: kernel errors <= 5e-7 here end as ~5e-4 in the images, the same size as the difference
    between two torch-backend runs whose weights differ only in memory alignment (seen in test_loading)."""
    unclip = pytest.importorskip("unclip")
    if not hasattr(unclip, "Pipeline"):
        pytest.skip("unclip.Pipeline is not available")
    steps = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)
    reference = unclip.Pipeline.from_preset("tiny", seed=0, device=DEVICE)
    fast = unclip.Pipeline.from_preset("tiny", seed=0, device=DEVICE, backend="fast")
    errors = {"attention": [], "group_norm": []}

    def checked(kernel, ref, kind):
        def impl(*args, **kwargs):
            out = kernel(*args, **kwargs)
            errors[kind].append(max_rel_err(out, ref(*args, **kwargs)))
            return out
        return impl

    for model in fast.cascade.networks.modules:  # the fast runner's copies of the networks
        for m in model.modules():
            if isinstance(m, (Attend, GroupNorm)):  # the backend swapped every swap point
                assert m.impl in (K.kernel_attention, K.kernel_group_norm), (type(model).__name__, m)
            if isinstance(m, Attend):
                m.impl = checked(m.impl, attention_reference, "attention")
            elif isinstance(m, GroupNorm):
                m.impl = checked(m.impl, group_norm_reference, "group_norm")

    def images(pipe):
        return pipe("a red square", generator=torch.Generator().manual_seed(0), output_type="pt", progress=False,
                    **steps).images

    with torch.no_grad():
        expected, got = images(reference), images(fast)
    assert len(errors["attention"]) > 0 and len(errors["group_norm"]) > 0, "the kernels were never called"
    assert max(errors["attention"]) <= 1e-5 and max(errors["group_norm"]) <= 1e-5, errors
    assert torch.isfinite(got).all()
    assert (got - expected).abs().max().item() <= 2e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_fast_backend_without_cuda_or_interpreter_says_so(monkeypatch):
    import unclip
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend 'fast' is not available here: it runs Triton kernels: it needs a "
                                         "CUDA device"):
        unclip.Pipeline.from_preset("tiny", backend="fast")


def test_use_kernels_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(_triton_support, "triton_installed", lambda: False)
    with pytest.raises(RuntimeError, match="triton.*not installed"):
        K.use_kernels(TinyBlock())
    q = torch.randn(1, 1, 4, 32)
    with pytest.raises(RuntimeError, match="not installed"):
        K.attention(q, q, q)


def test_kernel_on_cpu_without_interpreter_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.group_norm(x, 2, None, None, 1e-5)


# ----------------------------------------------------------------------------------------------- custom ops

def test_custom_ops_on_cpu_are_the_reference():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen) for n in (7, 9, 9))
    keep = torch.tensor([[True] * 9, [False] * 9])
    got = torch.ops.unclip.attention(q, k, v, causal=True, key_padding_mask=keep, scale=0.2)
    assert max_rel_err(got, attention_f64(q, k, v, True, keep, 0.2)) <= 1e-5
    assert (got[1] == 0).all()
    x = torch.randn(2, 6, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    s, t = torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    y = torch.ops.unclip.group_norm(x, 3, w, b, 1e-5, silu=True, scale=s, shift=t)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(y, group_norm_reference(x, 3, w, b, 1e-5, silu=True, scale=s, shift=t)) <= 1e-6


def test_custom_ops_pass_opcheck_and_trace_as_single_ops():
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (5, 6, 6))
    keep = torch.tensor([[True, True, False, True, True, False]])
    torch.library.opcheck(torch.ops.unclip.attention.default, (q, k, v),
                          dict(causal=True, key_padding_mask=keep, scale=None))
    x = torch.randn(2, 4, 3, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    s, t = torch.randn(2, 4, generator=gen), torch.randn(2, 4, generator=gen)
    torch.library.opcheck(torch.ops.unclip.group_norm.default, (x, 2, torch.ones(4), torch.zeros(4), 1e-5),
                          dict(silu=True, scale=s, shift=t))

    class UsesOps(nn.Module):
        def forward(self, x, q, k, v):
            return (torch.ops.unclip.group_norm(x, 2, None, None, 1e-5, silu=True),
                    torch.ops.unclip.attention(q, k, v, causal=True))

    exported = torch.export.export(UsesOps(), (x, q, k, v))
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    assert torch.ops.unclip.group_norm.default in targets and torch.ops.unclip.attention.default in targets
    with torch.device("meta"):
        assert torch.ops.unclip.attention(q.to("meta"), k.to("meta"), v.to("meta")).shape == q.shape

    # a use_kernels'd model compiles without graph breaks (on CPU the op runs its reference)
    torch.manual_seed(0)
    blk = TinyBlock(8, 2)
    xx, tt = torch.randn(1, 8, 3, 3, generator=gen), torch.randn(1, 4, generator=gen)
    with torch.no_grad():
        expected = blk(xx, tt, None)
        compiled = torch.compile(K.use_kernels(blk), backend="eager", fullgraph=True)
        assert max_rel_err(compiled(xx, tt, None), expected) <= 1e-5


# ----------------------------------------------------------------------------------------------- packaging

def _python(code: str, env_extra=None, timeout=240):
    env = dict(os.environ, **(env_extra or {}))
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_import_without_triton_works_and_cpu_ops_still_run():
    r = _python("""
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch
        import unclip.kernels as K
        assert not K.triton_installed()
        q = torch.randn(1, 1, 3, 8)
        assert torch.ops.unclip.attention(q, q, q).shape == q.shape
        try:
            K.use_kernels(torch.nn.Linear(2, 2))
        except RuntimeError as e:
            assert "not installed" in str(e), e
        else:
            raise AssertionError("use_kernels should say Triton is missing")
        print("ok")
    """)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler; compile each kernel for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    r = _python("""
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from unclip.kernels import _attention_triton as A, _group_norm_triton as G

        def build(fn, types, consts, warps, stages=3):
            sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
            ptrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if types.get(n, "")[:1] == "*"}
            triton.compile(ASTSource(fn, sig, consts, ptrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))

        for dt, exact in (("fp16", False), ("bf16", False), ("fp32", True)):
            t = {n: "*" + dt for n in "QKVO"}
            t.update(KEEP="*u8", qk_scale_log2="fp32")
            build(A.attention_forward_kernel, t, dict(CAUSAL=True, HAS_KEEP=True, EXACT_FP32=exact, UPCAST_DOT=False,
                  BLOCK_M=64 if exact else 128, BLOCK_N=32 if exact else 64, BLOCK_D=128 if dt == "bf16" else 64), 8)
        t = {n: "*fp16" for n in ("X", "Y", "W", "Bias", "Scale", "Shift")}
        t.update({n: "*fp32" for n in ("MEAN", "RSTD", "PART_MEAN", "PART_M2")}, eps="fp32", group_numel="fp32")
        f = dict(HAS_W=True, HAS_B=True, HAS_SCALE_SHIFT=True, SILU=True)
        build(G.group_norm_whole_group_kernel, t, dict(f, BLOCK_C=32, BLOCK_S=256), 8)
        build(G.group_norm_partial_stats_kernel, t, dict(BLOCK_C=4, BLOCK_S=1024), 8)
        build(G.group_norm_finalize_kernel, t, dict(BLOCK_C=8, BLOCK_K=256), 4)
        build(G.group_norm_apply_kernel, t, dict(f, BLOCK_C=128, BLOCK_S=32), 8)
        print("ok")
    """, env_extra={"TRITON_DEFAULT_FP_FUSION": "1"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_benchmark_exits_cleanly_without_cuda():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py")], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "CUDA" in r.stdout
