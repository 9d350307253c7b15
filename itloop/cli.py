"""The ``itloop`` command line: server, worker, database, accounts and benchmarks."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from itloop import __version__
from itloop.rig_client.cli import app as rig_app
from itloop.worker.process import PARENT_PID_VARIABLE, stop_worker_process

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from itloop.server.settings import Settings

app = typer.Typer(
    name="itloop",
    help="Closed-loop measurement of the adversarial sensitivity of IT neural sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Schema migrations of the database.", no_args_is_help=True)
user_app = typer.Typer(help="Lab members.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (for analysts, rigs and workers).", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks (print JSON figures).", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(user_app, name="user")
app.add_typer(token_app, name="token")
app.add_typer(bench_app, name="bench")
app.add_typer(rig_app, name="rig")

console = Console()
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"itloop {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    _version_flag: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """itloop: schedule sessions, generate attacks, ingest recordings, refit nightly."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from ``ITLOOP_*`` variables (and CLI overrides), or a clear message and exit 2."""
    from itloop.server.settings import Settings, UnsafeSettingsError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except UnsafeSettingsError as exc:
        err.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            err.print(f"[red]invalid setting[/red] ITLOOP_{where.upper()}: {error['msg']}")
        raise typer.Exit(2) from exc


def _migrate(url: str) -> str | None:
    from itloop.server import migrate
    from itloop.server.jobs import migrate_job_store

    with console.status("applying database migrations"):
        migrate.upgrade(url)
        migrate_job_store(url)
    return migrate.current_revision(url)


def _ensure_first_admin(settings: Settings) -> None:
    from sqlalchemy import func, select

    from itloop.server import accounts
    from itloop.server.db import make_engine, make_sessionmaker
    from itloop.server.db.tables import Role, User

    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            if db.scalar(select(func.count(User.id))):
                return
            password = secrets.token_urlsafe(15)
            accounts.create_user(
                db,
                email="admin@localhost",
                password=password,
                role=Role.admin,
                display_name="Admin",
            )
        console.print(
            "[bold green]first admin account[/bold green] "
            f"email: admin@localhost  password: {password}  (shown once; change it)"
        )
    finally:
        engine.dispose()


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (embedded default).")
    ] = None,
) -> None:
    """Run the API and web UI (and, on the embedded default, a worker in the same process)."""
    import uvicorn

    from itloop.server.app import create_app

    settings = load_settings(host=host, port=port, data_dir=data_dir)
    settings.prepare_data_dir()
    revision = _migrate(settings.effective_database_url)
    console.print(
        f"database at revision {revision}: {_display_url(settings.effective_database_url)}"
    )
    _ensure_first_admin(settings)
    worker = _start_worker_process(settings) if settings.runs_worker_in_process else None
    console.print(f"serving on http://{settings.host}:{settings.port}  (API docs: /api/v1/docs)")
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    finally:
        if worker is not None:
            stop_worker_process(worker)


def _stop_with_parent() -> threading.Event | None:
    """A stop event set when the process named by ITLOOP_WORKER_PARENT_PID is gone."""
    raw = os.environ.get(PARENT_PID_VARIABLE)
    if not raw:
        return None
    parent = int(raw)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                err.print("worker: the server that started it is gone; stopping")
                stop.set()

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    return stop


def _start_worker_process(settings: Settings) -> subprocess.Popen[bytes]:
    """The embedded default's worker: a child process, so the server itself never loads torch.

    It stops by itself if the server dies without stopping it.
    """
    from itloop.worker.process import start_worker_process

    proc = start_worker_process(
        {
            **os.environ,
            "ITLOOP_DATA_DIR": str(settings.data_dir.resolve()),
            "ITLOOP_DATABASE_URL": settings.effective_database_url,
            "ITLOOP_ENVIRONMENT": settings.environment,
        }
    )
    console.print(f"worker started (process {proc.pid})")
    return proc


