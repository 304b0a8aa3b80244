"""ingest: materialise a captioned-image dataset in COCO captions layout plus a manifest.

Sources: the built-in procedural dataset, a COCO captions folder, or an `image,caption` CSV
(Flickr8k / OpenCLIP layout). All three end as `images/` + `captions.json` read by one COCO
reader, and `manifest.jsonl` (image id, relative path, captions, sha256). DVC versions the folder;
its md5 in dvc.lock is the data version.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import stage, synthetic
from tasks.common.config import CocoSource, CsvSource, IngestParams, Params
from tasks.common.dataset import (
    CAPTIONS_FILE,
    IMAGES_DIR,
    MANIFEST_FILE,
    DatasetError,
    Record,
)


@dataclass(frozen=True)
class IngestResult:
    num_images: int
    num_captions: int
    out: str


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_coco(out: Path, images: list[dict], annotations: list[dict]) -> Path:
    path = out / CAPTIONS_FILE
    path.write_text(json.dumps({"images": images, "annotations": annotations}, indent=0))
    return path


def read_coco(images_dir: Path, captions_json: Path) -> list[Record]:
    """Read a COCO captions file; every image must exist and have at least one caption."""
    try:
        data = json.loads(Path(captions_json).read_text())
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {captions_json}") from None
    except json.JSONDecodeError as err:
        raise DatasetError(f"{captions_json} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise DatasetError(f"{captions_json}: expected COCO keys 'images' and 'annotations'")
    captions: dict[int, list[str]] = defaultdict(list)
    for i, ann in enumerate(data["annotations"]):
        try:
            text = str(ann["caption"]).strip()
            captions[int(ann["image_id"])].append(text)
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{captions_json}: annotation #{i} lacks image_id/caption") from None
    records, missing, uncaptioned = [], [], []
    for i, img in enumerate(data["images"]):
        try:
            image_id, file_name = int(img["id"]), str(img["file_name"])
        except (KeyError, TypeError, ValueError):
            raise DatasetError(f"{captions_json}: image entry #{i} lacks id/file_name") from None
        path = Path(images_dir) / file_name
        if not path.is_file():
            missing.append(file_name)
            continue
        caps = [c for c in captions.get(image_id, []) if c]
        if not caps:
            uncaptioned.append(file_name)
            continue
        records.append(Record(image_id, file_name, caps, sha256_file(path)))
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) listed in {captions_json} are missing from {images_dir}: "
            f"{missing[:5]}"
        )
    if uncaptioned:
        raise DatasetError(f"{len(uncaptioned)} image(s) have no caption: {uncaptioned[:5]}")
    known = {r.image_id for r in records}
    orphans = sorted(set(captions) - known)
    if orphans:
        raise DatasetError(f"captions refer to unknown image ids: {orphans[:5]}")
    if not records:
        raise DatasetError(f"{captions_json} lists no images")
    return sorted(records, key=lambda r: r.image_id)


def _generate_builtin(p: IngestParams, out: Path) -> None:
    images, annotations = [], []
    for i in stage.progress(range(p.num_images), desc="ingest: generating", unit="img"):
        img, caps = synthetic.generate(
            i, p.seed, p.image_size, p.captions_per_image, p.min_objects, p.max_objects
        )
        name = f"{i:06d}.png"
        img.save(out / IMAGES_DIR / name, format="PNG")
        images.append({"id": i, "file_name": name, "width": p.image_size, "height": p.image_size})
        annotations += [
            {"id": len(annotations) + j, "image_id": i, "caption": c} for j, c in enumerate(caps)
        ]
    write_coco(out, images, annotations)


def _copy_images(pairs: list[tuple[Path, str]], out: Path) -> None:
    for src, rel in stage.progress(pairs, desc="ingest: copying", unit="img"):
        dst = out / IMAGES_DIR / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _import_coco(src: CocoSource, out: Path) -> None:
    images_dir, captions_json = Path(src.images_dir), Path(src.captions_json)
    records = read_coco(images_dir, captions_json)  # validates before anything is copied
    _copy_images([(images_dir / r.path, r.path) for r in records], out)
    write_coco(
        out,
        [{"id": r.image_id, "file_name": r.path} for r in records],
        [
            {"id": n, "image_id": r.image_id, "caption": c}
            for n, (r, c) in enumerate((r, c) for r in records for c in r.captions)
        ],
    )


def read_csv_captions(path: Path, image_root: Path) -> dict[str, list[str]]:
    """Group `image,caption` rows by image; every image must exist under image_root."""
    if not path.is_file():
        raise DatasetError(f"csv file not found: {path}")
    grouped: dict[str, list[str]] = defaultdict(list)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: header must have columns 'image' and 'caption'")
        for line, row in enumerate(reader, start=2):
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if not image or not caption:
                raise DatasetError(f"{path}:{line}: empty image or caption")
            grouped[image].append(caption)
    if not grouped:
        raise DatasetError(f"{path}: no rows")
    missing = [name for name in grouped if not (image_root / name).is_file()]
    if missing:
        raise DatasetError(
            f"{len(missing)} image(s) named in {path} are missing from {image_root}: {missing[:5]}"
        )
    return dict(grouped)


def _import_csv(src: CsvSource, out: Path) -> None:
    image_root = Path(src.image_root)
    grouped = read_csv_captions(Path(src.path), image_root)
    names = sorted(grouped)
    _copy_images([(image_root / n, n) for n in names], out)
    write_coco(
        out,
        [{"id": i, "file_name": n} for i, n in enumerate(names)],
        [
            {"id": k, "image_id": i, "caption": c}
            for k, (i, c) in enumerate((i, c) for i, n in enumerate(names) for c in grouped[n])
        ],
    )


def ingest(p: IngestParams, out: Path) -> IngestResult:
    """Materialise the dataset chosen by `p.source` under `out` and write its manifest."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / IMAGES_DIR).mkdir(parents=True)
    if p.source == "builtin":
        _generate_builtin(p, out)
    elif p.source == "coco":
        _import_coco(p.coco, out)
    else:
        _import_csv(p.csv, out)
    records = [
        replace(r, path=f"{IMAGES_DIR}/{r.path}")
        for r in read_coco(out / IMAGES_DIR, out / CAPTIONS_FILE)
    ]
    with open(out / MANIFEST_FILE, "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    return IngestResult(len(records), sum(len(r.captions) for r in records), str(out))


def _under(root: Path, path: str | None) -> str | None:
    return None if path is None else str(root / path)  # an absolute path stays as it is


def run(params: Params, root: Path) -> IngestResult:
    coco, table = params.ingest.coco, params.ingest.csv
    p = params.ingest.model_copy(
        update={
            "coco": CocoSource(
                images_dir=_under(root, coco.images_dir),
                captions_json=_under(root, coco.captions_json),
            ),
            "csv": CsvSource(
                path=_under(root, table.path), image_root=_under(root, table.image_root)
            ),
        }
    )
    return ingest(p, root / params.paths.raw)


@task(
    name="ingest",
    cache_policy=NONE,
    **stage.io_retries(2, 10),
    timeout_seconds=3600,
)
def ingest_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("ingest", run, root, force)


if __name__ == "__main__":
    stage.main("ingest", run)
