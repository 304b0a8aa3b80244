"""register: log lineage, metrics and artifacts to the pipeline's MLflow run; register a version.

The registered model is a pyfunc wrapping the two ONNX towers (text in, embeddings out), with the
ONNX files and tokenizer as its artifacts. The new version gets the `candidate` alias; on an empty
registry it also becomes `champion` (promotion gates decide later moves).
"""

from __future__ import annotations

import json
import logging
import warnings
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
    experiment_id: str = ""


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


def log_dataset(raw: Path, data_version: str, name: str) -> None:
    """mlflow.log_input for the ingested folder, with the DVC md5 as its digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": both are local
        source = resolve_dataset_source(Path(raw).resolve().as_uri())
    mlflow.log_input(MetaDataset(source, name=name, digest=data_version[:36]), context="training")


def model_card(lineage: dict, params: dict, metrics: dict, export: dict) -> str:
    """The registered version's description: data, params, metrics, parity, export variants."""
    parity = export["parity"]
    lines = [
        "# xmodal dual encoder",
        "",
        "## Lineage",
        *(f"- {k}: `{v}`" for k, v in sorted(lineage.items())),
        "",
        "## Data and model",
        f"- dataset source: `{params['ingest']['source']}`, "
        f"DVC md5 `{lineage['dvc_data_version']}`",
        f"- image tower: `{params['model']['image']['backbone']}` "
        f"(weights `{params['model']['image']['weights']}`)",
        f"- text tower: `{params['model']['text']['pretrained'] or 'BERT from scratch'}`, "
        f"pooling `{params['model']['text']['pooling']}`; embed dim {params['model']['embed_dim']}",
        f"- epochs {params['train']['epochs']}, batch {params['train']['batch_size']}, "
        f"lr {params['train']['lr']}, seed {params['train']['seed']}",
        "",
        "## Test retrieval (PyTorch)",
        "| metric | value |",
        "| --- | --- |",
        *(f"| {k} | {v:.4f} |" for k, v in metrics.items()),
        "",
        f"## ONNX parity: {'passed' if parity['passed'] else 'FAILED'}",
        f"max abs embedding difference {parity['max_abs_diff']:.2e} (tolerance {parity['atol']:g})",
        "",
        "## Export variants (ONNX Runtime, test split)",
        "| variant | i2t R@1 | t2i R@1 | image bytes | text bytes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, v in export.get("variants", {}).items():
        if v.get("available", True):
            m, b = v["metrics"], v["bytes"]
            lines.append(
                f"| {name} | {m['i2t_R1']:.4f} | {m['t2i_R1']:.4f} | "
                f"{b['image_encoder']:,} | {b['text_encoder']:,} |"
            )
        else:
            lines.append(f"| {name} | unavailable here: {v['reason'][:80]} | | | |")
    mixed = export.get("variants", {}).get("int8", {}).get("mixed_precision")
    if mixed:
        lines += [
            "",
            f"int8 image tower: first {mixed['image_fp32_convs']} of {mixed['image_convs']} convs "
            f"kept fp32 (validation cosine to fp32 {mixed['val_cosine']:.4f}, "
            f"target {mixed['min_cosine']}).",
        ]
    return "\n".join(lines)


def library_versions() -> dict[str, str]:
    import onnxruntime
    import torch
    import transformers

    return {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }


def prefect_flow_run_id() -> str:
    """The Prefect flow run this stage runs in, or '' outside Prefect."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # noqa: BLE001 - lineage must not fail a registration
        return ""


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
    raw: Path,
    all_params: dict,
) -> RegisterResult:
    """Log artifacts and lineage to the training run and register the exported model."""
    metrics = read_json(metrics_json)["test"]
    export_report = read_json(export_json)
    parity = export_report["parity"]
    with tracking.resume_run(mlflow_p, root, train_dir / tracking.RUN_FILE) as run:
        mlflow.set_tags({**lineage, "parity_passed": str(parity["passed"]).lower()})
        log_dataset(raw, lineage["dvc_data_version"], f"xmodal-{all_params['ingest']['source']}")
        mlflow.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        for name, v in export_report.get("variants", {}).items():
            if v.get("available", True):
                mlflow.log_metrics({f"export/{name}_{k}": x for k, x in v["metrics"].items()})
                mlflow.log_metrics({f"export/{name}_bytes_{t}": b for t, b in v["bytes"].items()})
                for k, d in v.get("delta_vs_fp32", {}).items():
                    mlflow.log_metric(f"export/{name}_delta_{k}", d)
                if "mixed_precision" in v:
                    mixed = v["mixed_precision"]
                    mlflow.log_metrics(
                        {
                            f"export/{name}_image_fp32_convs": mixed["image_fp32_convs"],
                            f"export/{name}_val_cosine": mixed["val_cosine"],
                        }
                    )
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
        run_id, experiment_id = run.info.run_id, run.info.experiment_id
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
        description=model_card(lineage, all_params, metrics, export_report),
        # A tracking server refuses a `models:/m-...` source unless its model id is named too.
        model_id=info.model_id,
    )
    aliases = [p.candidate_alias]
    client.set_registered_model_alias(p.model_name, p.candidate_alias, mv.version)
    try:
        client.get_model_version_by_alias(p.model_name, p.champion_alias)
    except MlflowException:
        client.set_registered_model_alias(p.model_name, p.champion_alias, mv.version)
        aliases.append(p.champion_alias)
    result = RegisterResult(
        run_id,
        p.model_name,
        str(mv.version),
        aliases,
        info.model_uri,
        lineage["dvc_data_version"],
        experiment_id,
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
        "prefect_flow_run_id": prefect_flow_run_id(),
        **library_versions(),
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
        root / paths.raw,
        params.model_dump(mode="json"),
    )


@task(
    name="register",
    cache_policy=NONE,
    **stage.io_retries(2, 10, 30),
    timeout_seconds=900,
)
def register_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("register", run, root, force)


if __name__ == "__main__":
    stage.main("register", run)
