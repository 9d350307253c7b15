"""An in-memory server behind ``httpx.MockTransport`` that keeps the batch and upload contract."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field

import httpx

from itloop.protocol.batches import (
    BatchManifest,
    ManifestSite,
    ManifestStimulus,
    PlannedPresentation,
    PresentationTiming,
    StimulusKind,
    UploadChunk,
    UploadReceipt,
    manifest_digest,
)

from .conftest import png


def make_manifest(
    session_id: int = 7, n_images: int = 3, repeats: int = 2, per_trial: int = 4
) -> tuple[BatchManifest, dict[str, bytes]]:
    images = {hashlib.sha256(b).hexdigest(): b for b in (png(i) for i in range(n_images))}
    stimuli = [
        ManifestStimulus(
            stimulus_id=10 + i,
            sha256=sha,
            size_bytes=len(data),
            width_px=16,
            height_px=16,
            kind=StimulusKind.clean,
        )
        for i, (sha, data) in enumerate(images.items())
    ]
    plan = [
        PlannedPresentation(
            seq=seq,
            stimulus_id=stimuli[seq % n_images].stimulus_id,
            event_code=100 + seq,
            trial_index=seq // per_trial,
        )
        for seq in range(n_images * repeats)
    ]
    content = {
        "session_id": session_id,
        "rig_id": 1,
        "subject": "M1",
        "published_at": dt.datetime(2026, 12, 3, tzinfo=dt.UTC),
        "timing": PresentationTiming(on_ms=100, off_ms=100, size_deg=8, images_per_trial=per_trial),
        "window_start_ms": 70.0,
        "window_end_ms": 170.0,
        "spare_event_codes": [900 + i for i in range(8)],
        "sites": [
            ManifestSite(site_id=50 + c, acq_channel=c, array="aIT", electrode=c) for c in (1, 2)
        ],
        "stimuli": stimuli,
        "presentations": plan,
    }
    draft = BatchManifest(**content, manifest_sha256="0" * 64)  # type: ignore[arg-type]
    digest = manifest_digest(draft.model_dump(mode="json", exclude={"manifest_sha256"}))
    return draft.model_copy(update={"manifest_sha256": digest}), images


@dataclass
class FakeServer:
    manifest: BatchManifest
    images: dict[str, bytes]
    token: str = "rig-secret"
    stored: dict[int, dict[str, object]] = field(default_factory=dict)
    receipts: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)
    unavailable: int = 0
    store_then_drop: int = 0
    cut_images_at: int | None = None
    corrupt_image: str | None = None
    reject_seqs: set[int] = field(default_factory=set)
    requests: list[httpx.Request] = field(default_factory=list)
    state: str = "ready"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return httpx.Response(401, json={"error": "unauthorized", "message": "no"})
        path = request.url.path
        sid = self.manifest.session_id
        if self.unavailable > 0:
            self.unavailable -= 1
            raise httpx.ConnectError("connection refused", request=request)
        if path == f"/api/v1/sessions/{sid}/batch/manifest":
            return httpx.Response(200, content=self.manifest.model_dump_json())
        if m := re.fullmatch(rf"/api/v1/sessions/{sid}/batch/images/([0-9a-f]{{64}})", path):
            return self._image(request, m.group(1))
        if path == f"/api/v1/sessions/{sid}":
            return httpx.Response(200, json={"state": self.state})
        if path == f"/api/v1/sessions/{sid}/transitions":
            self.state = json.loads(request.content)["to"]
            return httpx.Response(200, json={"state": self.state})
        if path == f"/api/v1/sessions/{sid}/uploads":
            return self._upload(request)
        return httpx.Response(404, json={"error": "not_found", "message": path})

    def _image(self, request: httpx.Request, sha: str) -> httpx.Response:
        data = self.images[sha]
        if self.corrupt_image == sha:
            data = data[:-1] + bytes([data[-1] ^ 1])
        start = 0
        if rng := request.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").rstrip("-"))
        body = data[start:]
        if self.cut_images_at is not None and start == 0:
            body = body[: self.cut_images_at]

            def broken() -> bytes:
                raise httpx.ReadError("connection reset", request=request)

            return httpx.Response(206 if start else 200, stream=_Cut(body, broken))
        return httpx.Response(206 if start else 200, content=body)

    def _upload(self, request: httpx.Request) -> httpx.Response:
        key = request.headers["Idempotency-Key"]
        body_sha = hashlib.sha256(request.content).hexdigest()
        if key in self.receipts:
            stored_sha, receipt = self.receipts[key]
            if stored_sha != body_sha:
                return httpx.Response(422, json={"error": "invalid", "message": "key reused"})
            return httpx.Response(200, json=receipt)
        chunk = UploadChunk.model_validate_json(request.content)
        for i, p in enumerate(chunk.presentations):
            if p.seq in self.stored or p.seq in self.reject_seqs:
                return httpx.Response(
                    422,
                    json={
                        "error": "invalid_input",
                        "message": f"presentations[{i}]: seq {p.seq} refused",
                        "field": f"presentations[{i}].seq",
                        "value": p.seq,
                    },
                )
        for p in chunk.presentations:
            self.stored[p.seq] = p.model_dump(mode="json")
        receipt = UploadReceipt(
            session_id=self.manifest.session_id,
            chunk_sha256=body_sha,
            n_presentations=len(chunk.presentations),
            n_responses=len(chunk.presentations) * len(chunk.site_ids),
            stored_at=dt.datetime(2026, 12, 3, tzinfo=dt.UTC),
        ).model_dump(mode="json")
        self.receipts[key] = (body_sha, receipt)
        if self.store_then_drop > 0:
            self.store_then_drop -= 1
            raise httpx.ReadTimeout("timed out reading the answer", request=request)
        return httpx.Response(201, json=receipt)


class _Cut(httpx.SyncByteStream):
    def __init__(self, body: bytes, then: object) -> None:
        self.body = body
        self.then = then

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield self.body
        self.then()  # type: ignore[operator]
