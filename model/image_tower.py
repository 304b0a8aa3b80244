"""Image tower: any torchvision classification backbone, cut into stages, classifier removed.

Stages expose the spatial feature maps that the cross-attention fusion head (patch tokens) and the
multi-scale alignment loss (an intermediate stage) need, and the blocks LiT-style freezing counts.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from model.config import ImageTowerConfig

# The pixel statistics torchvision's ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _resolve_enum_weights(backbone: str, name: str, allow_downloads: bool = False):
    try:
        enum = torchvision.models.get_model_weights(backbone)
    except ValueError as err:
        raise ValueError(f"model.image.backbone: unknown torchvision model {backbone!r}") from err
    try:
        weights = enum[name]
    except KeyError as err:
        choices = ", ".join(w.name for w in enum)
        raise ValueError(
            f"model.image.weights: {name!r} is not a weights enum of {backbone} "
            f"(choices: {choices}, 'none', or a local file path)"
        ) from err
    # No hub access at run time: the file must already be in the torch hub cache.
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file() and not allow_downloads:
        raise FileNotFoundError(
            f"model.image.weights: {backbone} {name} is not in the local torch hub cache "
            f"({cached}); place the file there (make install provisions mobilenet_v2) "
            "or use a local path"
        )
    return weights


def _stages(net: nn.Module, backbone: str) -> list[nn.Module]:
    """The backbone's feature stages in order, each mapping a feature map to the next."""
    if hasattr(net, "layer4"):  # ResNet / ResNeXt / Wide ResNet
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        return [stem, net.layer1, net.layer2, net.layer3, net.layer4]
    if hasattr(net, "trunk_output"):  # RegNet
        return [net.stem, *net.trunk_output]
    if isinstance(getattr(net, "features", None), nn.Sequential):  # MobileNet, EfficientNet, ...
        return list(net.features)
    raise ValueError(f"model.image.backbone: no known stage layout for {backbone}")


class ImageTower(nn.Module):
    def __init__(
        self, cfg: ImageTowerConfig, load_weights: bool = True, allow_downloads: bool = False
    ) -> None:
        super().__init__()
        if cfg.backbone not in torchvision.models.list_models(torchvision.models):
            raise ValueError(
                f"model.image.backbone: unknown torchvision classification model {cfg.backbone!r}"
            )
        weights, local_file = None, None
        if load_weights and cfg.weights.lower() != "none":
            candidate = Path(cfg.weights)
            if candidate.suffix in {".pt", ".pth", ".bin"} or candidate.exists():
                if not candidate.is_file():
                    raise FileNotFoundError(f"model.image.weights: no such file {candidate}")
                local_file = candidate
            else:
                weights = _resolve_enum_weights(cfg.backbone, cfg.weights, allow_downloads)
        net = torchvision.models.get_model(cfg.backbone, weights=weights)
        if local_file is not None:
            net.load_state_dict(torch.load(local_file, map_location="cpu", weights_only=True))
        self.stages = nn.ModuleList(_stages(net, cfg.backbone))
        with torch.no_grad():
            was = self.training
            self.eval()
            self.stage_dims = [f.shape[1] for f in self(torch.zeros(1, 3, 64, 64))]
            self.train(was)

    @property
    def out_dim(self) -> int:
        return self.stage_dims[-1]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's feature map, (B, C_i, H_i, W_i); the last is the tower's output."""
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def run_stages(tower: ImageTower, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Stages [start, stop) of the tower: (B, C_in, H, W) in, (B, C_out, h, w) out."""
    for stage in tower.stages[start:stop]:
        x = stage(x)
    return x


def pool(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.mean(dim=(2, 3))  # (B, C): global average pooling, as torchvision's heads do
