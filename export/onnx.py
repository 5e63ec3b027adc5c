"""Export a cascade to ONNX: one graph per network plus a manifest, so the output folder is self-contained.

Layout of the output folder (`OUT`):

    manifest.json                      formats, versions, configs, schedulers, file hashes, graph I/O, and
                                       the manifest's own checksum
    tokenizer/                         tokenizer.json, vocab.json, merges.txt, tokenizer_config.json, ...
    text_encoder/model.onnx            (+ model.onnx.data: the weights, as ONNX external data)
    image_encoder/model.onnx           only for image-variation cascades
    prior/model.onnx, prior/clip_stats.safetensors   (the un-normalisation the sampler applies afterwards)
    text_proj/model.onnx
    decoder/model.onnx
    super_res_first/model.onnx, super_res_last/model.onnx, super_res_2_first/model.onnx, ...

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). Compared with the legacy
TorchScript tracer it gives cleaner graphs for TensorRT's parser: weights are initializers instead of
hundreds of `Constant` nodes, the batch dimension is one named symbol (no `Shape`/`Gather`/`Mod` chains
rebuilt per op), and torch.export proves the graph valid for every batch size in the declared range
instead of tracing one size and baking Python-side shape arithmetic in. It is also the maintained path
(the tracer is deprecated since torch 2.9). It needs opset >= 18 (its graphs use opset-18 `Split`), and
it is slower to export (seconds per small network on a CPU).

Graph conventions (shared by the ONNX Runtime and TensorRT backends, see `unclip.export.networks`):
every input and output has a dynamic leading "batch" axis, all other axes are static (the resolution and
token counts of the exported configs); float inputs and outputs are in the export dtype, except timesteps,
which are float32 (B,) (exact for integer timesteps, fractional ones allowed); token ids are int32;
masks are bool (True = attend). Attention is written as explicit MatMul/Softmax/MatMul with masked logits
set to the dtype's lowest finite value (no -inf, so fully masked rows stay finite), and half-precision
group norms are computed in float32 and cast back (as PyTorch's kernels accumulate) - see
`_export_friendly`. Every op is checked against the ONNX-TensorRT operator matrix (`TENSORRT_OPS`).

Writing is atomic: everything goes to a temporary sibling folder that replaces `OUT` only after the last
file is written and checked (unclip.files.replace_dir), so an unsupported config, a full disk or an
interruption (Ctrl-C) leaves no half-written `OUT`, and an existing export is replaced only on success.

Reading verifies: `read_manifest` checks the manifest's checksum and every key it holds, `verify_files`
the size and sha256 of every file it lists (opt out of the hashing with `verify=False` or
UNCLIP_VERIFY_EXPORTS=0), so a flipped byte in a graph, its weights or the manifest is refused, not run.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, read_json
from ..files import atomic_write_with, discard_dir, make_staging_dir, replace_dir
from ..loading import Components, model_classes
from ..models.layers import Attend, GroupNorm
from ..weights import write_json

FORMAT = "unclip-onnx"
FORMAT_VERSION = 2  # 2: the manifest carries its own checksum (CHECKSUM_KEY)
MANIFEST = "manifest.json"
CHECKSUM_KEY = "manifest_sha256"
VERIFY_ENV = "UNCLIP_VERIFY_EXPORTS"  # "0": skip hashing the files at load (sizes are still checked)
VERIFY_PROGRESS_BYTES = 1 << 30  # show a progress bar when verifying more than this
GRAPH_FILE = "model.onnx"
CLIP_STATS_FILE = "clip_stats.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_OPSET = 18
OPSETS = range(18, 24)  # the exporter's graphs need >= 18; TensorRT 10.15 parses opsets 9..24
MAX_BATCH = 4096  # upper end of the symbolic batch range torch.export proves the graphs for
EXPORTER = "torch.onnx.export(dynamo=True)"

# ONNX ops our graphs may contain, each listed as supported (with the types we use) in the ONNX-TensorRT
# operator matrix for TensorRT 10.15 (onnx/onnx-tensorrt docs/operators.md). A graph with any other op is
# flagged in the manifest and refused by the TensorRT builder before it starts.
TENSORRT_OPS = frozenset({
    "Add", "And", "ArgMax", "AveragePool", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos",
    "Div", "Equal", "Erf", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "GatherND", "Gemm",
    "Identity", "InstanceNormalization", "GroupNormalization", "LayerNormalization", "Less", "MatMul", "Max",
    "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range", "ReduceMax", "ReduceMean", "ReduceSum", "Reshape",
    "Resize", "Sigmoid", "Sin", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose",
    "Trilu", "Unsqueeze", "Where", "Shape", "IsNaN",
})

_log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export could not be completed (the output folder was left untouched)."""


