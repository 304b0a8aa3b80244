"""preprocess: split by image, decode and resize once into uint8 shards, tokenise captions.

Writes the prepared layout described in tasks/common/data.py. Images are decoded by the serving
runtime's `load_image`, so training and inference see the same pixels.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NONE
from transformers import AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerBase

from model.config import resolve_pretrained
from tasks.common import stage
from tasks.common.config import Params, PreprocessParams
from tasks.common.data import META_FILE, SPLITS, STATS_FILE, TOKENIZER_DIR
from tasks.common.dataset import DatasetError, Record, read_manifest
from xmodal_runtime.images import ImageError, load_image


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
    train_captions: list[str],
    allow_downloads: bool = False,
) -> PreTrainedTokenizerBase:
    """The pretrained text tower's tokenizer, else a WordPiece vocabulary fit to train captions."""
    if pretrained:
        return AutoTokenizer.from_pretrained(
            resolve_pretrained(pretrained), local_files_only=not allow_downloads
        )
    vocab = _wordpiece_vocab(train_captions, p.vocab_size)
    return BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True)


def _wordpiece_vocab(captions: list[str], size: int) -> list[str]:
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


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        return load_image(path, size)
    except ImageError as err:
        raise DatasetError(str(err)) from None


def _write_split(
    name: str,
    records: list[Record],
    raw: Path,
    out: Path,
    p: PreprocessParams,
    tokenizer: PreTrainedTokenizerBase,
) -> tuple[np.ndarray, np.ndarray]:
    """Write one split; return per-channel sum and sum of squares of its pixels (for stats)."""
    d = out / name
    d.mkdir(parents=True)
    total, total_sq = np.zeros(3), np.zeros(3)
    for start in range(0, len(records), p.shard_size):
        chunk = records[start : start + p.shard_size]
        arr = np.stack(
            [
                _decode(raw / r.path, p.image_size)
                for r in stage.progress(chunk, desc=f"preprocess: {name}", unit="img", leave=False)
            ]
        )  # (N, S, S, 3) uint8
        np.save(d / f"images_{start // p.shard_size:03d}.npy", arr)
        pix = arr.reshape(-1, 3).astype(np.float64) / 255.0
        total += pix.sum(0)
        total_sq += (pix**2).sum(0)
    texts = [c for r in records for c in r.captions]
    image_index = np.array([i for i, r in enumerate(records) for _ in r.captions], dtype=np.int32)
    enc = tokenizer(
        texts, padding="max_length", truncation=True, max_length=p.max_length, return_tensors="np"
    )
    np.savez(
        d / "captions.npz",
        input_ids=enc["input_ids"].astype(np.int32),
        attention_mask=enc["attention_mask"].astype(np.int8),
        image_index=image_index,
    )
    index = {
        "image_ids": [r.image_id for r in records],
        "paths": [r.path for r in records],
        "captions": texts,
    }
    (d / "index.json").write_text(json.dumps(index))
    return total, total_sq


def preprocess(
    p: PreprocessParams,
    text_pretrained: str | None,
    raw: Path,
    out: Path,
    allow_downloads: bool = False,
):
    """Split the ingested dataset at `raw` and write training-ready arrays to `out`."""
    raw, out = Path(raw), Path(out)
    records = read_manifest(raw)
    by_id = {r.image_id: r for r in records}
    splits = split_ids(list(by_id), p.val_fraction, p.test_fraction, p.seed)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train_caps = [c for i in splits["train"] for c in by_id[i].captions]
    tokenizer = build_tokenizer(p, text_pretrained, train_caps, allow_downloads)
    tokenizer.save_pretrained(out / TOKENIZER_DIR)
    counts = {}
    for name in SPLITS:
        recs = [by_id[i] for i in splits[name]]
        counts[name] = len(recs)
        if not recs:
            continue
        total, total_sq = _write_split(name, recs, raw, out, p, tokenizer)
        if name == "train":
            n = len(recs) * p.image_size * p.image_size
            mean = total / n
            std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
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
