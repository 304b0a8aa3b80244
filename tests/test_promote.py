"""Promotion gates (floor, tie policy, rolled-back versions), alias moves and their history,
refusal tags, rollback and the race re-check, on a real MLflow registry (sqlite) holding real
exported ONNX models; `xmodal rollback` and `xmodal registry history` as real subprocesses."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tasks import promote as promote_mod
from tasks import register as register_mod
from tasks.common import aliases as aliases_mod
from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import PromoteParams, validate
from tasks.common.data import split_index
from tasks.evaluate import evaluate
from tasks.export import export
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.promote import Gate, gates, promote, rollback

from .conftest import tiny_params_dict

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def test_gates_against_hand_figures():
    champ = {"i2t_R1": 0.5, "t2i_R1": 0.5, "i2t_R5": 0.9, "t2i_R5": 0.9}
    better = {"i2t_R1": 0.6, "t2i_R1": 0.5, "i2t_R5": 0.89, "t2i_R5": 0.95}
    ok = gates(better, champ, True, PromoteParams(min_delta=0.04, tolerance=0.02, min_mean_r1=0.5))
    assert all(g.passed for g in ok)
    at_bar = gates(better, champ, True, PromoteParams(min_delta=0.05, min_mean_r1=0.5))
    assert [g.name for g in at_bar if not g.passed] == ["mean_R1"]  # a tie: refused by default
    bad = gates(better, champ, False, PromoteParams(min_delta=0.1, tolerance=0.005))
    failed = {g.name for g in bad if not g.passed}
    assert failed == {"onnx_parity", "mean_R1_floor", "mean_R1", "i2t_R5_no_drop"}
    floor = next(g for g in bad if g.name == "mean_R1_floor")
    assert floor.detail == "candidate 0.5500 (i2t 0.6000, t2i 0.5000) < min_mean_r1 0.6"


def test_tie_policy_and_first_champion_gates():
    same = {"i2t_R1": 0.7, "t2i_R1": 0.6, "i2t_R5": 0.9}
    by_default = {g.name: g for g in gates(same, same, True, PromoteParams())}
    assert not by_default["mean_R1"].passed
    assert by_default["mean_R1"].detail.endswith("a tie, on_tie=refuse: refused")
    tie_ok = {g.name: g for g in gates(same, same, True, PromoteParams(on_tie="promote"))}
    assert all(g.passed for g in tie_ok.values())
    assert tie_ok["mean_R1"].detail.endswith("a tie, on_tie=promote: promoted")
    # A tie is against champion + min_delta: at exactly the bar is a tie, above it passes.
    bar = {g.name: g for g in gates(same, same, True, PromoteParams(min_delta=-0.01))}
    assert bar["mean_R1"].passed and "better by 0.0100" in bar["mean_R1"].detail
    # No champion: parity, not rolled back and the floor only.
    first = gates(same, None, True, PromoteParams(min_mean_r1=0.65))
    assert [(g.name, g.passed) for g in first] == [
        ("onnx_parity", True),
        ("not_rolled_back", True),
        ("mean_R1_floor", True),
    ]
    back = gates(same, None, True, PromoteParams(min_mean_r1=0.0), "was rolled back at t by u")
    assert not back[1].passed and "refused unless forced" in back[1].detail
    forced = gates(same, None, True, PromoteParams(min_mean_r1=0.0), "was rolled back", True)
    assert all(g.passed for g in forced)


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


@pytest.fixture
def store(monkeypatch):
    """The project's own sqlite store (params' relative tracking URI), not the session's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _params(params, name: str, **promote):
    """`params` with its own registered model `name` and promote keys changed."""
    return params.model_copy(
        update={
            "register": params.register.model_copy(update={"model_name": name}),
            "promote": params.promote.model_copy(update=promote),
        }
    )


def _register(params, root) -> str:
    return register_mod.run(params, root).version


def _alias(name: str, alias: str) -> str | None:
    return aliases_mod.alias_version(MlflowClient(), name, alias)


def _moves(name: str) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.action, e.alias, e.from_, e.to) for e in aliases_mod.events(MlflowClient(), name)]


def test_first_version_is_only_a_candidate_and_the_floor_decides_the_first_champion(project, store):
    params, root = project
    name = "floor-model"
    p = _params(params, name, min_mean_r1=1.0)
    assert register_mod.run(p, root).aliases == ["candidate"]
    assert _alias(name, "champion") is None  # registration never makes a champion

    res = promote_mod.run(p, root)
    assert not res.promoted and res.champion_before is None and res.champion_after is None
    assert [g.name for g in res.gates if not g.passed] == ["mean_R1_floor"]
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["promotion_status"] == "refused"
    assert tags["promotion_failed_gates"] == "mean_R1_floor"
    assert "min_mean_r1 1" in tags["promotion_gate.mean_R1_floor"]
    assert _alias(name, "champion") is None

    mean = promote_mod.mean_r1(res.candidate_metrics)
    above = promote_mod.run(_params(params, name, min_mean_r1=mean + 0.001), root)
    assert not above.promoted and _alias(name, "champion") is None
    at = promote_mod.run(_params(params, name, min_mean_r1=mean), root)  # the floor is >=
    assert at.promoted and at.note == "first champion", at.gates
    assert "PROMOTED (first champion)" in promote_mod.report(at)
    assert _alias(name, "champion") == "1" and _alias(name, "previous-champion") is None
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["promotion_status"] == "promoted"
    assert not any(k.startswith("promotion_gate.") for k in tags)  # stale refusals cleared
    assert "promotion_failed_gates" not in tags
    assert _moves(name) == [
        ("register", "candidate", None, "1"),
        ("first-champion", "champion", None, "1"),
    ]