# ------------------------------------------------------------------------------------ export-friendly ops

def attention_for_export(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                         key_padding_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """`unclip.models.layers.attention_reference` (same semantics, including zeros for a query row that sees
    no key) as plain MatMul/Softmax/MatMul, the pattern TensorRT fuses into its attention kernels.

    Masked logits get the lowest finite value instead of -inf, so the softmax stays finite (a row with no
    visible key would average all values); with a padding mask the output is then multiplied by "row sees
    any key" (ReduceMax of the visibility, 0 or 1), after the second MatMul so the fusable pattern stays
    intact. Causal attention without padding needs no such factor: every row sees key 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q * scale, k.transpose(-1, -2))
    visible = None
    if key_padding_mask is not None:
        visible = key_padding_mask[:, None, None, :].to(torch.bool)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        tri = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        visible = tri if visible is None else visible & tri
    if visible is not None:
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
    out = torch.matmul(torch.softmax(logits, dim=-1), v)
    if key_padding_mask is not None:
        out = out * visible.to(out.dtype).amax(dim=-1, keepdim=True)
    return out


def group_norm_for_export(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
    """`group_norm_reference`, with half-precision statistics computed in float32 as PyTorch's kernels do
    (a half-precision InstanceNormalization in the graph would accumulate in half on some runtimes)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        h = F.group_norm(x.float(), num_groups, None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps).to(x.dtype)
    else:
        h = F.group_norm(x, num_groups, weight, bias, eps)
    if scale is not None:
        if scale.dim() == 2:
            scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        h = h * (1 + scale) + shift
    return F.silu(h) if silu else h


@contextlib.contextmanager
def _export_friendly(module: nn.Module):
    """Swap every attention / group-norm implementation of `module` for the export forms above (whatever a
    backend may have installed, e.g. Triton kernels), restoring them afterwards."""
    saved = []
    for m in module.modules():
        if isinstance(m, Attend):
            saved.append((m, m.impl))
            m.impl = attention_for_export
        elif isinstance(m, GroupNorm):
            saved.append((m, m.impl))
            m.impl = group_norm_for_export
    try:
        yield
    finally:
        for m, impl in saved:
            m.impl = impl


export_friendly = _export_friendly  # public name: the native export (export/native.py) compiles the same forms


# ------------------------------------------------------------------------------------ per-network adapters
# Each adapter gives one network a flat, tensor-only signature in the graph conventions above.

class _TextEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)


class _ImageEncoderGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values)


class _PriorGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        return self.model(hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask)


