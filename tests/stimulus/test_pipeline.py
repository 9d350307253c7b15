"""Attack and store as one pipeline: the same stimuli as attack-then-write, PNGs in order."""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from itloop.stimulus import (
    AttackConfig,
    AttackEngine,
    AttackRows,
    decode_png,
    select_largest_change,
    sha256_hex,
    to_levels,
)
from itloop.stimulus.pipeline import PngWriter, attack_and_store, day_chunks

from .multirank import BACKENDS, run_ranks
from .toys import TinyConvNet

SHAPE = (3, 8, 8)
HERE = Path(__file__).resolve().parent


class MemoryStore:
    """A content store in a dict, safe for the writer's threads."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.blobs: dict[str, bytes] = {}
        self.delay_s = delay_s
        self.lock = threading.Lock()
        self.most_in_flight = 0
        self._in_flight = 0

    def put(self, data: bytes) -> str:
        with self.lock:
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        time.sleep(self.delay_s)
        digest = sha256_hex(data)
        with self.lock:
            self.blobs[digest] = data
            self._in_flight -= 1
        return digest


def _job(restarts: int) -> tuple[TinyConvNet, torch.Tensor, AttackRows]:
    model = TinyConvNet(n_sites=3, seed=4)
    gen = torch.Generator().manual_seed(8)
    clean = to_levels(torch.rand(3, *SHAPE, generator=gen))
    rows = AttackRows.grid([0, 1, 2, 1], [0, 1, 2, 2], [0.25, 0.5], restarts=restarts)
    return model, clean, rows


@pytest.mark.parametrize(("restarts", "batch"), [(1, 4), (3, 4), (3, 5), (1, 64)])
def test_pipeline_keeps_and_stores_what_attack_then_select_keeps(restarts: int, batch: int) -> None:
    """Groups of 2 × restarts rows cut by batch boundaries (6 rows, batches of 4 or 5) still
    keep the one best row each, and every kept stimulus is stored as its own exact PNG."""
    model, clean, rows = _job(restarts)
    engine = AttackEngine(model, AttackConfig(steps=4, batch_size=batch, autocast_dtype=None))
    expected = select_largest_change(
        engine.run(clean.float() / 255, rows, generator=torch.Generator().manual_seed(2))
    )
    store = MemoryStore()
    with PngWriter(store.put, workers=3) as writer:
        writer.submit([clean[0]])  # something written before: the addresses still line up
        kept = attack_and_store(
            engine, clean, rows, generator=torch.Generator().manual_seed(2), writer=writer
        )
    assert len(kept.result) == len(rows) // (2 * restarts) == 8
    assert torch.equal(kept.result.row_index, expected.row_index)
    assert torch.equal(kept.result.delta_levels, expected.delta_levels)
    assert torch.equal(kept.result.f_adv, expected.f_adv)
    levels = expected.adversarial_levels(clean)
    assert len(kept.sha256) == len(levels)
    for sha, image in zip(kept.sha256, levels, strict=True):
        assert torch.equal(decode_png(store.blobs[sha]), image)


def test_rows_of_a_group_apart_are_refused() -> None:
    model, clean, rows = _job(1)
    scattered = rows.take(torch.tensor([0, 2, 1, 3]))  # the signs of a pair no longer adjacent
    engine = AttackEngine(model, AttackConfig(steps=1, batch_size=2, autocast_dtype=None))
    with (
        PngWriter(MemoryStore().put, workers=1) as writer,
        pytest.raises(ValueError, match="not consecutive"),
    ):
        attack_and_store(engine, clean, scattered, generator=torch.Generator(), writer=writer)


def test_a_failure_while_storing_a_batch_is_raised_by_the_pipeline() -> None:
    class FullDisk(PngWriter):
        def _write(self, levels: torch.Tensor) -> str:
            raise OSError("no space left on device")

    model, clean, rows = _job(1)
    engine = AttackEngine(model, AttackConfig(steps=1, batch_size=2, autocast_dtype=None))
    with (
        FullDisk(MemoryStore().put, workers=1) as writer,
        pytest.raises(OSError, match="no space left"),
    ):
        attack_and_store(engine, clean, rows, generator=torch.Generator(), writer=writer)


def test_writer_keeps_order_bounds_its_queue_and_uses_its_threads() -> None:
    store = MemoryStore(delay_s=0.01)
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(24)]
    with PngWriter(store.put, workers=4, max_pending=6) as writer:
        first = writer.submit(images[:10])
        second = writer.submit(images[10:])
        assert writer.submitted == 24
        shas = writer.results()
    assert (first, second) == (range(0, 10), range(10, 24))
    assert [int(decode_png(store.blobs[s])[0, 0, 0]) for s in shas] == list(range(24))
    assert 2 <= store.most_in_flight <= 4


def test_a_failed_write_is_raised_not_lost() -> None:
    def broken(data: bytes) -> str:
        raise OSError("disk full")

    with PngWriter(broken, workers=2) as writer:
        writer.submit([torch.zeros(3, 4, 4, dtype=torch.uint8)])
        with pytest.raises(OSError, match="disk full"):
            writer.results()


def test_writer_refuses_a_queue_of_nothing() -> None:
    with pytest.raises(ValueError, match="max_pending must be >= 1, got 0"):
        PngWriter(MemoryStore().put, max_pending=0)


def test_stimuli_are_composed_from_their_clean_image_and_refused_when_counts_differ() -> None:
    store = MemoryStore()
    clean = to_levels(torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(3)))
    k = torch.zeros(3, *SHAPE, dtype=torch.int16)
    k[:, 0, 0, 0] = torch.tensor([-1, 1, 2], dtype=torch.int16)
    k[2, 1, 2, 3] = -3
    index = torch.tensor([1, 0, 1])
    with PngWriter(store.put, workers=2) as writer:
        writer.submit_stimuli(clean.clamp(3, 250), index, k)
        shas = writer.results()
        with pytest.raises(ValueError, match="2 image indices for 3 perturbations"):
            writer.submit_stimuli(clean, index[:2], k)
    for sha, i, dk in zip(shas, index.tolist(), k, strict=True):
        expected = (clean.clamp(3, 250)[i].to(torch.int16) + dk).to(torch.uint8)
        assert torch.equal(decode_png(store.blobs[sha]), expected)


@pytest.mark.parametrize(
    ("pairs", "rows_per_pair", "batch", "rows", "chunk_pairs", "whole_batches"),
    [
        (8400, 12, 512, 4096, 384, True),  # a lab day: 128 pairs fill 3 batches; chunks of 9
        (1000, 12, 32, 4096, 344, True),  # on a CPU: 8 pairs fill 3 batches of 32
        (32, 2, 32, 32, 16, True),
        (5000, 998, 512, 4096, 4, False),  # whole batches need 256 pairs (499 batches)
        (3, 12, 512, 4096, 3, True),  # fewer pairs than a chunk's: one chunk
    ],
)
def test_day_chunks_are_consecutive_and_whole_batches_but_the_last(
    pairs: int, rows_per_pair: int, batch: int, rows: int, chunk_pairs: int, whole_batches: bool
) -> None:
    chunks = day_chunks(pairs, rows_per_pair, batch, rows)
    assert chunks[0] == (0, min(chunk_pairs, pairs))
    assert [end for _, end in chunks[:-1]] == [start for start, _ in chunks[1:]]
    assert chunks[-1][1] == pairs
    assert all(0 < end - start <= chunk_pairs for start, end in chunks)
    padded = [(end - start) * rows_per_pair % batch != 0 for start, end in chunks[:-1]]
    assert not any(padded) if whole_batches else all(padded)


def test_day_chunks_of_a_lab_day_pad_less_than_chunks_of_8_sites() -> None:
    """200 sites × 42 images, 12 rows each, batches of 512: chunks of 8 sites (4,032 rows) padded
    64 rows each, 1,600 in all; the ranges pad only the last chunk's batch (4,032 rows again)."""
    padded = [-(end - start) * 12 % 512 for start, end in day_chunks(8400, 12, 512)]
    assert padded == [0] * 21 + [64]


