"""The pipeline through real services: Prefect server + deployments + worker, MLflow server.

Exactly what a user does after `make serve`: `prefect deployment run` executed by the worker
against the MLflow tracking server; then the run, the registered version and its aliases are read
back from that server. Everything runs on free ports on 127.0.0.1 in a throwaway git repository
and is torn down even when a test fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException

from services.base import DEPLOYMENTS, ServiceError, Services, require_postgres_binaries
from services.manager import (
    start,
    start_mlflow_server,
    start_prefect_server,
    status,
    stop_service,
)
from services.postgres import remove_cluster
from tasks.common import runlock

from .conftest import clean_env, extract_raw_images, free_port, make_repo, running_stack

pytestmark = pytest.mark.services

BIN = Path(sys.executable).parent
MODEL = "xmodal-dual-encoder"


def _prefect(s: Services, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "prefect"), *args],
        cwd=s.root,
        env={**clean_env(), **s.client_env(), "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _flow_run(s: Services, run_output: str) -> dict:
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", run_output)
    assert match, run_output
    with urllib.request.urlopen(f"{s.prefect_api}/flow_runs/{match.group(1)}", timeout=10) as r:
        return json.loads(r.read())


# sqlite: `make serve`; postgres: the production profile (both backend stores in PostgreSQL).
@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def services(request, tmp_path_factory):
    if request.param == "postgres":
        try:
            require_postgres_binaries()
        except ServiceError as err:
            pytest.skip(str(err))
    repo = make_repo(tmp_path_factory.mktemp(f"xmodal-services-{request.param}"))
    s = Services(
        root=repo,
        state=repo / ".services",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        backend=request.param,
        postgres_port=free_port(),
        timeout=300,
    )
    try:
        with running_stack(s):
            yield s
    finally:
        if s.backend == "postgres":
            remove_cluster(s)


@pytest.fixture(scope="module")
def deployment_run(services: Services) -> subprocess.CompletedProcess:
    return _prefect(
        services,
        "deployment",
        "run",
        "training-pipeline/default",
        "-p",
        "epochs=1",
        "-p",
        "seed=1",
        "-p",
        "promote=true",
        "--watch",
        "--watch-timeout",
        "900",
    )


def test_services_are_healthy_and_recorded(services: Services):
    expected = {"prefect-server", "mlflow-server", "prefect-worker"}
    if services.backend == "postgres":
        expected.add("postgres")
    assert set(status(services)) == expected
    assert all(v.startswith("running") for v in status(services).values())
    listed = _prefect(services, "deployment", "ls")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "training-pipeline/default" in listed.stdout
    assert "batch-inference/default" in listed.stdout
    env_file = (services.state / "env").read_text()
    assert f"MLFLOW_TRACKING_URI={services.mlflow_uri}" in env_file
    # Every server listens on 127.0.0.1 only: no socket on another address or the wildcard.
    ports = {services.prefect_port, services.mlflow_port}
    if services.backend == "postgres":
        ports.add(services.postgres_port)
    ours = [(host, port) for host, port in _listening() if port in ports]
    assert {port for _, port in ours} == ports, ours
    assert all(host == "127.0.0.1" for host, _ in ours), ours


def test_deployment_run_completes_against_mlflow_server(services: Services, deployment_run):
    out = deployment_run.stdout + deployment_run.stderr
    assert deployment_run.returncode == 0, out[-4000:]
    run = _flow_run(services, out)
    assert run["state"]["type"] == "COMPLETED"
    assert run["parameters"]["epochs"] == 1 and run["parameters"]["promote"] is True
    # The run name is built from the key params, including the typed overrides, and the run's
    # first log line, which --watch streams, names it (--watch itself shows the random name the
    # run was created with).
    assert run["name"].endswith("-e1-lr0.001-seed1"), run["name"]
    flat = " ".join(out.split())  # --watch wraps long log lines at the terminal width
    assert f"run {run['name']!r} (its name in the Prefect UI and MLflow)" in flat, out[-3000:]
    # The overrides ran as a DVC experiment: the checkout's params.yaml is as committed.
    assert _git(services, "status", "--porcelain", "--untracked-files=no") == ""

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_uri)
    exp = client.get_experiment_by_name("xmodal")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    mlrun = runs[0]
    assert mlrun.data.params["train.epochs"] == "1"
    assert mlrun.data.tags["prefect_flow_run_id"] == run["id"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=services.root, capture_output=True, text=True
    ).stdout.strip()
    assert mlrun.data.tags["git_commit"] == head
    assert "test/i2t_R1" in mlrun.data.metrics
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].run_id == mlrun.info.run_id
    assert versions[0].tags["git_dirty"] == "false"
    assert versions[0].tags["dvc_exp_name"].startswith(run["name"])
    assert client.get_model_version_by_alias(MODEL, "candidate").version == "1"
    # The 1-epoch smoke model is below the quality floor: on the empty registry it is refused,
    # not made champion (promote=true ran the gates).
    assert versions[0].tags["promotion_status"] == "refused"
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(MODEL, "champion")
    # The worker's flow run wrote no local MLflow store: everything went to the server.
    assert not (services.root / "mlflow.db").exists()
    if services.backend == "postgres":
        assert _pg_count(services, "mlflow", "SELECT count(*) FROM model_versions") == 1
        deployments = _pg_count(services, "prefect", "SELECT count(*) FROM deployment")
        assert deployments == len(DEPLOYMENTS)
        assert _pg_count(services, "prefect", "SELECT count(*) FROM flow_run") >= 1


def test_batch_inference_deployment_serves_a_registered_model(services: Services, deployment_run):
    assert deployment_run.returncode == 0
    out = services.root / "outputs" / "deployed"
    extract_raw_images(services.root / "data" / "raw", services.root / "photos")
    done = _prefect(
        services,
        "deployment",
        "run",
        "batch-inference/default",
        "-p",
        f"model=models:/{MODEL}@candidate",
        "-p",
        "images_dir=photos",
        "-p",
        f"out={out}",
        "-p",
        'queries=["a red circle"]',
        "-p",
        "shards=2",
        "--watch",
        "--watch-timeout",
        "600",
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert _flow_run(services, text)["state"]["type"] == "COMPLETED"
    summary = json.loads((out / "summary.json").read_text())
    images = len(list((services.root / "photos").iterdir()))
    assert (summary["images"], summary["shards"], summary["errors"]) == (images, 2, 0)
    hits = json.loads((out / "text_to_image.jsonl").read_text())["results"]
    assert len(hits) == 5


def _pg_count(s: Services, database: str, sql: str) -> int:
    import psycopg

    url = s.postgres_url(database, "psycopg", secret=True).replace(
        "postgresql+psycopg", "postgresql"
    )
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchone()[0]


def test_no_credential_reaches_a_log_a_command_line_or_a_tracked_record(
    services: Services, deployment_run
):
    """The PostgreSQL password goes to the servers through their environment only: it is in no
    service log, no process's command line, no MLflow param, tag or model card, and no Prefect
    flow-run parameter or artifact."""
    if services.backend != "postgres":
        pytest.skip("only the postgres profile has a credential")
    secret = services.postgres_password()
    assert len(secret) >= 16
    assert services.postgres_password_file.stat().st_mode & 0o777 == 0o600
    assert _pg_count(services, "mlflow", "SELECT count(*) FROM model_versions") >= 1  # it works
    leaks = []
    for path in services.state.rglob("*"):
        own = path == services.postgres_password_file  # the secret's one home (mode 0600)
        if path.is_file() and not own and secret.encode() in path.read_bytes():
            leaks.append(str(path))
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if secret.encode() in cmdline:
            leaks.append(f"command line of pid {proc.name}")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_uri)
    for run in client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=1000
    ):
        if secret in json.dumps([run.data.params, run.data.tags]):
            leaks.append(f"MLflow run {run.info.run_id}")
    for v in client.search_model_versions(f"name='{MODEL}'"):
        if secret in json.dumps([v.tags, v.description or ""]):
            leaks.append(f"model version {v.version}")
    flow_runs = _post(services, "flow_runs/filter", {})
    artifacts = _post(services, "artifacts/filter", {})
    if secret in json.dumps([r["parameters"] for r in flow_runs] + [a["data"] for a in artifacts]):
        leaks.append("Prefect flow-run parameters or artifacts")
    assert not leaks, leaks


def test_flow_run_artifacts_include_plots_served_by_mlflow(services: Services, deployment_run):
    run = _flow_run(services, deployment_run.stdout + deployment_run.stderr)
    body = json.dumps({"artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).encode()
    req = urllib.request.Request(
        f"{services.prefect_api}/artifacts/filter", data=body, method="POST"
    )
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        artifacts = {a["key"]: a for a in json.loads(r.read())}
    plots = {f"xmodal-plot-{n}" for n in ("loss", "recall", "retrieval-examples")}
    assert {"xmodal-report", "xmodal-recall", *plots} <= set(artifacts), sorted(artifacts)
    assert "ONNX parity: **passed**" in artifacts["xmodal-report"]["data"]
    for key in plots:
        plot = artifacts[key]
        assert plot["type"] == "image" and plot["data"].startswith(services.mlflow_uri)
        with urllib.request.urlopen(plot["data"], timeout=10) as r:
            assert r.read(8) == b"\x89PNG\r\n\x1a\n"


def test_failed_stage_fails_the_flow_with_its_message(services: Services, deployment_run):
    assert deployment_run.returncode == 0
    bad = _prefect(
        services,
        "deployment",
        "run",
        "training-pipeline/default",
        "-p",
        'overrides=["ingest.source=csv", "ingest.csv.path=missing.csv", "ingest.csv.image_root=."]',
        "--watch",
        "--watch-timeout",
        "600",
    )
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0, out[-3000:]
    state = _flow_run(services, out)["state"]
    assert state["type"] == "FAILED"
    # Refused by the configure task, before any stage ran or params.yaml changed.
    assert "ingest.csv.path: missing.csv does not exist" in state["message"], state["message"]
    assert _git(services, "status", "--porcelain", "--untracked-files=no") == ""


def test_deployment_run_is_refused_while_another_run_holds_the_checkout(services: Services):
    if services.backend != "sqlite":
        pytest.skip("the lock is the checkout's, not the backend's: one backend is enough")
    with runlock.hold(services.root, "a run started by hand"):
        busy = _prefect(services, "deployment", "run", "training-pipeline/default",
                        "--watch", "--watch-timeout", "300")  # fmt: skip
    out = busy.stdout + busy.stderr
    state = _flow_run(services, out)["state"]
    assert state["type"] == "FAILED", out[-3000:]
    assert "is busy: pipeline run 'a run started by hand'" in state["message"], state["message"]
    assert f"pid {os.getpid()}" in state["message"]


def test_skipped_stages_are_visible_in_prefect(services: Services, deployment_run):
    if services.backend != "sqlite":
        pytest.skip("task states do not depend on the backend: one is enough")
    runs = []
    # The first trains the committed params (the data stages come back from DVC's run cache:
    # the deployment run above prepared the same data); the second finds all up to date.
    for _ in range(2):
        done = _prefect(services, "deployment", "run", "training-pipeline/default",
                        "--watch", "--watch-timeout", "900")  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        runs.append(_flow_run(services, done.stdout + done.stderr))
    states = [_task_states(services, r["id"]) for r in runs]
    stages = ("ingest", "preprocess", "features", "train", "evaluate", "export", "register",
              "infer")  # fmt: skip
    ran = {s for s in stages if states[0][s][0] == "Completed"}
    assert {"train", "evaluate", "export", "register", "infer"} <= ran, states[0]
    restored = set(stages) - ran
    assert all("run cache" in states[0][s][1] for s in restored), states[0]
    assert {states[1][s][0] for s in stages} == {"Skipped"}, states[1]
    assert all("unchanged since dvc.lock" in states[1][s][1] for s in stages)
    report = _artifacts(services, runs[1]["id"])["xmodal-report"]["data"]
    assert "## Stages: 0 ran, 8 skipped" in report
    assert "| train | skipped: unchanged since dvc.lock |" in report


def test_mlflow_down_mid_register_loses_nothing_and_the_rerun_registers_once(
    services: Services, deployment_run
):
    """The MLflow server is stopped while register uploads artifacts: the run fails with one
    line naming the server, no version exists without its artifacts, promote fails the same
    way within its bounded retries; restarted, a rerun of the same run reuses every finished
    stage (DVC's run cache: the failed run was an experiment, put back) and registers once."""
    if services.backend != "sqlite":
        pytest.skip("the fault is the tracking server's, not its backend's: one is enough")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_uri)
    before = _versions(client)
    artifacts = services.state / "mlflow" / "artifacts"
    seen = _files(artifacts)
    created = _prefect(services, "deployment", "run", "training-pipeline/default", "-p", "seed=5")
    run_id = _flow_run(services, created.stdout + created.stderr)["id"]
    _wait_for(lambda: _task_states(services, run_id).get("register", ("",))[0] == "Running")
    _wait_for(lambda: _files(artifacts) - seen, step=0.02)  # register is uploading
    assert stop_service(services, "mlflow-server")
    try:
        state = _wait_for(lambda: _final_state(services, run_id), timeout=600)
        assert state["type"] == "FAILED", state
        assert (
            f"stage register failed: MLflow server {services.mlflow_uri} is unreachable"
            in (state["message"])
        )
        t0 = time.monotonic()
        promote = subprocess.run(
            [str(BIN / "xmodal"), "promote"], cwd=services.root, capture_output=True, text=True,
            env={**clean_env(), **services.client_env()}, timeout=300,
        )  # fmt: skip
        assert time.monotonic() - t0 < 120  # bounded retries, not MLflow's default 4 minutes
        errors = [x for x in promote.stderr.splitlines() if x.startswith("error:")]
        assert promote.returncode == 1 and len(errors) == 1, promote.stderr[-2000:]
        assert f"MLflow server {services.mlflow_uri} is unreachable" in errors[0]
    finally:
        start_mlflow_server(services, [])
    assert _versions(client) == before  # none was created without its artifacts

    again = _prefect(services, "deployment", "run", "training-pipeline/default", "-p", "seed=5",
                     "--watch", "--watch-timeout", "900")  # fmt: skip
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    states = _task_states(services, _flow_run(services, again.stdout + again.stderr)["id"])
    for name in ("ingest", "preprocess", "features", "train", "evaluate", "export"):
        assert states[name][0] == "Skipped", (name, states[name])
    assert "run cache" in states["train"][1]
    assert states["register"][0] == "Completed"
    after = _versions(client)
    assert after[: len(before)] == before and len(after) == len(before) + 1