def test_a_tie_is_refused_by_default_and_promoted_with_on_tie_promote(project, store):
    params, root = project
    name = "tie-model"
    p = _params(params, name, min_mean_r1=0.0)
    _register(p, root)
    assert promote_mod.run(p, root).promoted
    assert _register(p, root) == "2"  # the same model again: equal recall

    res = promote_mod.run(p, root)
    assert not res.promoted
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion_failed_gates"] == "mean_R1"
    assert tags["promotion_gate.mean_R1"].endswith("a tie, on_tie=refuse: refused")
    assert _alias(name, "champion") == "1"

    res = promote_mod.run(_params(params, name, min_mean_r1=0.0, on_tie="promote"), root)
    assert res.promoted and all(g.passed for g in res.gates), res.gates
    assert _alias(name, "champion") == "2" and _alias(name, "previous-champion") == "1"
    assert MlflowClient().get_model_version(name, "2").tags["promotion_status"] == "promoted"


def test_rollback_walks_the_history_back_and_refuses_when_exhausted(project, store):
    params, root = project
    name = "rollback-model"
    p = _params(params, name, min_mean_r1=0.0, on_tie="promote")
    for version in ("1", "2", "3"):
        assert _register(p, root) == version
        assert promote_mod.run(p, root).promoted
    assert _alias(name, "champion") == "3" and _alias(name, "previous-champion") == "2"

    first = rollback(p.register, p.promote, p.mlflow, root)
    assert (first.rolled_back, first.champion, first.previous) == ("3", "2", "1")
    assert first.candidate_removed and first.from_history
    assert _alias(name, "candidate") is None  # the next promote cannot pick v3 up again
    tags = MlflowClient().get_model_version(name, "3").tags
    assert tags["promotion_status"] == "rolled_back" and tags["rolled_back_by"]
    assert tags["rolled_back_at"].endswith("Z")

    second = rollback(p.register, p.promote, p.mlflow, root)  # not a toggle: one more step back
    assert (second.rolled_back, second.champion, second.previous) == ("2", "1", None)
    assert not second.candidate_removed
    assert _alias(name, "champion") == "1" and _alias(name, "previous-champion") is None
    with pytest.raises(LookupError) as err:
        rollback(p.register, p.promote, p.mlflow, root)
    assert str(err.value) == (
        "nothing to roll back to: champion v1 is the only champion in the history of "
        "'rollback-model'"
    )
    assert _moves(name)[-3:] == [
        ("rollback", "champion", "3", "2"),
        ("rollback", "candidate", "3", None),
        ("rollback", "champion", "2", "1"),
    ]
    assert aliases_mod.champion_stack(aliases_mod.events(MlflowClient(), name), "champion") == ["1"]


def test_rolled_back_version_is_refused_unless_forced(project, store):
    params, root = project
    name = "force-model"
    p = _params(params, name, min_mean_r1=0.0, on_tie="promote")
    for _ in range(2):
        _register(p, root)
        assert promote_mod.run(p, root).promoted
    rollback(p.register, p.promote, p.mlflow, root)
    assert _alias(name, "champion") == "1" and _alias(name, "candidate") is None
    # Someone points `candidate` at the rolled-back version again (MLflow UI, a script).
    MlflowClient().set_registered_model_alias(name, "candidate", "2")

    res = promote_mod.run(p, root)
    assert not res.promoted
    assert [g.name for g in res.gates if not g.passed] == ["not_rolled_back"]
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags["promotion_status"] == "rolled_back"  # a refusal keeps the mark
    assert "refused unless forced" in tags["promotion_gate.not_rolled_back"]
    assert _alias(name, "champion") == "1"

    res = promote_mod.run(p, root, force=True)
    assert res.promoted and res.note == "forced", res.gates
    assert _alias(name, "champion") == "2" and _alias(name, "previous-champion") == "1"
    assert MlflowClient().get_model_version(name, "2").tags["promotion_status"] == "promoted"
    assert _moves(name)[-1] == ("force-promote", "champion", "1", "2")


