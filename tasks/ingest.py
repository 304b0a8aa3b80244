"""ingest: validate every input item, quarantine what fails, materialise the rest.

Sources: the built-in procedural dataset, a COCO captions folder, or an `image,caption` CSV
(Flickr8k / OpenCLIP layout), read by tasks/common/sources.py. Each sample is checked on a process
pool (tasks/common/samples.py): its path stays inside the source root, it decodes fully, it is
under `max_pixels`, it has a caption. Accepted samples end as `images/` + `captions.json` (COCO
layout) and `manifest.jsonl` (image id, relative path, captions, sha256); each refused item is a
line of the quarantine report. DVC versions the folder; its md5 in dvc.lock is the data version.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import stage
from tasks.common.config import CocoSource, CsvSource, IngestParams, Params, WebDatasetSource
from tasks.common.dataset import (
    MANIFEST_FILE,
    SHARD_MTIME,
    SHARDS_DIR,
    DatasetError,
    Record,
    sample_key,
)
from tasks.common.samples import Accepted, Candidate, Reject, check_all
from tasks.common.sources import Event, events

log = logging.getLogger("xmodal")


@dataclass(frozen=True)
class IngestResult:
    input_items: int
    accepted: int
    quarantined: int
    num_images: int
    num_captions: int
    quarantine: str
    out: str


class _Quarantine:
    """The quarantine report: one JSON line per refused input item."""

    def __init__(self, f):
        self.f, self.count, self.input_items = f, 0, 0

    def add(self, r: Reject) -> None:
        self.f.write(json.dumps(r.line()) + "\n")
        self.count += 1

    def candidates(self, stream: Iterable[Event]) -> Iterator[Candidate]:
        """The candidates of a source's events; its rejects go straight to the report."""
        for e in stream:
            self.input_items += 1 if isinstance(e, Reject) else len(e.items)
            if isinstance(e, Reject):
                self.add(e)
            else:
                yield e


class _Shards:
    """Accepted samples into WebDataset tar shards of at most `samples` samples or `megabytes`."""

    def __init__(self, out: Path, samples: int, megabytes: int):
        self.out, self.samples, self.max_bytes = out, samples, megabytes * 2**20
        self.writer, self.entries = None, []

    def add(self, a: Accepted) -> None:
        entry = self.entries[-1] if self.entries else None
        if entry is None or entry["samples"] >= self.samples or entry["bytes"] >= self.max_bytes:
            self._roll()
        record = Record(a.image_id, a.name, a.captions, a.sha256)
        meta = json.dumps(asdict(record)).encode()
        self.writer.write({"__key__": sample_key(a.image_id), a.ext: a.data, "json": meta})
        entry = self.entries[-1]
        entry["samples"] += 1
        entry["bytes"] += len(a.data) + len(meta)
        entry["ids"].append(a.image_id)

    def _roll(self) -> None:
        from webdataset import TarWriter

        self.close()
        rel = f"{SHARDS_DIR}/raw-{len(self.entries):06d}.tar"
        # encoder=False: the original bytes as they are; a fixed mtime: byte-identical reruns.
        self.writer = TarWriter(str(self.out / rel), encoder=False, mtime=SHARD_MTIME)
        self.entries.append({"path": rel, "samples": 0, "bytes": 0, "ids": []})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _check_fraction(p: IngestParams, res: IngestResult) -> None:
    if res.input_items == 0:
        raise DatasetError("the source holds no items")
    bad = res.quarantined / res.input_items
    if bad > p.max_bad_fraction or res.accepted == 0:
        raise DatasetError(
            f"{res.quarantined} of {res.input_items} input items ({bad:.1%}) were quarantined, "
            f"over ingest.max_bad_fraction={p.max_bad_fraction}: see {res.quarantine}"
        )


def _validate_into(p: IngestParams, shards: _Shards, report: _Quarantine) -> tuple[int, int, int]:
    """Check every candidate; shard the accepted. Returns (images, captions, items accepted)."""
    images = captions = items = 0
    verdicts = check_all(report.candidates(events(p)), p.max_pixels, p.workers, p.dask_address)
    for cand, verdict in stage.progress(verdicts, desc="ingest: validating", unit="img"):
        if isinstance(verdict, str):
            for where, item in cand.items:
                report.add(Reject(cand.source, where, item, verdict))
            continue
        shards.add(verdict)
        images, captions, items = (
            images + 1,
            captions + len(verdict.captions),
            items + verdict.items,
        )
    shards.close()
    return images, captions, items


def ingest(
    p: IngestParams, out: Path, quarantine: Path, summary: Path | None = None
) -> IngestResult:
    """Validate the source `p.source` names; write accepted samples under `out`, a line per
    refused item to `quarantine`, the counts to `summary`. Fails only when the quarantined
    fraction is over `p.max_bad_fraction`."""
    out, quarantine = Path(out), Path(quarantine)
    if out.exists():
        shutil.rmtree(out)
    (out / SHARDS_DIR).mkdir(parents=True)
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    shards = _Shards(out, p.shard_samples, p.shard_megabytes)
    with open(quarantine, "w") as f:
        report = _Quarantine(f)
        images, captions, accepted = _validate_into(p, shards, report)
    manifest = {"format": "webdataset", "num_images": images, "num_captions": captions}
    (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "shards": shards.entries}) + "\n")
    if report.input_items != accepted + report.count:  # every item is kept or reported
        raise RuntimeError(
            f"ingest lost items: {report.input_items} in, {accepted} kept, "
            f"{report.count} quarantined"
        )
    res = IngestResult(
        report.input_items, accepted, report.count, images, captions, str(quarantine), str(out)
    )
    log.info(
        "ingest: %d input items, %d accepted, %d quarantined (see %s)",
        *(res.input_items, res.accepted, res.quarantined, quarantine),
    )
    if summary is not None:
        # Counts only: no machine's absolute paths in a file git and DVC track.
        counts = {k: v for k, v in asdict(res).items() if k not in ("out", "quarantine")}
        Path(summary).write_text(json.dumps(counts, indent=2) + "\n")
    _check_fraction(p, res)
    return res


def _under(root: Path, path: str | None) -> str | None:
    return None if path is None else str(root / path)  # an absolute path stays as it is


def _under_url(root: Path, urls: str | None) -> str | None:
    remote = urls is not None and ("://" in urls or urls.startswith("pipe:"))
    return urls if remote else _under(root, urls)


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
            "webdataset": WebDatasetSource(urls=_under_url(root, params.ingest.webdataset.urls)),
        }
    )
    paths = params.paths
    return ingest(p, root / paths.raw, root / paths.quarantine, root / paths.ingest_report)


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
