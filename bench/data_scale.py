"""The data path as the dataset grows: ingest, DVC, preprocess (issue 16, "Measured").

For each size N of the built-in dataset (64 px here, as the issue measured), in fresh processes:
- ingest: seconds, peak RSS, files and bytes of `data/raw` (WebDataset shards);
- `dvc add` of those shards, against `dvc add` of the same images as loose files (the layout
  the shards replace: one file per image plus the captions), each in a fresh DVC repo;
- preprocess at 1 and 2 decoding processes: seconds, images/s, peak RSS (the parent's and its
  workers', whichever is larger).

    .venv/bin/python -m bench.data_scale --sizes 2000 20000 100000
    .venv/bin/python -m bench.data_scale --csv ../shared/data/flickr-dev/captions.csv \
        --image-root ../shared/data/flickr-dev/images --image-size 224     # real photos
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports (Prefect, transformers: seconds of their own) are made before the clock starts.
CHILD = """
import json, resource, sys, time
from pathlib import Path
{imports}
t = time.perf_counter()
{call}
seconds = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
print(json.dumps({{"seconds": seconds, "peak_rss_mb": peak}}))
"""

INGEST = """
from tasks.common.config import IngestParams
from tasks.ingest import ingest
import webdataset
---
ingest(IngestParams(**{params!r}), Path({raw!r}), Path({q!r}))
"""

PREPROCESS = """
from tasks.common.config import PreprocessParams
from tasks.preprocess import preprocess
---
p = PreprocessParams(workers={workers}, image_size={size})
preprocess(p, None, Path({raw!r}), Path({out!r}))
"""

LOOSE = """
from tasks.common.dataset import iter_raw
---
out = Path({out!r})
(out / "images").mkdir(parents=True)
captions = []
for s in iter_raw(Path({raw!r})):
    name = f"{{s.record.image_id:06d}}.{{s.ext}}"
    (out / "images" / name).write_bytes(s.data)
    captions.append({{"file_name": name, "captions": s.record.captions}})
(out / "captions.json").write_text(json.dumps(captions))
"""


def child(body: str) -> dict:
    imports, call = body.split("---\n")
    code = CHILD.format(imports=imports, call=call)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dvc_add(folder: Path) -> dict:
    """Seconds of `dvc add` of `folder` in a fresh repo beside it, and the files it hashed."""
    repo = folder.parent
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    t = time.perf_counter()
    subprocess.run([dvc, "add", "-q", folder.name], cwd=repo, check=True)
    files = sum(1 for p in folder.rglob("*") if p.is_file())
    return {"seconds": time.perf_counter() - t, "files": files}


def measure(n: int, tmp: Path, source: dict, size: int) -> dict:
    shards = tmp / f"shards_{n}"
    shards.mkdir()
    raw = shards / "raw"
    params = {"num_images": n, "image_size": 64, **source}
    row = {"ingest": child(INGEST.format(params=params, raw=str(raw), q=str(tmp / f"q_{n}")))}
    row["n"] = n = json.loads((raw / "manifest.json").read_text())["num_images"]
    row["raw_bytes"] = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    for workers in (1, 2):
        out = str(tmp / f"prep_{n}_{workers}")
        m = child(PREPROCESS.format(workers=workers, size=size, raw=str(raw), out=out))
        m["images_per_s"] = n / m["seconds"]
        row[f"preprocess_{workers}"] = m
    loose = tmp / f"loose_{n}"
    loose.mkdir()
    child(LOOSE.format(raw=str(raw), out=str(loose / "raw")))
    row["dvc_shards"] = dvc_add(raw)
    row["dvc_loose"] = dvc_add(loose / "raw")
    return row


def table(rows: list[dict]) -> str:
    head = (
        "| images | ingest s | ingest peak MB | raw files (shards / loose) | dvc add s (shards / "
        "loose) | preprocess img/s (1 / 2 workers) | preprocess peak MB (1 / 2) |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    lines = [
        f"| {r['n']:,} | {r['ingest']['seconds']:.1f} | {r['ingest']['peak_rss_mb']:.0f} | "
        f"{r['dvc_shards']['files']:,} / {r['dvc_loose']['files']:,} | "
        f"{r['dvc_shards']['seconds']:.1f} / {r['dvc_loose']['seconds']:.1f} | "
        f"{r['preprocess_1']['images_per_s']:.0f} / {r['preprocess_2']['images_per_s']:.0f} | "
        f"{r['preprocess_1']['peak_rss_mb']:.0f} / {r['preprocess_2']['peak_rss_mb']:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--csv", type=Path, help="ingest this image,caption CSV instead (one size)")
    ap.add_argument("--image-root", type=Path, help="the CSV's image folder")
    ap.add_argument("--image-size", type=int, default=64, help="preprocess resolution")
    args = ap.parse_args(argv)
    source = {}
    if args.csv:
        csv = {"path": str(args.csv.resolve()), "image_root": str(args.image_root.resolve())}
        source = {"source": "csv", "csv": csv}
        args.sizes = args.sizes[:1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            rows.append(measure(n, Path(tmp), source, args.image_size))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
