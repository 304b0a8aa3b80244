"""The `batch-inference` flow: shard the images, map ONNX inference over the shards, merge.

In-process by default; with a Dask scheduler address it runs the shards on that Dask cluster
through prefect-dask's DaskTaskRunner.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, unmapped

from tasks.batch import infer_shard_task, merge_shards_task, plan_shards_task
from tasks.config import InferParams


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    model_dir: str,
    images_dir: str,
    out: str,
    queries: list[str] | None = None,
    shards: int = 4,
    infer: InferParams | None = None,
) -> dict:
    """Embed `images_dir` (and `queries`) with the exported model in `model_dir`, in shards."""
    Path(out).mkdir(parents=True, exist_ok=True)
    p = (infer or InferParams()).model_dump()
    queries = queries or []
    plan = plan_shards_task(images_dir, shards)
    results = infer_shard_task.map(
        unmapped(p),
        unmapped(model_dir),
        unmapped(images_dir),
        unmapped(queries),
        unmapped(out),
        range(len(plan)),
        plan,
    )
    return merge_shards_task(p, queries, out, results)


def run_batch_inference(dask_address: str | None = None, **kwargs) -> dict:
    """Run the flow in-process, or on the Dask cluster at `dask_address`."""
    if dask_address is None:
        return batch_inference(**kwargs)
    from prefect_dask import DaskTaskRunner

    return batch_inference.with_options(task_runner=DaskTaskRunner(address=dask_address))(**kwargs)
