"""The exceptions the model library raises; each message names the offending value."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "ModelError",
    "RegistryError",
    "UntrustedCheckpointError",
]


class ModelError(Exception):
    """Base class of every error raised by itloop.models."""


class RegistryError(ModelError, LookupError):
    """A backbone name that is unknown, or registered twice."""


class CheckpointError(ModelError):
    """A checkpoint file that cannot be read or does not describe the requested model."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that can only be read by unpickling arbitrary objects, not marked trusted."""


class CheckpointMismatchError(CheckpointError):
    """A state dict whose keys or shapes do not fit the model it is loaded into.

    missing: keys the model needs that the checkpoint lacks; unexpected: checkpoint keys that
    the architecture does not have at all; mismatched: (key, checkpoint shape, model shape).
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (),
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
