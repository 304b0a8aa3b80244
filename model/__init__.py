"""xmodal model library: a CLIP-style image-text dual encoder.

Imports neither Prefect, DVC nor MLflow, so it can be used from any trainer or server.
"""

from model.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from model.dual_encoder import DualEncoder
from model.loss import ClipLoss, LossWeighting, hard_negatives, itm_loss
from model.metrics import retrieval_metrics

__all__ = [
    "ClipLoss",
    "LossWeighting",
    "hard_negatives",
    "itm_loss",
    "DualEncoder",
    "ImageTowerConfig",
    "ModelConfig",
    "TextTowerConfig",
    "retrieval_metrics",
]
