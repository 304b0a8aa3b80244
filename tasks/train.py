"""train: fit the dual encoder with the symmetric InfoNCE loss; log steps to MLflow.

Writes checkpoint.pt (weights + model config + params hash) and run.json (the MLflow run id that
evaluate, export and register append to) under paths.train, and a per-step history CSV.
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from transformers import get_cosine_schedule_with_warmup

from model.config import ModelConfig
from model.dual_encoder import DualEncoder
from model.loss import ClipLoss, LossWeighting, itm_loss
from model.metrics import retrieval_metrics
from tasks.common import optim, stage, tracking
from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import Params, TrainParams
from tasks.common.data import (
    PrefixCache,
    Split,
    embed_images,
    embed_texts,
    load_features,
    load_split,
)
from tasks.common.loader import TrainBatches, train_loader


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    steps: int
    seconds: float
    final_loss: float
    samples_per_second: float


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available")
    return torch.device(name)


def autocast_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed)."""
    if amp == "off":
        return None, False
    if device.type == "cuda":
        if amp == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16, False
        return torch.float16, True  # fp16 needs loss scaling
    return (torch.bfloat16, False) if amp == "bf16" else (None, False)


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
    frozen: list[torch.nn.Module]
    loss_fn: ClipLoss = field(default_factory=ClipLoss)
    cuts: tuple[int, int] = (0, 0)  # (image, text) blocks the batches arrive past (cached)


