"""``RigServerClient``: the rig's only way to the server, HTTP through httpx.

Transport failures and transient answers become ``ServerUnavailable`` (retry), refusals become
``ServerRejected`` carrying the server's ``field``/``value``. The token goes in a header and is
never part of a message, a log line or a repr.
"""

from __future__ import annotations

from typing import IO

import httpx

from itloop.protocol.batches import BatchManifest, UploadReceipt
from itloop.rig_client.errors import ServerRejected, ServerUnavailable

API = "/api/v1"
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class RigServerClient:
    """A session-scoped HTTP client authenticated with the rig's bearer token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        transport: httpx.BaseTransport | None = None,
        timeout_s: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http`` replaces the client built here (e.g. a Starlette ``TestClient``)."""
        if http is not None:
            http.headers["Authorization"] = f"Bearer {token}"
            self._http = http
            return
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=timeout_s,
        )

    def __repr__(self) -> str:
        return f"RigServerClient({str(self._http.base_url)!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RigServerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs: object) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        _raise_for(response)
        return response

    def session_state(self, session_id: int) -> str:
        body = self._request("GET", f"{API}/sessions/{session_id}").json()
        return str(body["state"])

    def manifest(self, session_id: int) -> BatchManifest:
        response = self._request("GET", f"{API}/sessions/{session_id}/batch/manifest")
        return BatchManifest.model_validate_json(response.content)

    def fetch_image(self, session_id: int, sha256: str, out: IO[bytes], *, offset: int) -> int:
        """Append the image's bytes from ``offset`` to ``out`` (from 0 if the server ignores the
        range); returns the offset the written bytes started at."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        url = f"{API}/sessions/{session_id}/batch/images/{sha256}"
        try:
            with self._http.stream("GET", url, headers=headers) as response:
                if response.status_code == 416:
                    return offset
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                start = offset if response.status_code == 206 else 0
                out.seek(start)
                out.truncate()
                for block in response.iter_bytes():
                    out.write(block)
                return start
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"GET {url}: {type(exc).__name__}: {exc}") from exc

    def upload(self, session_id: int, idempotency_key: str, body: bytes) -> UploadReceipt:
        response = self._request(
            "POST",
            f"{API}/sessions/{session_id}/uploads",
            content=body,
            headers={"Idempotency-Key": idempotency_key, "Content-Type": "application/json"},
        )
        return UploadReceipt.model_validate_json(response.content)

    def transition(self, session_id: int, to: str, *, reason: str | None = None) -> str:
        payload: dict[str, str] = {"to": to}
        if reason:
            payload["reason"] = reason
        response = self._request("POST", f"{API}/sessions/{session_id}/transitions", json=payload)
        return str(response.json()["state"])


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    message, field, value = response.reason_phrase, None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("message") or body.get("detail") or message)
        field = body.get("field")
        value = body.get("value")
    where = f"{response.request.method} {response.request.url.path}"
    if response.status_code in RETRYABLE_STATUS:
        raise ServerUnavailable(f"{where}: {response.status_code} {message}")
    raise ServerRejected(
        response.status_code,
        f"{where}: {message}",
        field=str(field) if field is not None else None,
        value=value,
    )
