"""promote: move the `champion` alias to the `candidate` once it passes the gates; rollback.

Only promotion moves `champion` (register sets `candidate` alone). The candidate, and the
champion when there is one, are downloaded from the registry and scored on the same test split
through ONNX Runtime, each with its own tokenizer and input size (they may come from different
params). On a registry with no champion the gates that need none apply (parity, not rolled back,
the absolute floor `promote.min_mean_r1`) and a pass makes the first champion.

Every alias move is recorded in the registry as an event (tasks.common.aliases); rollback walks
that history back one champion at a time and marks the version it leaves as rolled back, which a
later promotion refuses unless forced. Not a DVC stage: it changes the registry, not files, and
its outcome depends on the registry's state at the time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from filelock import FileLock
from mlflow import MlflowClient
from prefect import task
from prefect.cache_policies import NONE

from model.metrics import retrieval_metrics
from tasks.common import aliases, stage, tracking
from tasks.common.config import (
    DEFAULT_PARAMS,
    MlflowParams,
    Params,
    PromoteParams,
    RegisterParams,
    load_params,
)
from tasks.common.data import split_index
from tasks.common.dataset import iter_raw
from tasks.common.registry import resolve_model
from xmodal_runtime.encoder import Encoder

# Mean R@1 closer than this to the bar (champion + min_delta) is a tie: recalls are multiples of
# 1/N, so only float rounding separates equal ones.
TIE = 1e-9
ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


@dataclass
class PromoteResult:
    promoted: bool
    candidate: str
    champion_before: str | None
    champion_after: str | None
    gates: list[Gate] = field(default_factory=list)
    candidate_metrics: dict = field(default_factory=dict)
    champion_metrics: dict = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class RollbackResult:
    rolled_back: str  # the version that was champion, now tagged promotion_status=rolled_back
    champion: str  # the champion after the rollback
    previous: str | None  # `previous-champion` after the rollback (None: no alias)
    candidate_removed: bool  # `candidate` named the rolled-back version and was removed
    from_history: bool  # False: no alias history, the `previous-champion` alias was followed


def lock_path(root: Path) -> Path:
    """The file lock serialising local alias moves: `<root>/.xmodal/promote.lock`."""
    folder = Path(root) / ".xmodal"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "promote.lock"


def split_images(raw: Path, image_ids: list[int]) -> list[bytes]:
    """The encoded images of `image_ids`, in that order, from the raw shards."""
    wanted = set(image_ids)
    found = {s.record.image_id: s.data for s in iter_raw(raw) if s.record.image_id in wanted}
    return [found[i] for i in image_ids]


def score_version(
    model_dir: Path, images: list[bytes], test_index: dict, variant: str, ks: list[int]
):
    """Recall@K of an exported model on a test split through the serving runtime, from the
    split's raw images (the original bytes in the ingested shards)."""
    enc = Encoder(model_dir, variant, provider="cpu", chunk_size=128)
    img = enc.encode_images(images)
    txt = enc.encode_texts(test_index["captions"], pad_to_max_length=True)
    return retrieval_metrics(img, txt, np.asarray(test_index["image_index"]), ks)


def mean_r1(m: dict) -> float:
    return (m["i2t_R1"] + m["t2i_R1"]) / 2


def gates(
    cand: dict,
    champ: dict | None,
    parity_passed: bool,
    p: PromoteParams,
    rolled_back: str = "",
    force: bool = False,
) -> list[Gate]:
    """The gates, in order. `champ` None: a first champion, only the gates that need none.
    `rolled_back`: how the candidate was rolled back ('' when it never was)."""
    out = [Gate("onnx_parity", parity_passed, f"candidate parity_passed={parity_passed}")]
    if rolled_back:
        how = "promoted anyway (--force)" if force else "refused unless forced (--force)"
        out.append(Gate("not_rolled_back", force, f"candidate {rolled_back}: {how}"))
    else:
        out.append(Gate("not_rolled_back", True, "candidate was never rolled back"))
    mean_c = mean_r1(cand)
    above = mean_c >= p.min_mean_r1 - TIE
    out.append(
        Gate(
            "mean_R1_floor",
            above,
            f"candidate {mean_c:.4f} (i2t {cand['i2t_R1']:.4f}, t2i {cand['t2i_R1']:.4f}) "
            f"{'>=' if above else '<'} min_mean_r1 {p.min_mean_r1:g}",
        )
    )
    if champ is None:
        return out
    out.append(_mean_gate(mean_c, mean_r1(champ), p))
    for key in sorted(k for k in cand if "_R" in k and not k.endswith("_R1")):
        drop = champ[key] - cand[key]
        out.append(
            Gate(
                f"{key}_no_drop",
                drop <= p.tolerance + 1e-12,
                f"candidate {cand[key]:.4f} vs champion {champ[key]:.4f} "
                f"(drop {drop:+.4f}, tolerance {p.tolerance:g})",
            )
        )
    return out


