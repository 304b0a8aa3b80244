"""The features stage: a frozen image tower's pooled output cached once, and training on the
cache is the same as training through the tower."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import validate
from tasks.common.data import load_features, load_split, to_pixels
from tasks.common.tracking import NullSink
from tasks.features import features, why_not_cached
from tasks.ingest import ingest
from tasks.preprocess import preprocess
from tasks.train import train

from .conftest import deep_merge, tiny_params_dict

# The frozen pretrained image tower is what the cache is for; the text tower stays tiny.
FROZEN = {
    "model": {"image": {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1",
                        "normalization": "imagenet"}},
    "train": {"image": {"trainable_blocks": 0}, "max_steps": 4, "batch_size": 8},
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("features")
    params = validate(tiny_params_dict(**FROZEN))
    ingest(params.ingest, root / "raw")
    preprocess(params.preprocess, params.model.text.pretrained, root / "raw", root / "prep")
    return root, params


def test_cache_applies_only_to_a_frozen_pretrained_tower_fed_plain_pixels():
    base = tiny_params_dict(**FROZEN)
    assert why_not_cached(*_sections(base)) is None
    cases = [
        ({"features": {"enabled": False}}, "features.enabled"),
        ({"train": {"image": {"trainable_blocks": None}}}, "trains"),
        ({"model": {"image": {"weights": "none", "normalization": "dataset"}}}, "untrained"),
        ({"model": {"fusion": {"enabled": True}}}, "feature maps"),
        ({"model": {"multiscale": {"enabled": True}}}, "feature maps"),
        ({"train": {"augment": {"crop_scale": [0.6, 1.0]}}}, "augment"),
    ]
    for change, word in cases:
        reason = why_not_cached(*_sections(deep_merge(base, change)))
        assert reason is not None and word in reason, (change, reason)


def _sections(raw: dict):
    p = validate(raw)
    return p.features, p.model, p.train


def test_cached_features_equal_the_models_own_tower(prepared):
    root, params = prepared
    result = features(params.features, params.model, params.train, root / "prep", root / "feat")
    assert result.cached and result.counts == {"train": 30, "val": 6, "test": 12}
    net = build_model(params.model, root / "prep").eval()
    for split in ("train", "val"):
        cached = load_features(root / "feat", split, params.model)
        with torch.no_grad():
            live = net.pooled_image(to_pixels(load_split(root / "prep", split).images))
        assert cached.shape == (result.counts[split], 1280)
        np.testing.assert_allclose(cached, live.numpy(), atol=1e-5)


def test_training_on_the_cache_equals_training_through_the_tower(prepared):
    root, params = prepared
    features(params.features, params.model, params.train, root / "prep", root / "feat")
    runs = {}
    for name, feats in (("cached", root / "feat"), ("tower", None)):
        out = root / f"train-{name}"
        train(params.train, params.model, root / "prep", out, out / "history.csv", NullSink(),
              features=feats)  # fmt: skip
        with open(out / "history.csv") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        state = torch.load(out / CHECKPOINT, weights_only=True)["state_dict"]
        runs[name] = (losses, state)
    (loss_c, state_c), (loss_t, state_t) = runs["cached"], runs["tower"]
    assert len(loss_c) == 3  # one epoch of 30 images in batches of 8
    np.testing.assert_allclose(loss_c, loss_t, rtol=1e-4)
    for key in ("image_proj.weight", "text_proj.weight", "logit_scale"):
        torch.testing.assert_close(state_c[key], state_t[key], atol=1e-4, rtol=1e-4)
    # The frozen tower did not move in either run.
    key = next(k for k in state_c if k.startswith("visual."))
    torch.testing.assert_close(state_c[key], state_t[key])


def test_stale_cache_is_refused(prepared):
    root, params = prepared
    features(params.features, params.model, params.train, root / "prep", root / "feat")
    other = params.model.model_copy(
        update={"image": params.model.image.model_copy(update={"weights": "IMAGENET1K_V2"})}
    )
    with pytest.raises(ValueError, match="rerun the features stage"):
        load_features(root / "feat", "train", other)


def test_nothing_cached_when_the_tower_trains(prepared):
    root, params = prepared
    trains = params.train.model_copy(
        update={"image": params.train.image.model_copy(update={"trainable_blocks": None})}
    )
    result = features(params.features, params.model, trains, root / "prep", root / "none")
    assert not result.cached and "trains" in result.reason
    assert load_features(root / "none", "train", params.model) is None
    assert sorted(p.name for p in (root / "none").iterdir()) == ["meta.json"]


def test_cache_of_another_split_size_is_refused(prepared):
    from tasks.train import Batches

    root, params = prepared
    data = load_split(root / "prep", "train", images=False)
    assert data.images is None and len(data) == 30
    with pytest.raises(ValueError, match="rerun the features stage"):
        Batches(data, params.train, torch.device("cpu"), np.zeros((29, 1280), np.float32))
