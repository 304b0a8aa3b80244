"""CLIP-style dual encoder: two towers, linear projections to a shared space, L2 normalisation.

Optional heads from the alignment notes: cross-attention fusion with an ITM classifier, and a
projection of an intermediate image stage for multi-scale alignment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig, ProjectionConfig
from model.fusion import CrossAttentionFusion
from model.image_tower import IMAGENET_MEAN, IMAGENET_STD, ImageTower, pool, run_stages
from model.text_tower import blocks as text_blocks
from model.text_tower import build_text_encoder, run_blocks
from model.text_tower import pool as pool_text


@dataclass
class Features:
    """Everything one training step needs from a forward pass."""

    image: torch.Tensor  # (B, D), L2-normalised
    text: torch.Tensor  # (B, D), L2-normalised
    scale: torch.Tensor  # () exp(logit_scale), clamped
    fmap: torch.Tensor | None  # (B, C, h, w) fusion's patch tokens; None from a cached prefix
    text_hidden: torch.Tensor  # (B, L, H) text token states
    image_ms: torch.Tensor | None = None  # (B, D) multi-scale embedding, L2-normalised


class ResidualProjection(nn.Module):
    """A linear head plus a non-linear branch that starts at zero, so training begins from
    CLIP's linear head and the branch only adds what the data supports."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, bias=False)
        self.branch = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim)
        )
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.branch(x)


class HeadEnsemble(nn.Module):
    """Independent heads whose L2-normalised outputs are concatenated and scaled by 1/sqrt(K):
    the result is unit-norm, and a dot product of two is the mean of the K heads' cosines.
    ClipLoss(heads=K) trains each head on its own slice."""

    def __init__(self, heads: list[nn.Module]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, K * D), L2-normalised
        out = [F.normalize(h(x), dim=-1) for h in self.heads]
        return torch.cat(out, dim=-1) / math.sqrt(len(out))


def projection(cfg: ProjectionConfig, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.heads > 1:
        one, dim = cfg.model_copy(update={"heads": 1}), out_dim // cfg.heads
        return HeadEnsemble([projection(one, in_dim, dim) for _ in range(cfg.heads)])
    if cfg.kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    if cfg.kind == "residual":
        return ResidualProjection(in_dim, out_dim, cfg.hidden, cfg.dropout)
    return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, out_dim))


