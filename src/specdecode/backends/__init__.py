"""Model backends: our compact `torch` transformer, and any `transformers` model through `hf`."""

from specdecode.backends.base import Backend

__all__ = ["Backend"]
