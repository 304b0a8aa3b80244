"""Prefect artifacts for a training-pipeline run: a markdown report, a Recall@K table, the plots."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import urlencode

from prefect import task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_table_artifact,
)
from prefect.cache_policies import NONE

from tasks.common.config import DEFAULT_PARAMS, load_params
from tasks.common.registry import redact
from tasks.common.tracking import tracking_uri


def _why(o) -> str:
    return "skipped: " + (o.reason.split(":")[0] if o.reason else "unchanged since dvc.lock")


def stage_lines(outcomes: dict | None) -> list[str]:
    """The run's stages: which ran (and for how long) and which DVC skipped as unchanged."""
    if not outcomes:
        return []
    rows = [
        f"| {name} | {_why(o) if o.skipped else 'ran'} | {o.seconds:.1f} |"
        for name, o in outcomes.items()
    ]
    ran = sum(not o.skipped for o in outcomes.values())
    return [
        f"## Stages: {ran} ran, {len(outcomes) - ran} skipped",
        "",
        "| stage | outcome | seconds |",
        "| --- | --- | --- |",
        *rows,
        "",
    ]


def markdown_report(root: Path, outcomes: dict | None = None) -> tuple[str, list[dict]]:
    params = load_params(root / DEFAULT_PARAMS)
    paths = params.paths
    metrics = json.loads((root / paths.metrics).read_text())["test"]
    parity = json.loads((root / paths.export_report).read_text())["parity"]
    reg = json.loads((root / paths.register_report).read_text())
    ks = params.evaluate.ks
    table = [
        {"K": k, "image→text": metrics[f"i2t_R{k}"], "text→image": metrics[f"t2i_R{k}"]} for k in ks
    ]
    lines = [
        "# xmodal training-pipeline",
        "",
        *stage_lines(outcomes),
        "| Recall@K | image→text | text→image |",
        "| --- | --- | --- |",
        *(f"| R@{r['K']} | {r['image→text']:.3f} | {r['text→image']:.3f} |" for r in table),
        "",
        f"Mean rank i2t {metrics['i2t_mean_rank']:.2f}, t2i {metrics['t2i_mean_rank']:.2f}.",
        "",
        f"ONNX parity: **{'passed' if parity['passed'] else 'FAILED'}** "
        f"(max abs diff {parity['max_abs_diff']:.2e}, tolerance {parity['atol']:g}).",
        "",
        mlflow_links(redact(tracking_uri(params.mlflow, root)), reg),  # no credentials
    ]
    for png in sorted((root / paths.figures).glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        lines += ["", f"![{png.stem}](data:image/png;base64,{data})"]
    return "\n".join(lines), table


def artifact_key(name: str) -> str:
    """Prefect accepts only lowercase letters, digits and dashes in artifact keys."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower())


def mlflow_links(uri: str, reg: dict) -> str:
    """Links into the MLflow UI when the store is a tracking server, else the plain ids."""
    run, model = f"run `{reg['run_id']}`", f"model `models:/{reg['model_name']}/{reg['version']}`"
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        exp = reg.get("experiment_id")
        run_url = f"{base}/#/experiments/{exp}/runs/{reg['run_id']}" if exp else f"{base}/#/"
        run = f"[run {reg['run_id']}]({run_url})"
        model_url = f"{base}/#/models/{reg['model_name']}/versions/{reg['version']}"
        model = f"[model {reg['model_name']} v{reg['version']}]({model_url})"
    return f"MLflow ({uri}): {run}, {model} (aliases {', '.join(reg['aliases'])})."


def plot_urls(root: Path) -> dict[str, str]:
    """URLs of the run's plots as the MLflow tracking server serves them (evaluate logs them
    under `plots/`); none for a local store, whose files have no URL a browser can load."""
    params = load_params(root / DEFAULT_PARAMS)
    uri = redact(tracking_uri(params.mlflow, root))
    if not uri.startswith(("http://", "https://")):
        return {}
    run_id = json.loads((root / params.paths.register_report).read_text())["run_id"]
    base = f"{uri.rstrip('/')}/get-artifact"
    return {
        png.stem: f"{base}?{urlencode({'path': f'plots/{png.name}', 'run_uuid': run_id})}"
        for png in sorted((root / params.paths.figures).glob("*.png"))
    }


@task(name="report", cache_policy=NONE)
def report_task(root: str = ".", outcomes: dict | None = None) -> None:
    md, table = markdown_report(Path(root).resolve(), outcomes)
    create_markdown_artifact(md, key="xmodal-report", description="metrics, parity, MLflow links")
    create_table_artifact(table, key="xmodal-recall", description="test Recall@K")
    for name, url in plot_urls(Path(root).resolve()).items():
        create_image_artifact(
            url, key=artifact_key(f"xmodal-plot-{name}"), description=f"{name} plot (MLflow)"
        )