def unit_norm(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's output, L2-normalised. A HeadEnsemble's already is: normalising it again would
    add a norm tensor that is 1 for every row, which int8 calibration cannot bin."""
    out = head(x)
    return out if isinstance(head, HeadEnsemble) else F.normalize(out, dim=-1)


class DualEncoder(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        load_weights: bool = True,
        pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg.image, load_weights, cfg.allow_downloads)
        self.text = build_text_encoder(cfg.text, load_weights, cfg.allow_downloads)
        text_dim = self.text.config.hidden_size
        self.image_dropout = nn.Dropout(cfg.image.dropout)
        self.text_dropout = nn.Dropout(cfg.text.pooled_dropout)
        self.image_proj = projection(cfg.projection, self.visual.out_dim, cfg.embed_dim)
        self.text_proj = projection(cfg.projection, text_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))
        self.fusion = None
        if cfg.fusion.enabled:
            f = cfg.fusion
            self.fusion = CrossAttentionFusion(
                text_dim, self._stage_dim(f.stage, "fusion"), f.dim, f.layers, f.heads, f.dropout
            )
        self.ms_proj = None
        if cfg.multiscale.enabled:
            dim = self._stage_dim(cfg.multiscale.stage, "multiscale")
            self.ms_proj = nn.Linear(dim, cfg.embed_dim, bias=False)
        if cfg.image.normalization == "imagenet":
            pixel_stats = (IMAGENET_MEAN, IMAGENET_STD)
        elif pixel_stats is None and load_weights:
            raise ValueError("model.image.normalization is 'dataset' but no pixel stats were given")
        mean, std = pixel_stats or (IMAGENET_MEAN, IMAGENET_STD)  # overwritten by load_state_dict
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _stage_dim(self, stage: int, section: str) -> int:
        dims = self.visual.stage_dims
        if not -len(dims) <= stage < len(dims):
            raise ValueError(
                f"model.{section}.stage: {stage} is outside the {len(dims)} stages of "
                f"{self.cfg.image.backbone}"
            )
        return dims[stage]

    @property
    def max_log_scale(self) -> float:
        return math.log(self.cfg.max_logit_scale)

    def image_stages(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Every image-tower stage's feature map, (B, C_i, H_i, W_i); the last is the output."""
        # pixels: (B, 3, H, W) in [0, 1]; normalising here means exports need no stats.
        return self.visual((pixels - self.pixel_mean) / self.pixel_std)

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's token states, (B, L, H)."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def _project_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = pool_text(hidden, attention_mask, self.cfg.text.pooling)  # (B, H)
        return unit_norm(self.text_proj, self.text_dropout(pooled))

    def blocks(self, tower: str) -> list[nn.Module]:
        """A tower's blocks in input-to-output order ("image": stages; "text": BERT embeddings +
        layers): what `train.<tower>.trainable_blocks` counts from the end."""
        return list(self.visual.stages) if tower == "image" else text_blocks(self.text)

    def frozen_blocks(self, tower: str, trainable_blocks: int | None) -> int:
        """How many leading blocks of `tower` stay frozen when its last `trainable_blocks` train."""
        if trainable_blocks is None:
            return 0
        return max(0, len(self.blocks(tower)) - trainable_blocks)

    def pooled_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled output, (B, C)."""
        return pool(self.image_stages(pixels)[-1])

    def image_prefix(self, pixels: torch.Tensor, cut: int) -> torch.Tensor:
        """The first `cut` stages' output, (B, C, h, w), or the pooled (B, C) when `cut` is every
        stage: what a feature cache of the frozen stages holds."""
        x = run_stages(self.visual, (pixels - self.pixel_mean) / self.pixel_std, 0, cut)
        return pool(x) if cut == len(self.visual.stages) else x

    def image_from(self, prefix: torch.Tensor, cut: int) -> torch.Tensor:
        """The pooled output (B, C) from `image_prefix(pixels, cut)`; cut 0 takes the pixels."""
        if cut == 0:
            return self.pooled_image(prefix)
        if cut == len(self.visual.stages):
            return prefix
        return pool(run_stages(self.visual, prefix, cut, len(self.visual.stages)))

    def text_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut: int):
        """The token states (B, L, H) after the first `cut` (>= 1) text blocks."""
        return run_blocks(self.text, input_ids, attention_mask, 0, cut)

    def text_from(self, prefix: torch.Tensor, attention_mask: torch.Tensor, cut: int):
        """The final token states (B, L, H) from `text_prefix(ids, mask, cut)`; cut 0 takes ids."""
        if cut == 0:
            return self.text_states(prefix, attention_mask)
        return run_blocks(self.text, prefix, attention_mask, cut, len(self.blocks("text")))

    def project_image(self, pooled: torch.Tensor) -> torch.Tensor:
        # (B, D), L2-normalised; the dropout acts in training only
        return unit_norm(self.image_proj, self.image_dropout(pooled))

    def encode_image_from(self, prefix: torch.Tensor, cut: int) -> torch.Tensor:
        return self.project_image(self.image_from(prefix, cut))

    def encode_text_from(self, prefix: torch.Tensor, attention_mask: torch.Tensor, cut: int):
        return self._project_text(self.text_from(prefix, attention_mask, cut), attention_mask)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.project_image(self.pooled_image(pixels))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._project_text(self.text_states(input_ids, attention_mask), attention_mask)

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

    def features(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        image_cut: int = 0,
        text_cut: int = 0,
    ) -> Features:
        """One pass through both towers, keeping what the optional heads need. `image` is pixels,
        or `image_prefix(pixels, image_cut)` from a feature cache; `text` is token ids, or
        `text_prefix(ids, mask, text_cut)`. The fusion and multi-scale heads need the image
        tower's feature maps, so they refuse a cached image prefix."""
        hidden = self.text_from(text, attention_mask, text_cut)
        projected_text = self._project_text(hidden, attention_mask)
        if image_cut:
            if self.fusion is not None or self.ms_proj is not None:
                raise ValueError("a cached image prefix cannot feed the fusion or multi-scale head")
            image_emb = self.encode_image_from(image, image_cut)
            return Features(image_emb, projected_text, self.scale(), None, hidden)
        stages = self.image_stages(image)
        image_ms = None
        if self.ms_proj is not None:
            image_ms = F.normalize(self.ms_proj(pool(stages[self.cfg.multiscale.stage])), dim=-1)
        return Features(
            image=self.project_image(pool(stages[-1])),
            text=projected_text,
            scale=self.scale(),
            fmap=stages[self.cfg.fusion.stage],
            text_hidden=hidden,
            image_ms=image_ms,
        )

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
