"""``python -m itloop`` is the ``itloop`` command."""

from itloop.cli import app

app()
