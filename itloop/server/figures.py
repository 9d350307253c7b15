"""The paper's figures from live data (matplotlib, Agg), each with the table behind it.

Every figure is built in two steps: ``*_table`` reads the database into a ``FigureTable`` (what
the "data" link serves as CSV), and ``render`` draws only from that table, so the picture and
its CSV can never disagree. Values are the normalised lower bound s̃(ε) (units of the site's
clean-image σ), so the clean-image σ reference line is at 1.

- ``bound_vs_eps``: Fig. 1A style, per site (light) and mean ± s.d. over sites (dark), with the
  σ reference (grey dashed) and the mean |Δr| between random clean image pairs (blue dashed).
- ``days``: Fig. 5 style, the site-averaged bound vs ε for every day (light → dark), with the
  last day's Gaussian-noise and interpolation controls.
- ``controls``: model-based attacks vs the model-free controls on one day, each scored with the
  same sign-corrected estimator (solid) and, for the controls, the paper's RMS measure (dashed).
- ``image_curves``: Fig. 3B style, image-specific curves s̃_i(x, ε) of one site in one session.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server.db.tables import (
    Analysis,
    ElectrodeArray,
    RecordingSession,
    RecordingSite,
    SensitivityResult,
    SessionSite,
    StimulusKind,
)
from itloop.server.errors import InvalidInput, NotFound
from itloop.server.exports.trials import load_session, stimulus_means

__all__ = [
    "COLUMNS",
    "FIGURES",
    "FigureSpec",
    "FigureTable",
    "build_table",
    "render",
]

COLUMNS = (
    "series",
    "site_id",
    "session_id",
    "day",
    "eps_l2",
    "kind",
    "measure",
    "value",
    "ci_low",
    "ci_high",
    "sd",
    "n",
    "image_sha256",
)
"""The columns of every figure's CSV (empty where a column does not apply)."""

Format = Literal["png", "svg", "csv"]
BLUE, DARK_BLUE, GREEN, ORANGE, GREY = "#8fb8de", "#08306b", "#238b45", "#e6550d", "#636363"
KIND_COLOUR = {
    StimulusKind.attack: DARK_BLUE,
    StimulusKind.noise: GREEN,
    StimulusKind.interpolation: ORANGE,
}


@dataclass(frozen=True)
class Row:
    series: str
    eps_l2: float | None
    value: float
    kind: str = ""
    measure: str = "lower_bound_normalised"
    site_id: int | None = None
    session_id: int | None = None
    day: dt.date | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    sd: float | None = None
    n: int | None = None
    image_sha256: str = ""

    def cells(self) -> list[object]:
        def num(v: float | None) -> object:
            return "" if v is None or not math.isfinite(v) else f"{v:.6g}"

        return [
            self.series,
            "" if self.site_id is None else self.site_id,
            "" if self.session_id is None else self.session_id,
            "" if self.day is None else self.day.isoformat(),
            num(self.eps_l2),
            self.kind,
            self.measure,
            num(self.value),
            num(self.ci_low),
            num(self.ci_high),
            num(self.sd),
            "" if self.n is None else self.n,
            self.image_sha256,
        ]


@dataclass
class FigureTable:
    """The rows behind one figure, and what it is about."""

    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    subtitle: str = ""

    def series(self, name: str) -> list[Row]:
        return sorted(
            (r for r in self.rows if r.series == name), key=lambda r: (r.eps_l2 or 0.0, r.day)
        )

    def series_names(self) -> list[str]:
        return list(dict.fromkeys(r.series for r in self.rows))

    def to_csv(self) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        for row in self.rows:
            writer.writerow(row.cells())
        return out.getvalue().encode()

    @property
    def empty(self) -> bool:
        return not self.rows


@dataclass(frozen=True)
class FigureSpec:
    name: str
    title: str
    caption: str
    needs_site: bool
    table: Callable[..., FigureTable]
    draw: Callable[[Axes, FigureTable], None]


# --- reading the data -----------------------------------------------------------------------


