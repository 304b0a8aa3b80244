"""What a training-pipeline run does to the checkout: validate first, and leave no trace.

- `configure` validates params, presets and overrides completely before any work: the schema,
  the image backbone's name and the dataset's input paths.
- `experiment` runs a set of overrides (flow parameters, `xmodal run -S/-P`) as a DVC
  experiment: it writes them into params.yaml for the run's stages, saves the finished run with
  `dvc exp save` (a git ref holding params.yaml, dvc.lock and the metrics; `dvc exp show` lists
  it, `dvc exp apply` brings it back), then restores params.yaml, dvc.lock, the git-tracked
  reports and the DVC outputs as they were. A failed run restores params.yaml, dvc.lock and the
  cached outputs but keeps the reports it wrote (the quarantine list names bad inputs); a run
  killed mid-way is restored so by the next run (the journal under .xmodal/experiment/).

Flow-level code: stages never import this module (their DVC deps stay as they are).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common import runlock
from tasks.common.config import DEFAULT_PARAMS, ConfigError, Params, load_params, persist_overrides
from tasks.common.runlock import STATE_DIR

log = logging.getLogger("xmodal")

JOURNAL = "experiment"
# What tracking.run_identity and register read to name and tag the run after its experiment,
# as under `dvc exp run`.
EXP_ENV = ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")


@dataclass(frozen=True)
class PipelineRun:
    """What a training-pipeline run returns: each stage's outcome, and the experiment it was."""

    outcomes: dict[str, Any]  # stage name -> stage.StageOutcome
    experiment: str | None  # the DVC experiment (git ref) of a run with overrides
    overrides: list[str]
    promotion: dict | None = None  # promote_task's result, with its printed `report`


def input_problems(params: Params, root: Path) -> list[str]:
    """What the params name but the machine lacks: an unknown backbone, a missing dataset path."""
    import torchvision

    problems = []
    backbone = params.model.image.backbone
    if backbone not in torchvision.models.list_models(torchvision.models):
        problems.append(
            f"model.image.backbone: unknown torchvision classification model {backbone!r}"
        )
    ingest = params.ingest
    wanted = {
        "coco": {"ingest.coco.images_dir": ingest.coco.images_dir,
                 "ingest.coco.captions_json": ingest.coco.captions_json},
        "csv": {"ingest.csv.path": ingest.csv.path, "ingest.csv.image_root": ingest.csv.image_root},
    }.get(ingest.source, {})  # fmt: skip
    for key, value in wanted.items():
        if value and not (root / value).exists():
            problems.append(f"{key}: {value} does not exist (under {root})")
    if ingest.source == "webdataset" and ingest.webdataset.urls:
        problems += _missing_shards(ingest.webdataset.urls, root)
    return problems


def _missing_shards(urls: str, root: Path) -> list[str]:
    """Local shard files named by a brace pattern that do not exist; remote URLs are not checked."""
    from braceexpand import braceexpand

    if re.match(r"^[a-z][a-z0-9+.-]*:", urls):  # http://, s3://, pipe:, file: ...
        return []
    missing = [u for u in braceexpand(urls) if not (root / u).is_file()]
    if not missing:
        return []
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return [f"ingest.webdataset.urls: shard {missing[0]} does not exist{more} (under {root})"]


def configure(root: Path | str = ".", overrides: list[str] | None = None) -> str:
    """Validate params.yaml with the overrides and the inputs they name; return the params hash.

    Writes nothing: `experiment` applies the overrides once the run holds the checkout."""
    root = Path(root).resolve()
    params = load_params(root / DEFAULT_PARAMS, overrides)
    problems = input_problems(params, root)
    if problems:
        raise ConfigError("invalid params:\n  " + "\n  ".join(problems))
    return params.params_hash()


@contextmanager
def held(root: Path | str) -> Iterator[str]:
    """Hold the checkout for the current Prefect flow run; yield its name.

    The first line of the run's log names the run: `prefect deployment run --watch` prints the
    random name the run was created with, before the flow renames it from its parameters."""
    from prefect import get_run_logger
    from prefect.runtime import flow_run

    name = flow_run.name or "training-pipeline"
    with runlock.hold(root, f"training-pipeline {name}", str(flow_run.id or "")):
        get_run_logger().info(
            "run %r (its name in the Prefect UI and MLflow) holds checkout %s",
            name,
            Path(root).resolve(),
        )
        yield name


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True
    ).stdout


