"""Symmetric InfoNCE loss of CLIP (Radford et al. 2021, Fig. 3)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

# The public autograd all_gather; the replacement its warning suggests lives in the private
# torch.distributed._functional_collectives, where it has been renamed twice.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated")


class ClipLoss(nn.Module):
    """Mean of image->text and text->image cross-entropy over in-batch pairs.

    With world_size > 1 each rank holds a slice of the global batch: the other ranks' features
    are all-gathered with their gradients and the rank's loss is that of its own rows against the
    whole batch (OpenCLIP's gather_with_grad + local_loss). The ranks' mean is the global batch's
    loss, and DDP's gradient average is its gradient.

    With heads > 1 the embeddings are HeadEnsemble outputs: K slices, each a head's L2-normalised
    output over sqrt(K). Each head gets its own loss on its own slice, and the result is their
    mean, so the heads train as independent members of an ensemble.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, heads: int = 1) -> None:
        super().__init__()
        self.rank, self.world_size, self.heads = rank, world_size, heads

    def forward(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        # image_emb, text_emb: (B, D), L2-normalised; row i of each is a matching pair.
        if self.heads == 1:
            return self._loss(image_emb, text_emb, logit_scale)
        k = self.heads
        images = (image_emb * k**0.5).chunk(k, dim=-1)  # K x (B, D / K), each L2-normalised
        texts = (text_emb * k**0.5).chunk(k, dim=-1)
        return sum(self._loss(i, t, logit_scale) for i, t in zip(images, texts, strict=True)) / k

    def _loss(
        self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if self.world_size == 1:
            logits_per_image = logit_scale * image_emb @ text_emb.T  # (B, B)
            logits_per_text = logits_per_image.T
        else:
            all_image = torch.cat(dist_nn.all_gather(image_emb))  # (world * B, D)
            all_text = torch.cat(dist_nn.all_gather(text_emb))
            logits_per_image = logit_scale * image_emb @ all_text.T  # (B, world * B)
            logits_per_text = logit_scale * text_emb @ all_image.T
        labels = torch.arange(image_emb.shape[0], device=image_emb.device)
        labels = labels + self.rank * image_emb.shape[0]
        loss_i2t = F.cross_entropy(logits_per_image, labels)
        loss_t2i = F.cross_entropy(logits_per_text, labels)
        return (loss_i2t + loss_t2i) / 2


def hard_negatives(sim: torch.Tensor) -> torch.Tensor:
    """One in-batch negative per row, drawn with probability softmax(sim) over the other columns.

    Hard negatives for ITM as in ALBEF (Li et al. 2021): similar-but-wrong pairs are drawn most.
    sim: (B, B) with positives on the diagonal -> (B,) column indices, never the diagonal.
    """
    weights = sim.detach().float().softmax(dim=1)
    weights = weights * (1 - torch.eye(sim.shape[0], device=sim.device))
    weights = weights + 1e-12 * (1 - torch.eye(sim.shape[0], device=sim.device))  # no zero rows
    return torch.multinomial(weights, 1).squeeze(1)


def itm_loss(
    fusion: nn.Module,
    text_hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    fmap: torch.Tensor,
    sim: torch.Tensor,
) -> torch.Tensor:
    """Binary matched/unmatched cross-entropy over B positives and 2B mined hard negatives."""
    b = sim.shape[0]
    neg_text = hard_negatives(sim)  # for image i, a wrong caption
    neg_image = hard_negatives(sim.T)  # for caption j, a wrong image
    hidden = torch.cat([text_hidden, text_hidden[neg_text], text_hidden])
    mask = torch.cat([attention_mask, attention_mask[neg_text], attention_mask])
    fmaps = torch.cat([fmap, fmap, fmap[neg_image]])
    labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(sim.device)
    return F.cross_entropy(fusion(hidden, mask, fmaps), labels)


class LossWeighting(nn.Module):
    """Combine named losses: fixed weights, learned uncertainty, or auxiliary weights ramped in.

    uncertainty: sum_i exp(-s_i) L_i + s_i with a learned log-variance s_i per loss
    (Kendall, Gal & Cipolla 2018); the fixed weights are then unused.
    schedule: the first loss keeps its weight; the others ramp linearly from 0 over ramp_epochs.
    """

    def __init__(
        self, weights: dict[str, float], mode: str = "fixed", ramp_epochs: float = 1.0
    ) -> None:
        super().__init__()
        if mode not in ("fixed", "uncertainty", "schedule"):
            raise ValueError(f"train.loss.weighting: unknown mode {mode!r}")
        self.names = list(weights)
        self.weights = dict(weights)
        self.mode = mode
        self.ramp_epochs = ramp_epochs
        self.log_vars = (
            nn.Parameter(torch.zeros(len(self.names))) if mode == "uncertainty" else None
        )

    def current_weights(self, epoch: float) -> dict[str, float]:
        if self.mode == "uncertainty":
            return {
                n: float(torch.exp(-s.detach()))
                for n, s in zip(self.names, self.log_vars, strict=True)
            }
        if self.mode == "schedule":
            ramp = min(1.0, epoch / self.ramp_epochs) if self.ramp_epochs > 0 else 1.0
            return {
                n: w * (1.0 if i == 0 else ramp) for i, (n, w) in enumerate(self.weights.items())
            }
        return dict(self.weights)

    def forward(self, losses: dict[str, torch.Tensor], epoch: float = 0.0) -> torch.Tensor:
        if self.mode == "uncertainty":
            idx = {n: i for i, n in enumerate(self.names)}
            return sum(
                torch.exp(-self.log_vars[idx[n]]) * v + self.log_vars[idx[n]]
                for n, v in losses.items()
            )
        w = self.current_weights(epoch)
        return sum(w[n] * v for n, v in losses.items())
