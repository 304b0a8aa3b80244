"""The training data path: loader throughput against what a step consumes, decoding raw images
against reading prepared shards, and peak memory as the dataset grows (issue 16, "Measured").

For each size N of the built-in dataset (64 px, as the issue measured), in fresh processes:
- ingest, then preprocess with the default model's tokenizer (1 decoding process);
- peak RSS (VmHWM) of preprocess, and of a 50-step training run of the default model with its
  loader inline (train.workers 0, so that every byte the loader holds is in the one process).
  `--cache` also runs the features stage first, as the default pipeline does; without it the
  frozen text blocks run each step (features.enabled false), which reads the shards' tokens;
- at the first size only: loader images/s at 0, 1 and 2 workers over an epoch, against the
  images/s one training step of the default model consumes; and images/s of decoding the raw
  shards' images (one process) against reading the same count of prepared rows at random.

    .venv/bin/python -m bench.loader --sizes 2000 20000 100000
    .venv/bin/python -m bench.loader --sizes 5000 --csv ../shared/data/flickr-dev/captions.csv \
        --image-root ../shared/data/flickr-dev/images   # real JPEGs
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Imports are made before the clock starts; VmHWM is the process's own peak resident memory
# (ru_maxrss would count what the parent held when it forked this child).
CHILD = """
import json, re, sys, time
from pathlib import Path
from tasks.common.config import apply_overrides, flatten, read_yaml, validate
over = [f"{{k}}={{json.dumps(v)}}" for k, v in flatten({over!r}).items()]
params = validate(apply_overrides(read_yaml(Path("params.yaml")), over))
root = Path({root!r})
{body}
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)
print(json.dumps({{**out, "peak_rss_mb": int(hwm) / 1024}}))
"""

INGEST = """
from tasks.ingest import ingest
ingest(params.ingest, root / "raw", root / "quarantine.jsonl")
out = {"n": json.loads((root / "raw" / "manifest.json").read_text())["num_images"]}
"""

PREPROCESS = """
from tasks.preprocess import preprocess
t = time.perf_counter()
preprocess(params.preprocess, params.model.text.pretrained, root / "raw", root / "prep")
out = {"seconds": time.perf_counter() - t}
"""

FEATURES = """
from tasks.features import features
t = time.perf_counter()
features(params.features, params.model, params.train, root / "prep", root / "feat")
out = {"seconds": time.perf_counter() - t}
"""

TRAIN = """
from tasks.common.tracking import NullSink
from tasks.train import train
t = time.perf_counter()
r = train(params.train, params.model, root / "prep", root / "train", root / "history.csv",
          NullSink(), features=root / "feat")
out = {"seconds": time.perf_counter() - t, "steps": r.steps}
"""

# Loader images/s per worker count over 200 batches after the first (startup reported apart),
# and the images/s one training step consumes.
THROUGHPUT = """
import torch
from tasks.common.checkpoint import build_model
from tasks.common.data import load_features, load_split
from tasks.common.loader import TrainBatches, train_loader
from tasks.common.trainer import build_trainer, train_step
net = build_model(params.model, root / "prep")
p = params.train
cuts = (net.frozen_blocks("image", p.image.trainable_blocks),
        net.frozen_blocks("text", p.text.trainable_blocks))
cache = load_features(root / "feat", "train", params.model, cuts)
batches = TrainBatches(load_split(root / "prep", "train", cache.image is None), p, cache)
n = min(len(batches), 201)
out = {"batch_size": p.batch_size, "batches": n - 1}
for workers in (0, 1, 2):
    t = time.perf_counter()
    for i, _ in enumerate(train_loader(batches, 0, n, workers, pin_memory=False)):
        if i == 0:  # the first batch waits for the workers to start (spawned: seconds)
            first, t = time.perf_counter() - t, time.perf_counter()
    out[f"loader_{workers}"] = (n - 1) * p.batch_size / (time.perf_counter() - t)
    out[f"first_batch_s_{workers}"] = first
t = build_trainer(p, net, torch.device("cpu"), 100, (cache.image_cut, cache.text_cut))
net.train()
for s in range(13):  # 3 warm-up steps, then 10 timed
    if s == 3:
        t0 = time.perf_counter()
    train_step(t, *batches[s], s, 0.0)
