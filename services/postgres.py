"""A PostgreSQL cluster for the production profile: Prefect's and MLflow's backend stores.

Uses the Debian `postgresql` binaries (initdb, pg_ctl) on 127.0.0.1. The `xmodal` role has a
password (XMODAL_POSTGRES_PASSWORD, or one generated per state dir) and TCP connections need it
(scram-sha-256); only the cluster's own Unix socket, in a directory only its owner reads, trusts.
The password reaches the servers through their environment, never a command line or a log.
PostgreSQL refuses to run as root, so under root the cluster runs as the `postgres` OS user in a
directory it owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services.base import (
    HOST,
    ServiceError,
    Services,
    alive,
    forget,
    require_postgres_binaries,
    write_record,
)

ROLE = "xmodal"
DATABASES = ("prefect", "mlflow")
OS_USER = "postgres"


def _cluster_dir(s: Services) -> Path:
    if os.geteuid() != 0:
        return (s.state / "postgres").resolve()
    # The state dir may sit under a root-only parent (pytest's tmp), unreachable for `postgres`.
    key = hashlib.sha1(str(s.state.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"xmodal-postgres-{key}"


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _record(s: Services) -> Path:
    return s.state / "postgres.json"


def _pg(cmd: list[str], what: str, password: str | None = None) -> None:
    env = {**os.environ, "PGPASSWORD": password} if password else None  # libpq reads it
    done = subprocess.run(_as_owner(cmd), capture_output=True, text=True, env=env)
    if done.returncode:
        raise ServiceError(f"postgres: {what} failed ({done.returncode}): {done.stderr.strip()}")


def start_postgres(s: Services, launched: list[str]) -> None:
    """Start this state dir's cluster; "postgres" goes on `launched` before pg_ctl starts it."""
    bindir = require_postgres_binaries()
    cluster = _cluster_dir(s)
    data, log = cluster / "data", cluster / "postgres.log"
    if not (data / "PG_VERSION").is_file():
        cluster.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(cluster, OS_USER, OS_USER)
        pwfile = cluster / "initdb.pw"  # initdb reads the password from a file, then it goes
        pwfile.write_text(s.postgres_password())
        if os.geteuid() == 0:
            shutil.chown(pwfile, OS_USER, OS_USER)
        try:
            _pg([str(bindir / "initdb"), "-D", str(data), "-U", ROLE, f"--pwfile={pwfile}",
                 "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8",
                 "--no-instructions"], "initdb")  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
    _record(s).parent.mkdir(parents=True, exist_ok=True)
    _record(s).write_text(json.dumps({"cluster": str(cluster), "bindir": str(bindir)}))
    options = f"-p {s.postgres_port} -c listen_addresses={HOST} -k {cluster}"
    # `start` refused a running cluster, so one running from here on is this call's (a pg_ctl
    # that times out leaves its postmaster running).
    launched.append("postgres")
    _pg([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w",
         "-t", str(int(s.timeout)), "start"], "pg_ctl start")  # fmt: skip
    pid = int((data / "postmaster.pid").read_text().split()[0])
    write_record(s, "postgres", pid, f"postgresql://{HOST}:{s.postgres_port}")
    for db in DATABASES:
        if not _database_exists(bindir, s.postgres_port, db, s.postgres_password()):
            _pg([str(bindir / "createdb"), "-h", HOST, "-p", str(s.postgres_port), "-U", ROLE, db],
                f"createdb {db}", s.postgres_password())  # fmt: skip


def _database_exists(bindir: Path, port: int, db: str, password: str) -> bool:
    psql = shutil.which("psql") or str(bindir / "psql")
    done = subprocess.run(
        [
            psql,
            "-h",
            HOST,
            "-p",
            str(port),
            "-U",
            ROLE,
            "-d",
            "postgres",
            "-tAc",
            f"SELECT 1 FROM pg_database WHERE datname = '{db}'",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env={**os.environ, "PGPASSWORD": password},
    )
    return done.stdout.strip() == "1"


def stop_postgres(s: Services) -> bool:
    """Fast shutdown of the cluster `start_postgres` recorded; True if one was running."""
    record = _record(s)
    if not record.is_file():
        return False
    info = json.loads(record.read_text())
    data = Path(info["cluster"]) / "data"
    running = (data / "postmaster.pid").is_file()
    if running:
        _pg([str(Path(info["bindir"]) / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            "pg_ctl stop")  # fmt: skip
        time.sleep(0.1)
    forget(s, "postgres")
    return running


def running_postmaster(s: Services) -> tuple[int, str] | None:
    """The postmaster of this state dir's cluster and its address, if one runs (recorded or not)."""
    try:
        lines = (_cluster_dir(s) / "data" / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, f"postgresql://{HOST}:{port}") if alive(pid) else None


def remove_cluster(s: Services) -> None:
    """Delete the cluster's files (tests); the cluster must be stopped."""
    record = _record(s)
    if record.is_file():
        shutil.rmtree(json.loads(record.read_text())["cluster"], ignore_errors=True)
        record.unlink()
