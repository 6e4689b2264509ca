"""The `torch` backend: a compact transformer with a static KV cache."""

from specdecode.backends.torch.backend import TorchBackend

__all__ = ["TorchBackend"]
