"""Plumbing shared by the stage modules: their DVC entry point and their Prefect-task body.

DVC owns caching. A Prefect task asks DVC whether its stage changed, runs the same pure core that
`dvc repro` runs, then commits the stage to dvc.lock and the DVC cache. So a flow run and
`dvc repro` share one lock: after either, the other sees the pipeline up to date.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tqdm import tqdm

from tasks.common import runlock
from tasks.common.config import DEFAULT_PARAMS, Params, load_params

log = logging.getLogger("xmodal")

StageFn = Callable[[Params, Path], Any]


class StageFailed(RuntimeError):
    """A stage's own error, named by stage: what the Prefect UI shows as the failed state."""


SKIPPED_MESSAGE = "unchanged since dvc.lock: deps, params and outputs match; not run"
RESTORED_MESSAGE = "restored from DVC's run cache: these deps and params ran before; not run"


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float
    result: Any = None
    reason: str = ""  # why a skipped stage did not run


# MLflow error codes worth a retry (the server is busy or restarting), as opposed to a request
# the server will refuse again (INVALID_PARAMETER_VALUE, RESOURCE_ALREADY_EXISTS...).
TRANSIENT_MLFLOW_CODES = {
    "TEMPORARILY_UNAVAILABLE",
    "INTERNAL_ERROR",
    "RESOURCE_EXHAUSTED",
    "REQUEST_LIMIT_EXCEEDED",
}


def is_transient(err: BaseException | None) -> bool:
    """True when `err` or anything it was raised from is a network or server-side hiccup."""
    import requests
    from mlflow.exceptions import MlflowException

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ConnectionError | TimeoutError | requests.ConnectionError):
            return True
        if isinstance(err, requests.Timeout):
            return True
        if isinstance(err, MlflowException) and err.error_code in TRANSIENT_MLFLOW_CODES:
            return True
        err = err.__cause__ or err.__context__
    return False


def unreachable(err: BaseException, tracking_uri: str | None = None) -> str | None:
    """One line for a tracking server that did not answer, naming it; None for other errors.

    MLflow's own HTTP retries (mlflow.http_retries, with backoff) were spent by then."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri or ""
    if not uri.startswith(("http://", "https://")) or not is_transient(err):
        return None
    parts = urlsplit(uri)
    if parts.password or parts.username:  # never print credentials
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    cause = err
    while cause.__cause__ or cause.__context__:
        cause = cause.__cause__ or cause.__context__
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
    return (
        f"MLflow server {urlunsplit(parts)} is unreachable ({type(cause).__name__}) after "
        f"{retries} retries with backoff; start it (make serve) and run again"
    )


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry condition for I/O tasks: retry network/server errors, not bad input."""
    try:
        state.result()
    except Exception as err:  # noqa: BLE001 - classified below
        return is_transient(err)
    return False


def io_retries(*delays: float) -> dict[str, Any]:
    """Prefect task options for idempotent I/O: one retry per delay (backoff, seconds), taken
    only on network or server errors."""
    return {
        "retries": len(delays),
        "retry_delay_seconds": list(delays),
        "retry_condition_fn": retry_if_transient,
    }


def stage_changed(root: Path, name: str) -> bool:
    """True when DVC would re-run stage `name` (deps, params, command or outputs changed)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        return repo.stage.get_target(name).changed()


def commit_stage(root: Path, name: str) -> None:
    """Record the stage in dvc.lock and move its outputs into the DVC cache, as `dvc repro` does,
    and save the run in DVC's run cache, so the same deps and params restore instead of rerun."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stages = repo.commit(name, force=True)
        with repo.lock:
            for committed in stages:
                repo.stage_cache.save(committed)


def restore_run(root: Path, name: str) -> bool:
    """Check out the stage's outputs from DVC's run cache when its current deps and params ran
    before (an experiment that was put back, a run retried after a failure), as `dvc repro`
    does; then commit it. False when the run cache has no such run."""
    from dvc.repo import Repo
    from dvc.stage.cache import RunCacheNotFoundError

    with Repo(str(root)) as repo, repo.lock:
        try:
            repo.stage_cache.restore(repo.stage.get_target(name))
        except RunCacheNotFoundError:
            return False
    commit_stage(root, name)
    return True


def run_stage(name: str, fn: StageFn, root: Path | str = ".", force: bool = False):
    """Run one pipeline stage through DVC's bookkeeping; skip it when DVC says it is unchanged.

    The Prefect-task body: a skipped stage returns a `Skipped` state (type COMPLETED, its data
    the StageOutcome), so the Prefect UI tells a skipped task from one that ran."""
    root = Path(root).resolve()
    start = time.perf_counter()
    reason = None
    if not force and not stage_changed(root, name):
        reason = SKIPPED_MESSAGE
    elif not force and restore_run(root, name):
        reason = RESTORED_MESSAGE
    if reason:
        log.info("stage %s: %s", name, reason)
        from prefect.states import Completed

        outcome = StageOutcome(name, True, time.perf_counter() - start, reason=reason)
        return Completed(name="Skipped", message=reason, data=outcome)
    params = None
    try:
        params = load_params(root / DEFAULT_PARAMS)
        result = fn(params, root)
    except Exception as err:
        # The task (and so the flow) ends Failed with this one line as its state message; the
        # traceback stays in the task's logs.
        why = unreachable(err, params.mlflow.tracking_uri if params else None)
        raise StageFailed(f"stage {name} failed: {why or f'{type(err).__name__}: {err}'}") from err
    commit_stage(root, name)
    return StageOutcome(name, False, time.perf_counter() - start, result)


# What bad input raises: invalid params, malformed data, missing inputs, undecodable files, and a
# run that diverged (train's NonFiniteLoss names the step).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def main(name: str, fn: StageFn, argv: list[str] | None = None) -> Any:
    """`python -m tasks.<name>`: what a DVC stage runs. Presets (-P) and overrides (-S) are for
    runs outside DVC; they are not written to params.yaml."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=fn.__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file")
    parser.add_argument(
        "-P",
        "--preset",
        dest="presets",
        action="append",
        default=[],
        type=Path,
        metavar="PATH",
        help="lay a preset overlay (presets/*.yaml) over the params file; repeatable, in order, "
        "before -S",
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param by dotted key, e.g. -S train.lr=0.001 (repeatable)",
    )
    parser.add_argument(
        "--root", type=Path, help="project root (default: the params file's folder)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # Importing Prefect gave the root logger a handler (basicConfig is then a no-op) and left it
    # at WARNING: the project's own INFO lines still reach that handler through this level.
    log.setLevel(logging.INFO)
    root = (args.root or args.params.resolve().parent).resolve()
    try:
        params = load_params(args.params, args.overrides, args.presets)
        # `dvc repro` runs this per stage: refused while a pipeline run holds the checkout.
        with runlock.hold(root, f"python -m tasks.{name}"):
            return fn(params, root)
    except (*USER_ERRORS, StageFailed) as err:
        if args.verbose:
            raise
        # One line naming the problem (bad params, data or a missing upstream output); the
        # traceback is one --verbose away.
        message = " ".join(str(err).split())
        parser.exit(2, f"stage {name} failed: {type(err).__name__}: {message}\n")


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 30 s when stderr is not a terminal (CI, logs)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kwargs)