@pytest.mark.parametrize(
    ("argument", "value"), [("pairs", -1), ("rows_per_pair", 0), ("batch", 0), ("rows", 0)]
)
def test_day_chunks_name_a_bad_argument(argument: str, value: int) -> None:
    kwargs = {"pairs": 10, "rows_per_pair": 12, "batch": 512, "rows": 4096, argument: value}
    with pytest.raises(ValueError, match=f"{argument} must be >= .*got {value}"):
        day_chunks(**kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_three_ranks_store_their_shards_and_the_first_gets_what_one_process_keeps(
    tmp_path: Path, backend: str
) -> None:
    argv = [str(HERE / "pipeline_worker.py"), str(tmp_path), backend]
    run_ranks(3, backend, argv, tmp_path / "logs", timeout_s=240)
    device = torch.device("cuda" if backend == "nccl" else "cpu")
    spec = importlib.util.spec_from_file_location("pipeline_worker", HERE / "pipeline_worker.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))  # the script imports toys and multirank as siblings
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(HERE))
    engine, clean, rows = module.job(device)
    alone = module.keep(engine, clean, rows, MemoryStore().put, device)
    first = torch.load(tmp_path / "0.pt")
    assert first["sha256"] == alone.sha256
    for name, tensor in alone.result.tensors().items():
        assert torch.equal(first["result"][name], tensor), name
    # the other ranks kept whole groups only: 8 groups over 3 ranks at cuts 18 and 30
    parts = [torch.load(tmp_path / f"{r}.pt") for r in (1, 2)]
    assert [len(p["sha256"]) for p in parts] == [2, 3]
    assert len(first["sha256"]) == 8  # rank 0's 3 groups and theirs
    for sha, image in zip(alone.sha256, alone.result.adversarial_levels(clean), strict=True):
        assert torch.equal(decode_png((tmp_path / "store" / f"{sha}.png").read_bytes()), image)
