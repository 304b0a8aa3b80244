"""Cross-attention fusion with an image-text matching (ITM) head (ALBEF, Li et al. 2021).

Text tokens attend to the image tower's spatial feature map (patch tokens with 2-D sin-cos
positions, since captions talk about where things are); the first token feeds a binary
matched/unmatched classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """(h*w, dim) fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022)."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    parts = []
    for grid in (ys.flatten(), xs.flatten()):
        angles = grid[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class CrossAttentionFusion(nn.Module):
    def __init__(
        self, text_dim: int, image_dim: int, dim: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.text_in = nn.Linear(text_dim, dim)
        self.image_in = nn.Linear(image_dim, dim)
        layer = nn.TransformerDecoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(dim)
        self.itm = nn.Linear(dim, 2)
        self.scale = math.sqrt(dim)

    def forward(
        self, text_hidden: torch.Tensor, attention_mask: torch.Tensor, fmap: torch.Tensor
    ) -> torch.Tensor:
        # text_hidden: (B, L, Ht); attention_mask: (B, L); fmap: (B, C, h, w) -> ITM logits (B, 2)
        b, _, h, w = fmap.shape
        patches = self.image_in(fmap.flatten(2).transpose(1, 2))  # (B, h*w, D)
        patches = patches + sincos_2d(h, w, patches.shape[-1], fmap.device)
        x = self.text_in(text_hidden)  # (B, L, D)
        x = self.decoder(x, patches, tgt_key_padding_mask=attention_mask == 0)
        return self.itm(self.norm(x[:, 0]))

    def match_prob(self, text_hidden, attention_mask, fmap) -> torch.Tensor:
        """P(matched) per pair, (B,)."""
        return self.forward(text_hidden, attention_mask, fmap).softmax(-1)[:, 1]
