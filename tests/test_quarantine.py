"""Ingest validation: a corpus holding every bad case, with each input item accounted for."""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tasks.common.config import CocoSource, CsvSource, IngestParams, WebDatasetSource
from tasks.common.dataset import DatasetError, iter_raw
from tasks.ingest import ingest
from xmodal_runtime.images import open_rgb

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(color=(200, 30, 30), size=(24, 16), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="JPEG", **save)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header claims width x height pixels (400 M by default), in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _good_images() -> dict[str, bytes]:
    """Every mode the issue names, each a valid image."""
    p = Image.new("P", (8, 8), 3)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    return {
        "rgb.jpg": _jpeg(),
        "grey.png": _png(Image.new("L", (8, 8), 100)),
        "la.png": _png(Image.new("LA", (8, 8), (100, 0))),
        "palette.png": _png(p),
        "rgba.png": _png(Image.new("RGBA", (8, 8), (10, 20, 30, 128))),
        "cmyk.jpg": _jpeg((0, 0, 0, 0), mode="CMYK"),
        "deep.png": _png(Image.fromarray(np.full((8, 8), 40000, np.uint16))),
        "sub/nested.jpg": _jpeg((0, 200, 0)),
    }


def _bad_images(root: Path, outside: Path) -> dict[str, str]:
    """Name as listed -> the reason's key word. Writes the files (or links) under `root`."""
    (root / "truncated.jpg").write_bytes(_jpeg(size=(64, 64))[:300])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all\n")
    (root / "bomb.png").write_bytes(bomb_png())  # past Pillow's own guard (2 x its warning)
    (root / "big.png").write_bytes(bomb_png(10_000, 10_000))  # past ingest.max_pixels only
    (root / "escape.jpg").symlink_to(outside)
    return {
        "truncated.jpg": "truncated",
        "empty.jpg": "empty",
        "text.jpg": "cannot decode",
        "bomb.png": "decompression bomb",
        "big.png": "over the limit",
        "escape.jpg": "symlink",
        "missing.jpg": "not found",
        str(outside): "absolute",
        f"../{outside.name}": "'..'",
    }


