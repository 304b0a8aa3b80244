"""Optimiser setup for train: per-tower learning rates and weight decay, LiT-style freezing,
and the temperature modes."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.dual_encoder import DualEncoder
from tasks.common.config import TemperatureParams, TrainParams


def freeze(net: DualEncoder, p: TrainParams) -> list[nn.Module]:
    """Freeze all but each tower's last `trainable_blocks` blocks; return the frozen modules.

    Frozen modules must stay in eval mode (BatchNorm statistics, dropout): see keep_frozen_eval.
    """
    frozen: list[nn.Module] = []
    for tower, cfg in (("image", p.image), ("text", p.text)):
        for block in net.blocks(tower)[: net.frozen_blocks(tower, cfg.trainable_blocks)]:
            block.requires_grad_(False)
            frozen.append(block)
    return frozen


def keep_frozen_eval(frozen: list[nn.Module]) -> None:
    for module in frozen:
        module.eval()


def _split_decay(named: list[tuple[str, nn.Parameter]]):
    """No weight decay on biases, norms, embeddings and the temperature (as in CLIP)."""
    decay, no_decay = [], []
    for name, prm in named:
        if not prm.requires_grad:
            continue
        flat = prm.ndim < 2 or "embeddings" in name or "logit_scale" in name
        (no_decay if flat else decay).append(prm)
    return decay, no_decay


def param_groups(
    net: nn.Module, p: TrainParams, extra: list[nn.Parameter] | None = None
) -> list[dict]:
    """AdamW groups: image tower, text tower and heads, each with its own lr and weight decay."""
    towers = {"image": "visual.", "text": "text."}
    named = list(net.named_parameters())
    groups = []
    for tower, prefix in towers.items():
        cfg = getattr(p, tower)
        lr = cfg.lr or p.lr
        wd = p.weight_decay if cfg.weight_decay is None else cfg.weight_decay
        decay, no_decay = _split_decay([(n, q) for n, q in named if n.startswith(prefix)])
        groups += [
            {"params": decay, "lr": lr, "weight_decay": wd, "name": f"{tower}"},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{tower}_no_decay"},
        ]
    lr = p.heads.lr or p.lr
    wd = p.weight_decay if p.heads.weight_decay is None else p.heads.weight_decay
    rest = [(n, q) for n, q in named if not n.startswith(tuple(towers.values()))]
    decay, no_decay = _split_decay(rest)
    no_decay += [q for q in extra or [] if q.requires_grad]
    groups += [
        {"params": decay, "lr": lr, "weight_decay": wd, "name": "heads"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "heads_no_decay"},
    ]
    return [g for g in groups if g["params"]]


def scheduled_temperature(t: TemperatureParams, step: int, total: int) -> float:
    """Cosine from t.start to t.end over `total` steps."""
    progress = min(1.0, step / max(1, total))
    return t.end + 0.5 * (t.start - t.end) * (1 + math.cos(math.pi * progress))


def setup_temperature(net: DualEncoder, t: TemperatureParams) -> None:
    if t.mode != "learnable":
        net.logit_scale.requires_grad_(False)
    if t.mode == "scheduled":
        set_temperature(net, t.start)


@torch.no_grad()
def set_temperature(net: DualEncoder, temperature: float) -> None:
    net.logit_scale.fill_(math.log(1.0 / temperature))
