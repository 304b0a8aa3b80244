"""The ingested dataset's layout (what ingest writes, preprocess reads): COCO captions plus a
manifest of image id, relative path, captions and sha256 per image."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CAPTIONS_FILE = "captions.json"
MANIFEST_FILE = "manifest.jsonl"
IMAGES_DIR = "images"


class DatasetError(ValueError):
    """The source dataset is malformed; the message names the file and the problem."""


@dataclass(frozen=True)
class Record:
    image_id: int
    path: str  # relative to the folder holding the manifest
    captions: list[str]
    sha256: str


def read_manifest(raw: Path) -> list[Record]:
    path = Path(raw) / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(f"no manifest at {path}: run the ingest stage first")
    with open(path) as f:
        return [Record(**json.loads(line)) for line in f if line.strip()]