class _TextProjGraph(nn.Module):
    """text_proj with guidance expressed as data: rows flagged `is_uncond` take the learned unconditional
    embedding (bit-identical to the module's own concatenation), so one graph serves both modes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, is_uncond, prompt_embeds, text_encoder_hidden_states):
        learned = self.model.learned_classifier_free_guidance_embeddings.to(image_embeddings.dtype)
        image_embeddings = torch.where(is_uncond[:, None], learned[None, :], image_embeddings)
        return self.model(image_embeddings, prompt_embeds, text_encoder_hidden_states, False)


class _DecoderGraph(nn.Module):
    def __init__(self, model, use_context: bool, use_class: bool):
        super().__init__()
        self.model, self.use_context, self.use_class = model, use_context, use_class

    def forward(self, sample, timestep, encoder_hidden_states, class_labels, attention_mask):
        return self.model(sample, timestep, encoder_hidden_states if self.use_context else None,
                          class_labels if self.use_class else None, attention_mask if self.use_context else None)


class _SuperResGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep):
        return self.model(sample, timestep)


@dataclass
class GraphSpec:
    """One graph to export: the folder name, the network kind, the module, its adapter and example inputs."""
    name: str
    kind: str  # text_encoder | image_encoder | prior | text_proj | decoder | super_res
    module: nn.Module
    adapter: nn.Module
    inputs: dict  # name -> example tensor (batch 2), in graph order
    outputs: tuple[str, ...]


def _require(cond: bool, what: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{what}: {message} (cannot export this config to ONNX)")


def _static_size(module, what: str) -> int:
    size = module.config.sample_size
    _require(size is not None, what, "config key 'sample_size' is null; ONNX graphs need a fixed resolution")
    if isinstance(size, tuple):
        _require(size[0] == size[1], what, f"config key 'sample_size' = {list(size)} is not square; the "
                                           "pipeline samples square images")
        size = size[0]
    return int(size)


def graph_specs(c: Components, dtype: torch.dtype) -> list[GraphSpec]:
    """Every graph of cascade `c`, validated for export (raises ConfigError naming the network and key)."""
    gen = torch.Generator().manual_seed(0)
    B = 2  # torch.export specialises sizes 0 and 1; 2 keeps the batch symbolic

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    specs = []
    tokens = int(c.tokenizer.model_max_length)
    te = c.text_encoder
    _require(tokens <= te.config.max_position_embeddings, "text_encoder",
             f"the tokenizer pads to {tokens} tokens but max_position_embeddings = {te.config.max_position_embeddings}")
    ids = torch.randint(0, te.config.vocab_size, (B, tokens), generator=gen, dtype=torch.int32)
    specs.append(GraphSpec("text_encoder", "text_encoder", te, _TextEncoderGraph(te), {"input_ids": ids},
                           ("text_embeds", "last_hidden_state")))
    if c.image_encoder is not None:
        ie = c.image_encoder
        s = ie.config.image_size
        specs.append(GraphSpec("image_encoder", "image_encoder", ie, _ImageEncoderGraph(ie),
                               {"pixel_values": rand(B, ie.config.num_channels, s, s)},
                               ("image_embeds", "last_hidden_state")))
    if c.prior is not None:
        p = c.prior
        pc = p.config
        _require(pc.num_embeddings == tokens, "prior", f"config key 'num_embeddings' = {pc.num_embeddings} differs "
                                                       f"from the tokenizer's {tokens} tokens")
        mask = torch.ones(B, tokens, dtype=torch.bool)
        mask[0, tokens // 2:] = False
        specs.append(GraphSpec("prior", "prior", p, _PriorGraph(p), {
            "hidden_states": rand(B, pc.embedding_dim),
            "timestep": torch.tensor([999.0, 3.0]),
            "proj_embedding": rand(B, pc.embedding_proj_dim or pc.embedding_dim),
            "encoder_hidden_states": rand(B, tokens, pc.embedding_dim),
            "attention_mask": mask,
        }, ("predicted_image_embedding",)))
    tp = c.text_proj
    tc = tp.config
    specs.append(GraphSpec("text_proj", "text_proj", tp, _TextProjGraph(tp), {
        "image_embeddings": rand(B, tc.clip_embeddings_dim),
        "is_uncond": torch.tensor([True, False]),
        "prompt_embeds": rand(B, tc.clip_embeddings_dim),
        "text_encoder_hidden_states": rand(B, tokens, tc.clip_embeddings_dim),
    }, ("encoder_hidden_states", "additive_time_embedding")))

    dec = c.decoder
    dc = dec.config
    size = _static_size(dec, "decoder")
    context = tc.clip_extra_context_tokens + tokens
    use_context = dec.has_attention
    use_class = dc.class_embed_type == "identity"
    if use_context:
        _require(dc.cross_attention_dim == tc.cross_attention_dim, "decoder",
                 f"cross_attention_dim = {dc.cross_attention_dim} differs from text_proj's {tc.cross_attention_dim}")
    dmask = torch.ones(B, context, dtype=torch.bool)
    dmask[0, context // 2:] = False
    specs.append(GraphSpec("decoder", "decoder", dec, _DecoderGraph(dec, use_context, use_class), {
        "sample": rand(B, dc.in_channels, size, size),
        "timestep": torch.tensor([999.0, 3.0]),
        "encoder_hidden_states": rand(B, context, dc.cross_attention_dim or tc.cross_attention_dim),
        "class_labels": rand(B, dc.time_embed_dim),
        "attention_mask": dmask,
    }, ("out_sample",)))

    for i, up in enumerate(c.upsamplers):
        prefix = "super_res" if i == 0 else f"super_res_{i + 1}"
        nets = [("first", up.first)] + ([("last", up.last)] if up.last is not up.first else [])
        for which, net in nets:
            name = f"{prefix}_{which}"
            s = _static_size(net, name)
            specs.append(GraphSpec(name, "super_res", net, _SuperResGraph(net), {
                "sample": rand(B, net.config.in_channels, s, s),
                "timestep": torch.tensor([999.0, 3.0]),
            }, ("out_sample",)))
        if up.last is not up.first:
            _require(_static_size(up.last, f"{prefix}_last") == _static_size(up.first, f"{prefix}_first"),
                     f"{prefix}_last", "sample_size differs from the first network's")
    for spec in specs:  # example inputs live where the weights are
        device = next(spec.module.parameters()).device
        spec.inputs = {k: v.to(device) for k, v in spec.inputs.items()}
    return specs


# ------------------------------------------------------------------------------------------ file helpers

def sha256_file(path: str, chunk: int = 1 << 24, progress: Callable[[int], object] | None = None) -> str:
    """Hex sha256 of a file, streamed in `chunk`-byte blocks (`progress(n)` after each)."""
    h = hashlib.sha256()
    block = bytearray(chunk)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(view)
            if not n:
                return h.hexdigest()
            h.update(view[:n])
            if progress is not None:
                progress(n)


def _file_entries(root: str, folder: str) -> dict:
    """{relative path: {sha256, bytes}} for every file under root/folder."""
    out = {}
    base = os.path.join(root, folder)
    for dirpath, _, names in os.walk(base):
        for n in sorted(names):
            full = os.path.join(dirpath, n)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            out[rel] = {"sha256": sha256_file(full), "bytes": os.path.getsize(full)}
    return out


def graph_hash(files: dict) -> str:
    """One digest for a graph and its external data (keys the TensorRT engine cache)."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(f"{rel}\0{files[rel]['sha256']}\n".encode())
    return h.hexdigest()


