"""Compile every Triton kernel variant of the `fast` backend for sm_80 and sm_90, without a GPU, and report
registers, spills, shared memory and theoretical occupancy.

    python benchmarks/kernel_report.py --out benchmarks/results/<date>-kernel_report-cpu-compile.json \
        --markdown /tmp/kernel_report.md --check
    python benchmarks/kernel_report.py --list           # the variants only, no compilation

Which variants. The kernels are launched by `unclip.kernels.attention` and `unclip.kernels.group_norm`, which
choose block sizes, num_warps and num_stages from the shapes and the device (attention_launch_config,
group_norm_launch_config). To cover what they can pick at the presets' shapes, this script
  1. builds each preset (karlo, dalle2, toy) on the meta device and runs every network once (text and image
     encoders, prior and decoder at the classifier-free-guidance batch, both upsamplers), recording each
     attention and group-norm call (shapes, strides, flags) through the models' `impl` swap points;
  2. expands every call site over the image batches (--batches), the dtypes fp16/bf16/fp32, attention with
     and without a key padding mask, group norm with and without SiLU and scale-shift, NCHW and channels-last;
  3. runs the public launchers on meta tensors inside `unclip.kernels.record_launches(target)`, for an A100
     (sm_80, 108 SMs) and an H100 (sm_90, 132 SMs), which records the launches instead of running them;
  4. reduces each launch to the specialization Triton's JIT would compile (constexprs, launch options, the
     argument types, ints equal to 1 and 16-divisible ints / 16-aligned pointers) and compiles each distinct
     one exactly once, in parallel (--jobs), with a fresh Triton cache (nothing is reused across runs).

Measured per variant and target: registers per thread and spill stores/loads (ptxas -v, via Triton's
ptxas log), shared memory per block (the kernel's `shared` metadata; Triton allocates it dynamically, so it
is the launch's whole requirement) and the theoretical occupancy (LIMITS below). --check exits 1 if any
variant fails to compile, spills (except a few bytes ptxas parks outside every loop, see problems()), or
exceeds the target's shared memory per block (tests/test_kernel_report.py). --scope calls restricts step 2 to
the calls themselves (the CI set).

Needs Triton with its NVIDIA backend (the wheel ships ptxas); no GPU, no CUDA driver. TRITON_INTERPRET is
removed from the compiling workers' environment, so the script also works where the tests set it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import importlib
import inspect
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

PRESETS = ("karlo", "dalle2", "toy")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
                 torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
DEFAULT_BATCHES = (1, 2, 4, 8, 16)  # images per call; the prior and decoder run at 2x (guidance)


# ------------------------------------------------------------------------------------------------- limits

@dataclasses.dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of one GPU generation (CUDA C Programming Guide, "Compute Capabilities" table, and the
    A100 / H100 tuning guides). Shared memory: the per-SM capacity is what the L1/shared carveout gives at
    most; a block may use `shared_per_block` (dynamic, opt-in) and the driver reserves 1 KB more per block."""
    name: str
    capability: int
    multiprocessors: int  # of the GPU the launch configuration is chosen for (A100 SXM, H100 SXM)
    registers_per_sm: int = 65536
    register_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    shared_per_sm: int = 0
    shared_per_block: int = 0
    reserved_shared_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    warp_size: int = 32

    @property
    def max_warps_per_sm(self) -> int:
        return self.max_threads_per_sm // self.warp_size


LIMITS = {
    "sm_80": SmLimits("sm_80", 80, 108, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),  # A100
    "sm_90": SmLimits("sm_90", 90, 132, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),  # H100
}


