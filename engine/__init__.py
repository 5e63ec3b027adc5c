"""unclip-engine: a fast, exact inference engine for the unCLIP text-to-image cascade."""
__version__ = "0.1.0"

__all__ = ["Pipeline", "UnCLIPOutput", "ConfigError", "WeightsError", "NonFiniteError", "Observer", "Runner",
           "register_runner", "__version__"]

_LAZY = {  # Lazy: `import unclip.models.prior` (or the CLI's `--help`) should not pay for the whole pipeline.
    "Pipeline": ("pipeline", "Pipeline"),
    "UnCLIPOutput": ("cascade", "UnCLIPOutput"),
    "NonFiniteError": ("errors", "NonFiniteError"),
    "ConfigError": ("config", "ConfigError"),
    "WeightsError": ("weights", "WeightsError"),
    "Observer": ("observers", "Observer"),
    "Runner": ("runner", "Runner"),
    "register_runner": ("runner", "register_runner"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module 'unclip' has no attribute {name!r}")
