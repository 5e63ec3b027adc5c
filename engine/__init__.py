"""unclip-engine: a fast, exact inference engine for the unCLIP text-to-image cascade."""
__version__ = "0.1.0"

__all__ = ["Pipeline", "UnCLIPOutput", "ConfigError", "WeightsError", "NonFiniteError", "__version__"]


def __getattr__(name):
    # Lazy: `import unclip.models.prior` (or the CLI's `--help`) should not pay for the whole pipeline.
    if name in ("Pipeline", "UnCLIPOutput", "NonFiniteError"):
        from . import pipeline
        return getattr(pipeline, name)
    if name == "ConfigError":
        from .config import ConfigError
        return ConfigError
    if name == "WeightsError":
        from .weights import WeightsError
        return WeightsError
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
