"""Data out of itloop: NWB files per session, CSV/Parquet tables, and the arrays behind them."""

from itloop.server.exports.nwb import read_spike_counts, write_session_nwb
from itloop.server.exports.tables import encode, responses_table, sensitivity_table
from itloop.server.exports.trials import SessionArrays, load_session

__all__ = [
    "SessionArrays",
    "encode",
    "load_session",
    "read_spike_counts",
    "responses_table",
    "sensitivity_table",
    "write_session_nwb",
]
