"""Training-time augmentation on uint8-decoded batches: multi-scale RandomResizedCrop and flip.

Flips default to off: captions of the built-in data say left and right, and a flipped image
would contradict them.
"""

from __future__ import annotations

import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomResizedCrop

from tasks.common.config import AugmentParams


def augment(pixels: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """pixels: (B, 3, S, S) float in [0, 1] -> same shape. Uses torch's seeded global RNG."""
    if p.crop_scale is None and not p.hflip:
        return pixels
    size = list(pixels.shape[-2:])
    out = []
    for img in pixels:
        if p.crop_scale is not None:
            i, j, h, w = RandomResizedCrop.get_params(img, list(p.crop_scale), list(p.crop_ratio))
            img = TF.resized_crop(img, i, j, h, w, size, antialias=True)
        if p.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out).clamp_(0.0, 1.0)
