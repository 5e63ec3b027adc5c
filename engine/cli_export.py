"""`unclip export`: write a cascade as ONNX graphs (and, with `--format tensorrt`, TensorRT engines).

    unclip export --model DIR|--preset NAME --format onnx|tensorrt --out OUT [--dtype fp32|fp16] [--opset N]
    unclip export --model DIR|--preset NAME --format native --out OUT [--device cpu] [--max-batch N]

The output folder is written atomically: on any error (unsupported config, disk full, Ctrl-C) it is not
created, and an existing export there is replaced only when the new one is complete (`--overwrite`).
"""
from __future__ import annotations

import os
import shutil
import sys

COMMANDS = ("export",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="export the cascade to ONNX graphs or TensorRT engines",
                              description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a diffusers-layout unCLIP folder (e.g. Karlo v1 alpha)")
    src.add_argument("--preset", help="toy (the trained shapes-world cascade that ships with the package) | "
                                      "random weights: tiny | karlo | dalle2")
    p.add_argument("--seed", type=int, default=0, help="seed of a --preset's random weights (default 0)")
    p.add_argument("--format", choices=("onnx", "tensorrt", "native"), default="onnx",
                   help="native: AOTInductor packages for the C++ runtime (backend 'native', unclip-native)")
    p.add_argument("--out", required=True, help="output folder (created; must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "fp16"), default=None,
                   help="graph precision (default: fp32 for onnx, fp16 for tensorrt)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18..23 (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    p.add_argument("--max-batch", type=int, default=None,
                   help="tensorrt/native: largest batch the engines/packages accept (default 8; guidance "
                        "doubles the batch)")
    p.add_argument("--opt-batch", type=int, default=None, help="tensorrt: batch the engines are tuned for (default 2)")
    p.add_argument("--device", default=None,
                   help="tensorrt: the GPU to build for (default cuda); native: cpu (default) or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    import torch

    if args.format == "native":
        return _run_native(args)
    if args.device is None:
        args.device = "cuda"

    from .export.onnx import DEFAULT_OPSET, ExportError, manifest_summary, prepare_out, read_manifest

    dtype = args.dtype or ("fp16" if args.format == "tensorrt" else "fp32")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))

    if args.format == "tensorrt":
        from .export.tensorrt import BuildSettings, tensorrt_status
        reason = tensorrt_status(args.device)
        if reason is not None:  # say so before any work
            print(f"unclip: error: --format tensorrt is not available here: {reason}. "
                  "`--format onnx` works without it.", file=sys.stderr)
            return 2
        settings = BuildSettings(**{k: v for k, v in (("opt_batch", args.opt_batch), ("max_batch", args.max_batch))
                                    if v is not None})
    elif args.max_batch is not None or args.opt_batch is not None:
        raise ValueError("--max-batch / --opt-batch apply to --format tensorrt only")

    out = prepare_out(args.out, args.overwrite)  # refuse early, before any export work
    if args.model:
        source = args.model
    else:
        from .presets import build_preset
        source = build_preset(args.preset, seed=args.seed, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype])

    try:
        _export(args, source, out, dtype, opset, say, settings if args.format == "tensorrt" else None)
    except ExportError as e:
        print(f"unclip: error: {e} (nothing was written to {out})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unclip: interrupted; nothing was written to {out}", file=sys.stderr)
        return 130
    if not args.quiet:
        print(manifest_summary(read_manifest(out)))
    print(out)
    return 0


def _export(args, source, out, dtype, opset, say, settings) -> None:
    from .export.onnx import export_onnx, publish, read_manifest, staging_dir

    if args.format == "onnx":
        export_onnx(source, out, dtype=dtype, opset=opset, overwrite=args.overwrite, progress=say)
    else:
        from .export.tensorrt import ensure_engines

        # Graphs and engines go to one temporary folder that becomes OUT only when both are complete.
        staging = staging_dir(out)
        try:
            graphs = export_onnx(source, os.path.join(staging, "export"), dtype=dtype, opset=opset, progress=say)
            say("building TensorRT engines ...")
            ensure_engines(graphs, read_manifest(graphs), device=args.device,
                           cache_dir=os.path.join(graphs, "tensorrt"), settings=settings)
            publish(graphs, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _run_native(args) -> int:
    import torch

    from .export.native import NativeExportError, check_max_batch, export_native, prepare_out

    if args.opset is not None or args.opt_batch is not None:
        raise ValueError("--opset / --opt-batch do not apply to --format native")
    if args.dtype not in (None, "fp32"):
        raise ValueError(f"--format native compiles fp32 packages; got --dtype {args.dtype}")
    max_batch = check_max_batch(8 if args.max_batch is None else args.max_batch)
    device = args.device or "cpu"
    say = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    out = prepare_out(args.out, args.overwrite)  # refuse early, before any compile work
    if args.model:
        source = args.model
    else:
        from .presets import build_preset
        source = build_preset(args.preset, seed=args.seed, device=device, dtype=torch.float32)
    try:
        export_native(source, out, device=device, max_batch=max_batch, overwrite=args.overwrite, progress=say,
                      bar=not args.quiet)
    except NativeExportError as e:
        print(f"unclip: error: {e} (nothing was written to {out})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unclip: interrupted; nothing was written to {out}", file=sys.stderr)
        return 130
    print(out)
    return 0
