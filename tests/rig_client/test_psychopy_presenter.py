"""The PsychoPy presenter for real, under Xvfb: captured back-buffer pixels match the stimulus
placed and scaled as configured; mask, photodiode patch and event codes behave."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itloop.protocol.batches import PresentationTiming
from itloop.rig_client.hardware import FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import ScreenGeometry, run_session

from .fake_server import make_manifest

pytestmark = [
    pytest.mark.display,
    # PsychoPy itself calls deprecated stdlib and pyglet APIs at import and window creation
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


def test_psychopy_renders_the_batch_as_configured(xvfb_display: str, tmp_path: Path) -> None:
    from itloop.rig_client.psychopy_presenter import PsychoPyPresenter, WindowSettings

    manifest, images = make_manifest(n_images=3, repeats=1, per_trial=3)
    manifest = manifest.model_copy(
        update={"timing": PresentationTiming(on_ms=20, off_ms=10, size_deg=8, images_per_trial=3)}
    )
    paths = {}
    for stimulus in manifest.stimuli:
        path = tmp_path / f"{stimulus.sha256}.png"
        path.write_bytes(images[stimulus.sha256])
        paths[stimulus.stimulus_id] = path
    # 400 px over 40 cm; 8° at this distance is 6.4 cm = 64 px: an exact 4x of the 16 px image
    distance_cm = 3.2 / np.tan(np.radians(4.0))
    geometry = ScreenGeometry(40.0, float(distance_cm), 400, 300)
    assert geometry.size_px(8.0) == 64
    settings = WindowSettings(
        geometry=geometry, size_deg=8.0, expected_refresh_hz=60.0, interpolate=False
    )
    frames: list[tuple[str, int, np.ndarray]] = []
    events = FakeEventOutput()

    def capture(kind: str, seq: int, frame: Image.Image) -> None:
        frames.append((kind, seq, np.asarray(frame.convert("RGB")).astype(int)))

    with PsychoPyPresenter(settings, paths, events, FakeEyeTracker(), capture=capture) as presenter:
        assert presenter.refresh_hz > 0
        log = run_session(manifest, presenter)

    assert events.words == [p.event_code for p in manifest.presentations]
    assert all(r.shown and r.fixation_ok and r.frame_drops >= 0 for r in log.records)
    assert [(k, s) for k, s, _ in frames] == [
        (kind, p.seq) for p in manifest.presentations for kind in ("stimulus", "mask")
    ]
    stimulus_by_seq = {p.seq: p.stimulus_id for p in manifest.presentations}
    sha_by_id = {s.stimulus_id: s.sha256 for s in manifest.stimuli}
    patch_values = []
    for kind, seq, frame in frames:
        assert frame.shape == (300, 400, 3)
        patch = frame[300 - 20, 20]
        patch_values.append((kind, int(patch.mean())))
        if kind == "mask":
            assert np.abs(frame[150, 200] - 128).max() <= 2  # grey mask at the centre
            continue
        source = np.asarray(
            Image.open(io.BytesIO(images[sha_by_id[stimulus_by_seq[seq]]])).convert("RGB")
        ).astype(int)
        top, left = 150 - 32, 200 - 32
        centres = frame[top + 2 : top + 64 : 4, left + 2 : left + 64 : 4]
        assert centres.shape == source.shape
        assert np.abs(centres - source).max() <= 2
        assert np.abs(frame[top - 3, 200] - 128).max() <= 2  # grey just outside the image
        assert np.abs(frame[150, left + 64 + 3] - 128).max() <= 2
    # the patch flips polarity with each onset and holds through the mask
    onsets = [v for k, v in patch_values if k == "stimulus"]
    masks = [v for k, v in patch_values if k == "mask"]
    assert onsets == [255, 0, 255]
    assert masks == onsets
