"""unclip-engine: a fast, exact inference engine for the unCLIP text-to-image cascade."""
__version__ = "0.1.0"