def _mean_gate(mean_c: float, mean_h: float, p: PromoteParams) -> Gate:
    """Mean R@1 strictly above champion + min_delta; a tie passes only with on_tie=promote."""
    diff = mean_c - (mean_h + p.min_delta)
    if diff > TIE:
        passed, how = True, f"better by {diff:.4f}"
    elif diff >= -TIE:
        passed = p.on_tie == "promote"
        how = f"a tie, on_tie={p.on_tie}: {'promoted' if passed else 'refused'}"
    else:
        passed, how = False, f"short by {-diff:.4f}"
    detail = f"candidate {mean_c:.4f} vs champion {mean_h:.4f} + min_delta {p.min_delta:g}: {how}"
    return Gate("mean_R1", passed, detail)


def _rolled_back(tags: dict) -> str:
    """How a version was rolled back, from its tags ('' when it was not)."""
    if tags.get("promotion_status") != ROLLED_BACK:
        return ""
    at, by = tags.get("rolled_back_at", "?"), tags.get("rolled_back_by", "?")
    return f"was rolled back at {at} by {by}"


def promote(
    p: PromoteParams,
    reg: RegisterParams,
    mlflow_p: MlflowParams,
    raw: Path,
    test_index: dict,
    root: Path,
    force: bool = False,
) -> PromoteResult:
    """Score candidate (and champion) through ONNX Runtime; move the aliases if all gates pass.
    `force`: promote a candidate that was rolled back (every other gate still applies)."""
    tracking.setup(mlflow_p, root)
    client = MlflowClient()
    name = reg.model_name
    cand = aliases.alias_version(client, name, reg.candidate_alias)
    if cand is None:
        raise LookupError(f"no model version of {name!r} has the alias {reg.candidate_alias!r}")
    champ = aliases.alias_version(client, name, reg.champion_alias)
    if champ == cand:
        return PromoteResult(False, cand, champ, champ, note="candidate is already the champion")

    tags = client.get_model_version(name, cand).tags
    rolled_back = _rolled_back(tags)
    scores = {}
    images = split_images(raw, test_index["image_ids"])  # one pass over the shards for both
    for v in (cand, champ) if champ is not None else (cand,):
        model_dir = resolve_model(f"models:/{name}/{v}", mlflow_p, root)
        scores[v] = score_version(model_dir, images, test_index, p.variant, p.ks)
    checks = gates(
        scores[cand], scores.get(champ), tags.get("parity_passed") == "true", p, rolled_back, force
    )
    result = PromoteResult(False, cand, champ, champ, checks, scores[cand], scores.get(champ, {}))
    if all(g.passed for g in checks):
        action = "first-champion" if champ is None else "promote"
        if rolled_back:
            action = "force-promote"
        _move_champion(client, reg, p, result, action, root)
    _tag_outcome(client, name, result, tags, rolled_back)
    return result


def _move_champion(
    client: MlflowClient,
    reg: RegisterParams,
    p: PromoteParams,
    result: PromoteResult,
    action: str,
    root: Path,
) -> None:
    """Move `champion` to the candidate, unless it moved while the versions were scored.

    MLflow has no compare-and-set for aliases: local promotions are serialised with a lock and
    the champion is re-read under it."""
    name, cand, champ = reg.model_name, result.candidate, result.champion_before
    with FileLock(str(lock_path(root)), timeout=300):
        now = aliases.alias_version(client, name, reg.champion_alias)
        if now != champ:
            result.gates.append(
                Gate("champion_unchanged", False, f"champion moved from v{champ} to v{now}")
            )
            return
        mean = mean_r1(result.candidate_metrics)
        note = f"mean R@1 {mean:.4f}" + (
            f" vs {mean_r1(result.champion_metrics):.4f}" if champ is not None else ""
        )
        aliases.move(client, name, reg.champion_alias, cand, action, note, before=champ)
        stack = aliases.champion_stack(aliases.events(client, name), reg.champion_alias)
        below = stack[-2] if len(stack) >= 2 else None  # the top is the candidate now
        aliases.set_or_delete(client, name, p.previous_alias, below)
        result.promoted, result.champion_after = True, cand
        result.note = {"first-champion": "first champion", "force-promote": "forced"}.get(
            action, ""
        )


