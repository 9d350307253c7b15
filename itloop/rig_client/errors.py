"""The rig client's exceptions: one hierarchy, foreign errors translated where they enter."""

from __future__ import annotations


class RigError(Exception):
    """Base of every error the rig client raises on purpose."""


class ConfigError(RigError):
    """The rig configuration file is missing, malformed or unsafe."""


class BatchNotVerified(RigError):
    """A pulled batch is incomplete or an image does not match its sha256."""


class ServerUnavailable(RigError):
    """The server could not be reached or answered with a transient error; retry later."""


class ServerRejected(RigError):
    """The server refused a request for good (4xx other than 408/409/429)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        field: str | None = None,
        value: object = None,
    ) -> None:
        super().__init__(f"server answered {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.field = field
        self.value = value


class AcquisitionError(RigError):
    """A recording cannot be read or cannot be used for counting."""


class SpoolError(RigError):
    """The local spool is unusable (not a spool, or from another session's layout)."""
