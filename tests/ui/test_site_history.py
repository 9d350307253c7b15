"""A site's history reads the quality stored with each analysis and computes the rest."""

from __future__ import annotations

import math

import pytest

from itloop.server.db.tables import Analysis, RecordingSite
from itloop.server.errors import NotFound
from itloop.server.exports.trials import load_session
from itloop.server.sitequality import (
    RESULT_KEY,
    SENSITIVITY_ANALYSIS_KIND,
    from_record,
    quality_record,
    site_quality,
    window_ms,
)
from itloop.server.ui import lab

from .conftest import UiLab


def test_the_record_round_trips_every_site(ui: UiLab) -> None:
    with ui.sessions() as db:
        arrays = load_session(db, ui.lab.session_ids[-1])
    record = quality_record(arrays)
    assert record["usable"] == int(arrays.usable.sum()) > 0
    for q in site_quality(arrays, {}, window_ms(arrays)):
        back = from_record(record, q.site_id, q.label)
        assert back == q
    one = quality_record(arrays.only_sites([arrays.site_ids[1]]))
    assert list(one["sites"]) == [str(arrays.site_ids[1])]
    assert one["sites"][str(arrays.site_ids[1])] == record["sites"][str(arrays.site_ids[1])]
    assert from_record(record, 10**9, "none") is None
    with pytest.raises(NotFound, match=r"not sites of session"):
        arrays.only_sites([10**9])


def test_non_finite_values_are_stored_as_null() -> None:
    record = {"usable": 3, "sites": {"5": {"rate_hz": None, "reliability": 0.5, "n_clean": 1}}}
    q = from_record(record, 5, "aIT-5")
    assert q is not None
    assert math.isnan(q.rate_hz)
    assert math.isnan(q.sigma_clean)
    assert q.reliability == 0.5


def test_history_uses_the_stored_record_and_computes_the_rest(
    ui: UiLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    analysed, fresh = ui.lab.session_ids[-1], ui.lab.session_ids[-2]
    with ui.sessions() as db:
        site = db.get(RecordingSite, ui.lab.site_ids[0])
        assert site is not None
        before = {row["session"].id: row for row in lab.site_history(db, site)}
        record = quality_record(load_session(db, analysed))
        record["sites"][str(site.id)]["reliability"] = 0.123  # only the stored record says so
        analysis = db.query(Analysis).filter(Analysis.session_id == analysed).one()
        assert analysis.kind == SENSITIVITY_ANALYSIS_KIND
        analysis.result = {**analysis.result, RESULT_KEY: record}
        db.commit()

        loaded: list[int] = []
        real = lab.load_session

        def counting(db_: object, session_id: int) -> object:
            loaded.append(session_id)
            return real(db_, session_id)  # type: ignore[arg-type]

        monkeypatch.setattr(lab, "load_session", counting)
        after = {row["session"].id: row for row in lab.site_history(db, site)}
    assert analysed not in loaded
    assert fresh in loaded
    assert after[analysed]["quality"].reliability == 0.123
    assert after[analysed]["usable"] == before[analysed]["usable"]
    assert after[analysed]["quality"].sigma_clean == pytest.approx(
        before[analysed]["quality"].sigma_clean
    )
    assert after[fresh]["quality"] == before[fresh]["quality"]