def _corpus(tmp_path: Path) -> tuple[Path, Path, int, dict[str, str]]:
    """A CSV source with every bad case. Returns (csv, image root, input items, expectations)."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(_jpeg((1, 2, 3)))  # decodable: only the path check may refuse it
    for name, data in _good_images().items():
        (root / name).write_bytes(data)
    (root / "inside_link.jpg").symlink_to(root / "rgb.jpg")  # a link that stays inside is fine
    bad = _bad_images(root, outside)
    raw = b"image,caption\n"
    good = [*_good_images(), "inside_link.jpg"]
    for name in good:
        raw += f"{name},a photo of {name}\n{name},another view of {name}\n".encode()
    for name in bad:
        raw += f"{name},a caption for {name}\n".encode()
    raw += b"rgb.jpg,   \n"  # empty after stripping
    raw += b"rgb.jpg\n"  # short row
    raw += b"rgb.jpg,a caption,an extra field\n"  # long row
    raw += b"rgb.jpg,caf\xe9 latin-1 bytes\n"  # not UTF-8
    raw += b"rgb.jpg,a photo of rgb.jpg\n"  # a duplicate pair
    raw += b'rgb.jpg,"a caption, quoted, spanning\ntwo lines"\n'  # valid
    (tmp_path / "captions.csv").write_bytes(raw)
    expected = {**bad, "line 29": "empty", "line 30": "fields", "line 31": "fields"}
    expected |= {"line 32": "UTF-8", "line 33": "duplicate of line 2"}
    items = 2 * len(good) + len(bad) + 6
    return tmp_path / "captions.csv", root, items, expected


def _csv_params(csv_path: Path, root: Path, **kw) -> IngestParams:
    src = CsvSource(path=str(csv_path), image_root=str(root))
    return IngestParams(source="csv", csv=src, max_bad_fraction=0.5, **kw)


def _report(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_item_is_accepted_or_quarantined(tmp_path: Path, workers: int):
    csv_path, root, items, expected = _corpus(tmp_path)
    q = tmp_path / "reports" / "quarantine.jsonl"
    res = ingest(_csv_params(csv_path, root, workers=workers), tmp_path / "raw", q)
    assert res.input_items == items == res.accepted + res.quarantined
    lines = _report(q)
    assert len(lines) == res.quarantined == 14
    by_name = {line["item"]["row"][0]: line for line in lines}
    for name, word in expected.items():
        if name.startswith("line "):
            (hit,) = [line for line in lines if line["where"] == name]
        else:
            hit = by_name[name]
        assert word.lower() in hit["reason"].lower(), (name, hit)
        assert hit["source"] == str(csv_path)
    assert {"row": ["rgb.jpg", "caf\\xe9 latin-1 bytes"]} in [line["item"] for line in lines]
    records = [s.record for s in iter_raw(tmp_path / "raw")]
    assert len(records) == 9 and res.num_captions == 19
    multi = [r for r in records if r.source_path == "rgb.jpg"][0]
    assert "a caption, quoted, spanning\ntwo lines" in multi.captions
    assert "sub/nested.jpg" in {r.source_path for r in records}
    corpus = {"captions.csv", "secret.jpg"}
    written = {
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_relative_to(root) and p.name not in corpus
    }  # nothing is written outside the stage's outputs
    assert written == {"raw/manifest.json", "raw/shards/raw-000000.tar", "reports/quarantine.jsonl"}


def test_fraction_over_the_limit_fails_naming_the_report(tmp_path: Path):
    csv_path, root, _, _ = _corpus(tmp_path)
    q = tmp_path / "q.jsonl"
    with pytest.raises(DatasetError, match=r"14 of 33 input items .*max_bad_fraction=0.1: see .*q"):
        ingest(
            _csv_params(csv_path, root).model_copy(update={"max_bad_fraction": 0.1}),
            tmp_path / "o",
            q,
        )
    assert len(_report(q)) == 14  # the report is complete even when the stage fails


def test_cli_prints_one_line_and_no_traceback(tmp_path: Path):
    csv_path, root, _, _ = _corpus(tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["ingest"] |= {"source": "csv", "workers": 1, "max_bad_fraction": 0.1}
    params["ingest"]["csv"] = {"path": str(csv_path), "image_root": str(root)}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    run = subprocess.run(
        [sys.executable, "-m", "tasks.ingest", "--params", str(tmp_path / "params.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    err = [line for line in run.stderr.splitlines() if line.startswith("stage ingest failed")]
    assert len(err) == 1 and "reports/quarantine.jsonl" in err[0], run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads((tmp_path / "reports" / "ingest.json").read_text())
    assert summary["input_items"] == summary["accepted"] + summary["quarantined"] == 33


def test_coco_annotation_problems_are_itemised(tmp_path: Path):
    root = tmp_path / "val"
    root.mkdir()
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(_jpeg((i * 50, 0, 0)))
    (tmp_path / "outside.jpg").write_bytes(_jpeg())
    images = [
        {"id": 0, "file_name": "0.jpg"},
        {"id": 1, "file_name": "1.jpg"},
        {"id": 1, "file_name": "2.jpg"},  # duplicate id: the first entry is kept
        {"id": 3, "file_name": "3.jpg"},  # no caption at all
        {"id": 4, "file_name": "../outside.jpg"},
        {"id": 5, "file_name": str(tmp_path / "outside.jpg")},
        {"file_name": "2.jpg"},  # no id
    ]
    annotations = [
        {"image_id": 0, "caption": "a red thing"},
        {"image_id": 0, "caption": "a red thing "},  # duplicate after stripping
        {"image_id": 1, "caption": "a darker thing"},
        {"image_id": 1, "caption": ""},
        {"image_id": 9, "caption": "nobody's caption"},
        {"image_id": 4, "caption": "an escape"},
        {"image_id": 5, "caption": "an absolute path"},
        {"caption": "no image id"},
    ]
    cap = tmp_path / "captions.json"
    cap.write_text(json.dumps({"images": images, "annotations": annotations}))
    src = CocoSource(images_dir=str(root), captions_json=str(cap))
    q = tmp_path / "q.jsonl"
    res = ingest(IngestParams(source="coco", coco=src, max_bad_fraction=1.0), tmp_path / "o", q)
    assert res.input_items == 15 == res.accepted + res.quarantined
    assert (res.accepted, res.num_images, res.num_captions) == (4, 2, 2)
    reasons = {line["where"]: line["reason"] for line in _report(q)}
    assert "duplicate image id 1" in reasons["images[2]"]
    assert "no non-empty caption" in reasons["images[3]"]
    assert "'..'" in reasons["images[4]"] and "'..'" in reasons["annotations[5]"]
    assert "absolute" in reasons["images[5]"]
    assert "'id'" in reasons["images[6]"]
    assert "duplicate caption" in reasons["annotations[1]"]
    assert "empty caption" in reasons["annotations[3]"]
    assert "unknown image id 9" in reasons["annotations[4]"]
    assert "'image_id'" in reasons["annotations[7]"]
    assert not (tmp_path / "o" / "outside.jpg").exists()


def test_every_mode_decodes_to_the_expected_rgb():
    expected = {
        "rgb.jpg": (200, 30, 30),
        "grey.png": (100, 100, 100),
        "la.png": (255, 255, 255),  # fully transparent: the white background, not the grey
        "palette.png": (0, 0, 255),  # index 3 of the palette
        "rgba.png": (132, 137, 142),  # alpha 128 over white: 10 * 128/255 + 255 * 127/255 = 132
        "cmyk.jpg": (255, 255, 255),  # no ink
        "deep.png": (156, 156, 156),  # 40000 / 257, scaled rather than clipped to 255
        "sub/nested.jpg": (0, 200, 0),
    }
    for name, data in _good_images().items():
        img, ext = open_rgb(data)
        assert img.mode == "RGB" and ext == name.rsplit(".", 1)[1]
        got = np.asarray(img)[4, 4].astype(int)
        assert np.abs(got - expected[name]).max() <= 3, (name, got)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out, _ = open_rgb(buf.getvalue())
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def _img2dataset_shards(folder: Path) -> str:
    """Two shards in img2dataset's layout (jpg + txt + json per sample), with bad samples."""
    import tarfile

    folder.mkdir()
    samples = [
        [("jpg", _jpeg((k * 20, 0, 0))), ("txt", f"photo number {k}".encode()), ("json", b"{}")]
        for k in range(6)
    ]
    samples[1][0] = ("jpg", _jpeg()[:200])  # truncated
    samples[2] = samples[2][:1] + samples[2][2:]  # no caption
    samples[3][1] = ("txt", b"   ")  # empty caption
    for shard in range(2):
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for k in range(3 * shard, 3 * shard + 3):
                for ext, data in samples[k]:
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / "shard-{00000..00001}.tar")


