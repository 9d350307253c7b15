"""``itloop rig inspect`` and ``itloop rig count`` on the real Blackrock recordings."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from itloop.rig_client.cli import app

RATE = 30_000
runner = CliRunner()

# file -> (channels, spikes, digital words, segments)
EXPECTED = {
    "Han_20170516.nev": (96, 20163, 0, 1),
    "datafile001.nev": (144, 0, 39139, 1),
    "test.nev": (96, 10, 1, 2),
}


def _neo_spike_ticks(path: Path) -> dict[tuple[int, int], list[int]]:
    """(segment, electrode) -> spike ticks, read through neo.io (not the rawio path under test)."""
    import neo

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block = neo.io.BlackrockIO(str(path.with_suffix("")), nsx_to_load=[]).read_block()
    out: dict[tuple[int, int], list[int]] = {}
    for s, segment in enumerate(block.segments):
        for train in segment.spiketrains:
            ticks = np.round(train.times.rescale("s").magnitude * RATE).astype(int).tolist()
            out.setdefault((s, int(train.annotations["channel_id"])), []).extend(ticks)
    return {k: sorted(v) for k, v in out.items()}


def _blackrock(shared_data: Path, name: str) -> Path:
    path = shared_data / "blackrock" / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


@pytest.mark.parametrize("name", EXPECTED)
def test_inspect_real_file(shared_data: Path, name: str) -> None:
    path = _blackrock(shared_data, name)
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    n_channels, n_spikes, n_words, n_segments = EXPECTED[name]
    assert info["n_channels"] == n_channels
    assert info["n_spikes"] == n_spikes == sum(info["spike_counts"].values())
    assert info["n_events"] == n_words
    assert len(info["segments"]) == n_segments
    assert info["tick_rate_hz"] == RATE
    neo_ticks = _neo_spike_ticks(path)
    for channel, n in info["spike_counts"].items():
        assert n == sum(len(v) for (s, c), v in neo_ticks.items() if c == int(channel))
    if name == "datafile001.nev":
        words = info["event_counts"]
        assert words["255"] == 9771
        assert words["134"] == 9771
        assert words["124"] == 9770
        assert info["notes"][0] == "NEV spec 2.2"
    if name == "test.nev":
        assert info["segments"][1]["n_events"] == 1
        assert any(".nev alone" in n for n in info["notes"])  # the header-only .ns1


@pytest.mark.parametrize("name", EXPECTED)
def test_count_real_file(shared_data: Path, name: str, tmp_path: Path) -> None:
    path = _blackrock(shared_data, name)
    onsets = {
        "Han_20170516.nev": [(0.1, 0), (0.5, 0), (1.0, 0), (1.9, 0), (5.0, 0)],
        "datafile001.nev": [(0.5, 0), (4.0, 0), (9.7, 0)],
        "test.nev": [(1.0, 0), (4.93, 0), (9.95, 0), (0.0, 1)],
    }[name]
    csv = tmp_path / "onsets.csv"
    csv.write_text("onset_s,segment\n" + "".join(f"{t},{s}\n" for t, s in onsets))
    result = runner.invoke(
        app, ["count", str(path), "--onsets", str(csv), "--window-ms", "70", "170", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["window_ms"] == [70.0, 170.0]
    assert len(out["counts"]) == len(onsets)
    neo_ticks = _neo_spike_ticks(path)
    for (onset_s, seg), p, row in zip(onsets, out["presentations"], out["counts"], strict=True):
        if row is None:
            assert not p["valid"]
            assert "outside segment" in p["invalid_reason"]
            continue
        assert len(row) == len(out["channels"])
        onset = round(onset_s * RATE)
        for channel, n in zip(out["channels"], row, strict=True):
            ticks = neo_ticks.get((seg, channel), [])
            assert n == sum(1 for t in ticks if onset + 2100 <= t < onset + 5100)
    validity = [p["valid"] for p in out["presentations"]]
    completeness = [p["complete"] for p in out["presentations"]]
    if name == "Han_20170516.nev":
        assert sum(map(sum, out["counts"][:3])) > 0
        assert validity == [True, True, True, True, False]  # 5 s is past the 2 s recording
        assert completeness[3] is False  # 1.9 s + 170 ms runs past the end
    if name == "test.nev":
        assert out["counts"][1][0] == 1  # the spike at 5.0 s is in [4.93+0.07, 4.93+0.17)
        assert completeness[2] is False


def test_inspect_refuses_a_file_without_nev(shared_data: Path) -> None:
    path = _blackrock(shared_data, "TEST_UN001.ns2")
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 2
    assert "not a .nev file" in result.output