def _versions() -> dict:
    import platform

    from .. import __version__
    out = {"unclip": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional at export time
            out[mod] = None
    return out


_ONNX_TYPES = {1: "float32", 10: "float16", 16: "bfloat16", 6: "int32", 7: "int64", 9: "bool", 11: "float64"}


def _io_description(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": _ONNX_TYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return out


# ------------------------------------------------------------------------------------------------ export

def _export_graph(spec: GraphSpec, folder: str, opset: int) -> dict:
    """Write spec's graph to folder/model.onnx (+ .data); check it; return its manifest entry (sans hashes)."""
    import onnx

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, GRAPH_FILE)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    args = tuple(spec.inputs.values())
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with _export_friendly(spec.module), warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            warnings.filterwarnings("ignore", message=".*axis name: batch will not be used")
            program = torch.onnx.export(
                spec.adapter.eval(), args, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                input_names=list(spec.inputs), output_names=list(spec.outputs),
                dynamic_shapes=tuple({0: batch} for _ in args))
        program.save(path, external_data=True)
    except (OSError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # the exporter's own failures: say which network
        raise ExportError(f"{spec.name}: ONNX export failed: {type(e).__name__}: {e}") from e
    finally:
        registration.setLevel(level)

    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{spec.name}: the exported graph fails onnx.checker: {e}") from e
    model = onnx.load(path, load_external_data=False)
    inputs, outputs = _io_description(model.graph.input), _io_description(model.graph.output)
    for io in inputs + outputs:
        if not io["shape"] or not isinstance(io["shape"][0], str):
            raise ExportError(f"{spec.name}: graph {io['name']!r} has no dynamic batch axis ({io['shape']})")
    ops = sorted({n.op_type for n in model.graph.node} | {
        n.op_type for f in model.functions for n in f.node})
    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    return {"graph": f"{spec.name}/{GRAPH_FILE}", "inputs": inputs, "outputs": outputs, "ops": ops,
            "custom_domains": domains, "model_functions": len(model.functions),
            "tensorrt_unsupported_ops": sorted(set(ops) - TENSORRT_OPS) + domains}


def _save_clip_stats(prior, folder: str) -> None:
    from safetensors.torch import save_file
    stats = {"clip_mean": prior.clip_mean.detach().cpu().contiguous().clone(),
             "clip_std": prior.clip_std.detach().cpu().contiguous().clone()}
    # Through unclip.files: safetensors alone would create the file private (0600), whatever the umask.
    atomic_write_with(os.path.join(folder, CLIP_STATS_FILE), lambda tmp: save_file(stats, tmp))


def _check_dtype(c: Components, dtype: torch.dtype) -> None:
    for name, m in c.networks().items():
        if m is not None:
            first = next(iter(m.parameters()), None) if isinstance(m, nn.Module) else None
            if first is None:
                raise TypeError(f"components.{name} is not a torch module with weights ({type(m).__name__}); "
                                "export needs the torch components")
            got = first.dtype
            if got != dtype:
                raise ValueError(f"components.{name} is {got}, but dtype={dtype} was asked; load or build the "
                                 "components in the export dtype")


def resolve_dtype(dtype) -> tuple[str, torch.dtype]:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype in names:
            return names[dtype], dtype
    elif dtype in DTYPES:
        return dtype, DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")


def prepare_out(out: str, overwrite: bool, *, kind: str = "ONNX") -> str:
    """`out` as an absolute path, refused (before any work) if it holds something other than an unclip `kind`
    export (every export folder has a manifest.json), or an export and not `overwrite`."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"out: {out} exists and is not a folder")
        entries = os.listdir(out)
        if entries and not os.path.isfile(os.path.join(out, MANIFEST)):
            raise FileExistsError(f"out: {out} exists and is not an unclip {kind} export (no {MANIFEST}); "
                                  "choose a new folder")
        if entries and not overwrite:
            raise FileExistsError(f"out: {out} already holds an export; pass overwrite=True (--overwrite) to "
                                  "replace it")
    return out


def export_onnx(source, out: str, *, dtype="fp32", opset: int = DEFAULT_OPSET, overwrite: bool = False,
                progress: Callable[[str], None] | None = None) -> str:
    """Export every network of a cascade to ONNX under `out`; returns the absolute path of `out`.

    source: a diffusers-layout folder (loaded in `dtype`) or a `Components` already in `dtype`.
    dtype: "fp32" or "fp16" (the precision of weights, activations and graph I/O; timesteps stay fp32).
    opset: ONNX opset, 18..23. overwrite: replace an existing export at `out` (only on success).
    progress: called with a line of text per step. Raises ConfigError (unsupported config, before anything
    is written), ExportError, OSError; on any failure `out` is left as it was.
    """
    name, torch_dtype = resolve_dtype(dtype)
    for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            raise ImportError(f"ONNX export needs the {package} package (pip install onnx onnxscript, or "
                              "unclip-engine[onnx])") from None
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        raise ValueError(f"opset must be an int in {OPSETS.start}..{OPSETS.stop - 1}; got {opset!r}")
    out = prepare_out(out, overwrite)
    say = progress or (lambda line: _log.info(line))

    if isinstance(source, Components):
        components = source
        _check_dtype(components, torch_dtype)
    elif isinstance(source, (str, os.PathLike)):
        from ..loading import load_components
        components = load_components(os.fspath(source), dtype=torch_dtype)
    else:
        raise TypeError(f"source must be a model folder or a Components; got {type(source).__name__}")
    specs = graph_specs(components, torch_dtype)  # all config checks happen here, before any writing

    tmp = staging_dir(out)
    try:
        classes = model_classes()
        networks = {}
        for spec in specs:
            say(f"exporting {spec.name} ...")
            entry = _export_graph(spec, os.path.join(tmp, spec.name), opset)
            if spec.kind == "prior":
                _save_clip_stats(spec.module, os.path.join(tmp, spec.name))
            files = _file_entries(tmp, spec.name)
            networks[spec.name] = {
                "kind": spec.kind,
                "class": classes[spec.kind][0][1],
                "config": spec.module.config.to_dict(),
                **entry,
                "files": files,
                "graph_sha256": graph_hash(files),
            }
        components.tokenizer.save(os.path.join(tmp, "tokenizer"))
        upsamplers = []
        for i, up in enumerate(components.upsamplers):
            prefix = "super_res" if i == 0 else f"super_res_{i + 1}"
            upsamplers.append({"name": up.name, "first": f"{prefix}_first",
                               "last": f"{prefix}_last" if up.last is not up.first else f"{prefix}_first",
                               "scheduler": up.scheduler.to_dict()})
        schedulers = {"decoder": components.decoder_scheduler.to_dict()}
        if components.prior_scheduler is not None:
            schedulers["prior"] = components.prior_scheduler.to_dict()
        unsupported = {k: v["tensorrt_unsupported_ops"] for k, v in networks.items() if v["tensorrt_unsupported_ops"]}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": name,
            "opset": opset,
            "exporter": EXPORTER,
            "versions": _versions(),
            "batch_axis": {"name": "batch", "min": 1, "max": MAX_BATCH},
            "tokenizer": {"folder": "tokenizer", "model_max_length": int(components.tokenizer.model_max_length),
                          "files": _file_entries(tmp, "tokenizer")},
            "networks": networks,
            "schedulers": schedulers,
            "upsamplers": upsamplers,
            "image_processor_config": components.image_processor_config,
            "call_defaults": dict(components.call_defaults),
            "tensorrt_op_check": {"reference": "ONNX-TensorRT operator matrix, TensorRT 10.15",
                                  "unsupported": unsupported},
        }
        manifest[CHECKSUM_KEY] = manifest_checksum(manifest)
        write_json(os.path.join(tmp, MANIFEST), manifest)
        publish(tmp, out, overwrite=overwrite)
    except BaseException:
        discard_dir(tmp)
        raise
    say(f"wrote {out}")
    return out


def staging_dir(out: str) -> str:
    """A new empty sibling folder of `out` to write into before `publish` (with the umask's permissions)."""
    return make_staging_dir(out)


def publish(tmp: str, out: str, *, overwrite: bool = True) -> None:
    """Put the finished folder `tmp` at `out` (unclip.files.replace_dir: atomic, and on any failure or
    Ctrl-C the previous export stays or is put back). Refuses, like `prepare_out`, to replace a folder that
    is not an export (or an export without `overwrite`); `tmp` is then left for the caller to discard."""
    prepare_out(out, overwrite)
    replace_dir(tmp, out)


# ----------------------------------------------------------------------------------------------- reading

def manifest_checksum(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), without its own checksum key."""
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(root: str) -> dict:
    """The validated manifest of an export folder. ConfigError naming the key for anything this version
    cannot read: not an export, another format version, a checksum that does not match (an edited or
    corrupted manifest), or any key missing or of the wrong type (never a KeyError or TypeError later)."""
    root = os.fspath(root)
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ConfigError(f"{root}: folder not found")
    if not os.path.isfile(path):
        raise ConfigError(f"{root}: not an ONNX export (no {MANIFEST}); create one with "
                          f"`unclip export --model DIR --format onnx --out {root}`")
    data = read_json(path)
    m = _Manifest(data, path)
    m.value(data, "format", str, choices=(FORMAT,))
    version = m.value(data, "format_version", int)
    if version != FORMAT_VERSION:
        raise m.error("format_version", f"= {version} is not supported (this version reads {FORMAT_VERSION}); "
                                        "export the model again")
    stored = m.value(data, CHECKSUM_KEY, str)
    if stored != manifest_checksum(data):
        raise ConfigError(f"{path}: the manifest does not match its checksum (key '{CHECKSUM_KEY}'): it was "
                          "edited or corrupted after export; export the model again")
    m.value(data, "dtype", str, choices=tuple(DTYPES))
    m.value(data, "opset", int)
    batch = m.value(data, "batch_axis", dict)
    m.value(batch, "name", str, where="batch_axis.name")
    for key in ("min", "max"):
        m.value(batch, key, int, where=f"batch_axis.{key}")

    networks = m.value(data, "networks", dict)
    for required in ("text_encoder", "text_proj", "decoder"):
        if required not in networks:
            raise m.error("networks", f"has no '{required}' graph")
    kinds = tuple(model_classes())
    for name, net in networks.items():
        where = f"networks.{name}"
        if not isinstance(net, dict):
            raise m.error(where, f"must be an object, got {type(net).__name__}")
        m.value(net, "kind", str, where=f"{where}.kind", choices=kinds)
        m.value(net, "class", str, where=f"{where}.class")
        m.value(net, "config", dict, where=f"{where}.config")
        files = m.files(net, f"{where}.files", prefix=f"{name}/")
        graph = m.value(net, "graph", str, where=f"{where}.graph")
        if graph not in files:
            raise m.error(f"{where}.graph", f"= {graph!r} is not one of the files listed in {where}.files")
        for io_key in ("inputs", "outputs"):
            for i, io in enumerate(m.value(net, io_key, list, where=f"{where}.{io_key}")):
                io_where = f"{where}.{io_key}[{i}]"
                if not isinstance(io, dict):
                    raise m.error(io_where, "must be an object")
                m.value(io, "name", str, where=f"{io_where}.name")
                m.value(io, "dtype", str, where=f"{io_where}.dtype")
                shape = m.value(io, "shape", list, where=f"{io_where}.shape")
                if not shape or not isinstance(shape[0], str) or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape[1:]):
                    raise m.error(f"{io_where}.shape", f"= {shape!r} must be a named batch axis, then sizes")
        for key in ("ops", "custom_domains", "tensorrt_unsupported_ops"):
            m.strings(net, key, where=f"{where}.{key}")
        if m.value(net, "graph_sha256", str, where=f"{where}.graph_sha256") != graph_hash(files):
            raise m.error(f"{where}.graph_sha256", f"does not match the hashes of {where}.files")

    tokenizer = m.value(data, "tokenizer", dict)
    folder = m.value(tokenizer, "folder", str, where="tokenizer.folder")
    if not _plain_name(folder):
        raise m.error("tokenizer.folder", f"= {folder!r} must be a plain folder name inside the export")
    m.value(tokenizer, "model_max_length", int, where="tokenizer.model_max_length")
    m.files(tokenizer, "tokenizer.files", prefix=f"{folder}/")

    schedulers = m.value(data, "schedulers", dict)
    m.value(schedulers, "decoder", dict, where="schedulers.decoder")
    if "prior" in networks:
        m.value(schedulers, "prior", dict, where="schedulers.prior")
    upsamplers = m.value(data, "upsamplers", list)
    if not upsamplers:
        raise m.error("upsamplers", "is empty (the cascade needs at least one)")
    for i, up in enumerate(upsamplers):
        where = f"upsamplers[{i}]"
        if not isinstance(up, dict):
            raise m.error(where, "must be an object")
        m.value(up, "name", str, where=f"{where}.name")
        for key in ("first", "last"):
            net = m.value(up, key, str, where=f"{where}.{key}")
            if networks.get(net, {}).get("kind") != "super_res":
                raise m.error(f"{where}.{key}", f"= {net!r} is not a super_res graph of 'networks'")
        m.value(up, "scheduler", dict, where=f"{where}.scheduler")
    m.value(data, "image_processor_config", (dict, type(None)), optional=True)
    m.value(data, "call_defaults", dict, optional=True)
    check = m.value(data, "tensorrt_op_check", dict, optional=True)
    if check is not None:
        unsupported = m.value(check, "unsupported", dict, where="tensorrt_op_check.unsupported", optional=True)
        for name, ops in (unsupported or {}).items():
            if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
                raise m.error(f"tensorrt_op_check.unsupported.{name}", "must be a list of op names")
    m.value(data, "versions", dict, optional=True)
    return data


class _Manifest:
    """Typed access to manifest keys, every failure a ConfigError naming the file and the key."""

    def __init__(self, data: dict, path: str):
        self.data, self.path = data, path

    def error(self, where: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: key '{where}' {message}")

    def value(self, obj: dict, key: str, types, *, where: str | None = None, choices=None, optional=False):
        where = where or key
        if key not in obj:
            if optional:
                return None
            raise self.error(where, "is required but missing (the export is damaged; export again)")
        value = obj[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and types in (int, (int, float)))
        if not ok:
            names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
            raise self.error(where, f"has type {type(value).__name__}, expected {names}")
        if choices is not None and value not in choices:
            raise self.error(where, f"= {value!r} is not supported (supported: {', '.join(map(repr, choices))})")
        return value

    def strings(self, obj: dict, key: str, *, where: str) -> list:
        values = self.value(obj, key, list, where=where)
        if not all(isinstance(v, str) for v in values):
            raise self.error(where, "must be a list of strings")
        return values

    def files(self, obj: dict, where: str, *, prefix: str) -> dict:
        """A {relative path: {sha256, bytes}} table; each path must stay inside its own folder."""
        files = self.value(obj, "files", dict, where=where)
        if not files:
            raise self.error(where, "lists no files")
        for rel, meta in files.items():
            parts = rel.split("/")
            if (not rel.startswith(prefix) or "\\" in rel or any(p in ("", ".", "..") for p in parts)
                    or os.path.isabs(rel)):
                raise self.error(f"{where}.{rel}", f"is not a path inside {prefix!r}")
            if not isinstance(meta, dict):
                raise self.error(f"{where}.{rel}", "must be an object with 'sha256' and 'bytes'")
            digest = self.value(meta, "sha256", str, where=f"{where}.{rel}.sha256")
            if len(digest) != 64 or digest.strip("0123456789abcdef"):
                raise self.error(f"{where}.{rel}.sha256", f"= {digest[:80]!r} is not a sha256 hex digest")
            size = self.value(meta, "bytes", int, where=f"{where}.{rel}.bytes")
            if size < 0:
                raise self.error(f"{where}.{rel}.bytes", f"= {size} must be >= 0")
        return files


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def verification_enabled(verify: bool | None = None) -> bool:
    """Whether loading hashes every file: `verify` when given, else the environment variable
    UNCLIP_VERIFY_EXPORTS (on unless set to 0, false, no or off)."""
    if verify is not None:
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True, False or None, got {verify!r}")
        return verify
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def verify_files(root: str, manifest: dict, *, hashes: bool | None = None) -> None:
    """Every file `manifest` (from `read_manifest`) lists exists with its recorded size and, when `hashes`
    (default: `verification_enabled()`), its recorded sha256, read in 16 MiB blocks. ConfigError names the
    first file that differs. Costs about one read of the export (see README, "Loading and files")."""
    entries = dict(manifest["tokenizer"]["files"])
    for net in manifest["networks"].values():
        entries.update(net["files"])
    paths = {}
    for rel, meta in entries.items():
        path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(path):
            raise ConfigError(f"{root}: {rel} is missing (the export is incomplete; export again)")
        if os.path.getsize(path) != meta["bytes"]:
            raise ConfigError(f"{root}: {rel} has {os.path.getsize(path)} bytes, the manifest says {meta['bytes']} "
                              "(corrupt or modified; export again)")
        paths[rel] = path
    if not verification_enabled(hashes):
        return
    from tqdm.auto import tqdm
    total = sum(meta["bytes"] for meta in entries.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="verifying export", leave=False,
              disable=total < VERIFY_PROGRESS_BYTES) as bar:
        for rel, path in paths.items():
            if sha256_file(path, progress=bar.update) != entries[rel]["sha256"]:
                raise ConfigError(f"{root}: {rel} does not match its sha256 in {MANIFEST} (corrupt or modified "
                                  f"after export; export again, or set {VERIFY_ENV}=0 to skip this check)")


def manifest_summary(manifest: dict) -> str:
    lines = [f"{FORMAT} v{manifest['format_version']}, dtype {manifest['dtype']}, opset {manifest['opset']}"]
    for name, net in manifest["networks"].items():
        size = sum(f["bytes"] for f in net["files"].values())
        lines.append(f"  {name:<18} {net['class']:<30} {size / 2**20:9.1f} MiB  {net['graph_sha256'][:12]}")
    return "\n".join(lines)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
