"""The analysts' client against the real app (the TestClient is its httpx seam)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from itloop.client import ItloopClient, ItloopClientError
from itloop.protocol.sessions import SessionCreate, SessionState
from itloop.server.exports.nwb import read_spike_counts

from .conftest import Recorded

pytestmark = pytest.mark.db


def test_reads_and_downloads(recorded: Recorded, tmp_path: Path) -> None:
    lab = recorded.lab
    with ItloopClient(
        "http://testserver", token=recorded.analyst_token, http=recorded.client
    ) as api:
        assert api.me().email == "analyst@lab.test"
        assert [s.name for s in api.subjects()] == ["M1"]
        sessions = api.sessions(subject_id=lab.subject_id, state=SessionState.analysed)
        assert [s.id for s in sessions] == lab.session_ids
        assert [v.id for v in api.lineage(lab.model_version_ids[-1])] == lab.model_version_ids[::-1]
        results = api.sensitivity(subject_id=lab.subject_id, kind="attack", eps_l2=1.0)
        assert len(results) == len(lab.site_ids) * len(lab.days)
        responses = list(api.iter_responses(session_id=lab.session_ids[0], page_size=100))
        nwb_path = api.download_nwb(lab.session_ids[0], tmp_path / "s.nwb")
        table = pq.read_table(api.download_responses(lab.session_ids[0], tmp_path / "r.parquet"))
        sens = pq.read_table(
            api.download_sensitivity(tmp_path / "s.parquet", subject_id=lab.subject_id)
        )
        with pytest.raises(ItloopClientError) as refused:
            api.schedule_session(
                SessionCreate(
                    subject_id=lab.subject_id,
                    rig_id=lab.rig_id,
                    protocol_id=lab.protocol_id,
                    scheduled_for=dt.datetime(2026, 12, 24, 9, tzinfo=dt.UTC),
                )
            )
    assert refused.value.status_code == 403
    assert refused.value.code == "permission_denied"
    _ids, _sites, counts = read_spike_counts(nwb_path)
    assert len(responses) == table.num_rows == counts.size
    by_key = {(r.presentation_id, r.site_id): r.spike_count for r in responses}
    assert sorted(by_key.values()) == sorted(table.column("spike_count").to_pylist())
    assert sens.num_rows == 3 * len(lab.site_ids) * 4 * len(lab.days)
    assert not list(tmp_path.glob(".*.part"))


def test_errors_name_the_value(recorded: Recorded) -> None:
    with ItloopClient("http://testserver", token=recorded.staff_token, http=recorded.client) as api:
        with pytest.raises(ItloopClientError) as missing:
            api.session(999)
        assert missing.value.status_code == 404
        assert missing.value.value == 999
        with pytest.raises(ItloopClientError) as wrong:
            api.transition(recorded.lab.session_ids[0], SessionState.running)
        assert wrong.value.status_code == 409
        assert "analysed" in wrong.value.message
    with pytest.raises(ValueError, match="token is empty"):
        ItloopClient("http://testserver", token=" ")
