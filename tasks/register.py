"""register: log lineage, metrics and artifacts to the pipeline's MLflow run; register a version.

The registered model is a pyfunc wrapping the two ONNX towers (text in, embeddings out), with the
ONNX files and tokenizer as its artifacts. The new version gets the `candidate` alias; on an empty
registry it also becomes `champion` (promotion gates decide later moves).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE

from tasks import stage, tracking
from tasks.config import MlflowParams, Params, RegisterParams
from tasks.data import read_json
from tasks.train import CHECKPOINT

log = logging.getLogger("xmodal")

MODEL_ARTIFACT = "dual_encoder"
SERVING_CODE = Path(__file__).with_name("serving.py")


@dataclass(frozen=True)
class RegisterResult:
    run_id: str
    model_name: str
    version: str
    aliases: list[str]
    model_uri: str
    data_version: str


def dvc_data_version(root: Path, raw: str) -> str:
    """The DVC md5 of the ingested dataset folder, as recorded in dvc.lock."""
    lock = Path(root) / "dvc.lock"
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("ingest", {}).get("outs", []):
            if Path(out["path"]) == Path(raw):
                return out["md5"]
    log.warning("no DVC data version for %s in %s (run through dvc repro or the flow)", raw, lock)
    return "unknown"


def register(
    p: RegisterParams,
    mlflow_p: MlflowParams,
    train_dir: Path,
    onnx_dir: Path,
    metrics_json: Path,
    export_json: Path,
    report: Path,
    root: Path,
    lineage: dict[str, str],
) -> RegisterResult:
    """Log artifacts and lineage to the training run and register the exported model."""
    metrics = read_json(metrics_json)["test"]
    parity = read_json(export_json)["parity"]
    with tracking.resume_run(mlflow_p, root, train_dir / tracking.RUN_FILE) as run:
        mlflow.set_tags({**lineage, "parity_passed": str(parity["passed"]).lower()})
        mlflow.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        mlflow.log_metrics(
            {
                "export/parity_max_abs_diff": parity["max_abs_diff"],
                "export/parity_passed": float(parity["passed"]),
            }
        )
        mlflow.log_artifact(str(train_dir / CHECKPOINT), artifact_path="checkpoint")
        mlflow.log_artifact(str(export_json), artifact_path="reports")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(SERVING_CODE),
            artifacts={"onnx": str(onnx_dir)},
            input_example=pd.DataFrame({"text": ["a large red circle on the left"]}),
            pip_requirements=["onnxruntime", "transformers", "numpy", "pandas"],
        )
        run_id = run.info.run_id
    client = MlflowClient()
    try:
        client.create_registered_model(p.model_name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(
        p.model_name,
        info.model_uri,
        run_id=run_id,
        tags={**lineage, "parity_passed": str(parity["passed"]).lower()},
    )
    aliases = [p.candidate_alias]
    client.set_registered_model_alias(p.model_name, p.candidate_alias, mv.version)
    try:
        client.get_model_version_by_alias(p.model_name, p.champion_alias)
    except MlflowException:
        client.set_registered_model_alias(p.model_name, p.champion_alias, mv.version)
        aliases.append(p.champion_alias)
    result = RegisterResult(
        run_id, p.model_name, str(mv.version), aliases, info.model_uri, lineage["dvc_data_version"]
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(asdict(result), indent=2))
    return result


def run(params: Params, root: Path) -> RegisterResult:
    paths = params.paths
    lineage = {
        **tracking.git_state(root),
        "dvc_data_version": dvc_data_version(root, paths.raw),
        "params_hash": params.digest(),
    }
    return register(
        params.register,
        params.mlflow,
        root / paths.train,
        root / paths.onnx,
        root / paths.metrics,
        root / paths.export_report,
        root / paths.register_report,
        root,
        lineage,
    )


@task(
    name="register",
    cache_policy=NONE,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    timeout_seconds=900,
)
def register_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("register", run, root, force)


if __name__ == "__main__":
    stage.main("register", run)
