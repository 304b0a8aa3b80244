"""The `training-pipeline` flow: every stage in order, ingest to infer (STAGES).

Each task asks DVC whether its stage changed and commits it to dvc.lock after running, so this
flow and `dvc repro` share one cache and lock; a stage DVC skips ends in the state `Skipped`.
A run holds the checkout from start to end (a second run is refused), and runs overrides as a
DVC experiment that leaves params.yaml and dvc.lock as they were (tasks/common/checkout.py).
Runs without a server (Prefect's ephemeral mode).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from prefect import flow, task
from prefect.cache_policies import NONE
from pydantic import Field

from tasks.common import checkout
from tasks.common.config import expand_presets, key_overrides
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.features import features_task
from tasks.infer import infer_task
from tasks.ingest import ingest_task
from tasks.preprocess import preprocess_task
from tasks.promote import promote_task
from tasks.register import register_task
from tasks.report import report_task
from tasks.train import train_task

configure_task = task(checkout.configure, name="configure", cache_policy=NONE)

STAGES = (
    ingest_task,
    preprocess_task,
    features_task,
    train_task,
    evaluate_task,
    export_task,
    register_task,
    infer_task,
)


def run_name() -> str:
    """Flow run name from the key params, e.g. `resnet18-bert2x128-e8-lr0.001-seed0`."""
    from prefect.runtime import flow_run

    from tasks.common.config import (
        DEFAULT_PARAMS,
        KEY_PARAMS,
        apply_overrides,
        key_overrides,
        read_yaml,
        validate,
    )

    args = flow_run.parameters
    root = Path(args.get("root") or ".")
    try:
        overrides = key_overrides(
            expand_presets(args.get("presets"), args.get("overrides"), root),
            **{k: args.get(k) for k in KEY_PARAMS},
        )
        p = validate(apply_overrides(read_yaml(root / DEFAULT_PARAMS), overrides))
    except ValueError:
        return "training-pipeline-invalid-params"
    m, t = p.model, p.train
    text = "pretrained" if m.text.pretrained else f"bert{m.text.num_layers}x{m.text.hidden_size}"
    return f"{m.image.backbone}-{text}-e{t.epochs}-lr{t.lr:g}-seed{t.seed}"


@flow(name="training-pipeline", log_prints=True, flow_run_name=run_name)
def training_pipeline(
    overrides: list[str] | None = None,
    presets: list[str] | None = None,
    force: bool = False,
    root: str = ".",
    promote: bool = False,
    epochs: Annotated[int, Field(ge=1)] | None = None,
    max_steps: Annotated[int, Field(ge=1)] | None = None,
    batch_size: Annotated[int, Field(ge=2)] | None = None,
    lr: Annotated[float, Field(gt=0)] | None = None,
    seed: Annotated[int, Field(ge=0)] | None = None,
) -> checkout.PipelineRun:
    """Run every stage. `presets`: overlay files (`presets/scratch-resnet18-bert2.yaml`, relative
    to `root`), expanded into dotted overrides in order, before `overrides`: dotted `key=value`
    params (`train.lr=0.001`); with any of them the run is a DVC experiment and params.yaml stays
    as it was. `force`: rerun unchanged stages; `promote`: finish with `xmodal promote` (gated
    alias move); `epochs`, `max_steps`, `batch_size`, `lr`, `seed`: typed shortcuts for the
    `train.*` keys."""
    overrides = key_overrides(
        expand_presets(presets, overrides, root),
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    with checkout.held(root) as name:
        configure_task(root, overrides)
        with checkout.experiment(root, overrides, name) as experiment:
            outcomes = {t.name: t(root, force, return_state=True).result() for t in STAGES}
            report_task(root, outcomes)
            promotion = promote_task(root) if promote else None
    return checkout.PipelineRun(outcomes, experiment, overrides, promotion)


if __name__ == "__main__":
    training_pipeline()