def _tag_outcome(
    client: MlflowClient, name: str, result: PromoteResult, tags: dict, rolled_back: str
) -> None:
    """promotion_* tags on the candidate; a refused rolled-back version stays `rolled_back`.
    Gate tags of an earlier attempt that this one does not repeat are removed."""
    cand = result.candidate
    status = "promoted" if result.promoted else ROLLED_BACK if rolled_back else "refused"
    client.set_model_version_tag(name, cand, "promotion_status", status)
    compared = result.champion_before or "none (first champion)"
    client.set_model_version_tag(name, cand, "promotion_compared_to", compared)
    failed = [g for g in result.gates if not g.passed]
    if failed:
        client.set_model_version_tag(
            name, cand, "promotion_failed_gates", ",".join(g.name for g in failed)
        )
    keep = {"promotion_failed_gates"} if failed else set()
    keep |= {f"promotion_gate.{g.name}" for g in failed}
    for key in tags:
        if key.startswith(("promotion_gate.", "promotion_failed_gates")) and key not in keep:
            client.delete_model_version_tag(name, cand, key)
    for g in failed:
        client.set_model_version_tag(name, cand, f"promotion_gate.{g.name}", g.detail[:5000])


def rollback(
    reg: RegisterParams, p: PromoteParams, mlflow_p: MlflowParams, root: Path
) -> RollbackResult:
    """Move `champion` back one step in the registry's champion history.

    The version it leaves is tagged promotion_status=rolled_back (with rolled_back_at and
    rolled_back_by) and loses `candidate` if it had it, so a plain `promote` cannot bring it
    back. LookupError when there is no earlier champion."""
    tracking.setup(mlflow_p, root)
    client = MlflowClient()
    name = reg.model_name
    with FileLock(str(lock_path(root)), timeout=300):
        champ = aliases.alias_version(client, name, reg.champion_alias)
        if champ is None:
            raise LookupError(f"nothing to roll back: {name!r} has no {reg.champion_alias!r}")
        stack = aliases.champion_stack(aliases.events(client, name), reg.champion_alias)
        previous = aliases.alias_version(client, name, p.previous_alias)
        plan = aliases.plan_rollback(stack, champ, previous, name)
        note = "" if plan.from_history else f"no history: followed {p.previous_alias!r}"
        aliases.move(client, name, reg.champion_alias, plan.target, "rollback", note, before=champ)
        aliases.set_or_delete(client, name, p.previous_alias, plan.below)
        user, host = aliases.who()
        at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        for key, value in (
            ("promotion_status", ROLLED_BACK),
            ("rolled_back_at", at),
            ("rolled_back_by", f"{user}@{host}"),
        ):
            client.set_model_version_tag(name, champ, key, value)
        removed = aliases.alias_version(client, name, reg.candidate_alias) == champ
        if removed:
            aliases.move(
                client,
                name,
                reg.candidate_alias,
                None,
                "rollback",
                f"v{champ} was rolled back",
                before=champ,
            )
    return RollbackResult(champ, plan.target, plan.below, removed, plan.from_history)


def run(params: Params, root: Path, force: bool = False) -> PromoteResult:
    raw = root / params.paths.raw
    index = split_index(root / params.paths.prepared, "test")
    return promote(params.promote, params.register, params.mlflow, raw, index, root, force)


def report(result: PromoteResult) -> str:
    head = (
        f"candidate v{result.candidate} vs champion v{result.champion_before}"
        if result.champion_before is not None
        else f"candidate v{result.candidate}, no champion yet"
    )
    if result.promoted:
        outcome = "PROMOTED" + (f" ({result.note})" if result.note else "")
    else:
        outcome = "refused" if result.gates else result.note
    lines = [f"{head}: {outcome}"]
    lines += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in result.gates]
    return "\n".join(lines)


def rollback_report(r: RollbackResult, reg: RegisterParams, p: PromoteParams) -> str:
    lines = [
        f"{reg.champion_alias}: v{r.rolled_back} -> v{r.champion} "
        f"(v{r.rolled_back} tagged promotion_status={ROLLED_BACK})",
        f"{p.previous_alias}: " + (f"v{r.previous}" if r.previous else "removed (none earlier)"),
    ]
    if r.candidate_removed:
        lines.append(f"{reg.candidate_alias}: removed (it named v{r.rolled_back})")
    if not r.from_history:
        lines.append(f"(no alias history: followed the {p.previous_alias!r} alias)")
    return "\n".join(lines)


@task(
    name="promote",
    cache_policy=NONE,
    **stage.io_retries(5, 30),
    timeout_seconds=1800,
)
def promote_task(root: str = ".", force: bool = False) -> dict:
    from prefect import get_run_logger

    result = run(load_params(Path(root).resolve() / DEFAULT_PARAMS), Path(root).resolve(), force)
    get_run_logger().info(report(result))  # the run's log in the UI, and `--watch`
    return {**asdict(result), "report": report(result)}


if __name__ == "__main__":
    res = run(load_params(DEFAULT_PARAMS), Path(".").resolve())
    print(report(res))
    print(json.dumps(asdict(res), indent=2, default=str))
