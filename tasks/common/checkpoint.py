"""The training checkpoint: a self-describing file (weights, model config, params hash, MLflow
run id) that evaluate, export and register rebuild the model from."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from model.dual_encoder import DualEncoder
from tasks.common.data import META_FILE, STATS_FILE, read_json

CHECKPOINT = "checkpoint.pt"


def build_model(cfg: ModelConfig, prepared: Path) -> DualEncoder:
    """The configured model, completed with what preprocess decided (vocabulary, pixel stats)."""
    meta = read_json(prepared / META_FILE)
    if cfg.text.pretrained is None:
        if cfg.text.vocab_size not in (None, meta["vocab_size"]):
            raise ValueError(
                f"model.text.vocab_size ({cfg.text.vocab_size}) does not match the tokenizer "
                f"({meta['vocab_size']}); leave it unset, preprocess decides it"
            )
        text = cfg.text.model_copy(
            update={
                "vocab_size": meta["vocab_size"],
                "max_positions": max(cfg.text.max_positions, meta["max_length"]),
            }
        )
        cfg = cfg.model_copy(update={"text": text})
    stats = read_json(prepared / STATS_FILE)
    return DualEncoder(cfg, pixel_stats=(stats["mean"], stats["std"]))


def load_checkpoint(train_dir: Path) -> tuple[DualEncoder, dict]:
    path = Path(train_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run the train stage first")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = DualEncoder.from_checkpoint(ckpt)
    net.eval()
    return net, ckpt
