"""infer: the pipeline's demo of batch inference, through the serving runtime.

Embeds the params' queries and the ingested images with the exported bundle (ONNX Runtime, no
torch) and writes embeddings and retrievals both ways; see xmodal_runtime.batch for the outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.common import stage
from tasks.common.config import InferParams, Params
from tasks.common.dataset import iter_raw, read_manifest
from xmodal_runtime.batch import BatchResult, embed_folder, embed_images
from xmodal_runtime.encoder import Encoder


def infer(
    p: InferParams,
    model_dir: Path,
    images_dir: Path | None,
    queries: list[str],
    out: Path,
    files: list[Path] | None = None,
    model: dict[str, Any] | None = None,
) -> BatchResult:
    """Embed images and queries with the exported towers and write retrievals between them.

    `files` restricts the images to a subset of `images_dir` (a shard); ids stay relative to it.
    `model` is summary.json's record of the model (registry.ResolvedModel.record(); default: the
    folder `model_dir`).
    """
    enc = Encoder(model_dir, p.variant, p.provider, p.threads, p.chunk_size)
    total = None if images_dir is None or files is None else len(files)
    with stage.progress(total=total, desc="infer: images", unit="img") as bar:
        return embed_folder(enc, images_dir, queries, out, p.top_k, files, bar.update, model)


def infer_dataset(
    p: InferParams, model_dir: Path, raw: Path, queries: list[str], out: Path
) -> BatchResult:
    """As `infer`, over the ingested samples streamed from their shards (ids: source paths)."""
    enc = Encoder(model_dir, p.variant, p.provider, p.threads, p.chunk_size)
    images = ((s.record.source_path, s.data) for s in iter_raw(raw))
    total = read_manifest(raw)["num_images"]
    with stage.progress(total=total, desc="infer: images", unit="img") as bar:
        return embed_images(enc, images, queries, out, p.top_k, bar.update)


def run(params: Params, root: Path) -> BatchResult:
    """The pipeline's demo: the params' queries against the ingested images, via the export."""
    paths = params.paths
    return infer_dataset(
        params.infer, root / paths.onnx, root / paths.raw, params.infer.queries, root / paths.infer
    )


@task(name="infer", cache_policy=NONE, timeout_seconds=3600)
def infer_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("infer", run, root, force)


if __name__ == "__main__":
    stage.main("infer", run)
