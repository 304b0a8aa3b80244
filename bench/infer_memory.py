"""Peak memory of `xmodal infer` as the input grows 10x: streaming keeps it flat.

Generates N and 10N built-in images, runs batch inference on each in a fresh process, and prints
peak RSS and throughput. Needs an exported model (default: paths.onnx of params.yaml).

    .venv/bin/python -m bench.infer_memory [--n 300]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
from pathlib import Path
from tasks.common.config import InferParams
from tasks.infer import infer
t = time.perf_counter()
res = infer(InferParams(chunk_size=64, top_k=5), Path({model!r}), Path({images!r}),
            ["a red circle on the left", "a small blue square"], Path({out!r}))
print(json.dumps({{"images": res.images, "seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def make_images(folder: Path, n: int) -> None:
    from tasks.common.synthetic import generate

    folder.mkdir(parents=True)
    for i in range(n):
        img, _ = generate(i, 123, 96, 1, 1, 3)
        img.save(folder / f"{i:07d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "onnx")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, 10 * args.n):
            images = Path(tmp) / f"images_{n}"
            make_images(images, n)
            code = CHILD.format(
                model=str(args.model),
                images=str(images),
                out=str(Path(tmp) / f"out_{n}"),
            )
            proc = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for r in results:
        print(
            f"{r['images']:>7} images: peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"{r['images'] / r['seconds']:.0f} images/s"
        )
    growth = results[1]["peak_rss_mb"] / results[0]["peak_rss_mb"]
    print(f"10x the input -> {growth:.2f}x the peak memory")


if __name__ == "__main__":
    main()
