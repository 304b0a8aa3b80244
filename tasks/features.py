"""features: a frozen image tower's pooled output, computed once per image (LiT).

When the image tower does not train (`train.image.trainable_blocks: 0`), its output for an image
is the same every epoch, so the stage computes it once per split and train feeds it to the image
head instead of running the tower. DVC keys the cache: the stage depends on the prepared data
(its version and resolution) and on the tower's params, so a changed tower, weights or
resolution reruns it. Evaluation and export use the whole model as before.

Writes `<features>/meta.json` always; `{split}.npy` (N, C) float32, rows in the prepared split's
image order, only when the cache applies. Otherwise meta.json says why not, and train runs the
tower.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE

from model.config import ModelConfig
from model.image_tower import IMAGENET_MEAN, IMAGENET_STD, ImageTower, pool
from tasks.common import stage
from tasks.common.config import FeaturesParams, Params, TrainParams
from tasks.common.data import FEATURES_META, SPLITS, STATS_FILE, load_split, read_json, to_pixels


@dataclass(frozen=True)
class FeaturesResult:
    cached: bool
    reason: str
    counts: dict[str, int]


def why_not_cached(p: FeaturesParams, cfg: ModelConfig, train: TrainParams) -> str | None:
    """Why the image tower cannot be cached under these params, or None when it can."""
    if not p.enabled:
        return "features.enabled is false"
    if train.image.trainable_blocks != 0:
        return "the image tower trains (train.image.trainable_blocks is not 0)"
    if cfg.image.weights == "none":
        # Its random initial weights depend on what else train builds first: not reproducible here.
        return "the frozen image tower is untrained (model.image.weights: none)"
    if cfg.fusion.enabled or cfg.multiscale.enabled:
        return "the fusion or multi-scale head needs the tower's feature maps"
    if train.augment.crop_scale is not None or train.augment.hflip:
        return "train.augment changes the pixels every epoch"
    return None


@torch.no_grad()
def pooled_features(tower: ImageTower, stats, images: np.ndarray, batch: int) -> np.ndarray:
    """(N, C) pooled tower output of uint8 (N, S, S, 3) images, normalised as the model does."""
    mean = torch.tensor(stats[0], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32).view(1, 3, 1, 1)
    out = [
        pool(tower((to_pixels(images[i : i + batch]) - mean) / std)[-1])  # as train feeds it
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy().astype(np.float32)


def features(
    p: FeaturesParams, cfg: ModelConfig, train: TrainParams, prepared: Path, out: Path
) -> FeaturesResult:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    reason = why_not_cached(p, cfg, train)
    counts: dict[str, int] = {}
    if reason is None:
        tower = ImageTower(cfg.image, True, cfg.allow_downloads).eval()
        if cfg.image.normalization == "imagenet":
            stats = (IMAGENET_MEAN, IMAGENET_STD)
        else:
            s = read_json(Path(prepared) / STATS_FILE)
            stats = (s["mean"], s["std"])
        for name in SPLITS:
            if not (Path(prepared) / name).is_dir():
                continue
            feats = pooled_features(tower, stats, load_split(prepared, name).images, p.batch_size)
            np.save(out / f"{name}.npy", feats)
            counts[name] = len(feats)
    meta = {
        "cached": reason is None,
        "reason": reason or "",
        "backbone": cfg.image.backbone,
        "weights": cfg.image.weights,
        "normalization": cfg.image.normalization,
        "counts": counts,
    }
    (out / FEATURES_META).write_text(json.dumps(meta, indent=2))
    return FeaturesResult(reason is None, reason or "", counts)


def run(params: Params, root: Path) -> FeaturesResult:
    return features(
        params.features,
        params.model,
        params.train,
        root / params.paths.prepared,
        root / params.paths.features,
    )


@task(name="features", cache_policy=NONE, timeout_seconds=3600)
def features_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("features", run, root, force)


if __name__ == "__main__":
    stage.main("features", run)
