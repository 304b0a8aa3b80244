"""Promotion gates, alias moves, refusal tags, rollback and the race re-check, on a real MLflow
registry (sqlite) holding real exported ONNX models."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tasks import promote as promote_mod
from tasks import register as register_mod
from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import validate
from tasks.common.data import split_index
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.promote import Gate, gates, promote, rollback

from .conftest import tiny_params_dict

pytestmark = pytest.mark.slow
NAME = "xmodal-dual-encoder"


def test_gates_against_hand_figures():
    from tasks.common.config import PromoteParams

    champ = {"i2t_R1": 0.5, "t2i_R1": 0.5, "i2t_R5": 0.9, "t2i_R5": 0.9}
    better = {"i2t_R1": 0.6, "t2i_R1": 0.5, "i2t_R5": 0.89, "t2i_R5": 0.95}
    ok = gates(better, champ, True, PromoteParams(min_delta=0.05, tolerance=0.02))
    assert all(g.passed for g in ok)
    bad = gates(better, champ, False, PromoteParams(min_delta=0.1, tolerance=0.005))
    failed = {g.name for g in bad if not g.passed}
    assert failed == {"onnx_parity", "mean_R1", "i2t_R5_no_drop"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("promote")
    params = validate(tiny_params_dict())
    paths = params.paths
    ingest(params.ingest, root / paths.raw, root / paths.quarantine)
    preprocess(params.preprocess, None, root / paths.raw, root / paths.prepared)
    torch.manual_seed(0)
    net = build_model(params.model, root / paths.prepared)
    (root / paths.train).mkdir(parents=True)
    torch.save(net.checkpoint(params_hash="t"), root / paths.train / CHECKPOINT)
    hist = root / paths.train_history
    hist.parent.mkdir(parents=True, exist_ok=True)
    with open(hist, "w", newline="") as f:
        csv.writer(f).writerows(
            [["step", "epoch", "loss", "lr", "temperature"], [1, 0, 4.0, 0.1, 0.07]]
        )
    evaluate(
        params.evaluate,
        root / paths.train,
        root / paths.prepared,
        hist,
        root / paths.metrics,
        root / paths.recall_plot,
        root / paths.figures,
        params.mlflow,
        root,
    )
    export(
        params.export,
        root / paths.train,
        root / paths.prepared,
        root / paths.onnx,
        root / paths.export_report,
    )
    return params, root


def _register(params, root) -> str:
    return register_mod.run(params, root).version


def test_promotion_rollback_refusal_and_race(project, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params, root = project
    assert _register(params, root) == "1"  # first version: candidate and champion
    assert _register(params, root) == "2"  # same model again: candidate only
    client = MlflowClient()

    res = promote_mod.run(params, root)  # equal recall, min_delta 0: passes
    assert res.promoted and all(g.passed for g in res.gates), res.gates
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(NAME, "previous-champion").version) == "1"
    assert client.get_model_version(NAME, "2").tags["promotion_status"] == "promoted"

    assert rollback(params.register, params.promote, params.mlflow, root) == ("1", "2")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    assert _register(params, root) == "3"
    strict = params.model_copy(
        update={"promote": params.promote.model_copy(update={"min_delta": 0.5})}
    )
    res = promote_mod.run(strict, root)
    assert not res.promoted
    tags = client.get_model_version(NAME, "3").tags
    assert tags["promotion_status"] == "refused"
    assert tags["promotion_failed_gates"] == "mean_R1"
    assert "min_delta 0.5" in tags["promotion_gate.mean_R1"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # Another promotion moves the champion while this one is comparing: it must not overwrite.
    real = promote_mod._alias_version
    calls = {"n": 0}

    def racing(client_, name, alias):
        if alias == "champion":
            calls["n"] += 1
            if calls["n"] == 2:  # the re-check under the lock
                return "2"
        return real(client_, name, alias)

    monkeypatch.setattr(promote_mod, "_alias_version", racing)
    res = promote(
        params.promote,
        params.register,
        params.mlflow,
        root / params.paths.raw,
        _test_index(params, root),
        root,
    )
    assert not res.promoted
    assert Gate("champion_unchanged", False, "champion moved from v1 to v2") in res.gates
    monkeypatch.setattr(promote_mod, "_alias_version", real)
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"


def _test_index(params, root: Path) -> dict:
    return split_index(root / params.paths.prepared, "test")