@app.command()
def worker() -> None:
    """Run a worker process: takes jobs from the GPU and CPU queues until stopped.

    Under ``torchrun --nproc-per-node N -m itloop worker`` one worker spreads its generation
    over the host's N GPUs (one rank each).
    """
    from itloop.worker.main import run_worker_ranks

    _log_to_console()
    settings = load_settings()
    settings.prepare_data_dir()
    console.print(f"worker on {_display_url(settings.effective_database_url)}")
    run_worker_ranks(settings, stop_event=_stop_with_parent())


def _log_to_console() -> None:
    """itloop's own log records (INFO and up) on stderr, with a time stamp."""
    import logging

    logger = logging.getLogger("itloop")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def _display_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from itloop.server import migrate
    from itloop.server.jobs import migrate_job_store

    settings = load_settings()
    settings.prepare_data_dir()
    migrate.upgrade(settings.effective_database_url, revision)
    migrate_job_store(settings.effective_database_url)
    console.print(f"at revision {migrate.current_revision(settings.effective_database_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "-1") -> None:
    """Revert migrations down to REVISION (default: one step; 'base' for all)."""
    from itloop.server import migrate

    settings = load_settings()
    migrate.downgrade(settings.effective_database_url, revision)
    console.print(f"at revision {migrate.current_revision(settings.effective_database_url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the database's revision and the newest one this version knows."""
    from itloop.server import migrate

    settings = load_settings()
    url = settings.effective_database_url
    console.print(f"current: {migrate.current_revision(url)}  head: {migrate.head_revision(url)}")


@contextmanager
def _session() -> Iterator[Session]:
    from itloop.server.db import make_engine, make_sessionmaker

    settings = load_settings()
    engine = make_engine(settings.effective_database_url)
    try:
        with make_sessionmaker(engine)() as db:
            yield db
    finally:
        engine.dispose()


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


@user_app.command("add")
def user_add(
    email: str,
    role: Annotated[str, typer.Option(help="admin, staff or analyst")] = "staff",
    display_name: Annotated[str, typer.Option()] = "",
    password: Annotated[
        str | None, typer.Option(help="Read from the prompt (or ITLOOP_NEW_PASSWORD) when omitted.")
    ] = None,
) -> None:
    """Add a lab member."""
    import os

    from itloop.server import accounts
    from itloop.server.db.tables import Role
    from itloop.server.errors import ItloopError

    try:
        role_value = Role(role)
    except ValueError as exc:
        raise _fail(ValueError(f"role {role!r} is not one of admin, staff, analyst")) from exc
    if password is None:
        password = os.environ.get("ITLOOP_NEW_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            raise _fail(ValueError("no password: give --password or set ITLOOP_NEW_PASSWORD"))
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    with _session() as db:
        try:
            user = accounts.create_user(
                db, email=email, password=password, role=role_value, display_name=display_name
            )
        except ItloopError as exc:
            raise _fail(exc) from exc
        console.print(f"user {user.id} {user.email} ({user.role.value})")


@token_app.command("create")
def token_create(
    name: str,
    kind: Annotated[str, typer.Option(help="user, rig or worker")] = "user",
    user_email: Annotated[str | None, typer.Option("--user", help="Owner of a user token.")] = None,
    rig: Annotated[str | None, typer.Option(help="Rig name or id of a rig token.")] = None,
    expires_in_days: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Create an API token; it is printed once and never stored."""
    from sqlalchemy import select

    from itloop.server import accounts
    from itloop.server.db.tables import Rig, TokenKind
    from itloop.server.errors import ItloopError

    try:
        kind_value = TokenKind(kind)
    except ValueError as exc:
        raise _fail(ValueError(f"kind {kind!r} is not one of user, rig, worker")) from exc
    with _session() as db:
        user_id = rig_id = None
        if user_email is not None:
            user = accounts.find_user(db, user_email)
            if user is None:
                raise _fail(ValueError(f"no user with email {user_email!r}"))
            user_id = user.id
        if rig is not None:
            found = db.scalar(select(Rig).where(Rig.name == rig))
            if found is None and rig.isdigit():
                found = db.get(Rig, int(rig))
            if found is None:
                raise _fail(ValueError(f"no rig named {rig!r}"))
            rig_id = found.id
        try:
            row, secret = accounts.create_token(
                db,
                name=name,
                kind=kind_value,
                user_id=user_id,
                rig_id=rig_id,
                expires_in_days=expires_in_days,
            )
        except ItloopError as exc:
            raise _fail(exc) from exc
        err.print(f"token {row.id} ({row.kind.value}) created; it is shown once:")
        print(secret)


@token_app.command("list")
def token_list(include_revoked: Annotated[bool, typer.Option("--all")] = False) -> None:
    """List API tokens (never their secrets)."""
    from itloop.server import accounts

    with _session() as db:
        table = Table("id", "name", "kind", "user", "rig", "created", "revoked", "last used")
        for t in accounts.list_tokens(db, include_revoked=include_revoked):
            table.add_row(
                str(t.id),
                t.name,
                t.kind.value,
                str(t.user_id or ""),
                str(t.rig_id or ""),
                f"{t.created_at:%Y-%m-%d %H:%M}",
                f"{t.revoked_at:%Y-%m-%d %H:%M}" if t.revoked_at else "",
                f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "",
            )
        console.print(table)


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke an API token; requests with it are refused from now on."""
    from itloop.server import accounts
    from itloop.server.errors import ItloopError

    with _session() as db:
        try:
            accounts.revoke_token(db, token_id)
        except ItloopError as exc:
            raise _fail(exc) from exc
    console.print(f"token {token_id} revoked")


_PASS_THROUGH: dict[str, Any] = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,  # --help goes to the benchmark's own parser, which lists its options
}
"""A benchmark command that hands every argument to the benchmark's own parser."""


@bench_app.command("attack", **_PASS_THROUGH)
def bench_attack(ctx: typer.Context) -> None:
    """Attack-engine throughput vs torchattacks in the same run (--help lists the options)."""
    from itloop.stimulus.benchmark import main as bench_main

    raise typer.Exit(bench_main(list(ctx.args)))


@bench_app.command("shards", **_PASS_THROUGH)
def bench_shards(ctx: typer.Context) -> None:
    """One attack job sharded over every GPU of the host against one GPU, in the same run."""
    from itloop.stimulus.shard_benchmark import main as shards_main

    raise typer.Exit(shards_main(list(ctx.args)))


@bench_app.command("upload")
def bench_upload(
    database: Annotated[
        list[str] | None,
        typer.Option(help="'sqlite' or a PostgreSQL admin URL; repeat for several."),
    ] = None,
    presentations: Annotated[int, typer.Option(help="Presentations in the session.")] = 20_000,
    sites: Annotated[int, typer.Option(help="Recording sites.")] = 192,
    chunk: Annotated[int, typer.Option(help="Presentations per upload request.")] = 2_000,
) -> None:
    """Time the ingest of a 5-hour session through the API on loopback (prints JSON)."""
    import json

    from itloop.server.benchmark import main as bench_main

    targets = database or ["sqlite", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"]
    print(
        json.dumps(
            bench_main(targets, presentations=presentations, sites=sites, chunk=chunk), indent=2
        )
    )


@app.command()
def demo(
    days: Annotated[
        int, typer.Option(min=1, help="Measured days after the day-0 mapping session.")
    ] = 4,
    sites: Annotated[
        int, typer.Option(min=2, help="Recording sites of the synthetic monkey.")
    ] = 16,
    images_per_site: Annotated[
        int, typer.Option(min=2, help="Clean images per site per day.")
    ] = 12,
    eps: Annotated[str, typer.Option(help="ε list at 224×224, comma-separated.")] = "1,2,4",
    seed: Annotated[int, typer.Option(help="Seed of the whole run.")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the data, report.json, figures.")
    ] = None,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Keep the server running afterwards.")
    ] = True,
) -> None:
    """The closed loop on a synthetic monkey, several days, on a CPU; prints the per-day table."""
    from itloop.demo import DemoConfig, run_demo

    try:
        eps_224 = tuple(float(e) for e in eps.split(",") if e.strip())
    except ValueError as exc:
        raise _fail(ValueError(f"--eps {eps!r} is not a comma-separated list of numbers")) from exc
    if not eps_224 or min(eps_224) <= 0:
        raise _fail(ValueError(f"--eps {eps!r} must list positive budgets"))
    _log_to_console()
    config = DemoConfig(
        days=days, sites=sites, images_per_site=images_per_site, eps_224=eps_224, seed=seed, out=out
    )
    try:
        report = run_demo(config, console)
    except ValueError as exc:
        raise _fail(exc) from exc
    if not serve_after:
        return
    data_dir = Path(report["out"]) / "itloop-data"
    os.environ["ITLOOP_DATA_DIR"] = str(data_dir)
    creds = report["credentials"]
    console.print(
        f"[bold]results in the UI[/bold]: log in as {creds['email']} / {creds['password']}"
    )
    serve(host=None, port=None, data_dir=data_dir)


@bench_app.command("units")
def bench_units(
    backbone: Annotated[str, typer.Option(help="Registered backbone.")] = "resnet18",
    layer: Annotated[str | None, typer.Option(help="Cut layer (default: the backbone's).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Lab-provided weights.")] = None,
    trusted: Annotated[bool, typer.Option(help="Allow a pickled checkpoint.")] = False,
    eps: Annotated[
        str, typer.Option(help="ε list (L2, [0, 1] units), comma-separated.")
    ] = "0.5,1,2",
    images: Annotated[int, typer.Option(min=2)] = 8,
    units: Annotated[int, typer.Option(min=1)] = 16,
    px: Annotated[int, typer.Option(min=16)] = 224,
    restarts: Annotated[int, typer.Option(min=1)] = 100,
    steps: Annotated[int, typer.Option(min=1)] = 250,
    device: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """White-box unit sensitivity of a registered model (§3.2), printed as JSON."""
    import json
    import tempfile
    import time

    import torch

    from itloop.demo import texture_folder
    from itloop.models import build_backbone
    from itloop.stimulus.images import load_image
    from itloop.stimulus.units import PooledUnits, UnitSearch, unit_sensitivity

    dev = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else ("cpu" if device == "auto" else device)
    )
    net = PooledUnits(
        build_backbone(backbone, layer=layer, pretrained_path=checkpoint, trusted=trusted)
    ).to(dev)
    with tempfile.TemporaryDirectory() as tmp:
        folder = texture_folder(Path(tmp), classes=images, per_class=1, px=px, seed=seed)
        batch = torch.stack(
            [load_image(p, size_hw=(px, px)) for p in sorted(folder.glob("*/*.png"))]
        )
    pick = torch.randperm(
        int(net(batch[:1].to(dev)).shape[1]), generator=torch.Generator().manual_seed(seed)
    )[:units]
    out = []
    for e in (float(v) for v in eps.split(",")):
        started = time.perf_counter()
        result = unit_sensitivity(
            net,
            batch.to(dev),
            e,
            units=pick,
            search=UnitSearch(restarts=restarts, steps=steps),
            generator=torch.Generator().manual_seed(seed),
        )
        out.append(
            {
                "eps_l2": e,
                "mean_normalised": float(result.normalised.mean()),
                "per_unit_normalised": [round(float(v), 4) for v in result.normalised],
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    print(
        json.dumps(
            {
                "backbone": backbone,
                "layer": net.features.layer,
                "device": str(dev),
                "images": images,
                "units": units,
                "restarts": restarts,
                "steps": steps,
                "results": out,
            },
            indent=1,
        )
    )