BOOKKEEPING = (str(DEFAULT_PARAMS), "dvc.lock")


def _tracked(root: Path) -> list[str]:
    """params.yaml, dvc.lock and every git-tracked file under a `paths:` entry (the reports)."""
    paths = load_params(root / DEFAULT_PARAMS).paths.model_dump().values()
    out = _git(root, "ls-files", "-z", "--", *BOOKKEEPING, *paths)
    return sorted(
        {p for p in out.split("\0") if p} | {p for p in BOOKKEEPING if (root / p).exists()}
    )


def experiment_name(label: str) -> str:
    """A git-ref-safe, unique experiment name: the run's label and the time."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip(".-") or "run"
    return f"{stem[:80]}-{time.strftime('%Y%m%d-%H%M%S')}"


def journal_dir(root: Path) -> Path:
    return Path(root) / STATE_DIR / JOURNAL


def restore(root: Path, reports: bool = True) -> bool:
    """Put back what the journal holds, check out the DVC outputs dvc.lock names, drop it.

    `reports=False` (a failed or killed run) puts back only params.yaml and dvc.lock: the
    reports the run wrote (quarantine list, metrics) stay for diagnosis."""
    journal = journal_dir(root)
    manifest = journal / "manifest.json"
    if not manifest.is_file():
        return False
    saved = json.loads(manifest.read_text())
    for rel in BOOKKEEPING:
        if rel not in saved["files"]:
            (Path(root) / rel).unlink(missing_ok=True)  # the run created it
    for rel in saved["files"] if reports else [f for f in saved["files"] if f in BOOKKEEPING]:
        dst = Path(root) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(journal / "files" / rel, dst)
    if (Path(root) / "dvc.lock").is_file():
        _checkout_outputs(root)
    shutil.rmtree(journal)
    return True


def _checkout_outputs(root: Path) -> None:
    from dvc.exceptions import CheckoutError
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        try:
            repo.checkout(force=True)
        except CheckoutError as err:
            # Outputs never cached (dvc.lock from git, stages not yet run here): the next run
            # rebuilds them, as it would have anyway.
            log.info("outputs not in the DVC cache, left for the next run: %s", err)


def recover(root: Path) -> None:
    """Undo what a killed experiment run left in the checkout (its journal says what)."""
    journal = journal_dir(root) / "manifest.json"
    if journal.is_file():
        name = json.loads(journal.read_text()).get("name")
        restore(root, reports=False)
        log.warning("restored params.yaml, dvc.lock and outputs left by interrupted run %s", name)


@contextmanager
def experiment(root: Path | str, overrides: list[str], label: str) -> Iterator[str | None]:
    """Run the body with `overrides` in params.yaml as DVC experiment `<label>-<time>`; on
    success save it (`dvc exp save`); always restore the checkout. Yields the experiment name,
    or None without overrides (the run then commits to the checkout's dvc.lock, as before)."""
    root = Path(root).resolve()
    recover(root)
    if not overrides:
        yield None
        return
    name = experiment_name(label)
    journal = journal_dir(root)
    files = _tracked(root)
    for rel in files:
        (journal / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, journal / "files" / rel)
    (journal / "manifest.json").write_text(json.dumps({"name": name, "files": files}))
    old_env = {k: os.environ.get(k) for k in EXP_ENV}
    ok = False
    try:
        persist_overrides(root / DEFAULT_PARAMS, overrides)
        os.environ["DVC_EXP_NAME"] = name
        os.environ["DVC_EXP_BASELINE_REV"] = _git(root, "rev-parse", "HEAD").strip()
        yield name
        ok = True
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        try:
            if ok:
                _save(root, name)
        finally:
            restore(root, reports=ok)


def _save(root: Path, name: str) -> None:
    """`dvc exp save`: params.yaml, dvc.lock and the reports, untracked ones included (DVC
    takes only tracked files otherwise, and a fresh project's reports are not tracked yet)."""
    from dvc.repo import Repo

    paths = load_params(root / DEFAULT_PARAMS).paths.model_dump().values()
    untracked = _git(root, "ls-files", "-z", "--others", "--exclude-standard", "--", *paths)
    with Repo(str(root)) as repo:
        rev = repo.experiments.save(
            name=name, include_untracked=[p for p in untracked.split("\0") if p] or None
        )
    log.info("saved DVC experiment %s (%s): `dvc exp show`, `dvc exp apply %s`", name, rev, name)
