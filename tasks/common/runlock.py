"""One pipeline run per checkout, held for the run's whole duration.

DVC's repo lock covers one DVC operation (a status check, a commit), not a run: between two
stages a second run could rewrite params.yaml or dvc.lock under the first. So a training-pipeline
run (flow, CLI or deployment) and each stage that `dvc repro` runs take this lock, and a second
one is refused at once with a message naming the holder.

The lock is an OS file lock (fcntl, via filelock): it dies with its process, so a crash never
leaves a stale lock. Processes a holder starts (torchrun's ranks, DVC's stage commands) inherit
its token in XMODAL_RUN_TOKEN and pass through.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

STATE_DIR = ".xmodal"  # git-ignored: locks, run records, the experiment journal, model cache
TOKEN_ENV = "XMODAL_RUN_TOKEN"


class CheckoutBusy(BlockingIOError):
    """Another pipeline run holds this checkout."""


def lock_path(root: Path) -> Path:
    return Path(root) / STATE_DIR / "run.lock"


def record_path(root: Path) -> Path:
    return Path(root) / STATE_DIR / "run.json"


def holder(root: Path) -> dict | None:
    """What the current (or last) holder wrote about itself; None when nothing was written."""
    try:
        return json.loads(record_path(root).read_text())
    except (OSError, ValueError):
        return None


def describe(record: dict | None) -> str:
    if not record:
        return "another process (no run record)"
    flow_run = f", Prefect flow run {record['flow_run_id']}" if record.get("flow_run_id") else ""
    return (
        f"{record.get('label', '?')!r} (pid {record.get('pid')} on {record.get('host')}"
        f"{flow_run}, since {record.get('started')})"
    )


def inherited(root: Path) -> bool:
    """True when this process is (or was started by) the run that holds `root` right now."""
    token = os.environ.get(TOKEN_ENV)
    record = holder(root)
    return bool(token) and record is not None and record.get("token") == token


def busy_message(root: Path) -> str:
    return (
        f"checkout {Path(root).resolve()} is busy: pipeline run {describe(holder(root))} holds "
        "it; wait for it to finish (or stop it) and run again"
    )


def ensure_free(root: Path) -> None:
    """Raise CheckoutBusy now if another run holds `root` (a check, not a reservation)."""
    if inherited(root):
        return
    lock = FileLock(str(lock_path(root)), timeout=0)
    lock_path(root).parent.mkdir(parents=True, exist_ok=True)
    try:
        lock.acquire()
    except Timeout:
        raise CheckoutBusy(busy_message(root)) from None
    lock.release()


@contextmanager
def hold(root: Path | str, label: str, flow_run_id: str = "") -> Iterator[dict]:
    """Hold the checkout at `root` for the body; CheckoutBusy at once when another run has it.

    Re-entrant for the holder and the processes it started."""
    root = Path(root).resolve()
    if inherited(root):
        yield holder(root) or {}
        return
    lock_path(root).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(root)), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CheckoutBusy(busy_message(root)) from None
    record = {
        "label": label,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "flow_run_id": flow_run_id,
        "token": uuid.uuid4().hex,
    }
    old_token = os.environ.get(TOKEN_ENV)
    try:
        record_path(root).write_text(json.dumps(record, indent=2))
        os.environ[TOKEN_ENV] = record["token"]
        yield record
    finally:
        if old_token is None:
            os.environ.pop(TOKEN_ENV, None)
        else:
            os.environ[TOKEN_ENV] = old_token
        record_path(root).unlink(missing_ok=True)
        lock.release()
