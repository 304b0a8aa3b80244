"""The real services, on 127.0.0.1 only: Prefect server, work pool, deployments, worker, MLflow.

`xmodal services start` (what `make serve` runs) refuses while a service recorded in its state
directory still runs, then starts each one as its own process group, writes its pid file (and a
record of what it serves), and waits for its health check before starting the next; if a step
fails it stops only what that call launched. `xmodal services stop` (`make stop`) stops exactly
the processes named by the pid files. Everything lives under one state directory (default
`.services/`): pid files, logs, Prefect's home, MLflow's store, and an `env` file to `source` so
`prefect` and `mlflow` commands talk to these servers.

The `postgres` backend starts a PostgreSQL cluster under the state directory (Debian's
`postgresql` binaries) and puts both the Prefect and the MLflow backend stores in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from services import postgres
from services.base import (
    DEPLOYMENTS,
    GPU_WORK_POOL,
    HOST,
    ORDER,
    WORK_POOL,
    ServiceError,
    Services,
    alive,
    forget,
    port_free,
    read_pid,
    read_record,
    recorded_pid,
    venv_bin,
    write_record,
)


def _spawn(
    s: Services,
    name: str,
    cmd: list[str],
    env: dict[str, str],
    address: str,
    launched: list[str],
    unset: tuple[str, ...] = (),
) -> subprocess.Popen:
    """Start `name`, record it, and put it on `launched` (what this `start` call must undo)."""
    old = recorded_pid(s, name)
    if old is not None:  # `start` checked already; this guards a concurrent start
        raise ServiceError(f"{name} is already running (pid {old}, {s.pid_file(name)})")
    s.log_file(name).parent.mkdir(parents=True, exist_ok=True)
    log = s.log_file(name).open("ab")
    # Own session: `stop` signals the whole group (uvicorn and flow-run children included).
    full_env = {k: v for k, v in {**os.environ, **env}.items() if k not in unset}
    proc = subprocess.Popen(
        cmd,
        cwd=s.root,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    launched.append(name)
    write_record(s, name, proc.pid, address)
    return proc


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(s: Services, name: str, proc: subprocess.Popen | None, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + s.timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(
                f"{name} exited with code {proc.returncode} before it was healthy; "
                f"last lines of {s.log_file(name)}:\n{_tail(s.log_file(name))}"
            )
        if check():
            return
        time.sleep(0.5)
    raise ServiceError(
        f"{name} did not pass its health check within {s.timeout:.0f} s; "
        f"last lines of {s.log_file(name)}:\n{_tail(s.log_file(name))}"
    )


def _http_ok(url: str, method: str = "GET", body: dict | None = None) -> bool:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _http_json(url: str, body: dict) -> object:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _run(s: Services, name: str, cmd: list[str], env: dict[str, str]) -> None:
    """A one-shot command (work pool, deploy); its output goes to the service log."""
    s.log_file(name).parent.mkdir(parents=True, exist_ok=True)
    with s.log_file(name).open("ab") as log:
        done = subprocess.run(
            cmd, cwd=s.root, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise ServiceError(
            f"`{' '.join(cmd)}` failed with code {done.returncode}; last lines of "
            f"{s.log_file(name)}:\n{_tail(s.log_file(name))}"
        )


# ----------------------------------------------------------------------------- services


def _refuse_if_running(s: Services) -> None:
    """One line naming every service this state dir records as running, and what to do."""
    found = []
    for name in ORDER:
        pid = recorded_pid(s, name)
        address = read_record(s, name).get("address", "address not recorded")
        if pid is None and name == "postgres" and (pm := postgres.running_postmaster(s)):
            pid, address = pm
        if pid is not None:
            found.append(f"{name} (pid {pid}, {address})")
    if found:
        raise ServiceError(
            f"already running from {s.state}: {', '.join(found)}. Stop them first (`make stop`, "
            f"or `xmodal services stop --state-dir {s.state}`), or start another stack with "
            "another --state-dir (XMODAL_STATE_DIR) and free ports."
        )


def _check_ports(s: Services) -> None:
    wanted = {"prefect-server": s.prefect_port, "mlflow-server": s.mlflow_port}
    if s.backend == "postgres":
        wanted["postgres"] = s.postgres_port
    taken = [f"{name} port {port}" for name, port in wanted.items() if not port_free(port)]
    if taken:
        raise ServiceError(
            f"{HOST}: {', '.join(taken)} already in use. Choose other ports with "
            "--prefect-port / --mlflow-port / --postgres-port (or XMODAL_PREFECT_PORT, "
            "XMODAL_MLFLOW_PORT, XMODAL_POSTGRES_PORT), or `make stop` an earlier `make serve`."
        )


def start_prefect_server(s: Services, launched: list[str]) -> None:
    env = {
        "PREFECT_HOME": str(s.prefect_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": s.prefect_api,
        # `prefect deployment run --watch` streams the run's logs beside its events (off by
        # default in Prefect 3.8): the run's first line names it as the UI and MLflow do.
        "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
        "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
        **s.extra_env,
    }
    if s.backend == "postgres":
        # Through the environment only: a command line is visible to every user (ps).
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = s.postgres_url("prefect", "asyncpg", True)
    cmd = [venv_bin("prefect"), "server", "start", "--host", HOST, "--port", str(s.prefect_port)]
    # A PREFECT_API_URL from the caller's shell would make the server a client of another API.
    address = f"http://{HOST}:{s.prefect_port} (API {s.prefect_api})"
    proc = _spawn(s, "prefect-server", cmd, env, address, launched, unset=("PREFECT_API_URL",))
    _wait(s, "prefect-server", proc, lambda: _http_ok(f"{s.prefect_api}/health"))


def start_mlflow_server(s: Services, launched: list[str]) -> None:
    store = s.state / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    env = dict(s.extra_env)
    if s.backend == "postgres":
        # The password goes through the environment (MLflow reads MLFLOW_BACKEND_STORE_URI),
        # never the command line, which every user can read with ps.
        env["MLFLOW_BACKEND_STORE_URI"] = s.postgres_url("mlflow", "psycopg", secret=True)
    else:
        env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{(store / 'mlflow.db').resolve()}"
    cmd = [
        venv_bin("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(s.mlflow_port),
        "--workers",
        "1",
        "--artifacts-destination",
        (store / "artifacts").resolve().as_uri(),
    ]
    proc = _spawn(s, "mlflow-server", cmd, env, s.mlflow_uri, launched)
    _wait(s, "mlflow-server", proc, lambda: _http_ok(f"{s.mlflow_uri}/health"))


def deploy(s: Services) -> None:
    """Create the process work pools and the deployments in prefect.yaml."""
    env = {**s.client_env(), **s.extra_env}
    prefect = venv_bin("prefect")
    for pool in (WORK_POOL, GPU_WORK_POOL):
        _run(s, "deploy", [prefect, "work-pool", "create", pool, "--type", "process",
                           "--overwrite"], env)  # fmt: skip
    _run(s, "deploy", [prefect, "--no-prompt", "deploy", "--all"], env)


def _worker_online(s: Services, worker: str) -> bool:
    try:
        workers = _http_json(f"{s.prefect_api}/work_pools/{WORK_POOL}/workers/filter", {})
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return any(
        w.get("name") == worker and w.get("status") == "ONLINE"
        for w in workers  # type: ignore[union-attr]
    )


def start_worker(s: Services, launched: list[str]) -> None:
    # The flow runs the worker starts inherit this environment: MLflow goes to the server.
    env = {
        **s.client_env(),
        # A Prefect server restart is survived if it is back within the client's retries:
        # 2, 4, ... 256 s with 8 retries (about 8.5 minutes; Prefect's default 5 is 1 minute).
        "PREFECT_CLIENT_MAX_RETRIES": "8",
        **s.extra_env,
    }
    # Its own name: a worker stopped seconds ago still shows ONLINE until its heartbeat lapses.
    worker = f"xmodal-{uuid.uuid4().hex[:8]}"
    cmd = [venv_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
           "--name", worker]  # fmt: skip
    address = f"worker {worker}, pool {WORK_POOL} on {s.prefect_api}"
    proc = _spawn(s, "prefect-worker", cmd, env, address, launched)
    _wait(s, "prefect-worker", proc, lambda: _worker_online(s, worker))


def start(s: Services, echo: Callable[[str], None] = print) -> None:
    """Start every service in ORDER; on a failure stop only what this call launched, raise."""
    _refuse_if_running(s)
    _check_ports(s)
    s.state.mkdir(parents=True, exist_ok=True)
    steps: list[tuple[str, Callable[[Services, list[str]], None]]] = [
        ("prefect-server", start_prefect_server),
        ("mlflow-server", start_mlflow_server),
        ("deployments", lambda s, _launched: deploy(s)),
        ("prefect-worker", start_worker),
    ]
    if s.backend == "postgres":
        steps.insert(0, ("postgres", postgres.start_postgres))
    launched: list[str] = []
    try:
        for name, step in steps:
            t0 = time.monotonic()
            step(s, launched)
            echo(f"{name}: ready ({time.monotonic() - t0:.0f} s)")
    except BaseException:
        for name in reversed(launched):
            _stop_one(s, name, echo=lambda _m: None, launched_here=True)
        raise
    write_env(s)
    echo(f"Prefect UI and API: http://{HOST}:{s.prefect_port}  ({s.prefect_api})")
    echo(f"MLflow UI:          {s.mlflow_uri}")
    echo(f"work pool {WORK_POOL}, deployments: {', '.join(DEPLOYMENTS)}")
    echo(f"pid files and logs under {s.state}; `source {s.state / 'env'}` to use these servers")


def write_env(s: Services) -> None:
    lines = [f"export {k}={v}" for k, v in s.client_env().items()]
    (s.state / "env").write_text("\n".join(lines) + "\n")


def stop(s: Services, echo: Callable[[str], None] = print, grace: float = 15.0) -> list[str]:
    """Stop the processes named by the pid files (their whole process groups), forget stale
    pid files; return the names of those that ran."""
    return [name for name in reversed(ORDER) if _stop_one(s, name, echo, grace)]


def stop_service(s: Services, name: str, echo: Callable[[str], None] = print) -> bool:
    """Stop one recorded service (its process group); True if it ran. Its `start_*` restarts it
    on the same port and store."""
    return _stop_one(s, name, echo)


def _stop_one(
    s: Services,
    name: str,
    echo: Callable[[str], None],
    grace: float = 15.0,
    launched_here: bool = False,
) -> bool:
    """Stop `name` if its recorded process runs, forget its pid file; True if it ran."""
    if name == "postgres":
        if postgres.stop_postgres(s):
            echo("postgres: stopped")
            return True
        return False
    pid = recorded_pid(s, name)
    if pid is None and launched_here:
        # Its leader exited before it was healthy; children (MLflow's uvicorn) may remain.
        pid = read_pid(s.pid_file(name))
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.2)
        if alive(pid):
            _signal_group(pid, signal.SIGKILL)
        _reap(pid)
        echo(f"{name}: stopped (pid {pid})")
    forget(s, name)
    return pid is not None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the group we created with start_new_session
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (tests start and stop)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def status(s: Services) -> dict[str, str]:
    out = {}
    for name in ORDER:
        pid = read_pid(s.pid_file(name))
        if pid is None:
            continue
        if recorded_pid(s, name) is None:
            out[name] = f"dead (stale pid {pid})"
        else:
            address = read_record(s, name).get("address")
            out[name] = f"running (pid {pid}, {address})" if address else f"running (pid {pid})"
    return out
