"""Wire schemas shared by the server, the worker and the rig client (pydantic only, no I/O)."""
