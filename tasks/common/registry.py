"""Exported bundles from a folder or from the MLflow registry (`models:/<name>@<alias>`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tasks.common import tracking
from tasks.common.config import MlflowParams
from xmodal_runtime.bundle import Bundle, find_bundle


def resolve_model(model: str, mlflow_p: MlflowParams | None = None, root: Path = Path(".")) -> Path:
    """The bundle folder: given directly, or downloaded from a `models:/` or `runs:/` URI."""
    if model.startswith(("models:/", "runs:/")):
        import mlflow

        tracking.setup(mlflow_p or MlflowParams(), root)
        local = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=tempfile.mkdtemp())
        return Bundle.open(find_bundle(local)).root
    return Bundle.open(model).root