def _results(
    db: Session, subject_id: int, *, day: dt.date | None = None, kinds: Sequence[StimulusKind] = ()
) -> list[SensitivityResult]:
    """The newest analysis's result per (site, day, ε, kind) of the subject."""
    query = (
        select(SensitivityResult)
        .join(Analysis, Analysis.id == SensitivityResult.analysis_id)
        .where(Analysis.subject_id == subject_id)
        .order_by(SensitivityResult.analysis_id)
    )
    if day is not None:
        query = query.where(SensitivityResult.day == day)
    if kinds:
        query = query.where(SensitivityResult.kind.in_(list(kinds)))
    newest: dict[tuple[int, dt.date, float, StimulusKind], SensitivityResult] = {}
    for result in db.scalars(query):
        newest[(result.site_id, result.day, round(result.eps_l2, 9), result.kind)] = result
    return list(newest.values())


def result_days(db: Session, subject_id: int) -> list[dt.date]:
    """Days with attack results for the subject, oldest first."""
    return sorted(
        set(
            db.scalars(
                select(SensitivityResult.day)
                .join(Analysis, Analysis.id == SensitivityResult.analysis_id)
                .where(
                    Analysis.subject_id == subject_id,
                    SensitivityResult.kind == StimulusKind.attack,
                )
            )
        )
    )


def _day_or_latest(db: Session, subject_id: int, day: dt.date | None) -> dt.date | None:
    if day is not None:
        return day
    days = result_days(db, subject_id)
    return days[-1] if days else None


def _mean_rows(
    results: Sequence[SensitivityResult],
    series: str,
    *,
    measure: str = "lower_bound_normalised",
    day: dt.date | None = None,
) -> list[Row]:
    by_eps: dict[float, list[float]] = defaultdict(list)
    for r in results:
        by_eps[round(r.eps_l2, 9)].append(float(getattr(r, measure)))
    kind = results[0].kind.value if results else ""
    return [
        Row(
            series=series,
            eps_l2=eps,
            value=float(np.mean(v)),
            sd=float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            n=len(v),
            kind=kind,
            measure=measure,
            day=day,
        )
        for eps, v in sorted(by_eps.items())
    ]


def _site_labels(db: Session, site_ids: Sequence[int]) -> dict[int, str]:
    rows = db.execute(
        select(RecordingSite.id, RecordingSite.label, RecordingSite.electrode, ElectrodeArray.name)
        .join(ElectrodeArray, ElectrodeArray.id == RecordingSite.array_id)
        .where(RecordingSite.id.in_(list(site_ids)))
    ).all()
    return {sid: label or f"{array}:{electrode}" for sid, label, electrode, array in rows}


def random_pair_reference(db: Session, session_ids: Sequence[int]) -> float | None:
    """Mean normalised |r(x_i) − r(x_j)| over pairs of clean images, averaged over sites."""
    per_site: list[float] = []
    for session_id in session_ids:
        arrays = load_session(db, session_id)
        means = stimulus_means(arrays)
        clean = [
            means[s]
            for s, info in arrays.stimuli.items()
            if info.kind is StimulusKind.clean and s in means
        ]
        if len(clean) < 3:
            continue
        matrix = np.stack(clean)  # (M, N)
        for j in range(matrix.shape[1]):
            values = matrix[:, j]
            sigma = float(np.std(values, ddof=1))
            if sigma <= 0:
                continue
            diffs = np.abs(values[:, None] - values[None, :])[np.triu_indices(values.size, 1)]
            per_site.append(float(diffs.mean()) / sigma)
    return float(np.mean(per_site)) if per_site else None


def _sessions_on(db: Session, subject_id: int, day: dt.date) -> list[int]:
    return list(
        db.scalars(
            select(Analysis.session_id)
            .join(SensitivityResult, SensitivityResult.analysis_id == Analysis.id)
            .where(
                Analysis.subject_id == subject_id,
                Analysis.session_id.is_not(None),
                SensitivityResult.day == day,
            )
            .distinct()
        )
    )


def bound_vs_eps_table(db: Session, *, subject_id: int, day: dt.date | None = None) -> FigureTable:
    day = _day_or_latest(db, subject_id, day)
    table = FigureTable("bound_vs_eps", "Normalised lower bound vs ε")
    if day is None:
        return table
    table.subtitle = f"day {day.isoformat()}"
    results = _results(db, subject_id, day=day, kinds=[StimulusKind.attack])
    labels = _site_labels(db, sorted({r.site_id for r in results}))
    for r in sorted(results, key=lambda r: (r.site_id, r.eps_l2)):
        table.rows.append(
            Row(
                series=f"site {labels.get(r.site_id, r.site_id)}",
                site_id=r.site_id,
                day=day,
                eps_l2=r.eps_l2,
                kind=r.kind.value,
                value=r.lower_bound_normalised,
                ci_low=r.ci_low,
                ci_high=r.ci_high,
                n=r.n_images,
            )
        )
    table.rows += _mean_rows(results, "mean over sites", day=day)
    if results:
        table.rows.append(Row("clean-image σ", None, 1.0, measure="reference"))
        reference = random_pair_reference(db, _sessions_on(db, subject_id, day))
        if reference is not None:
            table.rows.append(Row("random image pair |Δr|", None, reference, measure="reference"))
    return table


