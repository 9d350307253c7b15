"""The analysts' Python client: typed reads of the itloop API with a Bearer token (httpx).

    from itloop.client import ItloopClient
    with ItloopClient("https://itloop.lab", token="itl_…") as api:
        results = api.sensitivity(subject_id=1, kind="attack")

Answers are the wire models of ``itloop.protocol``; every error answer becomes an
``ItloopClientError`` carrying the server's code, message and the offending field and value.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx

from itloop.protocol.auth import UserOut
from itloop.protocol.common import ErrorDetail, WireModel
from itloop.protocol.lab import ProtocolOut, RigOut, SiteOut, SubjectOut
from itloop.protocol.sessions import (
    ModelVersionOut,
    Page,
    ResponseOut,
    SensitivityResultOut,
    SessionCreate,
    SessionOut,
    SessionState,
    SessionTransition,
)

__all__ = ["ItloopClient", "ItloopClientError"]

Model = TypeVar("Model", bound=WireModel)
TableFormat = Literal["csv", "parquet"]
Kind = Literal["clean", "attack", "noise", "interpolation"]


class ItloopClientError(Exception):
    """An error answer of the server (or no answer at all: ``status_code`` 0)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str = "",
        field: str | None = None,
        value: Any = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}" if code else message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.field = field
        self.value = value


def _params(**values: Any) -> dict[str, str]:
    out = {}
    for name, value in values.items():
        if value is None:
            continue
        out[name] = value.isoformat() if isinstance(value, dt.date | dt.datetime) else str(value)
    return out


class ItloopClient:
    """A session with one itloop server; use it as a context manager (or call ``close``)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str,
        timeout_s: float = 60.0,
        http: httpx.Client | None = None,
    ) -> None:
        """``http`` replaces the underlying client (tests pass a ``TestClient`` or a
        ``MockTransport``-backed one); its base URL is then used as it is."""
        if not token.strip():
            raise ValueError("token is empty; create one on the Admin page or `itloop token`")
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s)
        self._headers = {"Authorization": f"Bearer {token.strip()}"}

    def __enter__(self) -> ItloopClient:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    # --- transport ----------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        try:
            answer = self._http.request(
                method, f"/api/v1{path}", params=params, json=json, headers=self._headers
            )
        except httpx.TransportError as exc:
            raise ItloopClientError(0, f"no answer from the server: {exc}") from exc
        if answer.is_error:
            raise self._error(answer)
        return answer

    @staticmethod
    def _error(answer: httpx.Response) -> ItloopClientError:
        try:
            detail = ErrorDetail.model_validate(answer.json())
        except ValueError:
            return ItloopClientError(answer.status_code, answer.text[:500] or answer.reason_phrase)
        return ItloopClientError(
            answer.status_code,
            detail.message,
            code=detail.error,
            field=detail.field,
            value=detail.value,
        )

    def _get(self, path: str, model: type[Model], **params: Any) -> Model:
        return model.model_validate(self._request("GET", path, params=_params(**params)).json())

    def _get_list(self, path: str, model: type[Model], **params: Any) -> list[Model]:
        answer = self._request("GET", path, params=_params(**params))
        items = answer.json()
        if not isinstance(items, list):
            raise ItloopClientError(
                answer.status_code, f"expected a list from {path}, got {items!r:.200}"
            )
        return [model.model_validate(item) for item in items]

    # --- reads --------------------------------------------------------------------------

    def me(self) -> UserOut:
        return self._get("/auth/me", UserOut)

    def subjects(self) -> list[SubjectOut]:
        return self._get_list("/subjects", SubjectOut)

    def rigs(self) -> list[RigOut]:
        return self._get_list("/rigs", RigOut)

    def sites(self, *, subject_id: int | None = None, active: bool | None = None) -> list[SiteOut]:
        flag = None if active is None else str(active).lower()
        return self._get_list("/sites", SiteOut, subject_id=subject_id, active=flag)

    def protocols(self) -> list[ProtocolOut]:
        return self._get_list("/protocols", ProtocolOut)

    def sessions(
        self,
        *,
        subject_id: int | None = None,
        rig_id: int | None = None,
        state: SessionState | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> list[SessionOut]:
        return self._get_list(
            "/sessions",
            SessionOut,
            subject_id=subject_id,
            rig_id=rig_id,
            state=state.value if state else None,
            since=since,
            until=until,
        )

    def session(self, session_id: int) -> SessionOut:
        return self._get(f"/sessions/{session_id}", SessionOut)

    def model_versions(self, *, subject_id: int | None = None) -> list[ModelVersionOut]:
        return self._get_list("/model-versions", ModelVersionOut, subject_id=subject_id)

    def lineage(self, version_id: int) -> list[ModelVersionOut]:
        """The version and its ancestors, newest first."""
        return self._get_list(f"/model-versions/{version_id}/lineage", ModelVersionOut)

    def sensitivity(
        self,
        *,
        subject_id: int | None = None,
        site_id: int | None = None,
        session_id: int | None = None,
        eps_l2: float | None = None,
        kind: Kind | None = None,
        day_from: dt.date | None = None,
        day_to: dt.date | None = None,
    ) -> list[SensitivityResultOut]:
        return self._get_list(
            "/sensitivity",
            SensitivityResultOut,
            subject_id=subject_id,
            site_id=site_id,
            session_id=session_id,
            eps_l2=eps_l2,
            kind=kind,
            day_from=day_from,
            day_to=day_to,
        )

    def iter_responses(
        self,
        *,
        session_id: int | None = None,
        site_id: int | None = None,
        stimulus_id: int | None = None,
        page_size: int = 10_000,
    ) -> Iterator[ResponseOut]:
        """Every spike count (presentation × site), fetched page by page."""
        offset = 0
        while True:
            page = self._get(
                "/responses",
                Page[ResponseOut],
                session_id=session_id,
                site_id=site_id,
                stimulus_id=stimulus_id,
                offset=offset,
                limit=page_size,
            )
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    # --- files --------------------------------------------------------------------------

    def download_nwb(self, session_id: int, target: Path) -> Path:
        """The session's NWB file at ``target`` (written to a temporary file, then renamed)."""
        return self._download(f"/sessions/{session_id}/export.nwb", {}, target)

    def download_responses(
        self, session_id: int, target: Path, fmt: TableFormat = "parquet"
    ) -> Path:
        return self._download(f"/exports/responses.{fmt}", _params(session_id=session_id), target)

    def download_sensitivity(
        self,
        target: Path,
        fmt: TableFormat = "parquet",
        *,
        subject_id: int | None = None,
        session_id: int | None = None,
        site_id: int | None = None,
        kind: Kind | None = None,
    ) -> Path:
        params = _params(subject_id=subject_id, session_id=session_id, site_id=site_id, kind=kind)
        return self._download(f"/exports/sensitivity.{fmt}", params, target)

    def _download(self, path: str, params: Mapping[str, str], target: Path) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(self._request("GET", path, params=params).content)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return target

    # --- writes (staff and admin tokens) ------------------------------------------------

    def schedule_session(self, body: SessionCreate) -> SessionOut:
        answer = self._request("POST", "/sessions", json=body.model_dump(mode="json"))
        return SessionOut.model_validate(answer.json())

    def transition(
        self, session_id: int, to: SessionState, reason: str | None = None
    ) -> SessionOut:
        body = SessionTransition(to=to, reason=reason).model_dump(mode="json")
        answer = self._request("POST", f"/sessions/{session_id}/transitions", json=body)
        return SessionOut.model_validate(answer.json())
