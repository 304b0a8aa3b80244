"""CLIP-style dual encoder: two towers, linear projections to a shared space, L2 normalisation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.image_tower import build_backbone
from model.text_tower import build_text_encoder, pool

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DualEncoder(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        load_weights: bool = True,
        pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual, image_dim = build_backbone(cfg.image, load_weights=load_weights)
        self.text = build_text_encoder(cfg.text, load_weights=load_weights)
        text_dim = self.text.config.hidden_size
        self.image_proj = nn.Linear(image_dim, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        if cfg.image.normalization == "imagenet":
            pixel_stats = (IMAGENET_MEAN, IMAGENET_STD)
        elif pixel_stats is None and load_weights:
            raise ValueError("model.image.normalization is 'dataset' but no pixel stats were given")
        mean, std = pixel_stats or (IMAGENET_MEAN, IMAGENET_STD)  # overwritten by load_state_dict
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def max_log_scale(self) -> float:
        return math.log(self.cfg.max_logit_scale)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: (B, 3, H, W) in [0, 1]; normalising here means exports need no stats.
        x = (pixels - self.pixel_mean) / self.pixel_std
        feats = self.visual(x).flatten(1)  # (B, C)
        return F.normalize(self.image_proj(feats), dim=-1)  # (B, D), L2-normalised

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = pool(hidden, attention_mask, self.cfg.text.pooling)  # (B, H)
        return F.normalize(self.text_proj(pooled), dim=-1)  # (B, D), L2-normalised

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped so it never exceeds cfg.max_logit_scale."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        self.logit_scale.clamp_(0.0, self.max_log_scale)

    def forward(
        self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(pixels), self.encode_text(input_ids, attention_mask), self.scale()

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """A self-describing checkpoint: weights plus the config needed to rebuild them."""
        return {
            "model_config": self.cfg.model_dump(mode="json"),
            "state_dict": self.state_dict(),
            **extra,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> DualEncoder:
        net = cls(ModelConfig.model_validate(ckpt["model_config"]), load_weights=False)
        net.load_state_dict(ckpt["state_dict"])
        return net
