"""The prepared shards read row by row, and the training loader over them: the same batches for
any number of workers, a restored position that continues the stream exactly, and epochs that
are permutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.config import validate
from tasks.common.data import NpyWriter, PrefixCache, Rows, load_split
from tasks.common.loader import Position, TrainBatches, train_loader
from tests.conftest import ingest_and_preprocess, tiny_params_dict

# Crops on: augmentation is random, and must be drawn from (seed, epoch, batch) all the same.
AUGMENT = {"train": {"epochs": 3, "batch_size": 5, "augment": {"crop_scale": [0.5, 1.0]}}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("loader")
    params = validate(tiny_params_dict(**AUGMENT))
    return ingest_and_preprocess(root, params), params


def _stream(batches: TrainBatches, start: int, workers: int) -> list[tuple[torch.Tensor, ...]]:
    return list(train_loader(batches, start, len(batches), workers, pin_memory=False))


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        all(torch.equal(x, y) for x, y in zip(p, q, strict=True)) for p, q in zip(a, b, strict=True)
    )


def test_rows_read_what_the_shards_hold(tmp_path: Path):
    parts = [np.arange(k * 100, k * 100 + 3 * n).reshape(n, 3) for k, n in enumerate((4, 1, 5))]
    for k, part in enumerate(parts):
        np.save(tmp_path / f"a_{k}.npy", part)
    rows = Rows(sorted(tmp_path.glob("a_*.npy")))
    whole = np.concatenate(parts)
    assert rows.shape == (10, 3) and len(rows) == 10 and rows.dtype == whole.dtype
    np.testing.assert_array_equal(np.asarray(rows), whole)
    pick = np.array([9, 0, 4, 4, 5, 3])  # across shards, repeated, unsorted
    np.testing.assert_array_equal(rows[pick], whole[pick])
    np.testing.assert_array_equal(rows[3:7], whole[3:7])
    np.testing.assert_array_equal(rows[::3], whole[::3])
    np.testing.assert_array_equal(rows[5], whole[5])
    assert [len(c) for c in rows.chunks(4)] == [4, 4, 2]
    with pytest.raises(IndexError):
        rows[np.array([10])]


def test_npy_writer_writes_np_save_bytes_and_counts_rows(tmp_path: Path):
    data = np.random.default_rng(0).random((7, 2, 3), dtype=np.float32)
    w = NpyWriter(tmp_path / "w.npy", 7)
    for a in range(0, 7, 3):
        w.write(data[a : a + 3])
    w.close()
    np.save(tmp_path / "s.npy", data)
    assert (tmp_path / "w.npy").read_bytes() == (tmp_path / "s.npy").read_bytes()
    short = NpyWriter(tmp_path / "short.npy", 8)
    short.write(data)
    with pytest.raises(RuntimeError, match="wrote 7 rows of 8"):
        short.close()


def test_batches_are_the_same_for_any_number_of_workers(prepared):
    prep, params = prepared
    batches = TrainBatches(load_split(prep, "train"), params.train)
    inline = _stream(batches, 0, workers=0)
    assert len(inline) == len(batches) == 3 * (len(batches.data) // 5)
    image, text, mask = inline[0]
    assert image.shape == (5, 3, 32, 32) and image.dtype == torch.float32
    assert text.shape == mask.shape == (5, 24) and text.dtype == torch.int64
    for workers in (1, 2):
        assert _same(_stream(batches, 0, workers), inline), f"{workers} workers"


def test_a_restored_position_continues_the_stream_exactly(prepared):
    prep, params = prepared
    batches = TrainBatches(load_split(prep, "train"), params.train)
    whole = _stream(batches, 0, workers=0)
    at = Position(epoch=1, batch=2)
    start = at.step(batches.per_epoch)
    assert Position.of_step(start, batches.per_epoch) == at
    # A fresh dataset object (a restarted process) with a different worker count.
    again = TrainBatches(load_split(prep, "train"), params.train)
    assert _same(_stream(again, start, workers=2), whole[start:])


def test_each_epoch_is_a_permutation_and_epochs_differ(prepared):
    prep, params = prepared
    data = load_split(prep, "train")
    batches = TrainBatches(data, params.train)
    orders = [batches.order(e) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(len(data)))
    assert not np.array_equal(orders[0], orders[1])
    # A drawn caption always belongs to its image: the tokens match one of the image's captions.
    _, text, _ = batches[0]
    idx = np.sort(orders[0][:5])
    ids = np.asarray(data.input_ids)
    for row, i in enumerate(idx):
        own = ids[data.caption_offsets[i] : data.caption_offsets[i + 1]]
        assert (own == text[row].numpy()).all(1).any()
    other_seed = params.train.model_copy(update={"seed": 1})
    assert not np.array_equal(TrainBatches(data, other_seed).order(0), orders[0])


def test_cached_prefixes_replace_pixels_and_tokens(prepared):
    prep, params = prepared
    data = load_split(prep, "train", images=False)
    n, c = len(data), len(data.input_ids)
    lengths = np.arange(c) % 3 + 1  # caption k has k % 3 + 1 cached token states
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    states = np.arange(offsets[-1] * 2, dtype=np.float32).reshape(-1, 2)  # (T, H=2)
    cache = PrefixCache(19, np.arange(n * 4, dtype=np.float32).reshape(n, 4), 5, states, offsets)
    batches = TrainBatches(data, params.train, cache)
    image, hidden, mask = batches[0]
    idx = np.sort(batches.order(0)[:5])
    np.testing.assert_array_equal(image.numpy(), cache.image[idx])
    assert hidden.shape[2] == 2 and mask.shape == hidden.shape[:2]
    for row in range(5):
        k = int(mask[row].sum())  # the drawn caption's length, and its states in order
        cap = np.flatnonzero(lengths == k)
        starts = offsets[cap]
        assert any((hidden[row, :k].numpy() == states[s : s + k]).all() for s in starts)


def test_flips_come_from_the_cached_flipped_view_and_split_across_ranks(prepared):
    prep, params = prepared
    data = load_split(prep, "train", images=False)
    n = len(data)
    plain = np.arange(1, n * 4 + 1, dtype=np.float32).reshape(n, 4)
    flipped_only = params.train.model_copy(
        update={"augment": params.train.augment.model_copy(update={"crop_scale": None,
                                                                   "hflip": True})}
    )  # fmt: skip
    with pytest.raises(ValueError, match="no flipped view"):
        TrainBatches(data, flipped_only, PrefixCache(19, plain))
    cache = PrefixCache(19, plain, image_hflip=-plain)  # a flipped row is its negative
    whole = TrainBatches(data, flipped_only, cache)
    views = []
    for step in range(len(whole)):
        image = whole[step][0].numpy()
        epoch, b = divmod(step, whole.per_epoch)
        idx = np.sort(whole.order(epoch)[b * 5 : (b + 1) * 5])
        np.testing.assert_array_equal(np.abs(image), plain[idx])  # the right images, either view
        views.append(image[:, 0] < 0)
    views = np.concatenate(views)
    assert 0.2 < views.mean() < 0.8  # both views are drawn
    # Two ranks of a batch of 4 draw the flips of the whole batch: their halves are its rows.
    even = flipped_only.model_copy(update={"batch_size": 4})
    one = TrainBatches(data, even, cache)[3][0]
    halves = [TrainBatches(data, even, cache, rank, 2)[3][0] for rank in (0, 1)]
    torch.testing.assert_close(torch.cat(halves), one)
    # Without the flag the flipped view is never read.
    assert (TrainBatches(data, params.train.model_copy(update={"augment": flipped_only.augment
            .model_copy(update={"hflip": False})}), cache)[0][0] > 0).all()  # fmt: skip
