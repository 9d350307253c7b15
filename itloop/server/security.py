"""Passwords (argon2), API token secrets (SHA-256, constant-time compare) and signed cookies."""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

TOKEN_PREFIX = "itl"
_TOKEN_RE = re.compile(rf"^{TOKEN_PREFIX}_([A-Za-z0-9]{{12}})_([A-Za-z0-9_-]{{43}})$")
_TOKEN_ANYWHERE_RE = re.compile(rf"{TOKEN_PREFIX}_[A-Za-z0-9]{{12}}_[A-Za-z0-9_-]{{8,}}")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user does not exist, so both paths take as long.
DUMMY_PASSWORD_HASH = _hasher.hash("not-a-real-password")


@dataclass(frozen=True)
class NewToken:
    """A freshly made token: the full string is shown once; only ``secret_sha256`` is kept."""

    token: str
    lookup: str
    secret_sha256: str


def new_token() -> NewToken:
    lookup = "".join(secrets.choice(_ALNUM) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    return NewToken(f"{TOKEN_PREFIX}_{lookup}_{secret}", lookup, sha256_hex(secret))


def parse_token(token: str) -> tuple[str, str] | None:
    """``(lookup, secret)`` of a well-formed token, else None."""
    match = _TOKEN_RE.match(token)
    return (match.group(1), match.group(2)) if match else None


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def secret_matches(secret: str, stored_sha256: str) -> bool:
    return hmac.compare_digest(sha256_hex(secret), stored_sha256)


def redact(text: str) -> str:
    """``text`` with anything shaped like an API token masked."""
    return _TOKEN_ANYWHERE_RE.sub(f"{TOKEN_PREFIX}_<redacted>", text)


class TokenRedactingFilter(logging.Filter):
    """Masks API tokens in log records, whatever logger emits them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
