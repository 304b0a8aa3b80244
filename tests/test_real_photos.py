"""Real-photo paths end to end: a COCO smoke run on coco-mini, a Flickr8k-style CSV, and
img2dataset-style WebDataset shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import evaluate, export, infer, ingest, preprocess, train
from tasks.common.config import validate

from .conftest import tiny_params_dict

pytestmark = pytest.mark.slow


def _run_all(params, root: Path) -> dict:
    ingest.run(params, root)
    preprocess.run(params, root)
    train.run(params, root)
    evaluate.run(params, root)
    export.run(params, root)
    infer.run(params, root)
    return json.loads((root / params.paths.metrics).read_text())


def test_coco_mini_smoke(tmp_path: Path, coco_mini: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = validate(
        tiny_params_dict(
            ingest={
                "source": "coco",
                "coco": {
                    "images_dir": str(coco_mini / "val2017"),
                    "captions_json": str(coco_mini / "annotations" / "captions_val2017.json"),
                },
            },
            preprocess={"image_size": 64, "vocab_size": 2000},
            train={"epochs": 1, "max_steps": None},
        )
    )
    metrics = _run_all(params, tmp_path)
    assert metrics["test_size"]["images"] == 20  # 25% of 79 images
    parity = json.loads((tmp_path / params.paths.export_report).read_text())["parity"]
    assert parity["passed"], parity
    summary = json.loads((tmp_path / params.paths.infer / "summary.json").read_text())
    assert summary["images"] == 79 and summary["errors"] == 0


def test_csv_dataset_end_to_end(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "flickr"
    (src / "Images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["image,caption"]
    colours = ["red", "green", "blue", "yellow"]
    for i in range(24):
        c = i % 4
        pixels = np.zeros((40, 56, 3), np.uint8)
        pixels[..., c % 3] = 200
        pixels += rng.integers(0, 40, pixels.shape, dtype=np.uint8)
        Image.fromarray(pixels).save(src / "Images" / f"{i:04d}.jpg")
        rows += [f"{i:04d}.jpg,a {colours[c]} photo number {i} take {k}" for k in range(5)]
    (src / "captions.txt").write_text("\n".join(rows) + "\n")
    params = validate(
        tiny_params_dict(
            ingest={
                "source": "csv",
                "csv": {"path": str(src / "captions.txt"), "image_root": str(src / "Images")},
            }
        )
    )
    metrics = _run_all(params, tmp_path)
    assert metrics["test_size"] == {"images": 6, "captions": 30}
    assert 0 <= metrics["test"]["t2i_R1"] <= 1


def test_webdataset_source_end_to_end(tmp_path: Path, monkeypatch):
    """Shards as img2dataset writes them (jpg + txt + json per sample), by brace pattern."""
    import io
    import tarfile

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    src = tmp_path / "wds"
    src.mkdir()
    rng = np.random.default_rng(1)
    colours = ["red", "green", "blue"]
    for shard in range(3):
        with tarfile.open(src / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * 8, shard * 8 + 8):
                pixels = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
                pixels[..., i % 3] += 180
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG")
                caption = f"a {colours[i % 3]} square, photo {i}"
                for ext, data in (
                    ("jpg", buf.getvalue()),
                    ("txt", caption.encode()),
                    ("json", b"{}"),
                ):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    params = validate(
        tiny_params_dict(
            ingest={"source": "webdataset", "webdataset": {"urls": str(src / "{00000..00002}.tar")}}
        )
    )
    metrics = _run_all(params, tmp_path)
    assert metrics["test_size"] == {"images": 6, "captions": 6}
    counts = json.loads((tmp_path / params.paths.ingest_report).read_text())
    assert (counts["input_items"], counts["accepted"], counts["quarantined"]) == (24, 24, 0)
    summary = json.loads((tmp_path / params.paths.infer / "summary.json").read_text())
    assert summary["images"] == 24 and summary["errors"] == 0
