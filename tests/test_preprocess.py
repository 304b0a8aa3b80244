import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tasks.common.config import IngestParams, PreprocessParams
from tasks.common.data import load_split
from tasks.common.dataset import DatasetError
from tasks.ingest import ingest
from tasks.preprocess import preprocess, split_ids


def test_split_is_by_image_disjoint_and_deterministic():
    ids = list(range(100))
    a = split_ids(ids, 0.1, 0.2, seed=0)
    assert split_ids(ids, 0.1, 0.2, seed=0) == a
    sets = [set(a[s]) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (70, 10, 20)
    assert split_ids(ids, 0.1, 0.2, seed=1) != a


def test_split_rejects_too_few_images():
    with pytest.raises(DatasetError, match="too few"):
        split_ids([1, 2], 0.5, 0.4, seed=0)


def test_preprocess_writes_shards_tokens_and_stats(tmp_path: Path):
    ingest(IngestParams(num_images=20, image_size=48), tmp_path / "raw", tmp_path / "q.jsonl")
    p = PreprocessParams(
        image_size=32, max_length=20, shard_size=6, val_fraction=0.1, test_fraction=0.2
    )
    res = preprocess(p, None, tmp_path / "raw", tmp_path / "prep")
    assert res.counts == {"train": 14, "val": 2, "test": 4}
    train = load_split(tmp_path / "prep", "train")
    assert train.images.shape == (14, 32, 32, 3) and train.images.dtype == np.uint8
    assert len(sorted((tmp_path / "prep" / "train").glob("images_*.npy"))) == 3
    assert train.input_ids.shape == (70, 20) and train.image_index.max() == 13
    # every caption of an image stays in the image's split
    test = load_split(tmp_path / "prep", "test")
    assert not set(train.image_ids) & set(test.image_ids)
    stats = json.loads((tmp_path / "prep" / "stats.json").read_text())
    expected = np.asarray(train.images).reshape(-1, 3).mean(0) / 255
    assert np.allclose(stats["mean"], expected, atol=1e-5)
    # same input -> byte-identical arrays and tokenizer, whatever the number of decoding processes
    preprocess(p.model_copy(update={"workers": 2}), None, tmp_path / "raw", tmp_path / "prep2")
    files = ("train/images_000.npy", "tokenizer/tokenizer.json", "test/input_ids_000.npy")
    for rel in (*files, "test/attention_mask_000.npy", "train/index.jsonl"):
        assert (tmp_path / "prep" / rel).read_bytes() == (tmp_path / "prep2" / rel).read_bytes()


def test_corrupt_image_is_named(tmp_path: Path):
    ingest(IngestParams(num_images=10, image_size=48), tmp_path / "raw", tmp_path / "q.jsonl")
    shard = tmp_path / "raw" / "shards" / "raw-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:  # damaged after ingest validated it
        for m, data in members:
            data = b"not a png" if m.name == "000000003.png" else data
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(DatasetError, match="sample 3: cannot decode"):
        preprocess(PreprocessParams(image_size=32), None, tmp_path / "raw", tmp_path / "prep")
