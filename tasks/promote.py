"""promote: move the `champion` alias to the `candidate` when it passes the gates; rollback.

Both versions are downloaded from the registry and scored on the same test split through ONNX
Runtime, each with its own tokenizer and input size (they may come from different params).
Not a DVC stage: it changes the registry, not files, and its outcome depends on the registry's
state at the time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NONE

from model.metrics import retrieval_metrics
from tasks.common import stage, tracking
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

log = logging.getLogger("xmodal")


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


def gates(cand: dict, champ: dict, parity_passed: bool, p: PromoteParams) -> list[Gate]:
    out = [Gate("onnx_parity", parity_passed, f"candidate parity_passed={parity_passed}")]
    mean_c = (cand["i2t_R1"] + cand["t2i_R1"]) / 2
    mean_h = (champ["i2t_R1"] + champ["t2i_R1"]) / 2
    out.append(
        Gate(
            "mean_R1",
            mean_c >= mean_h + p.min_delta - 1e-12,
            f"candidate {mean_c:.4f} vs champion {mean_h:.4f} + min_delta {p.min_delta:g}",
        )
    )
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


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(
    p: PromoteParams,
    reg: RegisterParams,
    mlflow_p: MlflowParams,
    raw: Path,
    test_index: dict,
    root: Path,
) -> PromoteResult:
    """Compare candidate and champion through ONNX Runtime; move the aliases if all gates pass."""
    tracking.setup(mlflow_p, root)
    client = MlflowClient()
    name = reg.model_name
    cand = _alias_version(client, name, reg.candidate_alias)
    if cand is None:
        raise LookupError(f"no model version of {name!r} has the alias {reg.candidate_alias!r}")
    champ = _alias_version(client, name, reg.champion_alias)
    if champ is None or champ == cand:
        if champ is None:
            client.set_registered_model_alias(name, reg.champion_alias, cand)
        note = "first champion" if champ is None else "candidate is already the champion"
        return PromoteResult(champ is None, cand, champ, cand, note=note)

    version = client.get_model_version(name, cand)
    parity_ok = version.tags.get("parity_passed") == "true"
    scores = {}
    images = split_images(raw, test_index["image_ids"])  # one pass over the shards for both
    for v in (cand, champ):
        model_dir = resolve_model(f"models:/{name}/{v}", mlflow_p, root)
        scores[v] = score_version(model_dir, images, test_index, p.variant, p.ks)
    checks = gates(scores[cand], scores[champ], parity_ok, p)
    result = PromoteResult(False, cand, champ, champ, checks, scores[cand], scores[champ])
    if all(g.passed for g in checks):
        # MLflow has no compare-and-set for aliases: serialise local promotions with a lock and
        # re-check that the champion did not move while the two versions were being scored.
        with FileLock(str(Path(root) / ".xmodal-promote.lock"), timeout=300):
            now = _alias_version(client, name, reg.champion_alias)
            if now != champ:
                checks.append(
                    Gate("champion_unchanged", False, f"champion moved from v{champ} to v{now}")
                )
            else:
                client.set_registered_model_alias(name, p.previous_alias, champ)
                client.set_registered_model_alias(name, reg.champion_alias, cand)
                result.promoted, result.champion_after = True, cand
    failed = [g for g in checks if not g.passed]
    client.set_model_version_tag(
        name, cand, "promotion_status", "promoted" if result.promoted else "refused"
    )
    client.set_model_version_tag(name, cand, "promotion_compared_to", champ)
    if failed:
        client.set_model_version_tag(
            name, cand, "promotion_failed_gates", ",".join(g.name for g in failed)
        )
        for g in failed:
            client.set_model_version_tag(name, cand, f"promotion_gate.{g.name}", g.detail[:5000])
    return result


def rollback(
    reg: RegisterParams, p: PromoteParams, mlflow_p: MlflowParams, root: Path
) -> tuple[str, str]:
    """Swap `champion` and `previous-champion`; return (new champion, new previous)."""
    tracking.setup(mlflow_p, root)
    client = MlflowClient()
    with FileLock(str(Path(root) / ".xmodal-promote.lock"), timeout=300):
        champ = _alias_version(client, reg.model_name, reg.champion_alias)
        prev = _alias_version(client, reg.model_name, p.previous_alias)
        if champ is None or prev is None:
            raise LookupError(
                f"rollback needs both {reg.champion_alias!r} and {p.previous_alias!r} aliases "
                f"on {reg.model_name!r} (found champion={champ}, previous={prev})"
            )
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, prev)
        client.set_registered_model_alias(reg.model_name, p.previous_alias, champ)
    return prev, champ


def run(params: Params, root: Path) -> PromoteResult:
    raw = root / params.paths.raw
    index = split_index(root / params.paths.prepared, "test")
    return promote(params.promote, params.register, params.mlflow, raw, index, root)


def report(result: PromoteResult) -> str:
    lines = [
        f"candidate v{result.candidate} vs champion v{result.champion_before}: "
        + ("PROMOTED" if result.promoted else "refused" if result.gates else result.note)
    ]
    lines += [f"  [{'pass' if g.passed else 'FAIL'}] {g.name}: {g.detail}" for g in result.gates]
    return "\n".join(lines)


@task(
    name="promote",
    cache_policy=NONE,
    **stage.io_retries(5, 30),
    timeout_seconds=1800,
)
def promote_task(root: str = ".") -> dict:
    result = run(load_params(Path(root).resolve() / DEFAULT_PARAMS), Path(root).resolve())
    log.info(report(result))
    return asdict(result)


if __name__ == "__main__":
    res = run(load_params(DEFAULT_PARAMS), Path(".").resolve())
    print(report(res))
    print(json.dumps(asdict(res), indent=2, default=str))