def occupancy(limits: SmLimits, registers: int, shared_bytes: int, num_warps: int) -> dict:
    """Theoretical occupancy (resident warps / max warps per SM) and what limits it, as the CUDA occupancy
    calculator computes it: blocks per SM = min over registers, shared memory, threads and the block cap."""
    per_warp = -(-max(registers, 1) * limits.warp_size // limits.register_alloc_unit) * limits.register_alloc_unit
    by = {
        "registers": (limits.registers_per_sm // per_warp) // num_warps,
        "shared": (limits.shared_per_sm // (shared_bytes + limits.reserved_shared_per_block)
                   if shared_bytes > 0 else limits.max_blocks_per_sm),
        "threads": limits.max_threads_per_sm // (num_warps * limits.warp_size),
        "blocks": limits.max_blocks_per_sm,
    }
    blocks = min(by.values())
    return dict(occupancy=round(blocks * num_warps / limits.max_warps_per_sm, 4), blocks_per_sm=blocks,
                limited_by=min(by, key=lambda k: (by[k], k != "registers")))


# A spill is excused only when it is the one ptxas makes on purpose: with registers to spare it parks a value
# or two in local memory across a loop (one store before, one load after, per thread) to keep the register
# count on an occupancy step (e.g. 32 registers = every warp resident at 128 threads a block). Recognised
# from the SASS: at most this many bytes, and no local-memory instruction inside any loop.
PARKED_SPILL_MAX_BYTES = 16


def problems(row: dict) -> list[str]:
    """What makes a row fail the check: not compiled, spills (other than a small one parked outside every
    loop, see PARKED_SPILL_MAX_BYTES), shared memory over the target's per-block limit, or no block fitting."""
    if not row["ok"]:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        parked = (row.get("local_in_loops") == 0 and row["spill_stores"] <= PARKED_SPILL_MAX_BYTES
                  and row["spill_loads"] <= PARKED_SPILL_MAX_BYTES)
        if not parked:
            found.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads"
                         + (f", {row['local_in_loops']} local-memory instructions in loops)"
                            if row.get("local_in_loops") is not None else ")"))
    limit = LIMITS[row["target"]].shared_per_block
    if row["shared_bytes"] > limit:
        found.append(f"shared memory {row['shared_bytes']} B > {limit} B per block")
    if row["occupancy"] <= 0:
        found.append("no block fits on an SM")
    return found


# --------------------------------------------------------------------------------------- call sites

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple
    stride: tuple
    offset: int = 0

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def scaled(self, n: int) -> "TensorSpec":
        """The same tensor at n times the batch (dim 0; strides of batch-outermost tensors do not change)."""
        return TensorSpec((self.shape[0] * n,) + self.shape[1:], self.stride, self.offset)

    def meta(self, dtype: torch.dtype) -> torch.Tensor:
        extent = self.offset + 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return torch.empty(extent, dtype=dtype, device="meta").as_strided(self.shape, self.stride, self.offset)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    q: TensorSpec
    k: TensorSpec
    v: TensorSpec
    causal: bool
    mask: TensorSpec | None
    scale: float | None


@dataclasses.dataclass(frozen=True)
class GroupNormSite:
    x: TensorSpec
    num_groups: int
    affine: bool
    eps: float
    silu: bool
    scale: TensorSpec | None
    shift: TensorSpec | None


def _network_inputs(components, name: str, net, dtype):
    """Meta inputs of one network at one image (the prior and decoder at 2 rows: guidance)."""
    def meta(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device="meta")
    text = components.text_encoder.config
    if name == "text_encoder":
        return (meta(1, text.max_position_embeddings, dt=torch.long),), {}
    if name == "image_encoder":
        size = net.config.image_size
        return (meta(1, net.config.num_channels, size, size),), {}
    if name == "prior":
        c = net.config
        dim = c.clip_embed_dim or c.embedding_dim
        return (meta(2, dim), 999, meta(2, c.embedding_proj_dim or dim),
                meta(2, c.num_embeddings, c.embedding_dim), meta(2, c.num_embeddings, dt=torch.bool)), {}
    if name == "decoder":
        c = net.config
        clip_dim = components.text_proj.config.clip_embeddings_dim
        context, _ = components.text_proj(meta(1, clip_dim), meta(2, clip_dim),
                                          meta(2, text.max_position_embeddings, text.hidden_size), True)
        # The time embedding's width does not reach a kernel; the decoder's own keeps this independent of
        # whether text_proj's time_embed_dim matches it.
        return (meta(2, c.in_channels, c.sample_size, c.sample_size), 999, context, meta(2, c.time_embed_dim),
                meta(2, context.shape[1], dt=torch.bool)), {}
    if name.endswith((".first", ".last")):
        c = net.config
        return (meta(1, c.in_channels, c.sample_size, c.sample_size), 999), {}
    return None  # text_proj: no attention, no group norm


def collect_sites(preset: str) -> dict:
    """{site: set of "preset/network"} for every attention / group-norm call of one forward of every
    network of `preset`, built on the meta device (no weights, no compute)."""
    from unclip.models.layers import Attend, GroupNorm
    from unclip.presets import build_preset

    dtype = torch.float16
    components = build_preset(preset, device="meta", dtype=dtype)
    sites: dict = {}
    for name, net in components.networks().items():
        inputs = _network_inputs(components, name, net, dtype)
        if inputs is None:
            continue
        label = f"{preset}/{name.replace('.first', '').replace('.last', '')}"
        batch = inputs[0][0].shape[0]

        def spec(t):
            if t is None:
                return None
            if t.shape[0] != batch:
                raise RuntimeError(f"{label}: a kernel argument of shape {tuple(t.shape)} is not batch-major")
            return TensorSpec.of(t)

        def attend(q, k, v, *, causal=False, key_padding_mask=None, scale=None):
            site = AttentionSite(spec(q), spec(k), spec(v), bool(causal), spec(key_padding_mask), scale)
            sites.setdefault(site, set()).add(label)
            return q.new_empty(q.shape)

        def group_norm(x, num_groups, weight, bias, eps, *, silu=False, scale=None, shift=None):
            site = GroupNormSite(spec(x), num_groups, weight is not None, float(eps), bool(silu), spec(scale),
                                 spec(shift))
            sites.setdefault(site, set()).add(label)
            return torch.empty_like(x)

        previous = {}
        for m in net.modules():
            if isinstance(m, (Attend, GroupNorm)):
                previous[m] = m.impl
                m.impl = attend if isinstance(m, Attend) else group_norm
        try:
            with torch.inference_mode():
                net(*inputs[0], **inputs[1])
        finally:
            for m, impl in previous.items():
                m.impl = impl
    return sites


def _variants_of(site):
    """The call site itself plus what the launchers may also be asked at its shapes: attention with and
    without a key padding mask; group norm with and without SiLU and scale-shift, NCHW and channels-last.
    In a fixed order (lists, not sets), so the report's examples are the same on every run."""
    def unique(items):
        return list(dict.fromkeys(items))

    if isinstance(site, AttentionSite):
        batch, len_k = site.q.shape[0], site.k.shape[2]
        masks = unique([site.mask, None, TensorSpec((batch, len_k), (len_k, 1))])
        return [dataclasses.replace(site, mask=m) for m in masks]
    x = site.x
    b, c = x.shape[:2]
    layouts = [x]
    if len(x.shape) >= 3:
        rest = x.shape[2:]
        inner = [1] * len(rest)  # contiguous strides of the spatial dims
        for i in range(len(rest) - 2, -1, -1):
            inner[i] = inner[i + 1] * rest[i + 1]
        spatial = inner[0] * rest[0]
        layouts = unique([x, TensorSpec(x.shape, (c * spatial, spatial) + tuple(inner)),
                          TensorSpec(x.shape, (c * spatial, 1) + tuple(st * c for st in inner))])  # channels-last
    chunked = (TensorSpec((b, c), (2 * c, 1), 0), TensorSpec((b, c), (2 * c, 1), c))  # a (B, 2C) chunk
    out = []
    for layout in layouts:
        for silu in (False, True):
            for ss in ((site.scale, site.shift) if site.scale is not None else chunked, (None, None)):
                out.append(dataclasses.replace(site, x=layout, silu=silu, scale=ss[0], shift=ss[1]))
    return out


def record(site, n: int, dtype: torch.dtype, target):
    """The launches `attention` / `group_norm` make for `site` at n images, dtype, on `target`."""
    import unclip.kernels as K

    with K.record_launches(target) as launches:
        if isinstance(site, AttentionSite):
            q, k, v = (t.scaled(n).meta(dtype) for t in (site.q, site.k, site.v))
            mask = site.mask.scaled(n).meta(torch.bool) if site.mask is not None else None
            K.attention(q, k, v, causal=site.causal, key_padding_mask=mask, scale=site.scale)
        else:
            x = site.x.scaled(n).meta(dtype)
            channels = x.shape[1]
            w = torch.empty(channels, dtype=dtype, device="meta") if site.affine else None
            scale = site.scale.scaled(n).meta(dtype) if site.scale is not None else None
            shift = site.shift.scaled(n).meta(dtype) if site.shift is not None else None
            K.group_norm(x, site.num_groups, w, w, site.eps, silu=site.silu, scale=scale, shift=shift)
    return launches


def describe(site, n: int, dtype_name: str) -> str:
    if isinstance(site, AttentionSite):
        b, h, lq, d = site.q.scaled(n).shape
        flags = ("causal " if site.causal else "") + ("mask " if site.mask is not None else "")
        return f"q ({b},{h},{lq},{d}) Lk={site.k.shape[2]} {flags}{dtype_name}".replace("  ", " ")
    x = site.x.scaled(n)
    layout = "channels-last" if x.stride[1] == 1 and len(x.shape) > 2 else "contiguous"
    flags = ("silu " if site.silu else "") + ("scale-shift " if site.scale is not None else "")
    return f"x {tuple(x.shape)} G={site.num_groups} {layout} {flags}{dtype_name}"


# -------------------------------------------------------------------------------------- specializations

def _specialize(value):
    """(type, attribute) as Triton's JIT specializes an argument (triton 3.x): tensors -> "*<dtype>" and
    "D" when 16-byte aligned (the allocator aligns storage; views add offset·itemsize); ints equal to 1
    become the constexpr 1, other ints i32 (i64 beyond int32) with "D" when divisible by 16; floats fp32."""
    if isinstance(value, torch.Tensor):
        aligned = (value.storage_offset() * value.element_size()) % 16 == 0
        return "*" + TRITON_DTYPES[value.dtype], "D" if aligned else ""
    if isinstance(value, bool):
        return "u1", ""
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", ""
    raise TypeError(f"kernel_report: cannot specialize a {type(value).__name__} argument")


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One compilation: the kernel, Triton's signature/constexprs/divisibility, launch options, target."""
    module: str
    kernel: str
    signature: tuple  # ((name, type), ...), type "constexpr" for constexprs
    constexprs: tuple  # ((name, value), ...)
    divisible: tuple  # names of the arguments with the 16-divisibility attribute
    options: tuple  # ((name, value), ...): num_warps, num_stages, enable_fp_fusion
    target: str  # "sm_80" | "sm_90"

    @property
    def num_warps(self) -> int:
        return dict(self.options).get("num_warps", 4)

    @property
    def num_stages(self) -> int:
        return dict(self.options).get("num_stages", 3)  # Triton's default for CUDA

    def label(self) -> str:
        """Constexprs, launch options and the dtype (the variant's name in the report)."""
        consts = dict(self.constexprs)
        dtype = next((t[1:] for n, t in self.signature if t.startswith("*") and t != "*u8"), "?")
        parts = [dtype]
        blocks = [k for k in consts if k.startswith("BLOCK_")]
        if blocks:
            parts.append("x".join(str(consts[k]) for k in blocks) + " (" + ",".join(k[6:] for k in blocks) + ")")
        parts += [k.lower() for k, v in consts.items() if v is True and not k.startswith("BLOCK_")]
        ones = [n for n, t in self.signature if t == "constexpr" and n not in consts]
        if ones:
            parts.append("=1:" + ",".join(ones))
        parts.append(f"w{self.num_warps} s{self.num_stages}")
        return " ".join(parts)


def spec_of(launch, target: str) -> CompileSpec:
    """The compilation a recorded launch (unclip.kernels.KernelLaunch) needs on `target`."""
    fn = launch.kernel
    fn = getattr(fn, "fn", fn)  # InterpretedFunction / JITFunction -> the Python function
    params = list(inspect.signature(fn).parameters)
    names = [p for p in params if p not in launch.kwargs]
    if len(names) != len(launch.args):
        raise RuntimeError(f"{fn.__name__}: {len(launch.args)} positional arguments for {len(names)} parameters")
    signature, constexprs, divisible = [], [], []
    for name in params:
        if name in launch.kwargs:
            signature.append((name, "constexpr"))
            constexprs.append((name, launch.kwargs[name]))
            continue
        kind, attr = _specialize(launch.args[names.index(name)])
        signature.append((name, kind))
        if kind == "constexpr":
            continue  # an int equal to 1: Triton makes it the constexpr 1
        if attr == "D":
            divisible.append(name)
    options = tuple(sorted((k, v) for k, v in launch.kwargs.items() if k not in params))
    return CompileSpec(fn.__module__, fn.__name__, tuple(signature), tuple(constexprs), tuple(divisible), options,
                       target)


# -------------------------------------------------------------------------------------------- compiling

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _worker_setup(cache_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, whatever the tests set
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def compile_spec(spec: CompileSpec) -> dict:
    """Compile one spec for its target; registers and spills from ptxas -v, shared memory from metadata."""
    t0 = time.perf_counter()
    result = dict(ok=False, error=None, registers=None, spill_stores=None, spill_loads=None, shared_bytes=None)
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{spec.kernel} is a {type(fn).__name__}: TRITON_INTERPRET was set when it was loaded")
        constexprs = dict(spec.constexprs)
        for name, kind in spec.signature:
            if kind == "constexpr" and name not in constexprs:
                constexprs[name] = 1
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.divisible}
        knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's report
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, dict(spec.signature), constexprs, attrs),
                                      target=GPUTarget("cuda", LIMITS[spec.target].capability, 32),
                                      options=dict(spec.options))
        text = log.getvalue()
        regs, spills = _REGISTERS.search(text), _SPILLS.search(text)
        if regs is None or spills is None:  # a cache hit or a Triton without the knob: ask ptxas directly
            text = _ptxas_report(compiled.asm["ptx"], spec.target)
            regs, spills = _REGISTERS.search(text), _SPILLS.search(text)
        result.update(ok=True, registers=int(regs.group(1)), spill_stores=int(spills.group(1)),
                      spill_loads=int(spills.group(2)), shared_bytes=int(compiled.metadata.shared),
                      num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages))
        if result["spill_stores"] or result["spill_loads"]:
            result["local_in_loops"], result["local_accesses"] = local_accesses(compiled.asm["cubin"])
    except Exception as e:  # reported per variant; the check fails on it
        result["error"] = f"{type(e).__name__}: {str(e).strip()[:1500]}"
    result["compile_s"] = round(time.perf_counter() - t0, 2)
    return result


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def local_accesses(cubin: bytes) -> tuple[int, int]:
    """(local-memory instructions inside a loop, all of them) in a cubin's SASS (cuobjdump -sass). A loop is
    the address span from a backward branch's target to the branch."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "k.cubin")
        path.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True,
                              text=True).stdout
    local, loops = [], []
    for addr, op, operands in _SASS.findall(sass):
        at = int(addr, 16)
        if op.split(".")[0] in ("LDL", "STL"):
            local.append(at)
        elif op.split(".")[0] == "BRA":
            target = re.search(r"0x([0-9a-f]+)", operands)
            if target and int(target.group(1), 16) <= at:
                loops.append((int(target.group(1), 16), at))
    inside = sum(1 for at in local if any(lo <= at <= hi for lo, hi in loops))
    return inside, len(local)


def _ptxas_report(ptx: str, target: str) -> str:
    arch = "sm_90a" if target == "sm_90" else target  # Triton compiles sm_90 as sm_90a
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        # the flags Triton's make_cubin passes (triton 3.9), so the figures are those of its cubin
        r = subprocess.run([_ptxas_tool(target), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                            str(src), "-o", str(src) + ".o"], capture_output=True, text=True)
    return r.stdout + r.stderr


def compile_specs(specs: list[CompileSpec], jobs: int, progress: bool = True) -> list[dict]:
    """compile_spec for each spec, in `jobs` fresh processes (spawned: no TRITON_INTERPRET, own cache)."""
    cache = tempfile.mkdtemp(prefix="unclip-kernel-report-")
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, initializer=_worker_setup,
                                 initargs=(cache,)) as pool:
            futures = [pool.submit(compile_spec, s) for s in specs]
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=len(futures), desc="compiling", unit="variant", file=sys.stderr)
            results = []
            for f in futures:
                results.append(f.result())
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
        return results
    finally:
        shutil.rmtree(cache, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ report

def nvidia_backend_available() -> str | None:
    """None if Triton's NVIDIA backend (and its ptxas) is importable; else why not."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends.nvidia import compiler  # noqa: F401
        path = knobs.nvidia.ptxas.path
    except Exception as e:
        return f"Triton's NVIDIA backend is not available ({type(e).__name__}: {e})"
    if not path or not os.path.exists(path):
        return "Triton's NVIDIA backend has no ptxas"
    return None


