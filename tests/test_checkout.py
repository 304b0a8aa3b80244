"""One run per checkout, validation before any work, and overrides that leave no trace.

Real processes throughout: a second process really holds the lock, a run is really killed, two
real `xmodal run`s really overlap, and real DVC saves the experiment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tasks.common import checkout, runlock
from tasks.common.config import ConfigError

from .conftest import make_repo, project_env, tiny_params_dict

BIN = Path(sys.executable).parent
HOLD = textwrap.dedent(
    """
    import sys, time
    from tasks.common import runlock
    with runlock.hold(sys.argv[1], "holder under test"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def _holder(root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True, cwd=root
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_by_name_and_a_killed_one_frees_the_checkout(tmp_path):
    proc = _holder(tmp_path)
    try:
        t0 = time.monotonic()
        with pytest.raises(runlock.CheckoutBusy) as err, runlock.hold(tmp_path, "second"):
            pass
        assert time.monotonic() - t0 < 2  # refused at once, not after a wait
        assert "'holder under test'" in str(err.value) and f"pid {proc.pid}" in str(err.value)
        with pytest.raises(runlock.CheckoutBusy):
            runlock.ensure_free(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # The OS dropped the dead holder's lock: no stale lock to clean by hand.
    with runlock.hold(tmp_path, "after the kill") as record:
        assert json.loads(runlock.record_path(tmp_path).read_text())["label"] == "after the kill"
        assert record["pid"] == os.getpid()
    assert not runlock.record_path(tmp_path).exists()


def test_processes_the_holder_starts_pass_and_others_do_not(tmp_path):
    check = "import sys; from tasks.common import runlock; runlock.ensure_free(sys.argv[1])"
    with runlock.hold(tmp_path, "parent"):
        child = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True)
        assert child.returncode == 0, child.stderr.decode()[-2000:]  # inherits the token
        env = {k: v for k, v in os.environ.items() if k != runlock.TOKEN_ENV}
        other = subprocess.run(
            [sys.executable, "-c", check, str(tmp_path)], capture_output=True, env=env, text=True
        )
        assert other.returncode != 0 and "CheckoutBusy" in other.stderr


def _write_params(root: Path, **sections) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(**sections)))


def test_configure_names_every_missing_input_before_any_work(tmp_path):
    _write_params(tmp_path)
    assert len(checkout.configure(tmp_path)) == 64  # valid: the params hash
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a-000.tar").write_bytes(b"")
    bad = {
        "model.image.backbone=resnet9000": "model.image.backbone: unknown torchvision",
        "model.text.pooling=median": "model.text.pooling",
        "ingest.coco.images_dir=nowhere": "ingest.coco.images_dir: nowhere does not exist",
        "ingest.webdataset.urls=shards/a-{000..002}.tar": "shard shards/a-001.tar does not exist "
        "and 1 more",
    }
    for override, message in bad.items():
        extra = []
        if override.startswith("ingest.coco"):
            extra = ["ingest.source=coco", "ingest.coco.captions_json=shards/a-000.tar"]
        if override.startswith("ingest.webdataset"):
            extra = ["ingest.source=webdataset"]
        with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace(".", r"\.")):
            checkout.configure(tmp_path, [override, *extra])
    # Remote shards are the loader's business, not a path to check here.
    checkout.configure(
        tmp_path, ["ingest.source=webdataset", "ingest.webdataset.urls=http://h/a.tar"]
    )


KILLED_RUN = textwrap.dedent(
    """
    import os, sys
    from tasks.common import checkout
    with checkout.experiment(sys.argv[1], ["train.epochs=7"], "killed run"):
        os.kill(os.getpid(), 9)
    """
)


def test_experiment_restores_params_after_a_failure_and_after_a_kill(tmp_path):
    repo = make_repo(tmp_path / "repo")
    before = (repo / "params.yaml").read_bytes()
    failing = checkout.experiment(repo, ["train.epochs=5"], "failing run")
    with pytest.raises(RuntimeError, match="boom"), failing as name:
        assert name.startswith("failing-run-")
        assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 5
        assert os.environ["DVC_EXP_NAME"] == name
        raise RuntimeError("boom")
    assert (repo / "params.yaml").read_bytes() == before
    assert "DVC_EXP_NAME" not in os.environ
    assert not (repo / "dvc.lock").exists()  # created by the run, so removed with it

    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(repo)], cwd=repo)
    assert killed.returncode == -signal.SIGKILL
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 7
    checkout.recover(repo)  # what the next run does first
    assert (repo / "params.yaml").read_bytes() == before
    assert not checkout.journal_dir(repo).exists()


