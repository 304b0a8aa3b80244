import math

import pytest
import torch
import torchvision

from model.config import ImageTowerConfig, ModelConfig
from model.dual_encoder import DualEncoder
from model.loss import ClipLoss
from tasks.common.config import TrainParams
from tasks.common.optim import param_groups
from tasks.common.trainer import autocast_settings

from .conftest import SCRATCH_IMAGE, scratch_text

TEXT = scratch_text(num_layers=1)


def tiny(**kw) -> DualEncoder:
    cfg = ModelConfig(image=ImageTowerConfig(**{**SCRATCH_IMAGE, **kw}), text=TEXT, embed_dim=8)
    return DualEncoder(cfg, pixel_stats=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))).eval()


def _batch(b=3, length=6):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, 32, 32, generator=g), torch.randint(5, 50, (b, length), generator=g)


def test_embeddings_are_normalised_and_shaped():
    net = tiny()
    pixels, ids = _batch()
    img, txt, scale = net(pixels, ids, torch.ones_like(ids))
    assert img.shape == txt.shape == (3, 8)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert math.isclose(float(scale), 1 / 0.07, rel_tol=1e-5)


def test_logit_scale_is_clamped_at_100():
    net = tiny()
    with torch.no_grad():
        net.logit_scale.fill_(10.0)
    assert float(net.scale()) == pytest.approx(100.0)
    net.clamp_logit_scale_()
    assert float(net.logit_scale) == pytest.approx(math.log(100.0))


def test_mean_pooling_ignores_padding():
    cfg = ModelConfig(text=TEXT.model_copy(update={"pooling": "mean"}), embed_dim=8)
    net = DualEncoder(cfg, pixel_stats=((0.5,) * 3, (0.2,) * 3)).eval()
    ids = torch.tensor([[2, 7, 9, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    other = ids.clone()
    other[0, 4:] = 11  # garbage under the mask
    assert torch.allclose(net.encode_text(ids, mask), net.encode_text(other, mask), atol=1e-6)


def test_checkpoint_round_trip_rebuilds_identical_model():
    net = tiny()
    pixels, ids = _batch()
    clone = DualEncoder.from_checkpoint(net.checkpoint(params_hash="x")).eval()
    mask = torch.ones_like(ids)
    assert torch.equal(net.encode_image(pixels), clone.encode_image(pixels))
    assert torch.equal(net.encode_text(ids, mask), clone.encode_text(ids, mask))
    assert torch.equal(clone.pixel_mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2", "efficientnet_b0"])
def test_any_torchvision_backbone(backbone):
    img = tiny(backbone=backbone).encode_image(torch.rand(2, 3, 32, 32))
    assert img.shape == (2, 8)


def test_weights_from_a_local_file(tmp_path):
    ref = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    net = tiny(weights=str(path))
    assert torch.equal(net.visual.stages[0][0].weight, ref.conv1.weight)


def test_bad_backbone_and_weights_are_named():
    with pytest.raises(ValueError, match="model.image.backbone"):
        tiny(backbone="resnet9000")
    with pytest.raises(ValueError, match="model.image.weights"):
        tiny(weights="IMAGENET9K")
    with pytest.raises(FileNotFoundError, match="model.image.weights"):
        tiny(weights="/nonexistent/weights.pth")


def test_enum_weights_need_the_local_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local torch hub cache"):
        tiny(weights="IMAGENET1K_V1")


def test_a_few_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    net = tiny().train()
    pixels, ids = _batch(b=6)
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(param_groups(net, TrainParams(lr=3e-3, weight_decay=0.01)))
    loss_fn = ClipLoss()
    losses = []
    for _ in range(25):
        loss = loss_fn(*net(pixels, ids, mask))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_on_cpu_trains():
    dtype, scaler = autocast_settings("bf16", torch.device("cpu"))
    assert dtype is torch.bfloat16 and not scaler
    assert autocast_settings("auto", torch.device("cpu")) == (None, False)
    net = tiny().train()
    pixels, ids = _batch()
    with torch.autocast("cpu", dtype=dtype):
        img, txt, scale = net(pixels, ids, torch.ones_like(ids))
        loss = ClipLoss()(img.float(), txt.float(), scale)
    loss.backward()
    assert torch.isfinite(loss)


def test_no_weight_decay_on_biases_norms_and_temperature():
    net = tiny()
    groups = {g["name"]: g for g in param_groups(net, TrainParams(weight_decay=0.1))}
    no_decay = {id(p) for n, g in groups.items() if n.endswith("no_decay") for p in g["params"]}
    assert id(net.logit_scale) in no_decay and id(net.visual.stages[0][1].weight) in no_decay
    assert id(net.image_proj.weight) in {id(p) for p in groups["heads"]["params"]}
    assert groups["heads"]["weight_decay"] == 0.1
