"""Typed model configuration, saved inside every checkpoint so later stages rebuild the model."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageTowerConfig(_Strict):
    # Any torchvision classification model name (torchvision.models.list_models()).
    backbone: str = "resnet18"
    # "none", a torchvision weights enum name (e.g. IMAGENET1K_V1, from the local torch hub
    # cache), or a path to a local state-dict file.
    weights: str = "none"
    # Pixel statistics applied inside encode_image: ImageNet's (right with ImageNet weights) or the
    # training split's, computed by preprocess. Stored as buffers, so checkpoints carry them.
    normalization: Literal["imagenet", "dataset"] = "dataset"


class TextTowerConfig(_Strict):
    # Local directory of a pretrained BERT (config.json + weights); None builds from the sizes.
    pretrained: str | None = None
    # Filled in by train from the tokenizer preprocess used; not a user setting.
    vocab_size: int | None = Field(None, ge=8)
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1, le=48)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(512, ge=8)
    max_positions: int = Field(128, ge=8, le=4096)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    pooling: Literal["cls", "mean"] = "cls"


class ModelConfig(_Strict):
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    embed_dim: int = Field(128, ge=2)
    # CLIP starts the temperature at 0.07 and clamps exp(logit_scale) at 100 (Radford et al. 2021).
    init_temperature: float = Field(0.07, gt=0.0, le=1.0)
    max_logit_scale: float = Field(100.0, gt=1.0)

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)
