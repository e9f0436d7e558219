class TTScaleError(Exception):
    """Base class of ttscale errors."""


class ModelNotFoundError(TTScaleError):
    """A model name or path that resolves to no model directory."""