def days_table(db: Session, *, subject_id: int, day: dt.date | None = None) -> FigureTable:
    days = result_days(db, subject_id)
    if day is not None:
        days = [d for d in days if d <= day]
    table = FigureTable("days", "Lower bound over days")
    if not days:
        return table
    table.subtitle = f"{len(days)} days, {days[0].isoformat()} … {days[-1].isoformat()}"
    for d in days:
        results = _results(db, subject_id, day=d, kinds=[StimulusKind.attack])
        table.rows += _mean_rows(results, f"day {d.isoformat()}", day=d)
    for kind in (StimulusKind.noise, StimulusKind.interpolation):
        results = _results(db, subject_id, day=days[-1], kinds=[kind])
        table.rows += _mean_rows(results, f"{kind.value} control", day=days[-1])
    return table


def controls_table(db: Session, *, subject_id: int, day: dt.date | None = None) -> FigureTable:
    day = _day_or_latest(db, subject_id, day)
    table = FigureTable("controls", "Attacks vs model-free controls")
    if day is None:
        return table
    table.subtitle = f"day {day.isoformat()}"
    for kind in (StimulusKind.attack, StimulusKind.noise, StimulusKind.interpolation):
        results = _results(db, subject_id, day=day, kinds=[kind])
        table.rows += _mean_rows(results, f"{kind.value} (sign-corrected)", day=day)
        if kind is not StimulusKind.attack:
            table.rows += _mean_rows(
                results, f"{kind.value} (RMS)", measure="rms_normalised", day=day
            )
    return table


def image_curves_table(
    db: Session,
    *,
    subject_id: int,
    site_id: int,
    session_id: int | None = None,
    day: dt.date | None = None,
    max_images: int = 50,
) -> FigureTable:
    """s̃_i(x_j, ε) = sign(f(x_j) − f(x_j + δ)) · (r(x_j) − r(x_j + δ)) / σ_i per clean image."""
    site = db.get(RecordingSite, site_id)
    if site is None:
        raise NotFound(f"site {site_id} does not exist", field="site_id", value=site_id)
    if session_id is None:
        query = (
            select(RecordingSession.id)
            .join(SessionSite, SessionSite.session_id == RecordingSession.id)
            .where(SessionSite.site_id == site_id, RecordingSession.subject_id == subject_id)
            .order_by(RecordingSession.scheduled_for.desc(), RecordingSession.id.desc())
        )
        candidates = list(db.scalars(query))
        if day is not None:
            candidates = [
                s
                for s in candidates
                if (found := db.get(RecordingSession, s)) is not None
                and found.scheduled_for.date() <= day
            ]
    else:
        candidates = [session_id]
    label = _site_labels(db, [site_id]).get(site_id, str(site_id))
    table = FigureTable("image_curves", f"Image-specific curves, site {label}")
    for candidate in candidates:
        rows = _image_rows(db, candidate, site_id, max_images)
        if rows:
            session = db.get(RecordingSession, candidate)
            when = session.scheduled_for.date().isoformat() if session else ""
            table.subtitle = f"session {candidate} ({when})"
            table.rows = rows
            break
    return table


