"""``itloop rig …``: the rig client's commands (a Typer sub-app mounted by ``itloop.cli``)."""

from __future__ import annotations

import csv
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from itloop.rig_client.acquisition import Recording, SpikeSource
from itloop.rig_client.batch import open_batch, pull_batch
from itloop.rig_client.config import DEFAULT_CONFIG, RigConfig, load_config
from itloop.rig_client.counting import count_presentations, onsets_from_seconds
from itloop.rig_client.errors import AcquisitionError, RigError, ServerUnavailable
from itloop.rig_client.hardware import EventOutput, FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import (
    HeadlessPresenter,
    PresentationRecord,
    Presenter,
    ScreenGeometry,
)
from itloop.rig_client.runner import count_session, present_session, replay_onsets
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import Spool
from itloop.rig_client.uploader import Backoff, Uploader

app = typer.Typer(
    name="rig",
    help="The rig PC: pull a batch, present it, count spikes, spool and upload.",
    no_args_is_help=True,
)
log = logging.getLogger("itloop.rig")

ConfigOption = Annotated[
    Path, typer.Option("--config", help="rig configuration (TOML)", envvar="ITLOOP_RIG_CONFIG")
]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON")]


def _fail(exc: RigError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(3 if isinstance(exc, ServerUnavailable) else 2)


def _client(config: RigConfig) -> RigServerClient:
    return RigServerClient(config.server_url, config.token().get_secret_value())


def _echo(payload: object, as_json: bool, text: Callable[[], str]) -> None:
    typer.echo(json.dumps(payload, indent=1) if as_json else text())


@app.command()
def pull(session: int, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Download SESSION's published batch and verify every image's sha256 (resumable)."""
    try:
        cfg = load_config(config)
        with _client(cfg) as client:
            report = pull_batch(client, session, cfg.batches_dir)
    except RigError as exc:
        raise _fail(exc) from exc
    m = report.batch.manifest
    typer.echo(
        f"session {session}: {len(m.stimuli)} stimuli, {len(m.presentations)} presentations "
        f"verified ({report.downloaded} downloaded, {report.resumed} resumed, "
        f"{report.already_present} already present) in {report.batch.root}"
    )


def _source_for(
    cfg: RigConfig, session: int
) -> SpikeSource | Callable[[Sequence[PresentationRecord]], SpikeSource]:
    from itloop.rig_client.blackrock import BlackrockFileSource

    acq = cfg.acquisition
    if acq is None:
        raise AcquisitionError("the configuration has no [acquisition] section")
    path = acq.path_for(session)
    if acq.kind == "blackrock-file":
        return BlackrockFileSource(path)

    def replayed(records: Sequence[PresentationRecord]) -> SpikeSource:
        from itloop.rig_client.replay import Replayer

        recorded = BlackrockFileSource(path)
        rate = recorded.read().tick_rate_hz
        onsets, codes = replay_onsets(records, rate)
        replayer = Replayer(recorded, onsets, codes, tail_ticks=round(acq.tail_ms * rate / 1000))
        out = cfg.data_dir / f"session-{session}-replay.nev"
        return BlackrockFileSource(replayer.write_nev(out))

    return replayed


def _presenter(
    cfg: RigConfig, images: dict[int, Path], stack: ExitStack, headless: bool, size_deg: float
) -> Presenter:
    events: EventOutput = FakeEventOutput()
    if cfg.events.kind == "parallel" and not headless:
        from itloop.rig_client.psychopy_presenter import ParallelPortOutput

        events = ParallelPortOutput(cfg.events.address)
    eye = FakeEyeTracker()
    if headless or cfg.presenter == "headless":
        return HeadlessPresenter(events, eye, refresh_hz=cfg.monitor.refresh_hz)
    from itloop.rig_client.psychopy_presenter import PsychoPyPresenter, WindowSettings

    mon = cfg.monitor
    settings = WindowSettings(
        geometry=ScreenGeometry(mon.width_cm, mon.distance_cm, mon.width_px, mon.height_px),
        size_deg=size_deg,
        expected_refresh_hz=mon.refresh_hz,
        fullscreen=mon.fullscreen,
        screen=mon.screen,
        photodiode_px=cfg.stimulus.photodiode_px,
    )
    return stack.enter_context(PsychoPyPresenter(settings, images, events, eye))


def _upload(cfg: RigConfig, client: RigServerClient, spool: Spool, session: int) -> dict[str, Any]:
    up = cfg.upload
    uploader = Uploader(
        client,
        spool,
        chunk_presentations=up.chunk_presentations,
        backoff=Backoff(up.backoff_initial_s, 2.0, up.backoff_max_s, up.max_attempts),
        log=lambda msg: typer.echo(msg, err=True),
    )
    report = uploader.upload(session)
    status = report.status.as_dict() if report.status else {}
    return {
        **status,
        "chunks_sent": report.chunks_sent,
        "retries": report.retries,
        "newly_quarantined": [{"seq": q.seq, "reason": q.reason} for q in report.quarantined],
    }


@app.command()
def run(
    session: int,
    config: ConfigOption = DEFAULT_CONFIG,
    headless: Annotated[bool, typer.Option(help="no screen: simulated frame clock")] = False,
    upload: Annotated[bool, typer.Option(help="upload when counted")] = True,
) -> None:
    """Present SESSION's verified batch, count the recording, spool and upload."""
    try:
        cfg = load_config(config)
        batch = open_batch(cfg.batches_dir, session)
        manifest = batch.manifest
        if abs(manifest.timing.size_deg - cfg.stimulus.size_deg) > 1e-9:
            typer.echo(
                f"note: the batch asks for {manifest.timing.size_deg}°, the rig config says "
                f"{cfg.stimulus.size_deg}°; using the batch's",
                err=True,
            )
        images = {s.stimulus_id: batch.image_path(s.stimulus_id) for s in manifest.stimuli}
        with _client(cfg) as client, Spool(cfg.spool_path) as spool, ExitStack() as stack:
            if client.session_state(session) != "running":
                client.transition(session, "running")
            presenter = _presenter(cfg, images, stack, headless, manifest.timing.size_deg)
            log_ = present_session(manifest, presenter, spool)
            stack.close()
            spooled = count_session(manifest, spool, _source_for(cfg, session))
            typer.echo(
                f"presented {len(log_.records)} ({sum(r.shown for r in log_.records)} shown) at "
                f"{log_.refresh_hz:.2f} Hz; spooled {spooled}"
            )
            if upload:
                result = _upload(cfg, client, spool, session)
                typer.echo(json.dumps(result))
                if result.get("empty"):
                    client.transition(session, "uploaded")
    except RigError as exc:
        raise _fail(exc) from exc


@app.command()
def upload(session: int, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Upload SESSION's spooled presentations (safe to repeat; exactly once on the server)."""
    try:
        cfg = load_config(config)
        with _client(cfg) as client, Spool(cfg.spool_path) as spool:
            result = _upload(cfg, client, spool, session)
            if result.get("empty") and client.session_state(session) == "running":
                client.transition(session, "uploaded")
    except RigError as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(result))


@app.command()
def status(config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """What the spool holds per session: generated, pending, sent, quarantined."""
    try:
        cfg = load_config(config)
        if not cfg.spool_path.exists():
            rows: list[dict[str, Any]] = []
        else:
            with Spool(cfg.spool_path) as spool:
                rows = [
                    {
                        **spool.status(s).as_dict(),
                        "quarantine": [
                            {"seq": q.seq, "reason": q.reason} for q in spool.quarantined(s)
                        ],
                    }
                    for s in spool.sessions()
                ]
    except RigError as exc:
        raise _fail(exc) from exc
    _echo(
        {"spool": str(cfg.spool_path), "sessions": rows},
        as_json,
        lambda: (
            "\n".join(
                f"session {r['session_id']}: generated {r['generated']}, pending "
                f"{r['pending'] + r['in_chunks']}, sent {r['sent']}, quarantined {r['quarantined']}"
                for r in rows
            )
            or "spool is empty"
        ),
    )


def _read_recording(path: Path) -> Recording:
    from itloop.rig_client.blackrock import BlackrockFileSource

    return BlackrockFileSource(path).read()


def describe(recording: Recording) -> dict[str, Any]:
    rate = recording.tick_rate_hz
    return {
        "file": recording.source,
        "tick_rate_hz": rate,
        "duration_ticks": recording.duration_ticks(),
        "duration_s": recording.duration_ticks() / rate,
        "n_channels": len(recording.channels),
        "channels": list(recording.channels),
        "spike_counts": {str(c): n for c, n in recording.spike_counts().items()},
        "n_spikes": sum(recording.spike_counts().values()),
        "event_counts": {str(w): n for w, n in recording.event_counts().items()},
        "n_events": sum(recording.event_counts().values()),
        "segments": [
            {
                "index": s.index,
                "start_ticks": s.start_ticks,
                "stop_ticks": s.stop_ticks,
                "n_spikes": int(sum(t.size for t in s.spikes.values())),
                "n_events": int(s.event_ticks.size),
            }
            for s in recording.segments
        ],
        "notes": list(recording.notes),
    }


@app.command()
def inspect(file: Path, as_json: JsonOption = False) -> None:
    """Channels, spike counts per channel, event counts by word, duration and segments of FILE."""
    try:
        info = describe(_read_recording(file))
    except RigError as exc:
        raise _fail(exc) from exc

    def text() -> str:
        lines = [
            f"{info['file']}: {info['n_channels']} channels, {info['n_spikes']} spikes, "
            f"{info['n_events']} digital words, {info['duration_s']:.3f} s at "
            f"{info['tick_rate_hz']} Hz, {len(info['segments'])} segment(s)"
        ]
        lines += [
            f"  segment {s['index']}: ticks [{s['start_ticks']}, {s['stop_ticks']}), "
            f"{s['n_spikes']} spikes, {s['n_events']} words"
            for s in info["segments"]
        ]
        top = sorted(info["event_counts"].items(), key=lambda kv: -kv[1])[:10]
        if top:
            lines.append("  words: " + ", ".join(f"{w}×{n}" for w, n in top))
        lines += [f"  note: {n}" for n in info["notes"]]
        return "\n".join(lines)

    _echo(info, as_json, text)


def _silence_note(recording: Recording, channels: Sequence[int]) -> list[str]:
    spikes = recording.spike_counts()
    if any(spikes[c] for c in channels):
        return []
    return ["the recording has no spikes on these channels: zeros here are not a measured silence"]


def read_onsets_csv(path: Path) -> tuple[list[float], list[int] | None]:
    """Onsets in seconds from a CSV with an ``onset_s`` column (optional ``segment``), or one
    bare column of numbers."""
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except OSError as exc:
        raise AcquisitionError(f"cannot read onsets {path}: {exc}") from exc
    rows = [r for r in rows if r and any(cell.strip() for cell in r)]
    if not rows:
        raise AcquisitionError(f"{path} holds no onsets")
    header = [c.strip().lower() for c in rows[0]]
    col, seg_col = 0, None
    if "onset_s" in header:
        col = header.index("onset_s")
        seg_col = header.index("segment") if "segment" in header else None
        rows = rows[1:]
    onsets, segments = [], []
    for line, row in enumerate(rows, start=2 if seg_col is not None or "onset_s" in header else 1):
        try:
            onsets.append(float(row[col]))
            if seg_col is not None:
                segments.append(int(row[seg_col]))
        except (ValueError, IndexError) as exc:
            raise AcquisitionError(
                f"{path} line {line}: {row!r} is not an onset in seconds"
            ) from exc
    return onsets, segments if seg_col is not None else None


@app.command()
def count(
    file: Path,
    onsets: Annotated[Path | None, typer.Option(help="CSV of onsets in seconds")] = None,
    window_ms: Annotated[
        tuple[float, float], typer.Option(help="half-open window after onset, ms")
    ] = (70.0, 170.0),
    channels: Annotated[list[int] | None, typer.Option("--channel", help="default: all")] = None,
    session: Annotated[
        int | None, typer.Option(help="count this session's presentations and spool them")
    ] = None,
    config: ConfigOption = DEFAULT_CONFIG,
    as_json: JsonOption = False,
) -> None:
    """Count spikes of FILE per presentation × channel in [onset+start, onset+end)."""
    try:
        if session is not None:
            cfg = load_config(config)
            from itloop.rig_client.blackrock import BlackrockFileSource

            batch = open_batch(cfg.batches_dir, session)
            with Spool(cfg.spool_path) as spool:
                n = count_session(batch.manifest, spool, BlackrockFileSource(file))
            typer.echo(f"session {session}: spooled {n} presentations")
            return
        if onsets is None:
            raise AcquisitionError("give --onsets ONSETS.csv or --session ID")
        recording = _read_recording(file)
        onsets_s, segments = read_onsets_csv(onsets)
        chans = list(channels) if channels else list(recording.channels)
        counted = count_presentations(
            recording,
            onsets_from_seconds(recording, onsets_s, segments),
            window_start_ms=window_ms[0],
            window_end_ms=window_ms[1],
            channels=chans,
        )
    except RigError as exc:
        raise _fail(exc) from exc
    payload = {
        "file": recording.source,
        "tick_rate_hz": recording.tick_rate_hz,
        "window_ms": list(window_ms),
        "channels": chans,
        "presentations": [
            {
                "onset_s": onset_s,
                "segment": c.segment,
                "onset_ticks": c.onset_ticks,
                "valid": c.valid,
                "invalid_reason": c.invalid_reason,
                "complete": c.complete,
            }
            for onset_s, c in zip(onsets_s, counted, strict=True)
        ],
        "counts": [list(c.counts) if c.counts is not None else None for c in counted],
        "notes": list(recording.notes) + _silence_note(recording, chans),
    }

    def text() -> str:
        out = [f"{len(counted)} presentations × {len(chans)} channels, window {list(window_ms)} ms"]
        for p, row in zip(payload["presentations"], payload["counts"], strict=True):  # type: ignore[call-overload]
            flag = "" if p["complete"] else " (incomplete)"
            tail = p["invalid_reason"] if row is None else f"total {sum(row)}{flag}"
            out.append(f"  {p['onset_s']:.4f} s: {tail}")
        return "\n".join(out)

    _echo(payload, as_json, text)


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - manual entry
    app(args=list(argv) if argv is not None else sys.argv[1:])
