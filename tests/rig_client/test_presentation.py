"""Headless presentation: frames from the refresh rate, event codes, fixation re-queueing."""

from __future__ import annotations

import itertools
import math

import pytest

from itloop.rig_client.hardware import EventOutput, EyeTracker, FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import (
    HeadlessPresenter,
    Presenter,
    ScreenGeometry,
    frames_for,
    run_session,
)

from .fake_server import make_manifest


def test_degrees_to_pixels_from_monitor_geometry() -> None:
    geometry = ScreenGeometry(width_cm=53.0, distance_cm=57.0, width_px=1920, height_px=1080)
    expected = 2 * 57.0 * math.tan(math.radians(4.0)) * 1920 / 53.0
    assert geometry.size_px(8.0) == round(expected)
    with pytest.raises(ValueError, match="distance_cm"):
        ScreenGeometry(53.0, 0.0, 1920, 1080)


def test_frames_from_refresh_rate() -> None:
    assert frames_for(100, 60) == 6
    assert frames_for(100, 120) == 12
    assert frames_for(100, 144) == 14
    assert frames_for(1, 60, minimum=1) == 1


def test_fakes_satisfy_the_protocols() -> None:
    events, eye = FakeEventOutput(), FakeEyeTracker()
    assert isinstance(events, EventOutput)
    assert isinstance(eye, EyeTracker)
    assert isinstance(HeadlessPresenter(events, eye), Presenter)
    with pytest.raises(ValueError, match="16 bits"):
        events.send(70_000)


def test_headless_session_sends_every_code_in_order() -> None:
    manifest, _ = make_manifest(n_images=3, repeats=4, per_trial=4)
    events = FakeEventOutput()
    log = run_session(manifest, HeadlessPresenter(events, FakeEyeTracker(), refresh_hz=120))
    assert (log.on_frames, log.off_frames) == (12, 12)
    assert events.words == [p.event_code for p in manifest.presentations]
    onsets = [r.onset_s for r in log.records]
    assert all(b is not None and a is not None and b > a for a, b in itertools.pairwise(onsets))
    assert all(r.fixation_ok for r in log.records)


def test_broken_fixation_requeues_with_spare_codes() -> None:
    manifest, _ = make_manifest(n_images=3, repeats=4, per_trial=4)
    eye = FakeEyeTracker(breaks={(1, 1)})  # trial 1 breaks during its second image
    events = FakeEventOutput()
    log = run_session(manifest, HeadlessPresenter(events, eye, refresh_hz=60))
    by_seq = {r.seq: r for r in log.records}
    assert by_seq[4].fixation_ok  # before the break: kept
    assert not by_seq[5].fixation_ok  # during the break
    assert not by_seq[6].shown  # after: never shown, no event code
    assert not by_seq[7].shown
    assert 106 not in events.words
    requeued = [r for r in log.records if r.requeued_from is not None]
    assert [r.requeued_from for r in requeued] == [5, 6, 7]
    assert [r.event_code for r in requeued] == manifest.spare_event_codes[:3]
    assert [r.seq for r in requeued] == [12, 13, 14]
    assert all(r.fixation_ok for r in requeued)
    assert len({r.trial_index for r in requeued}) == 1
    assert log.unrequeued == []


def test_a_trial_without_fixation_shows_nothing() -> None:
    manifest, _ = make_manifest(n_images=3, repeats=4, per_trial=4)
    eye = FakeEyeTracker(refuse_trials={0})
    events = FakeEventOutput()
    log = run_session(manifest, HeadlessPresenter(events, eye), max_requeue_rounds=0)
    assert [r.shown for r in log.records[:4]] == [False] * 4
    assert sorted(log.unrequeued) == [0, 1, 2, 3]