def _image_rows(db: Session, session_id: int, site_id: int, max_images: int) -> list[Row]:
    arrays = load_session(db, session_id)
    if site_id not in arrays.site_ids:
        raise InvalidInput(
            f"site {site_id} is not recorded in session {session_id}",
            field="site_id",
            value=site_id,
        )
    j = arrays.site_ids.index(site_id)
    means = stimulus_means(arrays)
    clean = [s for s, i in arrays.stimuli.items() if i.kind is StimulusKind.clean and s in means]
    if len(clean) < 2:
        return []
    sigma = float(np.std([means[c][j] for c in clean], ddof=1))
    if sigma <= 0:
        return []
    curves: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for stim, info in arrays.stimuli.items():
        if info.kind is not StimulusKind.attack or info.site_id != site_id:
            continue
        if stim not in means or info.parent_id not in means or info.parent_id is None:
            continue
        if info.predicted_clean is None or info.predicted_perturbed is None:
            continue
        delta = means[info.parent_id][j] - means[stim][j]
        sign = float(np.sign(info.predicted_clean - info.predicted_perturbed))
        curves[info.parent_id].append((float(info.eps_requested_l2 or 0.0), sign * delta / sigma))
    rows: list[Row] = []
    by_eps: dict[float, list[float]] = defaultdict(list)
    for parent in sorted(curves)[:max_images]:
        for eps, value in sorted(curves[parent]):
            rows.append(
                Row(
                    series=f"image {parent}",
                    site_id=site_id,
                    session_id=session_id,
                    eps_l2=eps,
                    kind="attack",
                    value=value,
                    image_sha256=arrays.stimuli[parent].sha256,
                    n=1,
                )
            )
    for parent in sorted(curves):
        for eps, value in curves[parent]:
            by_eps[eps].append(value)
    for eps, values in sorted(by_eps.items()):
        rows.append(
            Row(
                series="mean over images",
                site_id=site_id,
                session_id=session_id,
                eps_l2=eps,
                kind="attack",
                value=float(np.mean(values)),
                sd=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                n=len(values),
            )
        )
    return rows


# --- drawing ----------------------------------------------------------------------------


