"""Flat tables for analysts: responses (one row per presentation × site) and sensitivity results.

Both are columnar (name → list) with a fixed schema, written as CSV or Parquet (pyarrow), so a
CSV and a Parquet export of the same query hold the same values.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from itloop.server.db.tables import (
    Analysis,
    RecordingSession,
    SensitivityResult,
)
from itloop.server.errors import InvalidInput
from itloop.server.exports.trials import load_session
from itloop.server.results import SensitivityFilter

__all__ = [
    "RESPONSE_SCHEMA",
    "SENSITIVITY_SCHEMA",
    "Table",
    "TableFormat",
    "encode",
    "media_type",
    "responses_table",
    "sensitivity_table",
]

TableFormat = Literal["csv", "parquet"]

RESPONSE_SCHEMA = pa.schema(
    [
        ("session_id", pa.int64()),
        ("presentation_id", pa.int64()),
        ("seq", pa.int64()),
        ("trial_index", pa.int64()),
        ("event_code", pa.int32()),
        ("stimulus_id", pa.int64()),
        ("stimulus_sha256", pa.string()),
        ("stimulus_kind", pa.string()),
        ("parent_stimulus_id", pa.int64()),
        ("eps_requested_l2", pa.float64()),
        ("eps_realised_l2", pa.float64()),
        ("sign", pa.int8()),
        ("targeted_site_id", pa.int64()),
        ("onset_ticks", pa.int64()),
        ("tick_rate_hz", pa.int64()),
        ("fixation_ok", pa.bool_()),
        ("frame_drops", pa.int32()),
        ("valid", pa.bool_()),
        ("complete", pa.bool_()),
        ("site_id", pa.int64()),
        ("spike_count", pa.int32()),
        ("window_start_ms", pa.float64()),
        ("window_end_ms", pa.float64()),
    ]
)
"""One row per uploaded presentation × session site that has a response."""

SENSITIVITY_SCHEMA = pa.schema(
    [
        ("analysis_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("session_id", pa.int64()),
        ("model_version_id", pa.int64()),
        ("site_id", pa.int64()),
        ("day", pa.date32()),
        ("eps_l2", pa.float64()),
        ("kind", pa.string()),
        ("n_images", pa.int64()),
        ("lower_bound", pa.float64()),
        ("lower_bound_normalised", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("sigma_clean", pa.float64()),
        ("naive_abs_normalised", pa.float64()),
        ("rms_normalised", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    columns: dict[str, list[Any]]

    @property
    def n_rows(self) -> int:
        first = next(iter(self.columns.values()), [])
        return len(first)

    def to_arrow(self) -> pa.Table:
        return pa.table(
            {f.name: pa.array(self.columns[f.name], type=f.type) for f in self.schema},
            schema=self.schema,
        )


def media_type(fmt: TableFormat) -> str:
    return "text/csv; charset=utf-8" if fmt == "csv" else "application/vnd.apache.parquet"


def encode(table: Table, fmt: TableFormat) -> bytes:
    """The table as CSV (header row, empty cells for nulls) or Parquet bytes."""
    if fmt == "parquet":
        out = io.BytesIO()
        pq.write_table(table.to_arrow(), out, compression="zstd")
        return out.getvalue()
    if fmt != "csv":
        raise InvalidInput(f"format {fmt!r} is not csv or parquet", field="format", value=fmt)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    names = [f.name for f in table.schema]
    writer.writerow(names)
    columns = [table.columns[n] for n in names]
    for i in range(table.n_rows):
        writer.writerow(_cell(col[i]) for col in columns)
    return text.getvalue().encode()


def _cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def responses_table(db: Session, session_ids: Sequence[int]) -> Table:
    """Every stored spike count of the sessions, long format, in (session, seq, site) order."""
    columns: dict[str, list[Any]] = {f.name: [] for f in RESPONSE_SCHEMA}
    for session_id in sorted(set(session_ids)):
        arrays = load_session(db, session_id)
        for row in range(arrays.n_presentations):
            if not arrays.has_response[row]:
                continue
            info = arrays.stimuli[int(arrays.stimulus_id[row])]
            per_presentation = {
                "session_id": session_id,
                "presentation_id": int(arrays.presentation_id[row]),
                "seq": int(arrays.seq[row]),
                "trial_index": int(arrays.trial_index[row]),
                "event_code": int(arrays.event_code[row]),
                "stimulus_id": info.id,
                "stimulus_sha256": info.sha256,
                "stimulus_kind": info.kind.value,
                "parent_stimulus_id": info.parent_id,
                "eps_requested_l2": info.eps_requested_l2,
                "eps_realised_l2": info.eps_realised_l2,
                "sign": info.sign,
                "targeted_site_id": info.site_id,
                "onset_ticks": int(arrays.onset_ticks[row]) if arrays.has_onset[row] else None,
                "tick_rate_hz": int(arrays.tick_rate_hz[row]) or None,
                "fixation_ok": bool(arrays.fixation_ok[row])
                if arrays.fixation_known[row]
                else None,
                "frame_drops": int(arrays.frame_drops[row]),
                "valid": bool(arrays.valid[row]),
                "complete": bool(arrays.complete[row]),
                "window_start_ms": arrays.window_start_ms,
                "window_end_ms": arrays.window_end_ms,
            }
            for j, site_id in enumerate(arrays.site_ids):
                for name, value in per_presentation.items():
                    columns[name].append(value)
                columns["site_id"].append(site_id)
                columns["spike_count"].append(int(arrays.counts[row, j]))
    return Table("responses", RESPONSE_SCHEMA, columns)


def sensitivity_table(db: Session, where: SensitivityFilter | None = None) -> Table:
    """Sensitivity results with their analysis's provenance, restricted by ``where``."""
    query = (
        select(SensitivityResult, Analysis)
        .join(Analysis, Analysis.id == SensitivityResult.analysis_id)
        .order_by(
            SensitivityResult.day,
            SensitivityResult.site_id,
            SensitivityResult.eps_l2,
            SensitivityResult.kind,
            SensitivityResult.id,
        )
    )
    query = (where or SensitivityFilter()).apply(query)
    columns: dict[str, list[Any]] = {f.name: [] for f in SENSITIVITY_SCHEMA}
    for result, analysis in db.execute(query).all():
        values = {
            "analysis_id": analysis.id,
            "subject_id": analysis.subject_id,
            "session_id": analysis.session_id,
            "model_version_id": analysis.model_version_id,
            "site_id": result.site_id,
            "day": result.day,
            "eps_l2": result.eps_l2,
            "kind": result.kind.value,
            "n_images": result.n_images,
            "lower_bound": result.lower_bound,
            "lower_bound_normalised": result.lower_bound_normalised,
            "ci_low": result.ci_low,
            "ci_high": result.ci_high,
            "sigma_clean": result.sigma_clean,
            "naive_abs_normalised": result.naive_abs_normalised,
            "rms_normalised": result.rms_normalised,
        }
        for name, value in values.items():
            columns[name].append(value)
    return Table("sensitivity", SENSITIVITY_SCHEMA, columns)


def sessions_of_subject(db: Session, subject_id: int) -> list[int]:
    return list(
        db.scalars(
            select(RecordingSession.id)
            .where(RecordingSession.subject_id == subject_id)
            .order_by(RecordingSession.id)
        )
    )
