"""Errors of the numerics (argument errors are ValueError/TypeError; file errors ConfigError/WeightsError)."""


class NonFiniteError(FloatingPointError):
    """A stage produced NaN or Inf (typically fp16 overflow); the message names the stage."""