def _eps_axis(ax: Axes, table: FigureTable) -> None:
    eps = sorted({r.eps_l2 for r in table.rows if r.eps_l2 is not None})
    if eps and min(eps) > 0:
        ax.set_xscale("log")
        ax.set_xticks(eps, [f"{e:g}" for e in eps])
        ax.minorticks_off()
    ax.set_xlabel(r"perturbation budget $\epsilon$ ($L_2$, [0, 1] RGB)")
    ax.set_ylabel(r"normalised lower bound $\tilde{s}(\epsilon)$ (units of $\sigma$)")
    ax.grid(True, color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _line(ax: Axes, rows: list[Row], **style: Any) -> None:
    x = [r.eps_l2 if r.eps_l2 is not None else math.nan for r in rows]
    y = [r.value for r in rows]
    ax.plot(x, y, **style)


def _band(ax: Axes, rows: list[Row], colour: str) -> None:
    x = np.array([r.eps_l2 for r in rows], dtype=float)
    y = np.array([r.value for r in rows])
    sd = np.array([r.sd or 0.0 for r in rows])
    ax.fill_between(x, y - sd, y + sd, color=colour, alpha=0.18, linewidth=0)


def _references(ax: Axes, table: FigureTable) -> None:
    for row in table.rows:
        if row.measure != "reference":
            continue
        colour = GREY if "σ" in row.series else DARK_BLUE
        ax.axhline(row.value, color=colour, linestyle="--", linewidth=1.2, label=row.series)


def draw_bound_vs_eps(ax: Axes, table: FigureTable) -> None:
    first = True
    for name in table.series_names():
        if name.startswith("site "):
            _line(
                ax,
                table.series(name),
                color=BLUE,
                linewidth=0.9,
                alpha=0.8,
                label="sites" if first else None,
            )
            first = False
    mean = table.series("mean over sites")
    if mean:
        _band(ax, mean, DARK_BLUE)
        _line(ax, mean, color=DARK_BLUE, linewidth=2.4, marker="o", label="mean ± s.d.")
    _references(ax, table)
    _eps_axis(ax, table)


def draw_days(ax: Axes, table: FigureTable) -> None:
    days = [n for n in table.series_names() if n.startswith("day ")]
    cmap = _blues(len(days))
    for colour, name in zip(cmap, days, strict=True):
        _line(ax, table.series(name), color=colour, linewidth=2, marker="o", label=name)
    for name, colour in (("noise control", GREEN), ("interpolation control", ORANGE)):
        rows = table.series(name)
        if rows:
            _line(ax, rows, color=colour, linewidth=1.8, marker="s", label=name)
    _eps_axis(ax, table)


def _blues(n: int) -> list[str]:
    """``n`` blues from light to dark (hex)."""
    start, end = np.array([0.62, 0.76, 0.89]), np.array([0.03, 0.19, 0.42])
    steps = [end] if n == 1 else [start + (end - start) * k / (n - 1) for k in range(n)]
    return ["#" + "".join(f"{round(c * 255):02x}" for c in step) for step in steps]


def draw_controls(ax: Axes, table: FigureTable) -> None:
    for kind in (StimulusKind.attack, StimulusKind.noise, StimulusKind.interpolation):
        colour = KIND_COLOUR[kind]
        rows = table.series(f"{kind.value} (sign-corrected)")
        if rows:
            _band(ax, rows, colour)
            label = "model-based attack" if kind is StimulusKind.attack else kind.value
            _line(ax, rows, color=colour, linewidth=2.2, marker="o", label=f"{label}, bound")
        rms = table.series(f"{kind.value} (RMS)")
        if rms:
            _line(ax, rms, color=colour, linewidth=1.4, linestyle="--", label=f"{kind.value}, RMS")
    ax.axhline(0.0, color=GREY, linewidth=0.8)
    _eps_axis(ax, table)


def draw_image_curves(ax: Axes, table: FigureTable) -> None:
    first = True
    for name in table.series_names():
        if name.startswith("image "):
            _line(
                ax,
                table.series(name),
                color=BLUE,
                linewidth=0.8,
                alpha=0.7,
                label="single images" if first else None,
            )
            first = False
    mean = table.series("mean over images")
    if mean:
        _line(ax, mean, color=DARK_BLUE, linewidth=2.6, marker="o", label="mean over images")
    ax.axhline(0.0, color=GREY, linewidth=0.8)
    _eps_axis(ax, table)


FIGURES: dict[str, FigureSpec] = {
    spec.name: spec
    for spec in (
        FigureSpec(
            "bound_vs_eps",
            "Sensitivity vs ε (Fig. 1A)",
            "Normalised sign-corrected lower bound per site (light) and mean ± s.d. over sites "
            "(dark); grey dashed: clean-image σ; blue dashed: mean |Δr| between random images.",
            False,
            bound_vs_eps_table,
            draw_bound_vs_eps,
        ),
        FigureSpec(
            "days",
            "Improvement over days (Fig. 5)",
            "Site-averaged lower bound vs ε on each day (light → dark), with the last day's "
            "Gaussian-noise (green) and interpolation (orange) controls.",
            False,
            days_table,
            draw_days,
        ),
        FigureSpec(
            "controls",
            "Attacks vs controls",
            "Model-based attacks vs model-free controls at the same ε, all scored with the "
            "sign-corrected estimator (solid, mean ± s.d. over sites); dashed: RMS of the "
            "controls, which carries a noise floor and is not a lower bound.",
            False,
            controls_table,
            draw_controls,
        ),
        FigureSpec(
            "image_curves",
            "Image-specific curves (Fig. 3B)",
            "One site: s̃(x, ε) near each clean image (light, up to 50 images) and their mean "
            "(dark).",
            True,
            image_curves_table,
            draw_image_curves,
        ),
    )
}


def build_table(db: Session, name: str, **params: Any) -> FigureTable:
    spec = FIGURES.get(name)
    if spec is None:
        raise NotFound(
            f"no figure named {name!r}; known: {', '.join(FIGURES)}", field="name", value=name
        )
    if spec.needs_site and params.get("site_id") is None:
        raise InvalidInput(f"figure {name!r} needs site_id", field="site_id")
    if not spec.needs_site:
        params.pop("site_id", None)
        params.pop("session_id", None)
    return spec.table(db, **params)


def render(table: FigureTable, fmt: Format) -> bytes:
    """The figure as PNG or SVG bytes, or its table as CSV."""
    if fmt == "csv":
        return table.to_csv()
    if fmt not in ("png", "svg"):
        raise InvalidInput(f"format {fmt!r} is not png, svg or csv", field="format", value=fmt)
    spec = FIGURES[table.name]
    figure = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    if table.empty:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        spec.draw(ax, table)
        handles, _labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8, frameon=False, loc="best")
    ax.set_title(f"{spec.title}\n{table.subtitle}" if table.subtitle else spec.title, fontsize=10)
    out = io.BytesIO()
    metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
    figure.savefig(out, format=fmt, metadata=metadata)
    return out.getvalue()
