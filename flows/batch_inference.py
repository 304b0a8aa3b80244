"""The `batch-inference` flow: shard the images, map ONNX inference over the shards, merge.

In-process by default; with a Dask scheduler address (a flow parameter, so deployment runs can
choose it too) the shards run on that Dask cluster through prefect-dask's DaskTaskRunner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow, unmapped
from pydantic import Field

from tasks.batch import (
    infer_shard_task,
    merge_shards_task,
    plan_shards_task,
    resolve_model_task,
)
from tasks.common.config import InferParams


@flow(name="batch-inference-shards")
def infer_shards(
    model: dict, images_dir: str, out: str, queries: list[str], shards: int, p: dict
) -> dict:
    """Plan the shards, map inference over them on this flow's task runner, merge in order.
    `model` is resolve-model's result (the bundle's local path and record)."""
    plan = plan_shards_task(images_dir, shards)
    results = infer_shard_task.map(
        unmapped(p),
        unmapped(model),
        unmapped(images_dir),
        unmapped(queries),
        unmapped(out),
        range(len(plan)),
        plan,
    )
    return merge_shards_task(p, queries, out, results, model)


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    model: str,
    images_dir: str,
    out: str,
    queries: list[str] | None = None,
    shards: Annotated[int, Field(ge=1)] = 4,
    infer: InferParams | None = None,
    dask_address: str | None = None,
) -> dict:
    """Embed `images_dir` (and `queries`) with `model` (an exported folder or
    `models:/<name>@<alias>`), in shards; on the Dask cluster at `dask_address` when given.
    summary.json records the model: its URI, registered version, run and bundle sha256."""
    Path(out).mkdir(parents=True, exist_ok=True)
    resolved = resolve_model_task(model)
    run = infer_shards
    if dask_address:
        from prefect_dask import DaskTaskRunner

        run = infer_shards.with_options(task_runner=DaskTaskRunner(address=dask_address))
    p = (infer or InferParams()).model_dump()
    return run(resolved, images_dir, out, queries or [], shards, p)
