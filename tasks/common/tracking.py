"""MLflow plumbing: tracking URI resolution, the pipeline's run, lineage tags."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import mlflow
from mlflow.exceptions import MlflowException

from tasks.common.config import MlflowParams, flatten

RUN_FILE = "run.json"


def tracking_uri(p: MlflowParams, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins over params; a relative sqlite path is taken under the project.

    Under `dvc exp run --temp` or a queued experiment the stages run in a temporary copy; DVC_ROOT
    names the real project, so the store (and every experiment's run) stays in one place.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or p.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        base = Path(os.environ.get("DVC_ROOT") or root)
        uri = prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


def run_identity() -> tuple[str | None, dict[str, str]]:
    """(run name, tags) naming who started the run: a DVC experiment or a Prefect flow run.

    `dvc exp run` sets DVC_EXP_NAME (its own random name when `-n` is not given), so the MLflow
    run carries the experiment's name and `dvc exp show` and the MLflow UI line up.
    """
    exp = os.environ.get("DVC_EXP_NAME")
    if exp:
        baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
        return exp, {"dvc_exp_name": exp, "dvc_exp_baseline_rev": baseline}
    try:
        from prefect.runtime import flow_run

        name = flow_run.name
    except Exception:  # noqa: BLE001 - outside Prefect there is simply no flow run
        name = None
    return (name or None), ({"prefect_flow_run_name": name} if name else {})


def http_settings(p: MlflowParams) -> None:
    """MLflow's HTTP retries, backoff and timeout from params (the environment's win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(p.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", str(p.http_backoff))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(p.http_timeout))


def setup(p: MlflowParams, root: Path) -> str:
    """Point MLflow at the store and select the pipeline's experiment; return its id."""
    http_settings(p)
    uri = tracking_uri(p, root)
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name(p.experiment)
    if exp is not None:
        return mlflow.set_experiment(p.experiment).experiment_id
    artifacts = None
    if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
        # Local stores keep artifacts beside the project, not in the caller's cwd.
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
    exp_id = mlflow.create_experiment(p.experiment, artifact_location=artifacts)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def mlflow_params(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys for MLflow's flat params; lists as JSON, as MLflow stores strings."""
    return {k: json.dumps(v) if isinstance(v, list) else v for k, v in flatten(params).items()}


@contextmanager
def resume_run(p: MlflowParams, root: Path, run_file: Path) -> Iterator[mlflow.ActiveRun]:
    """Re-open the run that train started (its id is in run_file); start a new one if it is gone."""
    setup(p, root)
    run_id = json.loads(Path(run_file).read_text())["run_id"] if Path(run_file).is_file() else None
    try:
        if run_id:
            mlflow.get_run(run_id)
    except MlflowException:
        run_id = None
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def git_state(root: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Current commit and whether the tracked tree differs from it, outside `ignore` (the files
    the pipeline itself writes: dvc.lock, the reports; see register)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        excluded = [f":(exclude){p}" for p in ignore]
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def experiment_tags() -> dict[str, str]:
    """The DVC experiment this run is (`dvc exp run`, or a flow run with overrides), if any."""
    name, tags = run_identity()
    return {k: v for k, v in tags.items() if k.startswith("dvc_exp_")}


class MetricSink(Protocol):
    """Where training sends its step metrics: MLflow in the pipeline, anything in tests/bench."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None: ...


class MlflowSink:
    """Logs to the active MLflow run, asynchronously (0.01 % of a step at train's cadence,
    bench/logging_overhead.md); `flush` waits for the queue."""

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        mlflow.log_metrics(metrics, step=step, synchronous=False)

    def flush(self) -> None:
        mlflow.flush_async_logging()


class NullSink:
    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def flush(self) -> None:
        pass


def _existing_run(run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        mlflow.get_run(run_id)
    except MlflowException:
        return None
    return run_id


@contextmanager
def training_run(
    p: MlflowParams,
    root: Path,
    run_dir: Path,
    params: dict[str, Any],
    tags: dict[str, str],
    resume_run_id: str | None = None,
) -> Iterator[tuple[str, MlflowSink]]:
    """Start the pipeline's MLflow run (params, lineage tags, system metrics), or continue
    `resume_run_id` when it still exists; record its id in `run_dir/RUN_FILE` for the later
    stages, and yield (run id, sink)."""
    setup(p, root)
    run_name, run_tags = run_identity()
    mlflow.set_system_metrics_sampling_interval(p.system_metrics_interval)
    mlflow.set_system_metrics_samples_before_logging(1)
    resumed = _existing_run(resume_run_id)
    with mlflow.start_run(
        run_id=resumed, run_name=None if resumed else run_name, log_system_metrics=p.system_metrics
    ) as run:
        (Path(run_dir) / RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id}))
        if not resumed:  # a resumed run has them already, with these values
            mlflow.log_params(mlflow_params(params))
        mlflow.set_tags({**tags, **git_state(root), **run_tags})
        sink = MlflowSink()
        try:
            yield run.info.run_id, sink
        finally:
            sink.flush()


def set_tags(tags: dict[str, str]) -> None:
    """Tags on the active run."""
    mlflow.set_tags(tags)