def test_webdataset_source_validates_like_the_others(tmp_path: Path):
    urls = _img2dataset_shards(tmp_path / "wds")
    src = WebDatasetSource(urls=urls)
    q = tmp_path / "q.jsonl"
    res = ingest(
        IngestParams(source="webdataset", webdataset=src, max_bad_fraction=0.5), tmp_path / "o", q
    )
    assert (res.input_items, res.accepted, res.quarantined) == (6, 3, 3)
    reasons = {line["item"]["key"]: line["reason"] for line in _report(q)}
    assert "truncated" in reasons["000000001"].lower()
    assert "no caption" in reasons["000000002"]
    assert "no non-empty caption" in reasons["000000003"]
    samples = list(iter_raw(tmp_path / "o"))
    assert [s.record.captions for s in samples] == [[f"photo number {k}"] for k in (0, 4, 5)]
    assert samples[1].record.source_path.endswith("shard-00001.tar:000000004")
    # this project's own shards are a webdataset source too: a round trip keeps every sample
    again = WebDatasetSource(urls=str(tmp_path / "o" / "shards" / "raw-000000.tar"))
    res2 = ingest(IngestParams(source="webdataset", webdataset=again), tmp_path / "o2", q)
    assert (res2.accepted, res2.quarantined) == (3, 0)
    assert [s.data for s in iter_raw(tmp_path / "o2")] == [s.data for s in samples]


@pytest.mark.slow
def test_validation_and_decoding_on_dask_match_a_local_run(tmp_path: Path):
    from dask.distributed import LocalCluster

    from tasks.common.config import PreprocessParams
    from tasks.preprocess import preprocess

    csv_path, root, _, _ = _corpus(tmp_path)
    local = _csv_params(csv_path, root, workers=1)
    pre = PreprocessParams(image_size=16, test_fraction=0.25, workers=1)
    ingest(local, tmp_path / "raw_local", tmp_path / "q_local.jsonl")
    preprocess(pre, None, tmp_path / "raw_local", tmp_path / "prep_local")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        on_dask = local.model_copy(update={"dask_address": address})
        ingest(on_dask, tmp_path / "raw_dask", tmp_path / "q_dask.jsonl")
        pre_dask = pre.model_copy(update={"dask_address": address})
        preprocess(pre_dask, None, tmp_path / "raw_dask", tmp_path / "prep_dask")
    same = [
        "raw_{}/shards/raw-000000.tar",
        "raw_{}/manifest.json",
        "q_{}.jsonl",
        "prep_{}/train/images_000.npy",
        "prep_{}/test/input_ids_000.npy",
    ]
    for rel in same:
        local_bytes = (tmp_path / rel.format("local")).read_bytes()
        assert local_bytes == (tmp_path / rel.format("dask")).read_bytes(), rel


@pytest.mark.slow
def test_xmodal_run_ends_a_data_error_in_one_line(tmp_path: Path):
    from .conftest import make_repo

    repo = make_repo(tmp_path / "repo")
    params = (repo / "params.yaml").read_bytes()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "c.csv").write_text(
        "image,caption\nnope.jpg,a caption\n/etc/hostname,x\n"
    )
    cmd = [
        sys.executable, "-m", "cli", "run",
        "-S", "ingest.source=csv",
        "-S", f"ingest.csv.path={tmp_path / 'photos' / 'c.csv'}",
        "-S", f"ingest.csv.image_root={tmp_path / 'photos'}",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: stage ingest failed: DatasetError: 2 of 2 input items"), line
    assert line.endswith("reports/quarantine.jsonl")
    assert "╭" not in done.stderr  # no rich traceback box from the CLI itself
    lines = (repo / "reports" / "quarantine.jsonl").read_text().splitlines()
    assert ["absolute" in x for x in lines].count(True) == 1 and len(lines) == 2
    # The failed run's overrides did not stay; its quarantine list did (it names the bad rows).
    assert (repo / "params.yaml").read_bytes() == params
