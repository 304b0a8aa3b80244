"""Plumbing shared by the stage modules: their DVC entry point and their Prefect-task body.

DVC owns caching. A Prefect task asks DVC whether its stage changed, runs the same pure core that
`dvc repro` runs, then commits the stage to dvc.lock and the DVC cache. So a flow run and
`dvc repro` share one lock: after either, the other sees the pipeline up to date.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from tasks.config import DEFAULT_PARAMS, Params, load_params

log = logging.getLogger("xmodal")

StageFn = Callable[[Params, Path], Any]


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    skipped: bool
    seconds: float
    result: Any = None


def stage_changed(root: Path, name: str) -> bool:
    """True when DVC would re-run stage `name` (deps, params, command or outputs changed)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        return repo.stage.get_target(name).changed()


def commit_stage(root: Path, name: str) -> None:
    """Record the stage in dvc.lock and move its outputs into the DVC cache, as `dvc repro` does."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        repo.commit(name, force=True)


def run_stage(name: str, fn: StageFn, root: Path | str = ".", force: bool = False) -> StageOutcome:
    """Run one pipeline stage through DVC's bookkeeping; skip it when DVC says it is unchanged."""
    root = Path(root).resolve()
    start = time.perf_counter()
    if not force and not stage_changed(root, name):
        log.info("stage %s: unchanged, skipped (dvc.lock is up to date)", name)
        return StageOutcome(name, True, time.perf_counter() - start)
    params = load_params(root / DEFAULT_PARAMS)
    result = fn(params, root)
    commit_stage(root, name)
    return StageOutcome(name, False, time.perf_counter() - start, result)


def main(name: str, fn: StageFn, argv: list[str] | None = None) -> Any:
    """`python -m tasks.<name>`: what a DVC stage runs. Overrides are for runs outside DVC."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{name}", description=fn.__doc__)
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file")
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param by dotted key, e.g. -S train.lr=0.001 (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    params = load_params(args.params, args.overrides)
    return fn(params, args.params.resolve().parent)


def configure(root: Path | str = ".", overrides: list[str] | None = None) -> str:
    """Validate params and overrides before any work; persist overrides; return the params hash."""
    path = Path(root).resolve() / DEFAULT_PARAMS
    params = load_params(path, overrides)
    if overrides:
        from tasks.config import persist_overrides

        persist_overrides(path, overrides)
    return params.digest()


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that redraws at most every 30 s when stderr is not a terminal (CI, logs)."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    return tqdm(iterable, **kwargs)
