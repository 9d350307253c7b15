"""``PsychoPyPresenter``: the batch on a real screen (the only module that imports PsychoPy).

Each image is drawn for ``on_frames`` flips at the configured size in degrees, then the grey
mask for ``off_frames``; the event code goes out with ``callOnFlip`` on the onset flip, and a
photodiode patch in a corner changes polarity on the same flip, so the acquisition system sees
both the word and the light. Dropped frames are counted per presentation from PsychoPy's own
frame-interval record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from psychopy import visual

from itloop.rig_client.hardware import EventOutput, EyeTracker
from itloop.rig_client.presentation import ItemOutcome, ScreenGeometry, TrialItem

log = logging.getLogger(__name__)
FrameCapture = Callable[[str, int, Image.Image], None]
GREY = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class WindowSettings:
    geometry: ScreenGeometry
    size_deg: float
    expected_refresh_hz: float
    fullscreen: bool = False
    screen: int = 0
    photodiode_px: int = 40
    interpolate: bool = True
    max_refresh_mismatch: float = 0.05


class PsychoPyPresenter:
    """A ``Presenter`` on a pyglet window; open with ``images`` (stimulus id → PNG path)."""

    def __init__(
        self,
        settings: WindowSettings,
        images: Mapping[int, Path],
        event_output: EventOutput,
        eye_tracker: EyeTracker,
        *,
        capture: FrameCapture | None = None,
        refresh_hz: float | None = None,
    ) -> None:
        self.settings = settings
        self.event_output = event_output
        self.eye_tracker = eye_tracker
        self.capture = capture
        geometry = settings.geometry
        self.win = visual.Window(
            size=(geometry.width_px, geometry.height_px),
            winType="pyglet",
            units="pix",
            color=GREY,
            colorSpace="rgb",
            fullscr=settings.fullscreen,
            screen=settings.screen,
            allowGUI=False,
            waitBlanking=True,
            checkTiming=False,
        )
        self._refresh_hz = refresh_hz or self._measure_refresh()
        self.win.recordFrameIntervals = True
        self.win.refreshThreshold = 1.5 / self._refresh_hz
        self.size_px = geometry.size_px(settings.size_deg)
        self._stims: dict[int, visual.ImageStim] = {}
        for stimulus_id, path in images.items():
            with Image.open(path) as raw:
                picture = raw.convert("RGB")
            height = max(1, round(self.size_px * picture.height / picture.width))
            self._stims[stimulus_id] = visual.ImageStim(
                self.win,
                image=picture,
                size=(self.size_px, height),
                units="pix",
                pos=(0, 0),
                interpolate=settings.interpolate,
            )
        side = settings.photodiode_px
        self._patch = visual.Rect(
            self.win,
            width=side,
            height=side,
            units="pix",
            pos=(-geometry.width_px / 2 + side / 2, -geometry.height_px / 2 + side / 2),
            fillColor=(-1.0, -1.0, -1.0),
            lineColor=None,
            colorSpace="rgb",
        )
        self._patch_white = False

    @property
    def refresh_hz(self) -> float:
        return self._refresh_hz

    def _measure_refresh(self) -> float:
        expected = self.settings.expected_refresh_hz
        measured = self.win.getActualFrameRate(
            nIdentical=10, nMaxFrames=120, nWarmUpFrames=10, threshold=1
        )
        if measured is None:
            log.warning("refresh rate could not be measured; using %.3f Hz", expected)
            return expected
        if abs(measured - expected) > self.settings.max_refresh_mismatch * expected:
            log.warning("measured refresh %.3f Hz, configured %.3f Hz", measured, expected)
        return float(measured)

    def close(self) -> None:
        self.win.close()

    def __enter__(self) -> PsychoPyPresenter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _draw_patch(self) -> None:
        value = 1.0 if self._patch_white else -1.0
        self._patch.fillColor = (value, value, value)
        self._patch.draw()

    def _grab(self, kind: str, seq: int) -> None:
        if self.capture is not None:
            self.capture(kind, seq, self.win._getFrame(buffer="back"))

    def run_trial(
        self, trial_index: int, items: Sequence[TrialItem], *, on_frames: int, off_frames: int
    ) -> list[ItemOutcome]:
        if not self.eye_tracker.acquire_fixation(trial_index):
            return [ItemOutcome(False, None, 0, False) for _ in items]
        outcomes: list[ItemOutcome] = []
        broken = False
        for position, item in enumerate(items):
            if broken:
                outcomes.append(ItemOutcome(False, None, 0, False))
                continue
            stim = self._stims[item.stimulus_id]
            dropped_before = self.win.nDroppedFrames
            self._patch_white = not self._patch_white
            onset: float | None = None
            for frame in range(on_frames):
                stim.draw()
                self._draw_patch()
                if frame == 0:
                    self._grab("stimulus", item.seq)
                    self.win.callOnFlip(self.event_output.send, item.event_code)
                flipped = self.win.flip()
                if frame == 0:
                    onset = float(flipped) if flipped is not None else None
            for frame in range(off_frames):
                self._draw_patch()
                if frame == 0:
                    self._grab("mask", item.seq)
                self.win.flip()
            held = self.eye_tracker.fixation_held(trial_index, position)
            broken = not held
            drops = max(0, self.win.nDroppedFrames - dropped_before)
            outcomes.append(ItemOutcome(True, onset, drops, held))
        return outcomes


class ParallelPortOutput:
    """Event words on a parallel port (8 bits; use a 16-bit digital card for codes > 255)."""

    def __init__(self, address: int) -> None:
        from psychopy import parallel

        self._port = parallel.ParallelPort(address=address)

    def send(self, word: int) -> None:
        if not 0 < word <= 0xFF:
            raise ValueError(f"event word {word} does not fit the parallel port's 8 bits")
        self._port.setData(int(word))
