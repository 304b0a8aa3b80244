"""Ingest's sources, read leniently: every input item becomes a `Candidate` sample or a `Reject`.

An input item is the unit a source gives: a built-in image, a CSV row, a COCO image entry or
annotation, a WebDataset sample. Problems in the annotation files are rejected item by item
(with their line or index), so one bad row never hides the next. Only a file that cannot be read
at all is fatal.

Duplicates, as documented in the README: a repeated (image, caption) pair and a repeated COCO
image id are quarantined, and the first occurrence is kept.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from tasks.common.config import CocoSource, CsvSource, IngestParams, WebDatasetSource
from tasks.common.dataset import DatasetError
from tasks.common.samples import Builtin, Candidate, Reject

Event = Candidate | Reject


def builtin_source(p: IngestParams) -> Iterator[Event]:
    recipe = (p.seed, p.image_size, p.captions_per_image, p.min_objects, p.max_objects)
    for i in range(p.num_images):
        item = ("image", {"index": i})
        yield Candidate(i, f"{i:06d}.png", "builtin", [item], data=Builtin(i, *recipe))


def _load_coco(path: Path) -> tuple[list, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"captions file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid UTF-8 JSON: {err}") from None
    if not isinstance(data, dict) or not {"images", "annotations"} <= set(data):
        raise DatasetError(f"{path}: expected COCO keys 'images' and 'annotations'")
    if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
        raise DatasetError(f"{path}: 'images' and 'annotations' must be lists")
    return data["images"], data["annotations"]


def _coco_field(entry, key: str, kind: type):
    value = entry.get(key) if isinstance(entry, dict) else None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise KeyError(key)
    if kind is str and not isinstance(value, str):
        raise KeyError(key)
    return value


def _coco_entries(images: list, src: str) -> Iterator[Reject | tuple[int, str, tuple]]:
    first: dict[int, int] = {}
    for i, entry in enumerate(images):
        where = f"images[{i}]"
        try:
            image_id, name = _coco_field(entry, "id", int), _coco_field(entry, "file_name", str)
        except KeyError as err:
            yield Reject(src, where, entry, f"image entry lacks a valid {err.args[0]!r}")
            continue
        if image_id in first:
            reason = f"duplicate image id {image_id} (first at images[{first[image_id]}], kept)"
            yield Reject(src, where, entry, reason)
            continue
        first[image_id] = i
        yield image_id, name, (where, entry)


def coco_source(s: CocoSource) -> Iterator[Event]:
    path, src = Path(s.captions_json), str(s.captions_json)
    images, annotations = _load_coco(path)
    entries = {}
    for e in _coco_entries(images, src):
        if isinstance(e, Reject):
            yield e
        else:
            entries[e[0]] = e
    caps: dict[int, list[tuple[tuple, str]]] = defaultdict(list)
    seen: dict[tuple[int, str], int] = {}
    for j, ann in enumerate(annotations):
        where = f"annotations[{j}]"
        try:
            image_id, text = _coco_field(ann, "image_id", int), _coco_field(ann, "caption", str)
        except KeyError as err:
            yield Reject(src, where, ann, f"annotation lacks a valid {err.args[0]!r}")
            continue
        text = text.strip()
        if image_id not in entries:
            yield Reject(src, where, ann, f"annotation for unknown image id {image_id}")
        elif not text:
            yield Reject(src, where, ann, "empty caption")
        elif (image_id, text) in seen:
            first = seen[image_id, text]
            reason = f"duplicate caption of image id {image_id} (first: annotations[{first}])"
            yield Reject(src, where, ann, reason)
        else:
            seen[image_id, text] = j
            caps[image_id].append(((where, ann), text))
    for image_id in sorted(entries):
        _, name, entry = entries[image_id]
        pairs = caps.get(image_id, [])
        items = [entry, *(item for item, _ in pairs)]
        captions = [text for _, text in pairs]
        yield Candidate(image_id, name, src, items, captions, root=str(s.images_dir))


def _printable(field: str) -> str:
    # Undecodable bytes (kept as surrogates) shown as \xNN, so the report line is valid JSON.
    return field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first line number, fields) of each data row; the header is checked and skipped."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    except FileNotFoundError:
        raise DatasetError(f"csv file not found: {path}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    end = 0
    try:
        for row in reader:
            start, end = end + 1, reader.line_num
            if row:  # a blank line is no item
                yield start, row
    except csv.Error as err:
        raise DatasetError(f"{path}:{end + 1}: unreadable CSV: {err}") from None


def csv_source(s: CsvSource) -> Iterator[Event]:
    path, src = Path(s.path), str(s.path)
    rows = _csv_rows(path)
    _, header = next(rows, (0, []))
    if not {"image", "caption"} <= set(h.strip() for h in header):
        raise DatasetError(f"{path}: header must have columns 'image' and 'caption'")
    cols = [h.strip() for h in header]
    at_image, at_caption = cols.index("image"), cols.index("caption")
    groups: dict[str, list[tuple[tuple, str]]] = defaultdict(list)
    seen: dict[tuple[str, str], int] = {}
    for line, row in rows:
        where, item = f"line {line}", {"row": [_printable(f) for f in row]}
        if any("\udc80" <= ch <= "\udcff" for f in row for ch in f):
            yield Reject(src, where, item, "not valid UTF-8")
        elif len(row) != len(cols):
            yield Reject(src, where, item, f"{len(row)} fields where the header has {len(cols)}")
        elif not row[at_image].strip() or not row[at_caption].strip():
            yield Reject(src, where, item, "empty image name or caption")
        elif (key := (row[at_image].strip(), row[at_caption].strip())) in seen:
            yield Reject(src, where, item, f"duplicate of line {seen[key]}")
        else:
            seen[key] = line
            groups[key[0]].append(((where, item), key[1]))
    for i, name in enumerate(sorted(groups)):
        pairs = groups[name]
        items, captions = [item for item, _ in pairs], [text for _, text in pairs]
        yield Candidate(i, name, src, items, captions, root=str(s.image_root))


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def _wds_captions(sample: dict) -> list[str] | None:
    """img2dataset puts the caption in `.txt`; our own shards list them in `.json`."""
    if "txt" in sample:
        return [sample["txt"].decode("utf-8", "replace")]
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except ValueError:
        return None
    caps = meta.get("captions", meta.get("caption")) if isinstance(meta, dict) else None
    caps = [caps] if isinstance(caps, str) else caps
    return caps if isinstance(caps, list) and all(isinstance(c, str) for c in caps) else None


def webdataset_source(s: WebDatasetSource) -> Iterator[Event]:
    """Samples of existing WebDataset shards (img2dataset, OpenCLIP, or this project's own):
    local paths, brace patterns (`shards/{00000..00099}.tar`) or URLs, via the webdataset package.
    A shard that cannot be read is one quarantined item naming it; reading goes on."""
    import webdataset as wds

    failures: list[Exception] = []

    def keep_going(err: Exception) -> bool:
        failures.append(err)
        return True

    samples = wds.WebDataset(s.urls, shardshuffle=False, handler=keep_going, empty_check=False)
    image_id = 0
    for sample in samples:
        while failures:
            err = failures.pop(0)
            yield Reject(s.urls, "shard", {"urls": s.urls}, f"unreadable: {err}")
        where = f"{sample.get('__url__', s.urls)}:{sample['__key__']}"
        item = {"key": sample["__key__"], "members": sorted(k for k in sample if k[0] != "_")}
        images = [ext for ext in IMAGE_EXTENSIONS if ext in sample]
        captions = _wds_captions(sample)
        if len(images) != 1:
            yield Reject(where, "sample", item, f"{len(images)} image members, expected 1")
        elif captions is None:
            yield Reject(where, "sample", item, "no caption (.txt, or .json 'caption(s)')")
        else:
            data = sample[images[0]]
            yield Candidate(image_id, where, where, [("sample", item)], captions, data=data)
            image_id += 1
    for err in failures:
        yield Reject(s.urls, "shard", {"urls": s.urls}, f"unreadable: {err}")


def events(p: IngestParams) -> Iterator[Event]:
    """Every input item of the source `p` names, as candidate samples or rejects."""
    if p.source == "coco":
        return coco_source(p.coco)
    if p.source == "csv":
        return csv_source(p.csv)
    if p.source == "webdataset":
        return webdataset_source(p.webdataset)
    return builtin_source(p)
