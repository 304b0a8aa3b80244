"""features: each tower's frozen prefix, computed once per image and caption (LiT).

Blocks that do not train (`train.image.trainable_blocks`, `train.text.trainable_blocks`) give
the same output every epoch, so the stage computes it once for the train and val splits, and
train runs only the trainable blocks on it. For the image tower that is the output of its frozen
stages (pooled when every stage is frozen); for the text tower, the token states after its
frozen BERT blocks. DVC keys the cache: the stage depends on the prepared data (its version and
resolution), the towers, their trainable depth and the augmentation, so a change to any of them
reruns it. Evaluation and export use the whole model as before.

A flip has two outcomes, so with `train.augment.hflip` the image prefix of every train image
flipped left to right is cached too, and train picks one of the two views per image and step.
Random crops (`train.augment.crop_scale`) have no such finite set and keep the image tower
uncached.

Writes `<features>/meta.json` always, saying per tower what is cached or why not, and where a
tower is cached, per split:
  image_{split}.npy         (N, ...) float32, rows in the prepared split's image order
  image_train_hflip.npy     (N, ...) the same of each train image flipped left to right, with
                            train.augment.hflip only (val is never augmented)
  text_{split}.npy          (T, H) float32, every caption's real-token states, concatenated
  text_{split}_offsets.npy  (C + 1,) caption c's rows are offsets[c]:offsets[c + 1]
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
from model.dual_encoder import DualEncoder
from tasks.common import stage
from tasks.common.checkpoint import build_model
from tasks.common.config import FeaturesParams, Params, TrainParams
from tasks.common.data import (
    FEATURES_META,
    NpyWriter,
    Rows,
    Split,
    cache_identity,
    load_split,
    to_pixels,
)

CACHED_SPLITS = ("train", "val")  # what train reads; test is only ever scored whole


@dataclass(frozen=True)
class FeaturesResult:
    cuts: dict[str, int]  # frozen blocks cached per tower; 0: not cached
    reasons: dict[str, str]  # why a tower is not cached
    counts: dict[str, int]


def why_not_cached(p: FeaturesParams, cfg: ModelConfig, train: TrainParams) -> dict[str, str]:
    """Per tower, why its frozen prefix cannot be cached under these params; absent when it can."""
    reasons = {}
    if train.image.trainable_blocks is None:
        reasons["image"] = "the whole image tower trains (train.image.trainable_blocks is null)"
    elif cfg.image.weights == "none":
        # Its random initial weights depend on what else train builds first: not reproducible here.
        reasons["image"] = "the frozen image stages are untrained (model.image.weights: none)"
    elif cfg.fusion.enabled or cfg.multiscale.enabled:
        reasons["image"] = "the fusion or multi-scale head needs the tower's feature maps"
    elif train.augment.crop_scale is not None:
        reasons["image"] = "train.augment.crop_scale draws new crops every epoch"
    if train.text.trainable_blocks is None:
        reasons["text"] = "the whole text tower trains (train.text.trainable_blocks is null)"
    elif cfg.text.pretrained is None:
        reasons["text"] = "the frozen text blocks are untrained (model.text.pretrained: null)"
    if not p.enabled:
        reasons = dict.fromkeys(("image", "text"), "features.enabled is false")
    return reasons


@torch.no_grad()
def image_prefix(
    net: DualEncoder, images: Rows, cut: int, batch: int, out: Path, flipped: Path | None = None
) -> None:
    """Write the (N, ...) float32 output of the first `cut` image stages to `out`, a chunk of
    uint8 (B, S, S, 3) images at a time, and with `flipped` that of the images flipped left to
    right, from the same read of each chunk."""
    plain = NpyWriter(out, len(images))
    mirror = NpyWriter(flipped, len(images)) if flipped is not None else None
    for chunk in images.chunks(batch):
        pixels = to_pixels(chunk)  # (B, 3, S, S)
        plain.write(net.image_prefix(pixels, cut).numpy().astype(np.float32))
        if mirror is not None:
            mirror.write(net.image_prefix(pixels.flip(-1), cut).numpy().astype(np.float32))
    plain.close()
    if mirror is not None:
        mirror.close()


@torch.no_grad()
def text_prefix(net: DualEncoder, data: Split, cut: int, batch: int, out: Path) -> np.ndarray:
    """Write every caption's real-token states after the first `cut` text blocks, concatenated
    ((T, H) float32), to `out`, a chunk at a time; return the (C + 1,) offsets of each
    caption's rows."""
    lengths = np.concatenate([m.sum(1) for m in data.attention_mask.chunks(8192)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    writer = NpyWriter(out, int(offsets[-1]))
    for i in range(0, len(lengths), batch):
        n = lengths[i : i + batch]
        mask = data.attention_mask[i : i + batch][:, : n.max()]
        if not all(mask[r, :k].all() for r, k in enumerate(n)):
            raise ValueError("prepared captions are not right-padded; the text cache needs them so")
        ids = torch.from_numpy(data.input_ids[i : i + batch][:, : n.max()].astype(np.int64))
        hidden = net.text_prefix(ids, torch.from_numpy(mask.astype(np.int64)), cut)  # (B, L, H)
        writer.write(torch.cat([hidden[r, :k] for r, k in enumerate(n)]).numpy())
    writer.close()
    return offsets


def features(
    p: FeaturesParams, cfg: ModelConfig, train: TrainParams, prepared: Path, out: Path
) -> FeaturesResult:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    reasons = why_not_cached(p, cfg, train)
    cuts = dict.fromkeys(("image", "text"), 0)
    counts: dict[str, int] = {}
    if len(reasons) < 2:
        net = build_model(cfg, Path(prepared)).eval()
        for tower, blocks in (("image", train.image), ("text", train.text)):
            if tower not in reasons:
                cuts[tower] = net.frozen_blocks(tower, blocks.trainable_blocks)
                if cuts[tower] == 0:
                    reasons[tower] = f"train.{tower}.trainable_blocks covers every block"
        for name in CACHED_SPLITS:
            if (Path(prepared) / name).is_dir():
                flip = name == "train" and train.augment.hflip  # val is never augmented
                counts[name] = _cache_split(
                    net, cuts, Path(prepared), name, p.batch_size, out, flip
                )
    meta = {
        "image": {
            "cut": cuts["image"],
            "reason": reasons.get("image", ""),
            "hflip": bool(cuts["image"]) and train.augment.hflip,
        },
        "text": {"cut": cuts["text"], "reason": reasons.get("text", "")},
        **cache_identity(cfg),
        "counts": counts,
    }
    (out / FEATURES_META).write_text(json.dumps(meta, indent=2))
    return FeaturesResult(cuts, reasons, counts)


def _cache_split(
    net: DualEncoder, cuts: dict, prepared: Path, name: str, batch: int, out: Path, hflip: bool
) -> int:
    data = load_split(prepared, name, images=bool(cuts["image"]))
    if cuts["image"]:
        flipped = out / f"image_{name}_hflip.npy" if hflip else None
        image_prefix(net, data.images, cuts["image"], batch, out / f"image_{name}.npy", flipped)
    if cuts["text"]:
        offsets = text_prefix(net, data, cuts["text"], batch, out / f"text_{name}.npy")
        np.save(out / f"text_{name}_offsets.npy", offsets)
    return len(data)


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
