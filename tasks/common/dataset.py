"""The ingested dataset's layout (what ingest writes, preprocess reads): WebDataset tar shards.

  shards/raw-000000.tar ...  per sample `<key>.<jpg|png|...>` (the original bytes) and
                             `<key>.json` (id, captions, source path, sha256); key = the image id
  manifest.json              the shards in order, each with its image ids, sample count and size

The layout of img2dataset and OpenCLIP: DVC hashes hundreds of shards, not a file per image.
Samples are in image-id order across shards, so streaming them gives each split in id order.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "manifest.json"
SHARDS_DIR = "shards"
# A fixed member mtime keeps the shards byte-identical from run to run: the DVC md5 is the data.
SHARD_MTIME = 0.0


class DatasetError(ValueError):
    """The source dataset is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Record:
    """One ingested sample, as its shard's `<key>.json` holds it."""

    image_id: int
    source_path: str  # the image as the source named it
    captions: list[str]
    sha256: str


@dataclass(frozen=True)
class RawSample:
    record: Record
    ext: str
    data: bytes  # the original encoded image


def sample_key(image_id: int) -> str:
    return f"{image_id:09d}"


def read_manifest(raw: Path) -> dict:
    path = Path(raw) / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(f"no manifest at {path}: run the ingest stage first")
    return json.loads(path.read_text())


def image_ids(raw: Path) -> list[int]:
    """Every ingested image id, from the manifest alone (no shard is opened)."""
    return [i for shard in read_manifest(raw)["shards"] for i in shard["ids"]]


def shard_paths(raw: Path) -> list[Path]:
    return [Path(raw) / s["path"] for s in read_manifest(raw)["shards"]]


def _sample(shard: Path, key: str, members: dict[str, bytes]) -> RawSample:
    meta = members.pop("json", None)
    if meta is None or len(members) != 1:
        raise DatasetError(f"{shard}: sample {key} needs one image and one .json member")
    ((ext, data),) = members.items()
    return RawSample(Record(**json.loads(meta)), ext, data)


def iter_raw(raw: Path) -> Iterator[RawSample]:
    """The ingested samples, streamed shard by shard in image-id order."""
    import tarfile

    for shard in shard_paths(raw):
        with tarfile.open(shard) as tar:
            key, members = None, {}
            for member in tar:
                name, _, ext = member.name.partition(".")
                if name != key and members:
                    yield _sample(shard, key, members)
                    members = {}
                key = name
                members[ext] = tar.extractfile(member).read()
            if members:
                yield _sample(shard, key, members)


def iter_records(raw: Path) -> Iterator[Record]:
    """Every sample's record, in image-id order, without reading its image (tar skips it)."""
    import tarfile

    for shard in shard_paths(raw):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    yield Record(**json.loads(tar.extractfile(member).read()))
