"""CSV and Parquet of responses and sensitivity results through the API, and the NWB route."""

from __future__ import annotations

import csv
import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from itloop.server.exports.trials import load_session

from .conftest import Recorded

pytestmark = pytest.mark.db


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_responses_csv_and_parquet_hold_the_database_counts(recorded: Recorded) -> None:
    session_id = recorded.lab.session_ids[0]
    headers = _auth(recorded.analyst_token)
    as_csv = recorded.client.get(
        f"/api/v1/exports/responses.csv?session_id={session_id}", headers=headers
    )
    as_parquet = recorded.client.get(
        f"/api/v1/exports/responses.parquet?session_id={session_id}", headers=headers
    )
    assert as_csv.status_code == 200, as_csv.text
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert as_parquet.status_code == 200
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    table = pq.read_table(io.BytesIO(as_parquet.content)).to_pydict()
    with recorded.sessions() as db:
        arrays = load_session(db, session_id)
    n_sites = len(arrays.site_ids)
    assert len(rows) == len(table["spike_count"]) == int(arrays.has_response.sum()) * n_sites
    counts = np.array(table["spike_count"]).reshape(-1, n_sites)
    np.testing.assert_array_equal(counts, arrays.counts[arrays.has_response])
    assert [int(r["spike_count"]) for r in rows] == table["spike_count"]
    assert rows[0]["stimulus_sha256"] == table["stimulus_sha256"][0]


def test_sensitivity_tables_filter_like_the_results_api(recorded: Recorded) -> None:
    headers = _auth(recorded.analyst_token)
    lab = recorded.lab
    api = recorded.client.get(
        f"/api/v1/sensitivity?subject_id={lab.subject_id}&kind=attack", headers=headers
    ).json()
    exported = recorded.client.get(
        f"/api/v1/exports/sensitivity.parquet?subject_id={lab.subject_id}&kind=attack",
        headers=headers,
    )
    table = pq.read_table(io.BytesIO(exported.content)).to_pydict()
    assert len(table["site_id"]) == len(api) == len(lab.site_ids) * 4 * len(lab.days)
    assert sorted(table["lower_bound_normalised"]) == sorted(
        r["lower_bound_normalised"] for r in api
    )
    as_csv = recorded.client.get(
        f"/api/v1/exports/sensitivity.csv?subject_id={lab.subject_id}", headers=headers
    )
    assert len(as_csv.text.strip().splitlines()) == 1 + 3 * len(api)


def test_nwb_route_and_refusals(recorded: Recorded) -> None:
    session_id = recorded.lab.session_ids[0]
    answer = recorded.client.get(
        f"/api/v1/sessions/{session_id}/export.nwb", headers=_auth(recorded.analyst_token)
    )
    assert answer.status_code == 200
    assert answer.content[:8] == b"\x89HDF\r\n\x1a\n"
    assert (
        recorded.client.get(f"/api/v1/exports/responses.csv?session_id={session_id}").status_code
        == 401
    )
    missing = recorded.client.get(
        "/api/v1/exports/responses.csv?session_id=999", headers=_auth(recorded.analyst_token)
    )
    assert missing.status_code == 404
    assert "999" in missing.json()["message"]
