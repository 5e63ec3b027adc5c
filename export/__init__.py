"""Export of the cascade's networks to ONNX and TensorRT, and the graph-backed backends that run them.

    from unclip.export import export_onnx, load_exported
    export_onnx("path/to/karlo", "karlo-onnx", dtype="fp16")          # or `unclip export ...`
    pipe = unclip.Pipeline.from_pretrained("karlo-onnx", backend="onnxruntime")

Modules: `onnx` (graph export, manifest), `networks` (stand-ins with the torch modules' call signatures),
`onnxruntime` (ONNX Runtime executor), `tensorrt` (engine building/caching and executor; not yet run on
a GPU), `loader` (building `Components` for a backend).
"""

__all__ = ["export_onnx", "load_exported", "read_manifest", "ExportError", "tensorrt_status"]


def __getattr__(name):
    # Lazy, so `import unclip.export` costs nothing until used (and needs no onnx/onnxruntime/tensorrt).
    if name in ("export_onnx", "read_manifest", "ExportError"):
        from . import onnx
        return getattr(onnx, name)
    if name == "load_exported":
        from .loader import load_exported
        return load_exported
    if name == "tensorrt_status":
        from .tensorrt import tensorrt_status
        return tensorrt_status
    raise AttributeError(f"module 'unclip.export' has no attribute {name!r}")
