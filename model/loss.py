"""Symmetric InfoNCE loss of CLIP (Radford et al. 2021, Fig. 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy over in-batch pairs."""

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        # image_emb, text_emb: (B, D), L2-normalised; row i of each is a matching pair.
        logits_per_image = logit_scale * image_emb @ text_emb.T  # (B, B)
        labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        loss_i2t = F.cross_entropy(logits_per_image, labels)
        loss_t2i = F.cross_entropy(logits_per_image.T, labels)
        return (loss_i2t + loss_t2i) / 2