def _listening() -> list[tuple[str, int]]:
    """(address, port) of every listening TCP socket, IPv4 and IPv6 (/proc/net/tcp*)."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            host, port = local.split(":")
            if len(host) == 8:  # IPv4, little-endian hex
                host = ".".join(str(int(host[i : i + 2], 16)) for i in (6, 4, 2, 0))
            out.append((host, int(port, 16)))
    return out


def test_a_prefect_server_restart_during_a_run_is_survived(services: Services, deployment_run):
    """The documented behaviour: the flow run's client retries its API calls (8 retries,
    about 8.5 minutes), so a server stopped and started again meanwhile sees the run complete,
    and its one version registered."""
    if services.backend != "sqlite":
        pytest.skip("the restart is the server's, not its backend's: one is enough")
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=services.mlflow_uri)
    before = _versions(client)
    created = _prefect(services, "deployment", "run", "training-pipeline/default", "-p", "seed=9")
    run_id = _flow_run(services, created.stdout + created.stderr)["id"]
    _wait_for(lambda: _task_states(services, run_id).get("train", ("",))[0] == "Running")
    assert stop_service(services, "prefect-server")
    time.sleep(5)  # the run goes on without its server
    start_prefect_server(services, [])
    state = _wait_for(lambda: _final_state(services, run_id), timeout=900)
    assert state["type"] == "COMPLETED", state
    assert len(_versions(client)) == len(before) + 1


def _versions(client) -> list[str]:
    found = client.search_model_versions(f"name='{MODEL}'")
    return sorted((v.version for v in found), key=int)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def _wait_for(check, timeout: float = 600, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {check}")


def _final_state(s: Services, flow_run_id: str) -> dict | None:
    with urllib.request.urlopen(f"{s.prefect_api}/flow_runs/{flow_run_id}", timeout=10) as r:
        state = json.loads(r.read())["state"]
    return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def _post(s: Services, path: str, body: dict) -> list[dict]:
    req = urllib.request.Request(
        f"{s.prefect_api}/{path}", data=json.dumps(body).encode(), method="POST"
    )
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _task_states(s: Services, flow_run_id: str) -> dict[str, tuple[str, str]]:
    """Task name (without its run suffix) -> (state name, state message). A task run the API has
    created but not yet given a state (`state: null`, seen under load) is left out."""
    rows = _post(s, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {
        r["name"].rsplit("-", 1)[0]: (r["state"]["name"], r["state"].get("message") or "")
        for r in rows
        if r.get("state")
    }


def _artifacts(s: Services, flow_run_id: str) -> dict[str, dict]:
    rows = _post(s, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"]: a for a in rows}


def _git(s: Services, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=s.root, capture_output=True, text=True, check=True
    ).stdout


def test_typed_flow_parameters_are_validated(services: Services):
    bad = _prefect(services, "deployment", "run", "training-pipeline/default", "-p", "lr=-1")
    assert "Validation failed for field 'lr'" in bad.stdout + bad.stderr


def test_taken_port_is_reported(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        s = Services(root=tmp_path, state=tmp_path / "state", prefect_port=taken)
        with pytest.raises(ServiceError, match=f"prefect-server port {taken} already in use"):
            start(s, echo=print)
    assert status(s) == {}
