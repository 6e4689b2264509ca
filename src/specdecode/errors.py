"""User-facing errors.

A `SpecDecodeError` carries a one-line message that says what went wrong and what to do. The CLI
prints it as `error: <message>` and exits non-zero, without a traceback; the Python API raises it.
"""


class SpecDecodeError(Exception):
    """An error caused by the user's input or environment, with a one-line, actionable message."""


class ModelNotFoundError(SpecDecodeError):
    """An unknown model name, or a path that holds no model."""


class ModelIntegrityError(SpecDecodeError):
    """A model file whose size or checksum does not match what the registry pins."""