# ----------------------------------------------------------------------------- real runs


def _run(repo: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "run", "--root", str(repo), *args],
        cwd=repo,
        env=project_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _git(repo: Path, *args: str) -> str:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    return subprocess.run(
        [*git, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project after one plain run, everything committed, as a real checkout is."""
    repo = make_repo(tmp_path_factory.mktemp("checkout"))
    first = _run(repo)
    out, _ = first.communicate(timeout=900)
    assert first.returncode == 0, out[-4000:]
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "first run")
    return repo


@pytest.mark.slow
def test_invalid_override_is_refused_before_any_work(project: Path):
    before = (project / "params.yaml").read_bytes()
    run = _run(project, "-S", "model.image.backbone=resnet9000")
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 2, out[-3000:]
    assert "model.image.backbone: unknown torchvision classification model" in out
    assert "Beginning flow run" not in out  # refused before Prefect started anything
    assert (project / "params.yaml").read_bytes() == before


@pytest.mark.slow
def test_overlapping_runs_and_an_override_run_leave_the_checkout_as_it_was(project: Path):
    params, lock = ((project / f).read_bytes() for f in ("params.yaml", "dvc.lock"))
    # Run A: an override run, a DVC experiment. While it holds the checkout, a plain run (B)
    # and a stage started the way `dvc repro` starts it are refused at once, naming A.
    a = _run(project, "-S", "train.epochs=2")
    record = runlock.record_path(project)
    deadline = time.monotonic() + 300
    while not record.is_file() and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    holder = json.loads(record.read_text())
    b = _run(project)
    b_out, _ = b.communicate(timeout=300)
    stage = subprocess.run(
        [sys.executable, "-m", "tasks.train"], cwd=project, env=project_env(project),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    a_out, _ = a.communicate(timeout=900)
    assert a.returncode == 0, a_out[-4000:]
    assert b.returncode == 1, b_out[-3000:]
    (line,) = [x for x in b_out.splitlines() if x.startswith("error:")]
    assert "is busy" in line and f"pid {holder['pid']}" in line and holder["label"] in line
    assert "Beginning flow run" not in b_out
    assert stage.returncode == 2 and "CheckoutBusy" in stage.stderr, stage.stderr[-2000:]

    # A's overrides did not stay: params.yaml, dvc.lock and the reports are as committed, and
    # the DVC cache holds every output dvc.lock names (status clean).
    assert (project / "params.yaml").read_bytes() == params
    assert (project / "dvc.lock").read_bytes() == lock
    assert _git(project, "status", "--porcelain", "--untracked-files=no") == ""
    dvc = str(BIN / "dvc")
    status = subprocess.run([dvc, "status", "--json"], cwd=project, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert json.loads(status.stdout) == {}

    # The experiment holds them instead, and the registered version names it.
    name = next(x for x in a_out.splitlines() if x.startswith("DVC experiment ")).split()[2]
    shown = subprocess.run([dvc, "exp", "show", "--json"], cwd=project, capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    assert name in shown
    exp_params = _git(project, "show", f"{_exp_ref(project, name)}:params.yaml")
    assert yaml.safe_load(exp_params)["train"]["epochs"] == 2
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    v = client.get_model_version_by_alias("xmodal-dual-encoder", "candidate")
    assert v.tags["dvc_exp_name"] == name
    assert v.tags["git_dirty"] == "false"
    assert v.tags["dvc_exp_baseline_rev"] == _git(project, "rev-parse", "HEAD").strip()
    assert "train (" in a_out and "ingest (skipped)" in a_out

    # A plain run after all this finds every stage up to date: nothing was corrupted.
    c = _run(project)
    c_out, _ = c.communicate(timeout=600)
    assert c.returncode == 0, c_out[-3000:]
    stages = next(x for x in c_out.splitlines() if x.startswith("stages: "))
    assert stages.count("(skipped)") == 8, stages
    assert c_out.count("Finished in state Skipped(") == 8


def _exp_ref(repo: Path, name: str) -> str:
    refs = _git(repo, "for-each-ref", "--format=%(refname)", "refs/exps").split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return ref
