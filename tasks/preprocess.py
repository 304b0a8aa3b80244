"""preprocess: split by image, decode and resize once into uint8 shards, tokenise captions.

Streams the raw WebDataset shards (tasks/common/dataset.py), decodes on `preprocess.workers`
processes, and writes the prepared layout described in tasks/common/data.py a shard at a time:
memory holds one shard per split, whatever the dataset's size. Images are decoded
by the serving runtime's `load_image`, so training and inference see the same pixels.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from model.config import resolve_pretrained
from tasks.common import stage
from tasks.common.config import Params, PreprocessParams
from tasks.common.data import INDEX_FILE, META_FILE, SPLITS, STATS_FILE, TOKENIZER_DIR, shard_file
from tasks.common.dataset import (
    DatasetError,
    RawSample,
    Record,
    image_ids,
    iter_raw,
    iter_records,
)
from tasks.common.decode import decode_sample
from tasks.common.pool import ordered_map


@dataclass(frozen=True)
class PreprocessResult:
    counts: dict[str, int]
    vocab_size: int
    out: str


def split_ids(image_ids: list[int], val_fraction: float, test_fraction: float, seed: int):
    """Deterministic split by image: every caption of an image lands in the image's split."""
    ids = np.array(sorted(image_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = max(1, round(len(ids) * test_fraction))
    n_val = round(len(ids) * val_fraction)
    if n_test + n_val >= len(ids):
        raise DatasetError(
            f"{len(ids)} images are too few for val_fraction={val_fraction} and "
            f"test_fraction={test_fraction}: the train split would be empty"
        )
    test, val, train = np.split(ids[order], [n_test, n_test + n_val])
    return {
        "train": sorted(train.tolist()),
        "val": sorted(val.tolist()),
        "test": sorted(test.tolist()),
    }


def build_tokenizer(
    p: PreprocessParams,
    pretrained: str | None,
    train_captions: Iterable[str],
    allow_downloads: bool = False,
) -> PreTrainedTokenizerBase:
    """The pretrained text tower's tokenizer, else a WordPiece vocabulary fit to train captions."""
    if pretrained:
        return AutoTokenizer.from_pretrained(
            resolve_pretrained(pretrained), local_files_only=not allow_downloads
        )
    vocab = _wordpiece_vocab(train_captions, p.vocab_size)
    return BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)


def _wordpiece_vocab(captions: Iterable[str], size: int) -> list[str]:
    """A deterministic WordPiece vocabulary: specials, every character (plain and ##-continuation),
    then the most frequent whole words (ties alphabetical) up to `size` entries.

    tokenizers' WordPieceTrainer breaks ties in hash-map order, so two runs on the same captions
    can assign different ids; a vocabulary built here is the same on every run.
    """
    from collections import Counter

    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    words = Counter(w for c in captions for w, _ in split.pre_tokenize_str(norm.normalize_str(c)))
    chars = sorted({ch for w in words for ch in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{ch}" for ch in chars)]
    seen = set(vocab)
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= size:
            break
        if w not in seen:
            vocab.append(w)
            seen.add(w)
    return vocab


def _tokenize(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(C, L) int32 ids and int8 mask of one shard's captions (a whole split's at once took
    gigabytes of the tokenizer's per-caption objects at 100k images)."""
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np"
    )
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int8)


class _SplitWriter:
    """One split's training shards, written as images stream in: each shard's images, its
    captions' tokens and their image rows, and the split's index a line per image. Memory holds
    one shard, whatever the split's size."""

    def __init__(self, d: Path, p: PreprocessParams, tokenizer: PreTrainedTokenizerBase):
        self.d, self.p, self.tokenizer = d, p, tokenizer
        self.images: list[np.ndarray] = []
        self.records: list[Record] = []
        self.count = self.shards = 0
        self.index = None
        # Exact integer sums of pixel values and their squares (for train stats), per channel.
        self.total, self.total_sq = np.zeros(3, np.uint64), np.zeros(3, np.uint64)

    def add(self, sample: RawSample, pixels: np.ndarray) -> None:
        self.records.append(sample.record)
        self.images.append(pixels)
        if len(self.images) == self.p.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.images:
            return
        if self.index is None:
            self.d.mkdir(parents=True, exist_ok=True)
            self.index = open(self.d / INDEX_FILE, "w")  # noqa: SIM115 - appended per shard
        arr = np.stack(self.images)  # (n, S, S, 3) uint8
        np.save(shard_file(self.d, "images", self.shards), arr)
        for a in range(0, len(arr), 64):  # a float copy of a whole 224 px shard took 2.4 GB
            pix = arr[a : a + 64].reshape(-1, 3).astype(np.uint64)
            self.total += pix.sum(0)
            self.total_sq += (pix * pix).sum(0)
        texts = [c for r in self.records for c in r.captions]
        rows = [self.count + i for i, r in enumerate(self.records) for _ in r.captions]
        ids, mask = _tokenize(self.tokenizer, texts, self.p.max_length)
        np.save(shard_file(self.d, "input_ids", self.shards), ids)
        np.save(shard_file(self.d, "attention_mask", self.shards), mask)
        np.save(shard_file(self.d, "caption_image", self.shards), np.array(rows, np.int32))
        for r in self.records:
            line = {"image_id": r.image_id, "source_path": r.source_path, "captions": r.captions}
            self.index.write(json.dumps(line) + "\n")
        self.count, self.shards = self.count + len(arr), self.shards + 1
        self.images, self.records = [], []

    def close(self) -> None:
        self.flush()
        if self.index is not None:
            self.index.close()


def _decode_splits(
    p: PreprocessParams, raw: Path, out: Path, splits: dict[str, list[int]], tokenizer
) -> dict[str, _SplitWriter]:
    """Stream the raw shards once; each decoded image goes to its split's writer, in id order."""
    split_of = {i: name for name, ids in splits.items() for i in ids}
    writers = {name: _SplitWriter(out / name, p, tokenizer) for name in SPLITS}
    decoded = ordered_map(
        decode_sample, iter_raw(raw), p.workers, dask_address=p.dask_address, size=p.image_size
    )
    for sample, pixels in stage.progress(decoded, desc="preprocess: decoding", unit="img"):
        writers[split_of[sample.record.image_id]].add(sample, pixels)
    for w in writers.values():
        w.close()
    return writers


def preprocess(
    p: PreprocessParams,
    text_pretrained: str | None,
    raw: Path,
    out: Path,
    allow_downloads: bool = False,
):
    """Split the ingested dataset at `raw` and write training-ready arrays to `out`."""
    raw, out = Path(raw), Path(out)
    splits = split_ids(image_ids(raw), p.val_fraction, p.test_fraction, p.seed)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_ids = set(splits["train"])
    train_captions = (c for r in iter_records(raw) if r.image_id in train_ids for c in r.captions)
    tokenizer = build_tokenizer(p, text_pretrained, train_captions, allow_downloads)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    writers = _decode_splits(p, raw, out, splits, tokenizer)
    counts = {name: w.count for name, w in writers.items()}
    n = counts["train"] * p.image_size * p.image_size
    mean = writers["train"].total / (n * 255.0)
    std = np.sqrt(np.maximum(writers["train"].total_sq / (n * 255.0**2) - mean**2, 1e-12))
    stats = {"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}
    (out / STATS_FILE).write_text(json.dumps(stats, indent=2))
    meta = {
        "image_size": p.image_size,
        "max_length": p.max_length,
        "vocab_size": len(tokenizer),
        "counts": counts,
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return PreprocessResult(counts, len(tokenizer), str(out))


def run(params: Params, root: Path) -> PreprocessResult:
    return preprocess(
        params.preprocess,
        params.model.text.pretrained,
        root / params.paths.raw,
        root / params.paths.prepared,
        params.model.allow_downloads,
    )


@task(name="preprocess", cache_policy=NONE, timeout_seconds=3600)
def preprocess_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("preprocess", run, root, force)


if __name__ == "__main__":
    stage.main("preprocess", run)
