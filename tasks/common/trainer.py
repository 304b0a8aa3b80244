"""One optimiser step of the train stage: the loss parts, gradient accumulation over cached
features, DDP, mixed precision and the GPU paths, and what a non-finite loss does."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup

from model.dual_encoder import DualEncoder, Features
from model.loss import ClipLoss, LossWeighting, itm_loss
from tasks.common import optim
from tasks.common.config import TrainParams
from tasks.common.distributed import World, mean


class NonFiniteLoss(FloatingPointError):
    """The loss (or the gradient) went non-finite and train.skip_nonfinite is off."""


def autocast_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "off":
        return None, False
    if device.type == "cuda":
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True  # fp16 needs loss scaling
    return (torch.bfloat16, False) if amp == "bf16" else (None, False)


class TrainModule(nn.Module):
    """What DDP wraps and torch.compile compiles: the model and the loss weighting (whose learned
    weights DDP averages too). Its forward is one pass through both towers."""

    def __init__(self, net: DualEncoder, weighting: LossWeighting, cuts: tuple[int, int]) -> None:
        super().__init__()
        self.net, self.weighting, self.cuts = net, weighting, cuts

    def forward(self, image: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> Features:
        return self.net.features(image, text, mask, *self.cuts)


@dataclass
class Trainer:
    """What one optimiser step needs; built once by `build_trainer`."""

    net: DualEncoder
    p: TrainParams
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    weighting: LossWeighting
    amp_dtype: torch.dtype | None
    total: int  # optimiser steps in the whole run
    frozen: list[nn.Module]
    model: nn.Module  # TrainModule, maybe under DDP and torch.compile
    ddp: DistributedDataParallel | None = None
    world: World = field(default_factory=World)
    loss_fn: ClipLoss = field(default_factory=ClipLoss)
    skipped: int = 0  # steps skipped for a non-finite loss


def gpu_settings(p: TrainParams, device: torch.device) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = p.tf32
        torch.backends.cudnn.allow_tf32 = p.tf32
        torch.backends.cudnn.benchmark = True


def build_trainer(
    p: TrainParams,
    net: DualEncoder,
    device: torch.device,
    total: int,
    cuts: tuple[int, int] = (0, 0),
    world: World | None = None,
) -> Trainer:
    """Freezing, temperature mode, loss weighting, AdamW groups, warmup + cosine schedule, AMP,
    then channels-last, SyncBatchNorm and DDP across ranks, and torch.compile, as asked."""
    world = world or World()
    gpu_settings(p, device)
    frozen = optim.freeze(net, p)
    optim.setup_temperature(net, p.temperature)
    weights = {"contrastive": p.loss.contrastive}
    if net.fusion is not None:
        weights["itm"] = p.loss.itm
    if net.ms_proj is not None:
        weights["multiscale"] = p.loss.multiscale
    weighting = LossWeighting(weights, p.loss.weighting, p.loss.ramp_epochs).to(device)
    if p.channels_last:
        net.visual.to(memory_format=torch.channels_last)
    if world.size > 1 and device.type == "cuda" and p.distributed.sync_batchnorm:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # keeps the Parameters
    opt = torch.optim.AdamW(optim.param_groups(net, p, list(weighting.parameters())), lr=p.lr)
    sched = get_cosine_schedule_with_warmup(opt, min(p.warmup_steps, total // 2), total)
    amp_dtype, use_scaler = autocast_settings(p.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    model: nn.Module = TrainModule(net, weighting, cuts)
    ddp = None
    if world.size > 1:
        ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        model = ddp
    if p.compile:
        model = torch.compile(model)
    loss_fn = ClipLoss(world.rank, world.size, net.cfg.projection.heads)
    return Trainer(
        net, p, opt, sched, scaler, weighting, amp_dtype, total, frozen, model, ddp, world, loss_fn
    )


def _joined(own: torch.Tensor, cached: list[Features] | None, j: int, name: str) -> torch.Tensor:
    """Micro-batch j's features (with gradients) among the others' cached ones (without)."""
    if cached is None:
        return own
    rows = [getattr(c, name).float() for c in cached]
    rows[j] = own
    return torch.cat(rows)


def _losses(t: Trainer, f: Features, cached, j: int, mask: torch.Tensor) -> dict:
    """The loss parts of micro-batch j. The contrastive ones see the whole batch (cached
    features of the other micro-batches, and of the other ranks through ClipLoss); ITM mines its
    hard negatives within the micro-batch."""
    img, txt = f.image.float(), f.text.float()
    all_txt = _joined(txt, cached, j, "text")
    # Every micro-batch's loss is the whole batch's: the temperature's gradient is taken once.
    scale = f.scale if j == 0 else f.scale.detach()
    parts = {"contrastive": t.loss_fn(_joined(img, cached, j, "image"), all_txt, scale)}
    if t.net.fusion is not None:
        parts["itm"] = itm_loss(t.net.fusion, f.text_hidden, mask, f.fmap, img @ txt.T)
    if t.net.ms_proj is not None:
        ms = _joined(f.image_ms.float(), cached, j, "image_ms")
        parts["multiscale"] = t.loss_fn(ms, all_txt, scale)
    return parts


def _sync(t: Trainer, last: bool) -> AbstractContextManager:
    """DDP averages gradients on the last micro-batch only (OpenCLIP's accum_freq)."""
    return t.ddp.no_sync() if t.ddp is not None and not last else nullcontext()


def train_step(
    t: Trainer,
    image: torch.Tensor,
    text: torch.Tensor,
    attention_mask: torch.Tensor,
    step: int,
    epoch: float,
) -> dict[str, torch.Tensor]:
    """One optimiser step on this rank's share of the batch: pixels (B, 3, S, S) and tokens
    (B, L), or the cached prefixes `t.model` expects. With train.accum_freq k the share runs as k
    micro-batches: a no-grad pass caches every micro-batch's features, then each one runs again
    with gradients against the others' cached features, so the gradients are those of the whole
    batch. Returns the loss parts and their weighted sum ("total"), averaged over the ranks.
    `step` is the 0-based global step; `epoch` is fractional (loss ramp-in)."""
    net, p, k = t.net, t.p, t.p.accum_freq
    if p.temperature.mode == "scheduled":
        optim.set_temperature(net, optim.scheduled_temperature(p.temperature, step, t.total))
    if p.channels_last and image.ndim == 4:
        image = image.contiguous(memory_format=torch.channels_last)
    micro = list(zip(image.chunk(k), text.chunk(k), attention_mask.chunk(k), strict=True))

    def amp() -> AbstractContextManager:
        if t.amp_dtype is None:
            return nullcontext()
        return torch.autocast(image.device.type, dtype=t.amp_dtype)

    cached = None
    if k > 1:
        with torch.no_grad(), amp():
            cached = [t.model(*m) for m in micro]
    t.opt.zero_grad(set_to_none=True)
    shown: dict[str, torch.Tensor] = {}
    for j, m in enumerate(micro):
        with _sync(t, j == k - 1), amp():
            parts = _losses(t, t.model(*m), cached, j, m[2])
            if "itm" in parts and k > 1:
                parts["itm"] = parts["itm"] / k  # the mean over micro-batches
            loss = t.weighting(parts, epoch)
        t.scaler.scale(loss).backward()
        for name, v in parts.items():  # what the step shows: each part's mean
            share = v.detach() if k == 1 or name == "itm" else v.detach() / k
            shown[name] = shown.get(name, 0) + share
    t.scaler.unscale_(t.opt)
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), p.grad_clip)
    shown = dict(zip(shown, mean(torch.stack(list(shown.values())), t.world), strict=True))
    with torch.no_grad():
        shown["total"] = t.weighting(shown, epoch).detach()
    finite = bool(torch.isfinite(shown["total"])) and (
        t.scaler.is_enabled() or bool(torch.isfinite(norm))  # fp16 overflow: the scaler skips
    )
    if finite:
        t.scaler.step(t.opt)
    elif not p.skip_nonfinite:
        raise NonFiniteLoss(
            f"non-finite loss at step {step + 1} (loss {float(shown['total'])}, gradient norm "
            f"{float(norm)}); lower train.lr, or set train.skip_nonfinite to skip such steps"
        )
    else:
        t.skipped += 1
    t.scaler.update()
    t.sched.step()
    net.clamp_logit_scale_()
    return shown
