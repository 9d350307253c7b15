"""``itloop demo``: the whole closed loop, several simulated days, on the synthetic monkey.

As in the paper, day 0 maps the sites with the untrained readout (its attacks are reported but
not counted as a measurement); days 1…D use the model refitted each night on everything so far.

Everything is the real system: the server (HTTP on loopback), a worker process running the
durable generation and refit jobs, the rig client (pull, headless presenter, spool, upload),
and a Blackrock recording per session that the rig client reads through neo. Only the monkey
is simulated: a ground-truth IT population (``itloop.models.synthetic``) whose spikes are
written into the NEV file (``itloop.rig_client.synthetic``). Its true sensitivity, from a
strong white-box attack on the truth, is what the estimates are compared with.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from sqlalchemy import func, select

from itloop.models.synthetic import SyntheticIT, TruthConfig, perturbed_backbone_state
from itloop.rig_client.batch import open_batch, pull_batch
from itloop.rig_client.blackrock import BlackrockFileSource
from itloop.rig_client.hardware import FakeEventOutput, FakeEyeTracker
from itloop.rig_client.presentation import HeadlessPresenter
from itloop.rig_client.runner import count_session, present_session
from itloop.rig_client.server_client import RigServerClient
from itloop.rig_client.spool import Spool
from itloop.rig_client.synthetic import record_session
from itloop.rig_client.uploader import Uploader
from itloop.server import accounts, migrate
from itloop.server.app import create_app
from itloop.server.db import make_engine, make_sessionmaker
from itloop.server.db.tables import (
    Image as ImageRow,
)
from itloop.server.db.tables import (
    Presentation,
    Response,
    Role,
    Stimulus,
    StimulusKind,
    TokenKind,
)
from itloop.server.jobs import migrate_job_store
from itloop.server.settings import Settings
from itloop.stimulus.attacks import AttackConfig, AttackEngine, AttackRows, select_largest_change
from itloop.stimulus.images import decode_png, load_image
from itloop.worker.process import start_worker_process, stop_worker_process

__all__ = ["DemoConfig", "run_demo"]

WINDOW_MS = (70.0, 170.0)
LATENCY_MS, DURATION_MS = 60.0, 100.0


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs. ε are given at 224×224 and scaled to ``px`` so the per-pixel RMS of a
    perturbation matches the paper's (ε·px/224)."""

    days: int = 4
    sites: int = 16
    images_per_site: int = 12
    eps_224: tuple[float, ...] = (1.0, 2.0, 4.0)
    seed: int = 0
    px: int = 64
    attack_steps: int = 10
    repeats: int = 2
    trunk_noise: float = 0.05
    truth_images_per_site: int = 8
    truth_steps: int = 40
    out: Path | None = None
    fit: dict[str, Any] = field(
        default_factory=lambda: {"freeze_backbone": True, "max_epochs": 40, "patience": 6}
    )

    @property
    def eps_l2(self) -> list[float]:
        return [round(e * self.px / 224.0, 6) for e in self.eps_224]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def texture_folder(root: Path, *, classes: int, per_class: int, px: int, seed: int) -> Path:
    """Procedural textures (oriented gratings and blobs) in ImageNet-style class folders."""
    rng = np.random.default_rng(seed)
    size = px + px // 4
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c in range(classes):
        folder = root / f"class{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        theta, freq = rng.uniform(0, np.pi), rng.uniform(1.5, 6.0)
        palette = rng.uniform(0.15, 0.85, (2, 3))
        for i in range(per_class):
            angle = theta + rng.normal(0, 0.3)
            f = freq * rng.uniform(0.8, 1.25)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * f * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))
            mix = (0.5 + 0.5 * wave)[..., None] * (0.6 + 0.4 * blob[..., None])
            rgb = palette[0] * (1 - mix) + palette[1] * mix
            rgb += rng.normal(0, 0.03, rgb.shape)
            pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


class ExpectedCounts(torch.nn.Module):
    """The truth's expected spike count in the counting window, per site (the attack target)."""

    def __init__(self, truth: SyntheticIT) -> None:
        super().__init__()
        self.truth = truth
        window_s = (WINDOW_MS[1] - WINDOW_MS[0]) / 1000.0
        overlap = max(
            0.0, min(WINDOW_MS[1], LATENCY_MS + DURATION_MS) - max(WINDOW_MS[0], LATENCY_MS)
        )
        self.base_s, self.evoked_s = window_s, overlap / 1000.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        base = self.truth.baseline_hz * self.truth.alive * self.base_s
        evoked: torch.Tensor = self.truth(images)
        return base + evoked * self.evoked_s


