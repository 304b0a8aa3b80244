"""`start` and `stop` against real processes: a second start leaves a running stack alone, a
failed start undoes only what it launched, and a stopped stack starts again at once on the same
ports although its TIME-WAIT connections remain.
"""

from __future__ import annotations

import dataclasses
import http.client
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.base import (
    HOST,
    ORDER,
    ServiceError,
    Services,
    port_free,
    read_pid,
    write_record,
)
from services.manager import start, status, stop

from .conftest import clean_env, free_port, make_repo, running_stack

BIN = Path(sys.executable).parent
PROCESSES = ("prefect-server", "mlflow-server", "prefect-worker")


def _time_wait_on(port: int) -> bool:
    """Whether a TIME-WAIT socket has local port `port` on HOST (`ss`, else /proc/net/tcp)."""
    if shutil.which("ss"):
        out = subprocess.run(
            ["ss", "-Htan", "state", "time-wait", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return bool(out.strip())
    local = f"0100007F:{port:04X}"  # 127.0.0.1 as the kernel prints it (little-endian)
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(r.split()[1] == local and r.split()[3] == "06" for r in rows)


def _time_wait(listener_reuse: bool) -> int:
    """A port whose server side is in TIME-WAIT and has no listener any more."""
    listener = socket.socket()
    if listener_reuse:  # as uvicorn's (asyncio's create_server) and PostgreSQL's listeners
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection((HOST, port))
    accepted, _ = listener.accept()
    accepted.close()  # the server closes first: its side, on `port`, goes to TIME-WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    assert _time_wait_on(port), f"no TIME-WAIT on port {port}"
    return port


def _plain_bind_fails(port: int) -> bool:
    """What the old check did: bind without SO_REUSEADDR."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def test_time_wait_alone_leaves_the_port_free_and_a_listener_does_not():
    port = _time_wait(listener_reuse=True)
    assert _plain_bind_fails(port)  # the old check's false "already in use"
    assert port_free(port)
    with socket.socket() as listener:  # a server started over that TIME-WAIT, as uvicorn can
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, port))
        listener.listen()
        assert not port_free(port)
    assert port_free(port)
    with socket.socket() as listener:  # and one that does not set SO_REUSEADDR
        listener.bind((HOST, 0))
        listener.listen()
        assert not port_free(listener.getsockname()[1])


def test_time_wait_that_blocks_the_servers_too_is_reported():
    # A listener without SO_REUSEADDR leaves TIME-WAIT that no server could bind over either.
    port = _time_wait(listener_reuse=False)
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError):
            sock.bind((HOST, port))
    assert not port_free(port)


def test_cli_refuses_to_start_over_a_recorded_live_process(tmp_path: Path):
    s = Services(root=tmp_path, state=tmp_path / "state")
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        write_record(s, "mlflow-server", sleeper.pid, "http://127.0.0.1:5999")
        done = subprocess.run(
            [str(BIN / "xmodal"), "services", "start", "--state-dir", str(s.state)],
            cwd=tmp_path,
            env={**clean_env(), "XMODAL_PREFECT_PORT": str(free_port())},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stdout + done.stderr
        line = f"mlflow-server (pid {sleeper.pid}, http://127.0.0.1:5999)"
        assert done.stderr.startswith("error: already running from ") and line in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert sleeper.poll() is None and read_pid(s.pid_file("mlflow-server")) == sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- real stack


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status == 200
    except OSError:
        return False


def _pids(s: Services) -> dict[str, int | None]:
    return {name: read_pid(s.pid_file(name)) for name in PROCESSES}


def _assert_serving(s: Services, pids: dict[str, int | None] | None = None) -> None:
    state = status(s)
    assert set(state) == set(PROCESSES), state
    assert all(v.startswith("running") for v in state.values()), state
    if pids is not None:
        assert _pids(s) == pids
    assert _healthy(f"{s.prefect_api}/health")
    assert _healthy(f"{s.mlflow_uri}/health")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Services]:
    repo = make_repo(tmp_path_factory.mktemp("xmodal-lifecycle"))
    s = Services(
        root=repo,
        state=repo / ".services",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        timeout=300,
    )
    with running_stack(s):
        yield s


@pytest.mark.services
def test_second_start_is_refused_and_the_running_stack_survives(stack: Services):
    pids = _pids(stack)
    again = dataclasses.replace(stack, prefect_port=free_port(), mlflow_port=free_port())
    with pytest.raises(ServiceError) as err:
        start(again, echo=print)
    message = str(err.value)
    assert "\n" not in message
    for name, pid in pids.items():
        assert f"{name} (pid {pid}, " in message, message
    assert f"http://{HOST}:{stack.prefect_port}" in message and stack.mlflow_uri in message
    assert "make stop" in message and "--state-dir" in message
    _assert_serving(stack, pids)
    assert port_free(again.prefect_port) and port_free(again.mlflow_port)


@pytest.mark.services
def test_failed_start_stops_only_what_it_launched(stack: Services, tmp_path: Path):
    pids = _pids(stack)
    other = Services(
        root=stack.root,
        state=tmp_path / "state",
        prefect_port=free_port(),
        mlflow_port=free_port(),
        timeout=300,
    )
    # A file where MLflow's store goes: the mlflow-server step fails after prefect-server is up.
    other.state.mkdir()
    (other.state / "mlflow").write_text("")
    said: list[str] = []
    try:
        with pytest.raises(FileExistsError):
            start(other, echo=said.append)
        assert [m.split(":")[0] for m in said] == ["prefect-server"], said  # it was up
        assert status(other) == {}
        assert not any(other.pid_file(n).exists() or other.record_file(n).exists() for n in ORDER)
        assert port_free(other.prefect_port)
        _assert_serving(stack, pids)
    finally:
        stop(other, echo=print)


@pytest.mark.services
def test_restart_on_the_same_ports_right_after_stop(stack: Services):
    old = _pids(stack)
    # Idle keep-alive connections: the servers close them when they stop, which leaves their
    # ports in TIME-WAIT, as after `make stop` of a stack that served requests.
    conns = []
    for port, path in ((stack.prefect_port, "/api/health"), (stack.mlflow_port, "/health")):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", path)
        assert conn.getresponse().read() is not None
        conns.append(conn)
    assert sorted(stop(stack, echo=print)) == sorted(PROCESSES)
    for conn in conns:
        conn.close()
    waiting = {p: _time_wait_on(p) for p in (stack.prefect_port, stack.mlflow_port)}
    print(f"TIME-WAIT after stop: {waiting}")
    assert any(waiting.values()), waiting
    start(stack, echo=print)
    _assert_serving(stack)
    assert all(_pids(stack)[n] != old[n] for n in PROCESSES)
