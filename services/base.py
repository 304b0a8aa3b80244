"""What every service module shares: addresses, state layout, process helpers.

Kept apart from the manager and the PostgreSQL module so that neither imports the other.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

HOST = "127.0.0.1"
WORK_POOL = "xmodal-process"
# The GPU deployment's pool: created here so that `prefect deploy --all` finds it; its worker
# runs on the GPU machine (prefect.yaml), never started by these scripts.
GPU_WORK_POOL = "xmodal-gpu"
DEPLOYMENTS = ("training-pipeline/default", "training-pipeline/gpu", "batch-inference/default")
# Start order; stop runs it backwards so the worker goes before the server it polls.
ORDER = ("postgres", "prefect-server", "mlflow-server", "prefect-worker")


class ServiceError(RuntimeError):
    """A service could not start, or its health check never passed."""


@dataclass(frozen=True)
class Services:
    """Where the services listen and keep their state."""

    root: Path
    state: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000
    backend: str = "sqlite"  # sqlite | postgres
    postgres_port: int = 5432
    timeout: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def prefect_home(self) -> Path:
        return self.state / "prefect"

    def pid_file(self, name: str) -> Path:
        return self.state / "pids" / f"{name}.pid"

    def record_file(self, name: str) -> Path:
        """Beside the pid file: what the process serves, and its start time (pid reuse)."""
        return self.state / "pids" / f"{name}.json"

    def log_file(self, name: str) -> Path:
        return self.state / "logs" / f"{name}.log"

    @property
    def postgres_password_file(self) -> Path:
        return self.state / "postgres.password"

    def postgres_password(self) -> str:
        """XMODAL_POSTGRES_PASSWORD, else the password generated for this state dir's cluster
        (a 0600 file beside the pid files), created on first use."""
        given = os.environ.get("XMODAL_POSTGRES_PASSWORD")
        if given:
            return given
        path = self.postgres_password_file
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def postgres_url(self, database: str, driver: str, secret: bool = False) -> str:
        """The store URL; with the password only when `secret` (for a server's environment,
        never for a command line, a message or a log)."""
        login = f"xmodal:{quote(self.postgres_password(), safe='')}" if secret else "xmodal"
        return f"postgresql+{driver}://{login}@{HOST}:{self.postgres_port}/{database}"

    def client_env(self) -> dict[str, str]:
        """What `prefect`/`mlflow` clients and the worker's flow runs need to reach the servers."""
        return {
            "XMODAL_ROOT": str(self.root),  # prefect.yaml's pull step: where flow runs start
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_HOME": str(self.prefect_home),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
        }


# ----------------------------------------------------------------------------- processes


def venv_bin(name: str) -> str:
    """A console script from this interpreter's environment (the project venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def port_free(port: int) -> bool:
    """Whether a server could bind `port` on HOST now.

    Binds as the servers do: uvicorn (Prefect, MLflow) and PostgreSQL set SO_REUSEADDR, so the
    TIME-WAIT connections a stopped server leaves for ~60 s do not count; a listener still does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (/proc), or None where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_record(s: Services, name: str, pid: int, address: str) -> None:
    """Write `name`'s pid file and its record: the address it serves and its start time."""
    s.pid_file(name).parent.mkdir(parents=True, exist_ok=True)
    s.pid_file(name).write_text(f"{pid}\n")
    info = {"pid": pid, "address": address, "started": _start_time(pid)}
    s.record_file(name).write_text(json.dumps(info) + "\n")


def read_record(s: Services, name: str) -> dict:
    try:
        info = json.loads(s.record_file(name).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def recorded_pid(s: Services, name: str) -> int | None:
    """The pid in `name`'s pid file while that process runs; None for a dead or reused pid."""
    pid = read_pid(s.pid_file(name))
    if pid is None or not alive(pid):
        return None
    info = read_record(s, name)
    # After a crash or reboot the pid may now be someone else's: its start time differs.
    then, now = info.get("started"), _start_time(pid)
    if info.get("pid") == pid and then and now and then != now:
        return None
    return pid


def forget(s: Services, name: str) -> None:
    s.pid_file(name).unlink(missing_ok=True)
    s.record_file(name).unlink(missing_ok=True)


def require_postgres_binaries() -> Path:
    """The directory holding initdb/pg_ctl, or a ServiceError saying how to install them."""
    for candidate in [shutil.which("pg_ctl")] + sorted(
        str(p) for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
    ):
        if candidate and Path(candidate).exists():
            return Path(candidate).resolve().parent
    raise ServiceError(
        "PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's package: "
        "`apt-get install -y postgresql`"
    )