def test_rollback_without_history_follows_previous_champion(project, store):
    """A registry from before the history: its aliases were set without events."""
    params, root = project
    name = "legacy-model"
    p = _params(params, name)
    _register(p, root)
    _register(p, root)
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "previous-champion", "1")
    res = rollback(p.register, p.promote, p.mlflow, root)
    assert (res.champion, res.previous, res.from_history) == ("1", None, False)
    assert res.candidate_removed  # v2 was also the candidate
    with pytest.raises(LookupError, match="only champion in the history"):
        rollback(p.register, p.promote, p.mlflow, root)


def test_promotion_race_does_not_overwrite_a_moved_champion(project, store, monkeypatch):
    params, root = project
    name = "race-model"
    p = _params(params, name, min_mean_r1=0.0, on_tie="promote")
    _register(p, root)
    assert promote_mod.run(p, root).promoted
    assert _register(p, root) == "2"

    # Another promotion moves the champion while this one is comparing: it must not overwrite.
    real = aliases_mod.alias_version
    calls = {"n": 0}

    def racing(client_, name_, alias):
        if alias == "champion":
            calls["n"] += 1
            if calls["n"] == 2:  # the re-check under the lock
                return "7"
        return real(client_, name_, alias)

    monkeypatch.setattr(aliases_mod, "alias_version", racing)
    res = promote(p.promote, p.register, p.mlflow, root / p.paths.raw, _test_index(p, root), root)
    assert not res.promoted
    assert Gate("champion_unchanged", False, "champion moved from v1 to v7") in res.gates
    monkeypatch.setattr(aliases_mod, "alias_version", real)
    assert _alias(name, "champion") == "1"
    assert MlflowClient().get_model_version(name, "2").tags["promotion_status"] == "refused"
    assert (root / ".xmodal").is_dir() and not (root / ".xmodal-promote.lock").exists()


def _xmodal(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    return subprocess.run(
        [str(BIN / "xmodal"), *args, "--params", "params.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_rollback_and_registry_history(project, store):
    params, root = project
    name = "cli-model"
    (root / "params.yaml").write_text(
        yaml.safe_dump(tiny_params_dict(register={"model_name": name}), sort_keys=False)
    )
    p = _params(params, name, min_mean_r1=0.0, on_tie="promote")
    _register(p, root)
    assert promote_mod.run(p, root).promoted

    refused = _xmodal(root, "rollback")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        f"error: nothing to roll back to: champion v1 is the only champion in the history of "
        f"'{name}'"
    ]
    assert refused.stdout == ""

    _register(p, root)
    assert promote_mod.run(p, root).promoted
    done = _xmodal(root, "rollback")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "champion: v2 -> v1 (v2 tagged promotion_status=rolled_back)",
        "previous-champion: removed (none earlier)",
        "candidate: removed (it named v2)",
    ]

    hist = _xmodal(root, "registry", "history")
    assert hist.returncode == 0, hist.stdout + hist.stderr
    lines = hist.stdout.splitlines()
    assert lines[0].startswith(f"alias history of '{name}' (sqlite:///")
    rows = [line.split() for line in lines[1:-1]]
    assert [(r[1], r[2], r[3], r[5]) for r in rows] == [
        ("register", "candidate", "-", "v1"),
        ("first-champion", "champion", "-", "v1"),
        ("register", "candidate", "v1", "v2"),
        ("promote", "champion", "v1", "v2"),
        ("rollback", "champion", "v2", "v1"),
        ("rollback", "candidate", "v2", "-"),
    ]
    assert all(r[4] == "→" and "@" in r[6] for r in rows)
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # oldest first
    assert lines[-1] == "aliases now: champion=v1"


def _test_index(params, root: Path) -> dict:
    return split_index(root / params.paths.prepared, "test")


def test_two_promotions_started_together_are_serialised(project, store):
    """Two real `xmodal promote` processes, started together on the same candidate: one moves
    the champion, the other sees it moved (the re-check under the lock) and refuses; the
    champion ends on the version that passed the gates, with one promotion in the history."""
    params, root = project
    name = "concurrent-model"
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            tiny_params_dict(
                register={"model_name": name}, promote={"min_mean_r1": 0.0, "on_tie": "promote"}
            ),
            sort_keys=False,
        )
    )
    p = _params(params, name, min_mean_r1=0.0, on_tie="promote")
    _register(p, root)
    assert promote_mod.run(p, root).promoted  # v1: the first champion
    _register(p, root)  # v2: the candidate both processes compare

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cmd = [str(BIN / "xmodal"), "promote", "--params", "params.yaml"]
    procs = [
        subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [proc.communicate(timeout=300) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    text = "\n".join(o for pair in outs for o in pair)
    assert text.count("PROMOTED") == 1, text
    # The second either compared against v1 and found it moved (refused), or started late
    # enough to find its candidate already champion (nothing to do).
    if codes == [0, 1]:
        assert "champion moved from v1 to v2" in text, text
    else:
        assert codes == [0, 0] and "already the champion" in text, text
    assert _alias(name, "champion") == "2" and _alias(name, "previous-champion") == "1"
    promotions = [m for m in _moves(name) if m[0] == "promote"]
    assert promotions == [("promote", "champion", "1", "2")]
