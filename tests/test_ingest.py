import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tasks.common.config import CocoSource, CsvSource, IngestParams
from tasks.common.dataset import DatasetError, Record, iter_raw, read_manifest
from tasks.ingest import ingest as _ingest


def ingest(p: IngestParams, out: Path):
    return _ingest(p, out, Path(f"{out}.quarantine.jsonl"))


def _params(**kw) -> IngestParams:
    return IngestParams(num_images=12, image_size=48, **kw)


def read_records(raw: Path) -> list[Record]:
    return [s.record for s in iter_raw(raw)]


def test_builtin_is_deterministic_in_webdataset_shards(tmp_path: Path):
    a = ingest(_params(seed=7, shard_samples=5), tmp_path / "a")
    ingest(_params(seed=7, shard_samples=5), tmp_path / "b")
    assert a.num_images == 12 and a.num_captions == 60
    manifest = read_manifest(tmp_path / "a")
    assert [(s["path"], s["ids"]) for s in manifest["shards"]] == [
        ("shards/raw-000000.tar", [0, 1, 2, 3, 4]),
        ("shards/raw-000001.tar", [5, 6, 7, 8, 9]),
        ("shards/raw-000002.tar", [10, 11]),
    ]
    for shard in manifest["shards"]:  # byte-identical: the DVC md5 is the data version
        assert (tmp_path / "a" / shard["path"]).read_bytes() == (
            tmp_path / "b" / shard["path"]
        ).read_bytes()
    with tarfile.open(tmp_path / "a" / "shards" / "raw-000000.tar") as tar:
        assert tar.getnames()[:2] == ["000000000.json", "000000000.png"]  # img2dataset layout
    samples = list(iter_raw(tmp_path / "a"))
    assert [s.record.image_id for s in samples] == list(range(12))
    first = samples[0]
    assert first.record.sha256 == hashlib.sha256(first.data).hexdigest() and first.ext == "png"
    assert first.record.source_path == "000000.png" and len(first.record.captions) == 5
    assert Path(f"{tmp_path / 'a'}.quarantine.jsonl").read_text() == ""
    with Image.open(io.BytesIO(first.data)) as img:
        assert img.size == (48, 48)


def test_builtin_captions_are_varied(tmp_path: Path):
    ingest(_params(seed=1), tmp_path / "raw")
    records = read_records(tmp_path / "raw")
    assert all(len(set(r.captions)) == 5 for r in records)
    words = {w for r in records for c in r.captions for w in c.split()}
    assert {"left", "right"} & words and len(words) > 40
    other = ingest(_params(seed=2), tmp_path / "other")
    assert other.num_images == 12
    assert read_records(tmp_path / "other")[0].sha256 != records[0].sha256


def test_coco_source_on_coco_mini(tmp_path: Path, coco_mini: Path):
    src = CocoSource(
        images_dir=str(coco_mini / "val2017"),
        captions_json=str(coco_mini / "annotations" / "captions_val2017.json"),
    )
    res = ingest(IngestParams(source="coco", coco=src), tmp_path / "raw")
    records = read_records(tmp_path / "raw")
    assert res.num_images == 79 == len(records)
    assert all(len(r.captions) >= 5 for r in records)
    assert records[0].source_path.endswith(".jpg")


def _csv_dataset(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "flickr"
    (root / "Images").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(3):
        Image.new("RGB", (20, 30), (i * 60, 10, 10)).save(root / "Images" / f"im{i}.jpg")
        rows += [f'im{i}.jpg,"a photo, number {i} variant {k}"' for k in range(5)]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    return root / "captions.txt", root / "Images"


def test_csv_source(tmp_path: Path):
    path, images = _csv_dataset(tmp_path)
    res = ingest(
        IngestParams(source="csv", csv=CsvSource(path=str(path), image_root=str(images))),
        tmp_path / "out",
    )
    records = read_records(tmp_path / "out")
    assert res.num_images == 3 and res.num_captions == 15
    assert records[1].captions[0] == "a photo, number 1 variant 0"  # quoted commas survive


def test_csv_missing_image_is_quarantined(tmp_path: Path):
    path, images = _csv_dataset(tmp_path)
    (images / "im2.jpg").unlink()
    src = CsvSource(path=str(path), image_root=str(images))
    with pytest.raises(DatasetError, match=r"5 of 15 input items .* see .*o.quarantine.jsonl"):
        ingest(IngestParams(source="csv", csv=src), tmp_path / "o")
    res = ingest(IngestParams(source="csv", csv=src, max_bad_fraction=0.5), tmp_path / "o")
    assert (res.accepted, res.quarantined, res.num_images) == (10, 5, 2)
    lines = Path(f"{tmp_path / 'o'}.quarantine.jsonl").read_text().splitlines()
    assert all("im2.jpg" in line and "not found" in line for line in lines) and len(lines) == 5


def test_csv_bad_header(tmp_path: Path):
    bad = tmp_path / "c.csv"
    bad.write_text("file,text\na.jpg,hello\n")
    with pytest.raises(DatasetError, match="'image' and 'caption'"):
        ingest(
            IngestParams(source="csv", csv=CsvSource(path=str(bad), image_root=str(tmp_path))),
            tmp_path / "o",
        )


def test_coco_missing_keys_and_files(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    cap = tmp_path / "c.json"
    cap.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}], "annotations": []}))
    src = CocoSource(images_dir=str(tmp_path / "imgs"), captions_json=str(cap))
    with pytest.raises(DatasetError, match="1 of 1 input items"):
        ingest(IngestParams(source="coco", coco=src), tmp_path / "o")
    cap.write_text(json.dumps({"pictures": []}))
    with pytest.raises(DatasetError, match="'images' and 'annotations'"):
        ingest(IngestParams(source="coco", coco=src), tmp_path / "o")