def collect_variants(presets, batches, dtypes, targets, scope: str = "full") -> dict:
    """{CompileSpec: {"used_by": set, "examples": list}} over every site, batch, dtype and target.
    scope "full": each call site and its variants (_variants_of); "calls": the call sites only."""
    from unclip.kernels import LaunchTarget

    variants: dict = {}
    for preset in presets:
        for site, labels in collect_sites(preset).items():
            for variant in (_variants_of(site) if scope == "full" else [site]):
                for n in batches:
                    for dtype_name in dtypes:
                        for target in targets:
                            limits = LIMITS[target]
                            launch_target = LaunchTarget.cuda(limits.capability, limits.multiprocessors)
                            for launch in record(variant, n, DTYPES[dtype_name], launch_target):
                                spec = spec_of(launch, target)
                                entry = variants.setdefault(spec, {"used_by": set(), "examples": []})
                                entry["used_by"].update(labels)
                                if len(entry["examples"]) < 3:
                                    entry["examples"].append(describe(variant, n, dtype_name))
    return variants


def build_rows(variants: dict, results: list[dict]) -> list[dict]:
    rows = []
    for (spec, info), res in zip(variants.items(), results):
        row = dict(kernel=spec.kernel, variant=spec.label(), target=spec.target,
                   registers=res["registers"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                   shared_bytes=res["shared_bytes"], occupancy=None, ok=res["ok"], error=res["error"],
                   num_warps=spec.num_warps, num_stages=spec.num_stages, constexprs=dict(spec.constexprs),
                   equal_to_1=[n for n, t in spec.signature if t == "constexpr" and n not in dict(spec.constexprs)],
                   divisible_by_16=list(spec.divisible), used_by=sorted(info["used_by"]),
                   examples=info["examples"], compile_s=res["compile_s"])
        if "local_in_loops" in res:
            row.update(local_in_loops=res["local_in_loops"], local_accesses=res["local_accesses"])
        if res["ok"]:
            occ = occupancy(LIMITS[spec.target], res["registers"], res["shared_bytes"], res["num_warps"])
            row.update(occupancy=occ["occupancy"], blocks_per_sm=occ["blocks_per_sm"], limited_by=occ["limited_by"])
        row["problems"] = problems(row)
        rows.append(row)
    # Same label, different integer specialization: number them so every (kernel, variant, target) is unique.
    seen: dict = {}
    for row in sorted(rows, key=lambda r: (r["kernel"], r["variant"], r["target"], r["divisible_by_16"])):
        key = (row["kernel"], row["variant"], row["target"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 1:
            row["variant"] += f" #{seen[key]}"
    rows.sort(key=lambda r: (r["kernel"], r["variant"], r["target"]))
    return rows


def markdown(rows: list[dict], header: str) -> str:
    """A per-kernel summary table, the excused spills, and (inside <details>) one row per launch
    configuration (kernel, target, block sizes, warps, stages), merged over dtypes, flags and integer
    specializations; the JSON has every variant."""
    def kb(n):
        return f"{n / 1024:.1f} KB"

    def span(values, fmt=str):
        lo, hi = min(values), max(values)
        return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"

    def pct(v):
        return f"{v * 100:g} %"
    out = [header, "", "| kernel | target | variants | registers | variants that spill | shared memory (max) | "
           "occupancy | failing |",
           "|---|---|---|---|---|---|---|---|"]
    for kernel in sorted({r["kernel"] for r in rows}):
        for target in LIMITS:
            rs = [r for r in rows if r["kernel"] == kernel and r["target"] == target]
            okr = [r for r in rs if r["ok"]]
            if not okr:
                if rs:
                    out.append(f"| `{kernel}` | {target} | {len(rs)} | – | – | – | – | {len(rs)} |")
                continue
            spilled = [r for r in okr if r["spill_stores"] or r["spill_loads"]]
            out.append(f"| `{kernel}` | {target} | {len(rs)} | {span([r['registers'] for r in okr])} | "
                       f"{len(spilled) or 'none'}{' (parked)' if spilled and not any(r['problems'] for r in spilled) else ''} | "
                       f"{kb(max(r['shared_bytes'] for r in okr))} | {span([r['occupancy'] for r in okr], pct)} | "
                       f"{sum(1 for r in rs if r['problems'])} |")
    parked = [r for r in rows if r["ok"] and (r["spill_stores"] or r["spill_loads"]) and not r["problems"]]
    if parked:
        out += ["", "Excused spills (at most "
                f"{PARKED_SPILL_MAX_BYTES} B, no local-memory instruction inside a loop: ptxas parks a value across "
                "a loop to stay on an occupancy step):", ""]
        out += [f"- {r['target']} `{r['kernel']}` {r['variant']}: {r['spill_stores']} B stored / {r['spill_loads']} B "
                f"loaded by {r['local_accesses']} instructions outside loops, {r['registers']} registers, occupancy "
                f"{pct(r['occupancy'])} ({', '.join(r['used_by'])})" for r in parked]
    failing = [r for r in rows if r["problems"]]
    if failing:
        out += ["", "Failing:", ""] + [f"- {r['target']} `{r['kernel']}` {r['variant']}: {'; '.join(r['problems'])}"
                                       for r in failing]
    groups: dict = {}
    for r in rows:
        if r["ok"]:
            blocks = "x".join(str(v) for k, v in r["constexprs"].items() if k.startswith("BLOCK_"))
            groups.setdefault((r["kernel"], r["target"], blocks, r["num_warps"], r["num_stages"]), []).append(r)
    out += ["", "<details><summary>Every launch configuration (merged over dtypes, flags and integer "
            "specializations)</summary>", "",
            "| kernel | target | blocks | warps | stages | variants | registers | shared | occupancy | used by |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, target, blocks, warps, stages), rs in sorted(groups.items()):
        used = sorted({u for r in rs for u in r["used_by"]})
        out.append(f"| {kernel.replace('_kernel', '')} | {target} | {blocks} | {warps} | {stages} | {len(rs)} | "
                   f"{span([r['registers'] for r in rs])} | {kb(max(r['shared_bytes'] for r in rs))} | "
                   f"{span([r['occupancy'] for r in rs], pct)} | {', '.join(used)} |")
    out += ["", "</details>", ""]
    return "\n".join(out)


def _ptxas_tool(target: str):
    """The ptxas Triton uses for `target` (triton 3.9: the CUDA 12 one below sm_90, the CUDA 13 one from
    sm_90 on)."""
    from triton import knobs
    tool = knobs.nvidia.ptxas if LIMITS[target].capability < 90 else getattr(knobs.nvidia, "ptxas_blackwell", None)
    return (tool or knobs.nvidia.ptxas).path


def toolchain(targets) -> str:
    import triton
    versions = []
    for target in targets:
        try:
            out = subprocess.run([_ptxas_tool(target), "--version"], capture_output=True, text=True).stdout
            release = re.search(r"release ([\d.]+)", out).group(1)
            versions.append(f"{release} ({target})")
        except Exception:
            versions.append(f"? ({target})")
    return f"triton {triton.__version__}, ptxas {', '.join(versions)}"


def write_rows(path: Path, rows: list[dict]) -> None:
    """The JSON list, one row a line (diffable), written to a temporary file first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=("tiny",) + PRESETS)
    p.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--targets", nargs="+", default=list(LIMITS), choices=list(LIMITS))
    p.add_argument("--scope", choices=("full", "calls"), default="full",
                   help="full: every call site plus its mask / SiLU / scale-shift / memory-format variants; "
                        "calls: only what the presets' networks call (the CI test's set)")
    p.add_argument("--kernels", nargs="+", default=None, metavar="NAME",
                   help="only these kernels (e.g. group_norm_apply_kernel); default: all")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    p.add_argument("--out", type=Path, help="JSON: a list of rows, one per (kernel, variant, target)")
    p.add_argument("--markdown", type=Path, help="write the Markdown tables here")
    p.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    p.add_argument("--check", action="store_true", help="exit 1 if any variant fails to compile, spills or "
                                                        "exceeds shared memory")
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batches):
        p.error("--batches must be positive")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    why = nvidia_backend_available()
    if why is not None:
        print(f"kernel_report: {why}; nothing compiled", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    variants = collect_variants(args.presets, args.batches, args.dtypes, args.targets, args.scope)
    if args.kernels:
        variants = {s: v for s, v in variants.items() if s.kernel in args.kernels}
    t_collect = time.perf_counter() - t0
    print(f"{len(variants)} distinct kernel specializations ({args.scope}) over {', '.join(args.presets)} "
          f"(batches {args.batches}, {', '.join(args.dtypes)}, {', '.join(args.targets)}) in {t_collect:.1f}s",
          file=sys.stderr)
    if args.list:
        for spec, info in variants.items():
            print(f"{spec.target} {spec.kernel} {spec.label()} | {', '.join(sorted(info['used_by']))} | "
                  f"{info['examples'][0]}")
        return 0
    results = compile_specs(list(variants), args.jobs)
    rows = build_rows(variants, results)
    tools = toolchain(args.targets)
    for r in rows:
        r["toolchain"] = tools
    failing = [r for r in rows if r["problems"]]
    elapsed = time.perf_counter() - t0
    print(f"compiled {len(rows)} variants in {elapsed:.0f}s with {args.jobs} jobs ({tools}); "
          f"{len(failing)} failing", file=sys.stderr)
    for r in failing:
        print(f"  FAIL {r['target']} {r['kernel']} {r['variant']}: {'; '.join(r['problems'])}", file=sys.stderr)
    if args.out:
        write_rows(args.out, rows)
    if args.markdown:
        header = (f"{_dt.date.today().isoformat()}, {tools}; scope {args.scope}, presets {', '.join(args.presets)}, "
                  f"image batches {', '.join(map(str, args.batches))}, {', '.join(args.dtypes)}: {len(rows)} compiled "
                  f"variants, {len(failing)} failing.")
        args.markdown.write_text(markdown(rows, header))
    return 1 if (args.check and failing) else 0


if __name__ == "__main__":
    sys.exit(main())