def build_trainer(
    p: TrainParams,
    net: DualEncoder,
    device: torch.device,
    total: int,
    cuts: tuple[int, int] = (0, 0),
) -> Trainer:
    """Freezing, temperature mode, loss weighting, AdamW groups, warmup + cosine schedule, AMP."""
    frozen = optim.freeze(net, p)
    optim.setup_temperature(net, p.temperature)
    weights = {"contrastive": p.loss.contrastive}
    if net.fusion is not None:
        weights["itm"] = p.loss.itm
    if net.ms_proj is not None:
        weights["multiscale"] = p.loss.multiscale
    weighting = LossWeighting(weights, p.loss.weighting, p.loss.ramp_epochs).to(device)
    opt = torch.optim.AdamW(optim.param_groups(net, p, list(weighting.parameters())), lr=p.lr)
    sched = get_cosine_schedule_with_warmup(opt, min(p.warmup_steps, total // 2), total)
    amp_dtype, use_scaler = autocast_settings(p.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    return Trainer(net, p, opt, sched, scaler, weighting, amp_dtype, total, frozen, cuts=cuts)


def train_step(
    t: Trainer,
    image: torch.Tensor,
    text: torch.Tensor,
    attention_mask: torch.Tensor,
    step: int,
    epoch: float,
) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch: pixels (B, 3, S, S) and tokens (B, L), or the cached
    prefixes `t.cuts` says; returns the detached loss parts and their weighted sum under
    "total". `epoch` is fractional (loss ramp-in)."""
    net, p = t.net, t.p
    if p.temperature.mode == "scheduled":
        optim.set_temperature(net, optim.scheduled_temperature(p.temperature, step, t.total))
    device_type = image.device.type
    amp = torch.autocast(device_type, dtype=t.amp_dtype) if t.amp_dtype else nullcontext()
    with amp:
        f = net.features(image, text, attention_mask, *t.cuts)
        img, txt = f.image.float(), f.text.float()
        parts = {"contrastive": t.loss_fn(img, txt, f.scale)}
        if net.fusion is not None:
            parts["itm"] = itm_loss(net.fusion, f.text_hidden, attention_mask, f.fmap, img @ txt.T)
        if net.ms_proj is not None:
            parts["multiscale"] = t.loss_fn(f.image_ms.float(), txt, f.scale)
        loss = t.weighting(parts, epoch)
    t.opt.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.unscale_(t.opt)
    torch.nn.utils.clip_grad_norm_(net.parameters(), p.grad_clip)
    t.scaler.step(t.opt)
    t.scaler.update()
    t.sched.step()
    net.clamp_logit_scale_()
    return {**{k: v.detach() for k, v in parts.items()}, "total": loss.detach()}


def _record(t: Trainer, parts: dict, step: int, epoch: int, history, bar, sink, sps: float):
    """One history row and progress update per step; metrics to the sink at the log cadence."""
    loss = float(parts["contrastive"])
    temperature = 1.0 / float(t.net.scale().detach())
    lr = t.sched.get_last_lr()[0]
    history.writerow([step, epoch, f"{loss:.6f}", f"{lr:.6g}", f"{temperature:.6f}"])
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}", epoch=epoch, refresh=False)
    if step % t.p.log_every == 0 or step == t.total:
        metrics = {f"train/loss_{k}": float(v) for k, v in parts.items() if k != "total"}
        metrics |= {f"train/weight_{k}": v for k, v in t.weighting.current_weights(epoch).items()}
        metrics |= {"train/loss_total": float(parts["total"]), "train/loss": loss, "train/lr": lr}
        sink.log({**metrics, "train/temperature": temperature, "train/samples_per_s": sps}, step)
    return loss


@torch.no_grad()
def embed_cached(net: DualEncoder, val: Split, cache: PrefixCache, batch: int, device):
    """L2-normalised ((N, D), (C, D)) val embeddings, through the cached prefixes where present."""
    net.eval()
    if cache.image is None:
        img = embed_images(net, val.images, batch, device)
    else:
        img = torch.cat([
            net.encode_image_from(torch.from_numpy(cache.image[i : i + batch]).to(device),
                                  cache.image_cut).float().cpu()
            for i in range(0, len(val), batch)
        ]).numpy()  # fmt: skip
    if cache.text is None:
        return img, embed_texts(net, val.input_ids, val.attention_mask, batch, device)
    n = len(val.input_ids)
    txt = []
    for caps in (np.arange(i, min(i + batch, n)) for i in range(0, n, batch)):
        hidden, mask = cache.text_batch(caps)
        txt.append(net.encode_text_from(hidden.to(device), mask.to(device), cache.text_cut))
    return img, torch.cat(txt).float().cpu().numpy()


def _validate(net: DualEncoder, val: Split | None, cache, device, sink, step: int, bar) -> None:
    """Val Recall@1/5; `cache`: the val split's cached prefixes."""
    if val is None or len(val) <= 1:
        return
    img, txt = embed_cached(net, val, cache, 256, device)
    m = retrieval_metrics(img, txt, val.image_index, ks=(1, 5))
    sink.log({f"val/{k}": v for k, v in m.items()}, step)
    bar.write(f"step {step}: val i2t_R1={m['i2t_R1']:.3f} t2i_R1={m['t2i_R1']:.3f}")


def train(
    p: TrainParams,
    model_cfg: ModelConfig,
    prepared: Path,
    out: Path,
    history_csv: Path,
    sink: tracking.MetricSink,
    params_hash: str = "",
    run_id: str = "",
    features: Path | None = None,
) -> TrainResult:
    """Train on the prepared train split, validate each epoch, save a self-describing checkpoint.
    `features`: the features stage's output; a cached frozen image tower is used from there."""
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = select_device(p.device)
    net = build_model(model_cfg, prepared).to(device)
    cuts = (
        net.frozen_blocks("image", p.image.trainable_blocks),
        net.frozen_blocks("text", p.text.trainable_blocks),
    )
    # With a cached image prefix the image shards are never read.
    cache = load_features(features, "train", model_cfg, cuts)
    batches = TrainBatches(load_split(prepared, "train", cache.image is None), p, cache)
    val, val_cache = None, PrefixCache()
    if (prepared / "val").is_dir():
        val_cache = load_features(features, "val", model_cfg, cuts)
        val = load_split(prepared, "val", images=val_cache.image is None)
    per_epoch = batches.per_epoch
    total = min(p.max_steps or len(batches), len(batches))
    t = build_trainer(p, net, device, total, (cache.image_cut, cache.text_cut))
    n_trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in net.parameters())
    sink.log({"model/parameters": n_all, "model/trainable_parameters": n_trainable})
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(history_csv).parent.mkdir(parents=True, exist_ok=True)
    step, start, loss = 0, time.perf_counter(), float("nan")
    loader = train_loader(batches, 0, total, p.workers, pin_memory=device.type == "cuda")
    with (
        open(history_csv, "w", newline="") as f,
        stage.progress(total=total, desc="train", unit="step") as bar,
    ):
        history = csv.writer(f)
        history.writerow(["step", "epoch", "loss", "lr", "temperature"])
        t0 = time.perf_counter()
        for batch in loader:
            epoch, b = divmod(step, per_epoch)
            if b == 0:
                net.train()
                optim.keep_frozen_eval(t.frozen)
            batch = [x.to(device, non_blocking=True) for x in batch]
            parts = train_step(t, *batch, step, epoch + b / per_epoch)
            step += 1
            sps = len(batch[1]) / (time.perf_counter() - t0)
            loss = _record(t, parts, step, epoch, history, bar, sink, sps)
            if step % per_epoch == 0 or step == total:
                _validate(net, val, val_cache, device, sink, step, bar)
            t0 = time.perf_counter()
    seconds = time.perf_counter() - start
    sps = step * p.batch_size / seconds
    sink.log({"train/seconds": seconds, "train/samples_per_s_mean": sps, "train/steps": step})
    ckpt = net.cpu().checkpoint(params_hash=params_hash, mlflow_run_id=run_id)
    torch.save(ckpt, Path(out) / CHECKPOINT)
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: final loss {loss}")
    return TrainResult(run_id, step, seconds, loss, sps)


def run(params: Params, root: Path) -> TrainResult:
    """The stage: a fresh output folder, the pipeline's MLflow run, then `train`."""
    paths, p = params.paths, params.train
    out = root / paths.train
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    params_hash = params.params_hash()
    tags = {"params_hash": params_hash, "device": str(select_device(p.device))}
    everything = params.model_dump(mode="json")
    with tracking.training_run(params.mlflow, root, out, everything, tags) as (run_id, sink):
        return train(
            p, params.model, root / paths.prepared, out, root / paths.train_history, sink,
            params_hash, run_id, root / paths.features,
        )  # fmt: skip


# Never retried: a failed training run is not an I/O hiccup.
@task(name="train", cache_policy=NONE, retries=0, timeout_seconds=4 * 3600)
def train_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("train", run, root, force)


if __name__ == "__main__":
    stage.main("train", run)
