"""Text tower: a BERT encoder from transformers, built from a config or a local directory."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask

from model.config import TextTowerConfig, resolve_pretrained


def build_text_encoder(
    cfg: TextTowerConfig, load_weights: bool = True, allow_downloads: bool = False
) -> nn.Module:
    if cfg.pretrained:
        path = resolve_pretrained(cfg.pretrained)
        if not allow_downloads and not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text.pretrained: no config.json in {path}")
        overrides = {
            "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
        }
        if load_weights:
            return AutoModel.from_pretrained(
                path, local_files_only=not allow_downloads, add_pooling_layer=False, **overrides
            )
        config = AutoConfig.from_pretrained(path, local_files_only=not allow_downloads, **overrides)
        return AutoModel.from_config(config, add_pooling_layer=False)
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(
            f"model.text.hidden_size ({cfg.hidden_size}) must be divisible by "
            f"model.text.num_heads ({cfg.num_heads})"
        )
    if cfg.vocab_size is None:
        raise ValueError("model.text.vocab_size must be set (train fills it from the tokenizer)")
    config = BertConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_positions,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
    )
    return BertModel(config, add_pooling_layer=False)


def blocks(encoder: nn.Module) -> list[nn.Module]:
    """The encoder's blocks in input-to-output order: embeddings, then each layer. LiT-style
    freezing counts these, and a frozen prefix of them is what the features stage caches."""
    return [encoder.embeddings, *encoder.encoder.layer]


def run_blocks(
    encoder: nn.Module, x: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Blocks [start, stop) of `blocks(encoder)`: token ids (B, L) in when start is 0, else the
    token states (B, L, H) that block start - 1 gave; token states (B, L, H) out."""
    if start == 0:
        x = encoder.embeddings(input_ids=x)
    layers = encoder.encoder.layer[max(start - 1, 0) : stop - 1]
    if len(layers):
        # The additive (B, 1, L, L) padding mask BertModel builds for its attention implementation.
        mask = create_bidirectional_mask(
            config=encoder.config, inputs_embeds=x, attention_mask=attention_mask
        )
        for layer in layers:
            x = layer(x, attention_mask=mask)
    return x


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    # hidden: (B, L, H); attention_mask: (B, L) with 1 for real tokens.
    if how == "cls":
        return hidden[:, 0]
    if how == "max":
        masked = hidden.masked_fill(
            attention_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min
        )
        return masked.max(1).values
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    raise ValueError(f"model.text.pooling: unknown pooling {how!r}")