def true_sensitivity(
    truth: SyntheticIT, images: torch.Tensor, eps: list[float], *, steps: int, seed: int
) -> dict[str, Any]:
    """Per site and ε: mean over images of the largest |Δ expected count| a strong white-box
    attack finds (both signs, two restarts), over the site's σ of expected counts."""
    counts = ExpectedCounts(truth).eval()
    n_sites = truth.config.n_sites
    with torch.no_grad():
        clean = counts(images)
    sigma = clean.std(0).clamp(min=1e-9)
    per = images.shape[0] // n_sites
    image_index = torch.arange(per * n_sites)
    site_index = image_index // per
    engine = AttackEngine(
        counts,
        AttackConfig(steps=steps, batch_size=64, autocast_dtype=None, channels_last=False),
    )
    rows = AttackRows.grid(image_index, site_index, eps, restarts=2)
    result = select_largest_change(
        engine.run(images, rows, generator=torch.Generator().manual_seed(seed))
    )
    change = result.predicted_change.abs().double()
    table = np.zeros((n_sites, len(eps)))
    for k, e in enumerate(eps):
        for site in range(n_sites):
            mask = (result.site_index == site) & (
                torch.isclose(result.eps_l2, torch.tensor(e, dtype=torch.float64))
            )
            table[site, k] = float(change[mask].mean()) / float(sigma[site])
    return {"normalised": table.tolist(), "sigma": sigma.tolist()}


