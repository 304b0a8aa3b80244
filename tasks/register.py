"""register: log lineage, metrics and artifacts to the pipeline's MLflow run; register a version.

The registered model is the serving runtime's pyfunc (texts or images in, embeddings out), logged
with the runtime package as its code, the exported bundle as its artifact and the runtime's
pinned requirements, so it loads without this repository. The new version gets the `candidate`
alias, and the move is recorded in the registry's alias history (tasks.common.aliases). Only
`xmodal promote` moves `champion`, through its gates, the first champion included.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from prefect import task
from prefect.cache_policies import NONE

import xmodal_runtime
from tasks.common import aliases, stage, tracking
from tasks.common.config import MlflowParams, Params, RegisterParams
from tasks.common.data import read_json
from xmodal_runtime.bundle import HASH_TAG, IMAGE_TOWER, TEXT_TOWER, Bundle, read_manifest
from xmodal_runtime.pyfunc import BUNDLE_ARTIFACT

log = logging.getLogger("xmodal")

MODEL_ARTIFACT = "dual_encoder"
RUNTIME = Path(xmodal_runtime.__file__).parent
# The registered model's requirements: the runtime's own (pyproject's base dependencies) plus what
# the pyfunc adds. MLflow adds itself. The CPU build of ONNX Runtime, which runs everywhere; a GPU
# serving image installs onnxruntime-gpu of the same version instead.
PYFUNC_EXTRAS = ("pandas",)


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


def model_card(lineage: dict, model_cfg: dict, params: dict, metrics: dict, export: dict) -> str:
    """The registered version's description: data, params, metrics, parity, export variants.

    `model_cfg` is the bundle's model config; `params` the training run's logged (flattened)
    params, so the card describes what trained, whatever params.yaml says now."""
    parity = export["parity"]
    lines = [
        "# xmodal dual encoder",
        "",
        "## Lineage",
        *(f"- {k}: `{v}`" for k, v in sorted(lineage.items())),
        "",
        "## Data and model",
        f"- dataset source: `{params.get('ingest.source', '?')}`, "
        f"DVC md5 `{lineage['dvc_data_version']}`",
        f"- image tower: `{model_cfg['image']['backbone']}` "
        f"(weights `{model_cfg['image']['weights']}`)",
        f"- text tower: `{model_cfg['text']['pretrained'] or 'BERT from scratch'}`, "
        f"pooling `{model_cfg['text']['pooling']}`; embed dim {model_cfg['embed_dim']}",
        *(
            f"- {k.removeprefix('train.')} {params.get(k, '?')}"
            for k in ("train.epochs", "train.batch_size", "train.lr", "train.seed")
        ),
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
                f"{b[IMAGE_TOWER]:,} | {b[TEXT_TOWER]:,} |"
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
    """Versions of the libraries that trained and exported the model (read from package
    metadata: register itself imports no torch)."""
    from importlib.metadata import version

    import onnxruntime

    return {
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "onnxruntime_version": onnxruntime.__version__,
    }


def runtime_requirements() -> list[str]:
    """`name==version` of each base dependency of the installed xmodal distribution (the
    runtime's), and of the pyfunc's extras, as installed here."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    names = [
        Requirement(r).name
        for r in requires("xmodal") or []
        if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})
    ]
    pins = []
    for name in [*names, *PYFUNC_EXTRAS]:
        if name in ("onnxruntime", "onnxruntime-gpu"):
            import onnxruntime

            pins.append(f"onnxruntime=={onnxruntime.__version__}")
        else:
            pins.append(f"{name}=={version(name)}")
    return sorted(set(pins))


def signature(embed_dim: int) -> ModelSignature:
    """Rows carry a `text` or an `image` (base64 bytes); out come (N, D) float32 embeddings."""
    inputs = Schema(
        [ColSpec("string", "text", required=False), ColSpec("string", "image", required=False)]
    )
    return ModelSignature(inputs, Schema([TensorSpec(np.dtype("float32"), (-1, embed_dim))]))


def prefect_flow_run_id() -> str:
    """The Prefect flow run this stage runs in, or '' outside Prefect."""
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id or "")
    except Exception:  # noqa: BLE001 - lineage must not fail a registration
        return ""


def log_export_metrics(export_report: dict) -> None:
    """Each variant's test metrics, sizes, deltas and mixed precision; parity figures."""
    for name, v in export_report.get("variants", {}).items():
        if not v.get("available", True):
            continue
        mlflow.log_metrics({f"export/{name}_{k}": x for k, x in v["metrics"].items()})
        mlflow.log_metrics({f"export/{name}_bytes_{t}": b for t, b in v["bytes"].items()})
        mlflow.log_metrics(
            {f"export/{name}_delta_{k}": d for k, d in v.get("delta_vs_fp32", {}).items()}
        )
        if "mixed_precision" in v:
            mixed = v["mixed_precision"]
            mlflow.log_metrics(
                {
                    f"export/{name}_image_fp32_convs": mixed["image_fp32_convs"],
                    f"export/{name}_val_cosine": mixed["val_cosine"],
                }
            )
    parity = export_report["parity"]
    mlflow.log_metrics(
        {
            "export/parity_max_abs_diff": parity["max_abs_diff"],
            "export/parity_passed": float(parity["passed"]),
        }
    )


