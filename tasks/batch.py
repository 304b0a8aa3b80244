"""Sharded batch inference for the `batch-inference` flow: plan shards, run one, merge them.

Each shard is an ordinary `xmodal_runtime.batch.embed_folder` run over a slice of the sorted
image list; the merge concatenates embeddings in shard order and merges the per-shard top-k
lists, so the result equals a single-process run over the whole folder. The model is resolved
once (`resolve_model_record`: a folder, or a registry version downloaded into the model cache) and
its record travels with the shards into the merged summary.json.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from tasks.common import stage
from tasks.common.config import InferParams
from tasks.common.registry import resolve
from xmodal_runtime import batch
from xmodal_runtime.encoder import Encoder
from xmodal_runtime.images import list_images


def plan_shards(images_dir: Path, shards: int) -> list[list[str]]:
    """Contiguous slices of the sorted image list (order is what makes the merge exact)."""
    files = [str(f) for f in list_images(Path(images_dir))]
    size = -(-len(files) // max(1, shards)) if files else 1
    return [files[i : i + size] for i in range(0, len(files), size)] or [[]]


def _record(model: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `model` from `resolve_model_record`'s dict (less the local path)."""
    return {k: v for k, v in model.items() if k != "path"}


def run_shard(
    p: dict,
    model: dict[str, Any],
    images_dir: str,
    queries: list[str],
    out: str,
    index: int,
    files: list[str],
) -> dict:
    """One shard with the model `resolve_model_record` found (its bundle folder: model["path"])."""
    ip = InferParams(**p)
    res = batch.embed_folder(
        Encoder(model["path"], ip.variant, ip.provider, ip.threads, ip.chunk_size),
        Path(images_dir),
        queries,
        Path(out) / f"shard_{index:04d}",
        ip.top_k,
        files=[Path(f) for f in files],
        model=_record(model),
    )
    # Which process ran the shard: tells in the summary where the work went (Dask workers).
    return {**asdict(res), "worker": f"{socket.gethostname()}:{os.getpid()}"}


def merge_shards(
    p: dict,
    queries: list[str],
    out: str,
    shard_results: list[dict],
    model: dict[str, Any] | None = None,
) -> dict:
    """Concatenate shard outputs in order and merge the per-shard top-k into the global top-k;
    summary.json records `model` (`resolve_model_record`'s dict, less its local path)."""
    out_dir = Path(out)
    shard_dirs = [Path(r["out"]) for r in shard_results]
    emb_paths = [
        d / batch.IMAGE_EMBEDDINGS for d in shard_dirs if (d / batch.IMAGE_EMBEDDINGS).is_file()
    ]
    files = {}
    if emb_paths:
        writer = None
        for path in emb_paths:
            table = pq.read_table(path)
            writer = writer or pq.ParquetWriter(out_dir / batch.IMAGE_EMBEDDINGS, table.schema)
            writer.write_table(table)
        writer.close()
        files["image_embeddings"] = str(out_dir / batch.IMAGE_EMBEDDINGS)
    if queries:
        shutil.copy(shard_dirs[0] / batch.TEXT_EMBEDDINGS, out_dir / batch.TEXT_EMBEDDINGS)
        files["text_embeddings"] = str(out_dir / batch.TEXT_EMBEDDINGS)
    for name in (batch.IMAGE_TO_TEXT, batch.ERRORS):
        with open(out_dir / name, "w") as dst:
            for d in shard_dirs:
                if (d / name).is_file():
                    dst.write((d / name).read_text())
        files[name.removesuffix(".jsonl")] = str(out_dir / name)
    if queries and emb_paths:
        merged: list[list[tuple[float, int, str]]] = [[] for _ in queries]
        for order, d in enumerate(shard_dirs):
            path = d / batch.TEXT_TO_IMAGE
            if not path.is_file():
                continue
            for q, line in enumerate(path.read_text().splitlines()):
                merged[q] += [(-h["score"], order, h["image"]) for h in json.loads(line)["results"]]
        with open(out_dir / batch.TEXT_TO_IMAGE, "w") as f:
            for q, hits in enumerate(merged):
                # ties keep the earlier shard first, as the single-process stable sort does
                best = sorted(hits, key=lambda h: (h[0], h[1]))[: p.get("top_k", 5)]
                rows = [{"image": img, "score": -s} for s, _, img in best]
                f.write(json.dumps({"query": queries[q], "results": rows}) + "\n")
        files["text_to_image"] = str(out_dir / batch.TEXT_TO_IMAGE)
    summary = {
        "images": sum(r["images"] for r in shard_results),
        "texts": len(queries),
        "errors": sum(r["errors"] for r in shard_results),
        "shards": len(shard_results),
        "workers": sorted({r["worker"] for r in shard_results}),
        "files": files,
        "model": None if model is None else _record(model),
    }
    (out_dir / batch.SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


def resolve_model_record(model: str, root: str = ".") -> dict[str, Any]:
    """The model an exported folder or a registry URI names: its record (uri, name, version,
    run_id, bundle_sha256) and local bundle `path` (a registry version is downloaded into the
    model cache under `root` once, then reused)."""
    return resolve(model, root=Path(root)).as_dict()


# Called from the flow's own thread (the main thread in-process and under a process worker),
# where Prefect's timeout is a SIGALRM that interrupts even a blocked download.
resolve_model_task = task(
    resolve_model_record,
    name="resolve-model",
    cache_policy=NONE,
    **stage.io_retries(2, 10, 30),
    timeout_seconds=600,
)
plan_shards_task = task(plan_shards, name="plan-shards", cache_policy=NONE)
# No timeout: mapped shards run in worker threads (Prefect's thread pool, or Dask's workers),
# where Prefect's timeout cannot interrupt ONNX Runtime's native calls; it could only inject an
# exception between two of them (mid-write, say), and Prefect warned so once per shard. A shard's
# work is bounded by its size, and a hung run is cancelled as a whole.
infer_shard_task = task(run_shard, name="infer-shard", cache_policy=NONE, retries=1)
merge_shards_task = task(merge_shards, name="merge-shards", cache_policy=NONE)
