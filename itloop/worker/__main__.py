"""``python -m itloop.worker``: a worker configured from ``ITLOOP_*`` environment variables."""

from __future__ import annotations

import logging

from itloop.server.settings import Settings
from itloop.worker.main import run_worker_ranks


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = Settings()
    settings.prepare_data_dir()
    run_worker_ranks(settings)


if __name__ == "__main__":
    main()
