"""The server's domain errors; mapped to HTTP answers once, in the app."""

from __future__ import annotations

from typing import Any


class ItloopError(Exception):
    """Base of every error a service raises on purpose."""

    status_code = 400
    code = "invalid"

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value


class InvalidInput(ItloopError):
    status_code = 422
    code = "invalid_input"


class NotFound(ItloopError):
    status_code = 404
    code = "not_found"


class Conflict(ItloopError):
    status_code = 409
    code = "conflict"


class AuthenticationRequired(ItloopError):
    status_code = 401
    code = "authentication_required"


class PermissionDenied(ItloopError):
    status_code = 403
    code = "permission_denied"


class CredentialsInUrl(ItloopError):
    status_code = 400
    code = "credentials_in_url"


class UnsupportedMediaType(ItloopError):
    status_code = 415
    code = "unsupported_media_type"


class BadIdempotencyKey(ItloopError):
    status_code = 400
    code = "bad_idempotency_key"
