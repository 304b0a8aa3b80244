"""Image tower: any torchvision classification backbone with its classifier removed."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from model.config import ImageTowerConfig

# Attribute that holds the classifier in torchvision's model families.
_HEAD_ATTRS = ("fc", "classifier", "heads", "head")


def _resolve_enum_weights(backbone: str, name: str):
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
    if not cached.is_file():
        raise FileNotFoundError(
            f"model.image.weights: {backbone} {name} is not in the local torch hub cache "
            f"({cached}); place the file there or use a local path"
        )
    return weights


def build_backbone(cfg: ImageTowerConfig, load_weights: bool = True) -> tuple[nn.Module, int]:
    """Return (backbone without classifier, feature dimension)."""
    if cfg.backbone not in torchvision.models.list_models(torchvision.models):
        raise ValueError(
            f"model.image.backbone: unknown torchvision classification model {cfg.backbone!r}"
        )
    weights = None
    local_file: Path | None = None
    if load_weights and cfg.weights.lower() != "none":
        candidate = Path(cfg.weights)
        if candidate.suffix in {".pt", ".pth", ".bin"} or candidate.exists():
            if not candidate.is_file():
                raise FileNotFoundError(f"model.image.weights: no such file {candidate}")
            local_file = candidate
        else:
            weights = _resolve_enum_weights(cfg.backbone, cfg.weights)
    net = torchvision.models.get_model(cfg.backbone, weights=weights)
    if local_file is not None:
        state = torch.load(local_file, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    for attr in _HEAD_ATTRS:
        if hasattr(net, attr):
            setattr(net, attr, nn.Identity())
            break
    else:
        raise ValueError(f"model.image.backbone: cannot find the classifier of {cfg.backbone}")
    was_training = net.training
    net.eval()
    with torch.no_grad():
        # Convolutional backbones accept any size; 224 covers the ones with a fixed input size.
        try:
            dim = net(torch.zeros(1, 3, 64, 64)).flatten(1).shape[1]
        except (RuntimeError, AssertionError):
            dim = net(torch.zeros(1, 3, 224, 224)).flatten(1).shape[1]
    net.train(was_training)
    return net, dim
