"""NWB export: valid for pynwb and nwbinspector, counts identical to the database, atomic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from nwbinspector import Importance, inspect_nwbfile
from pynwb import NWBHDF5IO, validate

from itloop.server.exports import nwb
from itloop.server.exports.nwb import read_spike_counts, write_session_nwb
from itloop.server.exports.trials import load_session

from .conftest import Recorded

pytestmark = pytest.mark.db


@pytest.fixture
def exported(recorded: Recorded, tmp_path: Path) -> Path:
    with recorded.sessions() as db:
        return write_session_nwb(db, recorded.lab.session_ids[-1], tmp_path / "out" / "s.nwb")


def test_pynwb_validates_and_nwbinspector_finds_nothing_serious(exported: Path) -> None:
    assert validate(path=str(exported)) == []
    messages = list(inspect_nwbfile(nwbfile_path=str(exported)))
    serious = [
        m for m in messages if m.importance.value >= Importance.BEST_PRACTICE_VIOLATION.value
    ]
    assert serious == [], [f"{m.check_function_name}: {m.message}" for m in serious]


def test_counts_round_trip_identical_to_the_database(recorded: Recorded, exported: Path) -> None:
    session_id = recorded.lab.session_ids[-1]
    with recorded.sessions() as db:
        arrays = load_session(db, session_id)
    ids, sites, counts = read_spike_counts(exported)
    assert sites == arrays.site_ids
    by_id = {int(pid): row for row, pid in enumerate(arrays.presentation_id)}
    assert sorted(ids.tolist()) == sorted(by_id)  # every presentation had an onset
    expected = np.stack([arrays.counts[by_id[int(pid)]] for pid in ids])
    np.testing.assert_array_equal(counts, expected)
    assert counts.dtype == np.int32


def test_presentations_carry_the_stimulus_and_the_rig_observations(
    recorded: Recorded, exported: Path
) -> None:
    with NWBHDF5IO(str(exported), mode="r") as io:
        nwbfile = io.read()
        table = nwbfile.intervals["presentations"].to_dataframe()
        stimuli = nwbfile.analysis["stimuli"].to_dataframe()
        models = nwbfile.analysis["model_versions"].to_dataframe()
        assert nwbfile.subject.subject_id == "M1"
        assert len(nwbfile.electrodes) == len(recorded.lab.site_ids)
    assert (np.diff(table["start_time"].to_numpy()) > 0).all()
    assert set(table["stimulus_kind"]) == {"clean", "attack", "noise", "interpolation"}
    assert table["stimulus_sha256"].str.fullmatch("[0-9a-f]{64}").all()
    attacks = table[table["stimulus_kind"] == "attack"]
    assert set(attacks["sign"]) <= {-1, 1}
    assert (attacks["targeted_site_id"] > 0).all()
    assert not table["fixation_ok"].all()
    assert table["fixation_ok"].any()
    assert table["frame_drops"].sum() > 0
    assert models["model_version_id"].iloc[0] == recorded.lab.model_version_ids[-1]
    assert list(models["parent_id"])[-1] == -1  # back to day 0
    for sha in stimuli["sha256"]:
        assert sha in recorded.store


def test_an_interrupted_export_leaves_nothing(
    recorded: Recorded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out" / "s.nwb"

    def broken_replace(_src: object, _dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(nwb.os, "replace", broken_replace)
    with recorded.sessions() as db, pytest.raises(OSError, match="disk full"):
        write_session_nwb(db, recorded.lab.session_ids[0], target)
    assert list(target.parent.iterdir()) == []


def test_a_session_with_nothing_recorded_is_refused(db_url: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from itloop.server import migrate
    from itloop.server.app import create_app
    from itloop.server.db import make_engine, make_sessionmaker
    from itloop.server.db.tables import Role
    from itloop.server.settings import Settings

    from ..server.conftest import Server, bearer
    from ..server.lab_fixture import make_lab

    migrate.upgrade(db_url)
    settings = Settings(environment="test", data_dir=tmp_path / "d", database_url=db_url)
    settings.prepare_data_dir()
    engine = make_engine(db_url)
    with TestClient(create_app(settings, engine=engine)) as client:
        server = Server(client, engine, make_sessionmaker(engine), settings)
        lab = make_lab(server)
        token = server.user_token(Role.analyst)
        answer = client.get(f"/api/v1/sessions/{lab.session_id}/export.nwb", headers=bearer(token))
        assert answer.status_code == 409
        assert "no presentation with an onset" in answer.json()["message"]
    engine.dispose()
