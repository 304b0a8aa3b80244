"""The train and evaluate stages with every option switched on, on tiny generated data."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tasks import evaluate, ingest, preprocess, train
from tasks.common.config import validate

from .conftest import tiny_params_dict

ALL_ON = {
    "preprocess": {"image_size": 64},
    "model": {
        "text": {"pooling": "max", "dropout": 0.2},
        "fusion": {"enabled": True, "dim": 16, "heads": 2, "dropout": 0.1},
        "multiscale": {"enabled": True, "stage": -3},
    },
    "train": {
        "max_steps": 2,
        "temperature": {"mode": "scheduled", "start": 0.1, "end": 0.05},
        "loss": {"weighting": "uncertainty"},
        "image": {"lr": 1e-4, "trainable_blocks": 2},
        "text": {"trainable_blocks": 1},
        "augment": {"crop_scale": [0.6, 1.0], "hflip": True},
    },
    "evaluate": {"rerank_k": 4},
}


@pytest.mark.slow
def test_every_option_trains_and_reranks(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = validate(tiny_params_dict(**ALL_ON))
    ingest.run(params, tmp_path)
    preprocess.run(params, tmp_path)
    res = train.run(params, tmp_path)
    assert res.steps == 2
    out = evaluate.run(params, tmp_path)
    report = json.loads((tmp_path / params.paths.metrics).read_text())
    assert set(report["test_rerank"]) >= {"i2t_R1", "t2i_R5", "i2t_mean_rank"}
    assert out.metrics["i2t_R1"] == report["test"]["i2t_R1"]
    run = mlflow.get_run(res.run_id)
    expected = (
        "model/parameters",
        "train/loss_itm",
        "train/loss_multiscale",
        "train/weight_itm",
        "test/i2t_rerank_qps",
    )
    for key in expected:
        assert key in run.data.metrics, key
    assert run.data.params["train.temperature.mode"] == "scheduled"
    assert run.data.params["model.fusion.enabled"] == "True"