out["step"] = 10 * p.batch_size / (time.perf_counter() - t0)
"""

# One process decoding the raw shards' images against reading prepared rows at random.
DECODE = """
import numpy as np
from tasks.common.data import load_split, to_pixels
from tasks.common.dataset import iter_raw
from tasks.common.decode import decode_sample
size = params.preprocess.image_size
t = time.perf_counter()
n = sum(1 for s in iter_raw(root / "raw") if decode_sample(s, size).size)
out = {"raw_decode": n / (time.perf_counter() - t)}
images = load_split(root / "prep", "train").images
rng = np.random.default_rng(0)
t = time.perf_counter()
for _ in range(n // 64):
    to_pixels(images[np.sort(rng.choice(len(images), 64, replace=False))])
out["prepared_rows"] = (n // 64) * 64 / (time.perf_counter() - t)
"""


def child(body: str, root: Path, over: dict) -> dict:
    code = CHILD.format(over=over, root=str(root), body=body)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n: int, root: Path, source: dict, cache: bool, first: bool) -> dict:
    over = {
        "ingest": {"num_images": n, "image_size": 64, **source},
        "preprocess": {"workers": 1},
        "features": {"enabled": cache},
        "mlflow": {"system_metrics": False},
        "train": {"max_steps": 50, "workers": 0},
    }
    row = {"n": child(INGEST, root, over)["n"]}
    row["preprocess"] = child(PREPROCESS, root, over)
    row["features"] = child(FEATURES, root, over)
    row["train"] = child(TRAIN, root, over)
    if first:
        row["throughput"] = child(THROUGHPUT, root, over)
        row["decode"] = child(DECODE, root, over)
    return row


def tables(rows: list[dict], cache: bool) -> str:
    out = [
        f"Peak RSS (VmHWM, MB), features cache {'on' if cache else 'off'}:\n",
        "| images | preprocess MB | preprocess s | features MB | 50-step train MB | train s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    out += [
        f"| {r['n']:,} | {r['preprocess']['peak_rss_mb']:.0f} | {r['preprocess']['seconds']:.1f} "
        f"| {r['features']['peak_rss_mb']:.0f} | {r['train']['peak_rss_mb']:.0f} "
        f"| {r['train']['seconds']:.1f} |"
        for r in rows
    ]
    first = rows[0]
    if "throughput" in first:
        t, d = first["throughput"], first["decode"]
        speeds = [t[f"loader_{w}"] for w in range(3)]
        rates = " / ".join(f"{s:.0f}" for s in speeds)
        firsts = " / ".join(f"{t[f'first_batch_s_{w}']:.2f}" for w in range(3))
        out += [
            f"\nAt {first['n']:,} images, batch {t['batch_size']}, {t['batches']} batches:\n",
            "| loader img/s (0 / 1 / 2 workers) | first batch s (0 / 1 / 2) "
            "| a training step consumes img/s | ratio (worst) |",
            "| --- | --- | --- | --- |",
            f"| {rates} | {firsts} | {t['step']:.1f} | {min(speeds) / t['step']:.0f}x |",
            f"\nDecoding raw images: {d['raw_decode']:.0f} img/s; reading prepared rows at "
            f"random: {d['prepared_rows']:.0f} img/s ({d['prepared_rows'] / d['raw_decode']:.1f}x)",
        ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--cache", action="store_true", help="run the features stage (the default)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--csv", type=Path, help="ingest this image,caption CSV instead")
    ap.add_argument("--image-root", type=Path, help="the CSV's image folder")
    ap.add_argument("--tmp", type=Path, help="work here instead of a temporary folder")
    args = ap.parse_args(argv)
    source = {}
    if args.csv:
        csv = {"path": str(args.csv.resolve()), "image_root": str(args.image_root.resolve())}
        source = {"source": "csv", "csv": csv}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for i, n in enumerate(args.sizes):
            root = Path(tmp) / str(n)
            root.mkdir()
            rows.append(measure(n, root, source, args.cache, first=i == 0))
            print(json.dumps(rows[-1]), flush=True)
            subprocess.run(["rm", "-rf", str(root)], check=True)
    print(f"\n{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(tables(rows, args.cache))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
