"""A content-addressed file store (SHA-256) on a local or shared filesystem path."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from itloop.server.errors import InvalidInput, NotFound

_HEX = frozenset("0123456789abcdef")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ContentStore:
    """Files named by the SHA-256 of their content, written atomically (temp file + rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not set(sha256) <= _HEX:
            raise InvalidInput(f"{sha256!r} is not a lower-case SHA-256 hex digest", value=sha256)
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put(self, data: bytes) -> str:
        """Store ``data`` (idempotent) and return its SHA-256."""
        digest = sha256_bytes(data)
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        return self.existing(sha256).read_bytes()

    def existing(self, sha256: str) -> Path:
        target = self.path(sha256)
        if not target.is_file():
            raise NotFound(f"no artifact with sha256 {sha256}", field="sha256", value=sha256)
        return target

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and self.path(sha256).is_file()