class _Server:
    """The itloop app under uvicorn on a loopback port, in a thread of this process."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _expect(answer: httpx.Response, status: int) -> Any:
    if answer.status_code != status:
        raise RuntimeError(f"{answer.request.method} {answer.request.url.path}: {answer.text}")
    return answer.json()


def _wait(
    what: str, probe: Callable[[], Any], worker: subprocess.Popen[bytes], timeout_s: float
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited (code {worker.returncode}) during {what}")
        time.sleep(0.25)
    raise RuntimeError(f"timed out after {timeout_s} s waiting for {what}")


def run_demo(config: DemoConfig, console: Console | None = None) -> dict[str, Any]:
    """Run the loop for ``config.days`` days; returns the report (also written to out/)."""
    console = console or Console()
    started = time.monotonic()
    torch.manual_seed(config.seed)
    root = Path(config.out) if config.out else Path(tempfile.mkdtemp(prefix="itloop-demo-"))
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"demo output folder {str(root)!r} is not empty; name a new one")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    data_dir = root / "itloop-data"
    url = f"sqlite:///{(data_dir / 'itloop.sqlite3').resolve()}"
    settings = Settings(environment="dev", data_dir=data_dir, database_url=url)
    settings.prepare_data_dir()
    migrate.upgrade(url)
    migrate_job_store(url)
    eps = config.eps_l2

    n_images = config.days * config.sites * config.images_per_site
    classes = max(8, config.sites)
    per_class = math.ceil((n_images * 1.3 + config.sites * config.truth_images_per_site) / classes)
    images_dir = texture_folder(
        root / "images", classes=classes, per_class=per_class, px=config.px, seed=config.seed
    )
    truth = SyntheticIT(
        TruthConfig(input_px=config.px, n_sites=config.sites, seed=1000 + config.seed)
    )
    files = sorted(images_dir.glob("*/*.png"))
    rng = np.random.default_rng(config.seed + 1)
    n_reference = min(64, len(files) // 4)
    reference = [files[int(i)] for i in rng.choice(len(files), size=n_reference, replace=False)]
    truth.calibrate(torch.stack([load_image(p, size_hw=(config.px, config.px)) for p in reference]))
    held_out = [f for f in files if f not in set(reference)][
        -config.sites * config.truth_images_per_site :
    ]
    with console.status("computing the truth: a strong white-box attack on the ground truth"):
        truth_images = torch.stack(
            [load_image(p, size_hw=(config.px, config.px)) for p in held_out]
        )
        truth_table = true_sensitivity(
            truth, truth_images, eps, steps=config.truth_steps, seed=config.seed + 99
        )
    checkpoint = root / "backbone.safetensors"
    save_file(
        perturbed_backbone_state(truth, config.trunk_noise, seed=config.seed + 5), str(checkpoint)
    )

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ITLOOP_", "DBOS_"))}
    env.update(
        ITLOOP_ENVIRONMENT="dev",
        ITLOOP_DATA_DIR=str(data_dir.resolve()),
        ITLOOP_DATABASE_URL=url,
        ITLOOP_WORKER_ID="demo-worker",
        ITLOOP_MODEL_BACKBONE="tiny",
        ITLOOP_MODEL_CHECKPOINT=str(checkpoint.resolve()),
        ITLOOP_MODEL_INPUT_PX=str(config.px),
        ITLOOP_DEVICE="cpu",
    )
    log_path = root / "worker.log"
    with log_path.open("w") as log_file:
        worker = start_worker_process(env, output=log_file)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    password = secrets.token_urlsafe(12)
    with sessions() as db:
        staff = accounts.create_user(
            db, email="demo@localhost", password=password, role=Role.admin, display_name="Demo"
        )
        _, token = accounts.create_token(db, name="demo", kind=TokenKind.user, user_id=staff.id)
    days: list[dict[str, Any]] = []
    try:
        with (
            _Server(settings) as server,
            httpx.Client(
                base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=120
            ) as api,
        ):
            subject = _expect(api.post("/api/v1/subjects", json={"name": "synthetic-1"}), 201)
            array = _expect(
                api.post(
                    "/api/v1/arrays",
                    json={"subject_id": subject["id"], "name": "utah-aIT", "n_channels": 96},
                ),
                201,
            )
            site_ids = [
                _expect(
                    api.post(
                        "/api/v1/sites",
                        json={"array_id": array["id"], "electrode": i, "acq_channel": i + 1},
                    ),
                    201,
                )["id"]
                for i in range(config.sites)
            ]
            rig = _expect(api.post("/api/v1/rigs", json={"name": "synthetic-rig"}), 201)
            protocol = _expect(
                api.post(
                    "/api/v1/protocols",
                    json={
                        "name": "demo",
                        "eps_l2": eps,
                        "images_per_site": config.images_per_site,
                        "repeats": config.repeats,
                        "attack_steps": config.attack_steps,
                        "images_per_trial": 8,
                        "window_start_ms": WINDOW_MS[0],
                        "window_end_ms": WINDOW_MS[1],
                        "image_source": str(images_dir.resolve()),
                    },
                ),
                201,
            )
            with sessions() as db:
                _, rig_token = accounts.create_token(
                    db, name="rig", kind=TokenKind.rig, rig_id=rig["id"]
                )
            rig_client = RigServerClient(server.url, rig_token, timeout_s=120)
            spool = Spool(root / "rig" / "spool.sqlite3")
            first_day = dt.date(2026, 1, 5)
            for day in range(config.days + 1):
                day_started = time.monotonic()
                truth.day = day
                date = first_day + dt.timedelta(days=day)
                session = _expect(
                    api.post(
                        "/api/v1/sessions",
                        json={
                            "subject_id": subject["id"],
                            "rig_id": rig["id"],
                            "protocol_id": protocol["id"],
                            "scheduled_for": f"{date.isoformat()}T09:00:00Z",
                        },
                    ),
                    201,
                )
                sid = session["id"]

                def ready(sid: int = sid) -> Any:
                    state = _expect(api.get(f"/api/v1/sessions/{sid}"), 200)
                    if state["state"] == "failed":
                        raise RuntimeError(f"generation failed: {state['error']}")
                    return state if state["state"] == "ready" else None

                with console.status(f"day {day}: generating attacks and controls"):
                    state = _wait("generation", ready, worker, 600)
                with console.status(f"day {day}: presenting, recording, counting, uploading"):
                    pull_batch(rig_client, sid, root / "rig" / "batches")
                    batch = open_batch(root / "rig" / "batches", sid)
                    manifest = batch.manifest
                    rig_client.transition(sid, "running")
                    presenter = HeadlessPresenter(FakeEventOutput(), FakeEyeTracker())
                    present_session(manifest, presenter, spool)
                    rates = _stimulus_rates(truth, batch, [s.stimulus_id for s in manifest.stimuli])
                    channels = [s.acq_channel for s in manifest.sites]
                    nev = root / "rig" / f"session-{sid}.nev"

                    def recorded(
                        records: Any,
                        sid: int = sid,
                        nev: Path = nev,
                        channels: list[int] = channels,
                        rates: dict[int, np.ndarray] = rates,
                    ) -> Any:
                        record_session(
                            nev,
                            list(records),
                            channels=channels,
                            baseline_hz=truth.baseline_hz.double().numpy() * truth.alive.numpy(),
                            evoked_hz=lambda stim: rates[stim],
                            seed=config.seed * 1000 + sid,
                            latency_ms=LATENCY_MS,
                            duration_ms=DURATION_MS,
                        )
                        return BlackrockFileSource(nev)

                    count_session(manifest, spool, recorded)
                    sent = Uploader(rig_client, spool).upload(sid)
                    if sent.status is None or sent.status.pending or sent.status.in_chunks:
                        raise RuntimeError(f"session {sid} upload left work in the spool: {sent}")
                    rig_client.transition(sid, "uploaded")
                refit = _expect(
                    api.post(
                        "/api/v1/jobs/refit",
                        json={
                            "subject_id": subject["id"],
                            "night": date.isoformat(),
                            "fit": config.fit,
                        },
                    ),
                    202,
                )

                def refitted(job_id: int = refit["id"]) -> Any:
                    status = _expect(api.get(f"/api/v1/jobs/{job_id}"), 200)
                    if status["state"] == "failed":
                        raise RuntimeError(f"refit failed: {status['error']}")
                    return status if status["state"] == "succeeded" else None

                with console.status(f"day {day}: nightly refit and analysis"):
                    done = _wait("refit", refitted, worker, 900)
                results = _expect(api.get("/api/v1/sensitivity", params={"session_id": sid}), 200)
                spool_status = spool.status(sid)
                days.append(
                    {
                        "day": day,
                        "date": date.isoformat(),
                        "session_id": sid,
                        "generating_model_version": state["model_version_id"],
                        "new_model_version": done["result"]["model_version_id"],
                        "median_val_r": done["result"].get("median_val_r"),
                        "results": results,
                        "spool": spool_status.as_dict(),
                        "seconds": round(time.monotonic() - day_started, 1),
                    }
                )
                console.print(f"day {day} done in {days[-1]['seconds']} s")
            rig_client.close()
            spool.close()
    finally:
        stop_worker_process(worker)
    checks = _integrity(sessions, [d["session_id"] for d in days])
    engine.dispose()
    report = _report(config, site_ids, days, truth_table, checks, time.monotonic() - started)
    (root / "report.json").write_text(json.dumps(report, indent=1))
    report["figures"] = _figures(report, root)
    (root / "report.json").write_text(json.dumps(report, indent=1))
    report["out"] = str(root)
    report["credentials"] = {"email": "demo@localhost", "password": password}
    _print(report, console)
    return report


def _stimulus_rates(
    truth: SyntheticIT, batch: Any, stimulus_ids: list[int]
) -> dict[int, np.ndarray]:
    """Evoked rate (Hz) of every site for every stimulus of the batch, in manifest site order."""
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(stimulus_ids), 256):
        ids = stimulus_ids[start : start + 256]
        levels = torch.stack([decode_png(batch.image_path(s).read_bytes()) for s in ids])
        with torch.no_grad():
            evoked = truth(levels.float() / 255.0).double().numpy()
        out.update(zip(ids, evoked, strict=True))
    return out


def _integrity(sessions: Any, session_ids: list[int]) -> dict[str, Any]:
    """Exactly-once and provenance checks over the whole run, straight from the database."""
    with sessions() as db:
        presentations = db.scalar(
            select(func.count())
            .select_from(Presentation)
            .where(Presentation.session_id.in_(session_ids))
        )
        uploaded = db.scalar(
            select(func.count())
            .select_from(Presentation)
            .where(Presentation.session_id.in_(session_ids), Presentation.uploaded_at.isnot(None))
        )
        responses = db.scalar(select(func.count()).select_from(Response))
        with_counts = db.scalar(
            select(func.count(func.distinct(Response.presentation_id))).select_from(Response)
        )
        derived_without_model = db.scalar(
            select(func.count())
            .select_from(Stimulus)
            .where(Stimulus.kind != StimulusKind.clean, Stimulus.model_version_id.is_(None))
        )
        stimuli = db.scalar(select(func.count()).select_from(Stimulus))
        images = db.scalar(select(func.count()).select_from(ImageRow))
    return {
        "presentations": int(presentations or 0),
        "uploaded": int(uploaded or 0),
        "responses": int(responses or 0),
        "presentations_with_responses": int(with_counts or 0),
        "stimuli": int(stimuli or 0),
        "images": int(images or 0),
        "derived_stimuli_without_generating_model": int(derived_without_model or 0),
    }


def _report(
    config: DemoConfig,
    site_ids: list[int],
    days: list[dict[str, Any]],
    truth: dict[str, Any],
    checks: dict[str, Any],
    elapsed_s: float,
) -> dict[str, Any]:
    eps = config.eps_l2
    column = {site: i for i, site in enumerate(site_ids)}
    per_day = []
    for d in days:
        summary: dict[str, Any] = {"day": d["day"], "session_id": d["session_id"], "by_eps": []}
        for k, e in enumerate(eps):
            row: dict[str, Any] = {"eps_l2": e, "eps_224": config.eps_224[k]}
            for kind in ("attack", "noise", "interpolation"):
                values = [
                    r["lower_bound_normalised"]
                    for r in d["results"]
                    if r["kind"] == kind and math.isclose(r["eps_l2"], e)
                ]
                row[kind] = float(np.mean(values)) if values else None
            row["truth"] = float(np.mean([truth["normalised"][s][k] for s in range(len(site_ids))]))
            summary["by_eps"].append(row)
        per_day.append(summary)
    sites = [
        {
            "day": d["day"],
            "site_id": r["site_id"],
            "eps_l2": r["eps_l2"],
            "kind": r["kind"],
            "estimate": r["lower_bound_normalised"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
            "naive_abs_normalised": r["naive_abs_normalised"],
            "truth": truth["normalised"][column[r["site_id"]]][eps.index(r["eps_l2"])]
            if r["eps_l2"] in eps
            else None,
        }
        for d in days
        for r in d["results"]
    ]
    measured = [d for d in per_day if d["day"] >= 1]
    first, last = measured[0]["by_eps"][0]["attack"], measured[-1]["by_eps"][0]["attack"]
    return {
        "config": {**asdict(config), "out": str(config.out) if config.out else None, "eps_l2": eps},
        "elapsed_s": round(elapsed_s, 1),
        "days": [{k: v for k, v in d.items() if k != "results"} for d in days],
        "per_day": per_day,
        "sites": sites,
        "truth": truth,
        "rise_smallest_eps": (last / first) if first and first > 0 else None,
        "checks": checks,
    }


def _figures(report: dict[str, Any], root: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = report["config"]["eps_224"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for d in report["per_day"]:
        axes[0].plot(eps, [r["attack"] for r in d["by_eps"]], marker="o", label=f"day {d['day']}")
    last = report["per_day"][-1]["by_eps"]
    axes[0].plot(eps, [r["truth"] for r in last], "k--", label="truth (white-box)")
    axes[0].set(
        xlabel="ε (L2, at 224×224)", ylabel="normalised lower bound", title="Attacks over days"
    )
    axes[0].legend(frameon=False)
    for kind, style in (("attack", "-o"), ("noise", "-s"), ("interpolation", "-^")):
        axes[1].plot(eps, [r[kind] for r in last], style, label=kind)
    axes[1].set(
        xlabel="ε (L2, at 224×224)",
        title=f"Day {report['per_day'][-1]['day']}: attacks vs controls",
    )
    axes[1].legend(frameon=False)
    paths = []
    for suffix in ("png", "svg"):
        path = root / f"sensitivity.{suffix}"
        fig.savefig(path, dpi=120)
        paths.append(str(path))
    plt.close(fig)
    return paths


def _print(report: dict[str, Any], console: Console) -> None:
    table = Table(title="normalised sign-corrected lower bound (mean over sites)")
    for name in ("day", "ε@224", "attack", "truth", "noise", "interpolation"):
        table.add_column(name, justify="right")
    for d in report["per_day"]:
        for r in d["by_eps"]:
            table.add_row(
                str(d["day"]),
                f"{r['eps_224']:g}",
                *(
                    f"{r[k]:.3f}" if r[k] is not None else "—"
                    for k in ("attack", "truth", "noise", "interpolation")
                ),
            )
    console.print(table)
    rise = report["rise_smallest_eps"]
    console.print(
        f"smallest ε: day {report['per_day'][-1]['day']} / day 1 = {rise:.2f}×"
        if rise is not None
        else "smallest ε: no positive day-1 bound to compare"
    )
    console.print(f"integrity: {report['checks']}")
    console.print(f"report: {report['out']}/report.json  (elapsed {report['elapsed_s']} s)")