def set_aliases(client: MlflowClient, p: RegisterParams, version: str) -> list[str]:
    """`candidate` on the new version, recorded in the alias history. Never `champion`, not
    even on an empty registry: only a promotion that passes the gates moves it."""
    before = aliases.alias_version(client, p.model_name, p.candidate_alias)
    if before != version:  # a retried register finds it moved already
        aliases.move(client, p.model_name, p.candidate_alias, version, "register", before=before)
    return [p.candidate_alias]


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
) -> RegisterResult:
    """Log artifacts and lineage to the training run and register the exported model; a rerun
    for the same training run and bundle (after a failure, say) returns the version it made."""
    metrics = read_json(metrics_json)["test"]
    bundle = Bundle.open(onnx_dir)
    export_report = read_json(export_json)
    parity = export_report["parity"]
    tracking.setup(mlflow_p, root)
    done = registered_before(MlflowClient(), p.model_name, train_dir / tracking.RUN_FILE, bundle)
    if done is not None:
        log.info("%s v%s already registers this run's bundle: not registered again",
                 p.model_name, done.version)  # fmt: skip
        return _result(MlflowClient(), p, done, lineage, report)
    with tracking.resume_run(mlflow_p, root, train_dir / tracking.RUN_FILE) as run:
        mlflow.set_tags({**lineage, "parity_passed": str(parity["passed"]).lower()})
        trained_with = mlflow.get_run(run.info.run_id).data.params  # what train logged
        source = trained_with.get("ingest.source", "dataset")
        log_dataset(raw, lineage["dvc_data_version"], f"xmodal-{source}")
        mlflow.log_metrics({f"test/{k}": v for k, v in metrics.items()})
        log_export_metrics(export_report)
        mlflow.log_artifacts(str(train_dir), artifact_path="checkpoint")  # weights + run.json
        mlflow.log_artifact(str(export_json), artifact_path="reports")
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(RUNTIME / "mlflow_model.py"),
            code_paths=[str(RUNTIME)],
            artifacts={BUNDLE_ARTIFACT: str(onnx_dir)},
            signature=signature(bundle.meta.embed_dim),
            input_example=pd.DataFrame({"text": ["a large red circle on the left"]}),
            pip_requirements=runtime_requirements(),
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
        tags={
            **lineage,
            "parity_passed": str(parity["passed"]).lower(),
            # What infer, the batch flow and promotion check the downloaded files against.
            "bundle_sha256": bundle.digest(),
            **{f"{HASH_TAG}{path}": h for path, h in read_manifest(onnx_dir).items()},
        },
        description=model_card(
            lineage, bundle.meta.model_config, trained_with, metrics, export_report
        ),
        # A tracking server refuses a `models:/m-...` source unless its model id is named too.
        model_id=info.model_id,
    )
    return _result(client, p, mv, lineage, report, experiment_id)


def registered_before(client: MlflowClient, name: str, run_file: Path, bundle: Bundle):
    """The version of `name` already registered from this training run with this very bundle
    (same sha256), or None: what makes a retried register create no second version."""
    if not run_file.is_file():
        return None
    run_id = json.loads(run_file.read_text())["run_id"]
    try:
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    digest = bundle.digest()
    same = [v for v in found if (v.tags or {}).get("bundle_sha256") == digest]
    return max(same, key=lambda v: int(v.version)) if same else None


def _result(client, p: RegisterParams, mv, lineage: dict, report: Path, experiment_id: str = ""):
    """Set the aliases of version `mv` and write the register report."""
    if not experiment_id:
        experiment_id = client.get_run(mv.run_id).info.experiment_id
    result = RegisterResult(
        mv.run_id,
        p.model_name,
        str(mv.version),
        set_aliases(client, p, str(mv.version)),
        mv.source,
        lineage["dvc_data_version"],
        experiment_id,
    )
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(asdict(result), indent=2))
    return result


def run(params: Params, root: Path) -> RegisterResult:
    paths = params.paths
    # What the run itself writes is not a dirty tree; nor is params.yaml in an experiment,
    # whose git ref (dvc_exp_name) records it.
    written = ("dvc.lock", *paths.model_dump().values())
    exp = tracking.experiment_tags()
    lineage = {
        **tracking.git_state(root, (*written, "params.yaml") if exp else written),
        **exp,
        "dvc_data_version": dvc_data_version(root, paths.raw),
        # The training params hash, as train stored it in the checkpoint and export in meta.json.
        "params_hash": Bundle.open(root / paths.onnx).meta.params_hash or "unknown",
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
