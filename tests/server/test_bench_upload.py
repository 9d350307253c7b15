"""The ingest benchmark runs end to end on a small session and checks what it stored."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from itloop.cli import app


def test_bench_upload_small_session() -> None:
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "upload",
            "--database",
            "sqlite",
            "--presentations",
            "300",
            "--sites",
            "7",
            "--chunk",
            "128",
        ],
    )
    assert result.exit_code == 0, result.output
    (figures,) = json.loads(result.stdout)
    assert figures["database"] == "sqlite"
    assert figures["responses_stored"] == 300 * 7
    assert figures["seconds"] > 0
