"""Pull a session's published batch to disk, resumably, and open it only once it verifies.

Layout under ``root``: ``session-<id>/manifest.json`` and ``session-<id>/images/<sha256>.png``;
an image being downloaded is ``<sha256>.png.part`` and resumes with ``Range: bytes=N-``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from itloop.protocol.batches import BatchManifest, ManifestStimulus
from itloop.rig_client.errors import BatchNotVerified
from itloop.rig_client.server_client import RigServerClient

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class LocalBatch:
    """A batch on disk whose manifest and every image matched their sha256 when opened."""

    root: Path
    manifest: BatchManifest

    def image_path(self, stimulus_id: int) -> Path:
        stimulus = self.stimulus(stimulus_id)
        return self.root / "images" / f"{stimulus.sha256}.png"

    def stimulus(self, stimulus_id: int) -> ManifestStimulus:
        for stimulus in self.manifest.stimuli:
            if stimulus.stimulus_id == stimulus_id:
                return stimulus
        raise BatchNotVerified(
            f"stimulus {stimulus_id} is not in session {self.manifest.session_id}"
        )


@dataclass(frozen=True)
class PullReport:
    batch: LocalBatch
    downloaded: int
    resumed: int
    already_present: int


def session_dir(root: Path, session_id: int) -> Path:
    return Path(root) / f"session-{session_id}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_manifest(manifest: BatchManifest) -> None:
    actual = manifest.content_sha256()
    if actual != manifest.manifest_sha256:
        raise BatchNotVerified(
            f"manifest of session {manifest.session_id} hashes to {actual}, "
            f"not its manifest_sha256 {manifest.manifest_sha256}"
        )
    known = {s.stimulus_id for s in manifest.stimuli}
    for p in manifest.presentations:
        if p.stimulus_id not in known:
            raise BatchNotVerified(
                f"presentation seq {p.seq} names stimulus {p.stimulus_id}, not in the manifest"
            )


def pull_batch(
    client: RigServerClient,
    session_id: int,
    root: Path,
    *,
    progress: Callable[[str], None] | None = None,
) -> PullReport:
    """Download the manifest and every image not yet verified on disk, then verify all."""
    target = session_dir(root, session_id)
    images = target / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = client.manifest(session_id)
    if manifest.session_id != session_id:
        raise BatchNotVerified(
            f"asked for session {session_id}, the server sent session {manifest.session_id}"
        )
    _check_manifest(manifest)
    downloaded = resumed = present = 0
    for stimulus in {s.sha256: s for s in manifest.stimuli}.values():
        final = images / f"{stimulus.sha256}.png"
        if final.is_file() and file_sha256(final) == stimulus.sha256:
            present += 1
            continue
        partial = images / f"{stimulus.sha256}.png.part"
        offset = partial.stat().st_size if partial.is_file() else 0
        if offset > stimulus.size_bytes:
            offset = 0
        for attempt in range(2):
            mode = "r+b" if partial.is_file() else "wb"
            with open(partial, mode) as out:
                started = client.fetch_image(session_id, stimulus.sha256, out, offset=offset)
                out.flush()
                os.fsync(out.fileno())
            if file_sha256(partial) == stimulus.sha256:
                break
            partial.unlink()
            offset = 0
            if attempt == 1:
                raise BatchNotVerified(
                    f"image {stimulus.sha256} (stimulus {stimulus.stimulus_id}) does not match "
                    "its sha256 after a fresh download"
                )
        if started > 0:
            resumed += 1
        downloaded += 1
        os.replace(partial, final)
        if progress:
            progress(f"image {stimulus.sha256[:12]} ok")
    manifest_path = target / MANIFEST
    tmp = manifest_path.with_suffix(".json.part")
    tmp.write_text(manifest.model_dump_json(indent=1), encoding="utf-8")
    os.replace(tmp, manifest_path)
    return PullReport(open_batch(root, session_id), downloaded, resumed, present)


def open_batch(root: Path, session_id: int) -> LocalBatch:
    """The pulled batch, after checking the manifest hash and every image's sha256 on disk."""
    target = session_dir(root, session_id)
    manifest_path = target / MANIFEST
    if not manifest_path.is_file():
        raise BatchNotVerified(
            f"session {session_id} has not been pulled (no {manifest_path}); run `itloop rig pull`"
        )
    manifest = BatchManifest.model_validate_json(manifest_path.read_bytes())
    _check_manifest(manifest)
    for stimulus in manifest.stimuli:
        path = target / "images" / f"{stimulus.sha256}.png"
        if not path.is_file():
            raise BatchNotVerified(
                f"image {path.name} of stimulus {stimulus.stimulus_id} is missing"
            )
        actual = file_sha256(path)
        if actual != stimulus.sha256:
            raise BatchNotVerified(
                f"image of stimulus {stimulus.stimulus_id} hashes to {actual}, "
                f"not {stimulus.sha256}"
            )
    return LocalBatch(target, manifest)


__all__ = ["LocalBatch", "PullReport", "open_batch", "pull_batch"]
