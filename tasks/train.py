"""train: fit the dual encoder with the symmetric InfoNCE loss; log steps to MLflow.

Writes checkpoint.pt (weights + model config + params hash) and run.json (the MLflow run id that
evaluate, export and register append to) under paths.train, and a per-step history CSV.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NONE
from transformers import get_cosine_schedule_with_warmup

from model.config import ModelConfig
from model.loss import ClipLoss, LossWeighting, itm_loss
from model.metrics import retrieval_metrics
from tasks.common import optim, stage, tracking
from tasks.common.augment import augment
from tasks.common.checkpoint import CHECKPOINT, build_model
from tasks.common.config import MlflowParams, Params, TrainParams
from tasks.common.data import embed_split, load_split, to_pixels


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


def train(
    p: TrainParams,
    model_cfg: ModelConfig,
    prepared: Path,
    out: Path,
    history_csv: Path,
    mlflow_p: MlflowParams,
    root: Path,
    params_hash: str,
    all_params: dict,
) -> TrainResult:
    """Train on the prepared train split, validate each epoch, save a self-describing checkpoint."""
    torch.manual_seed(p.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = select_device(p.device)
    amp_dtype, use_scaler = autocast_settings(p.amp, device)

    data = load_split(prepared, "train")
    val = load_split(prepared, "val") if (prepared / "val").is_dir() else None
    net = build_model(model_cfg, prepared).to(device)
    frozen = optim.freeze(net, p)
    optim.setup_temperature(net, p.temperature)
    loss_fn = ClipLoss()
    weights = {"contrastive": p.loss.contrastive}
    if net.fusion is not None:
        weights["itm"] = p.loss.itm
    if net.ms_proj is not None:
        weights["multiscale"] = p.loss.multiscale
    weighting = LossWeighting(weights, p.loss.weighting, p.loss.ramp_epochs).to(device)
    steps_per_epoch = len(data) // p.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.batch_size ({p.batch_size}) exceeds the {len(data)} training images"
        )
    total = (
        p.epochs * steps_per_epoch
        if p.max_steps is None
        else min(p.max_steps, p.epochs * steps_per_epoch)
    )
    opt = torch.optim.AdamW(optim.param_groups(net, p, list(weighting.parameters())), lr=p.lr)
    sched = get_cosine_schedule_with_warmup(opt, min(p.warmup_steps, total // 2), total)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    # One caption per image per step, drawn with the run's own generator: reproducible.
    rng = np.random.default_rng(p.seed)
    captions_of = [[] for _ in range(len(data))]
    for c, i in enumerate(data.image_index):
        captions_of[i].append(c)

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    history_csv = Path(history_csv)
    history_csv.parent.mkdir(parents=True, exist_ok=True)

    tracking.setup(mlflow_p, root)
    run_name, run_tags = tracking.run_identity()
    mlflow.set_system_metrics_sampling_interval(mlflow_p.system_metrics_interval)
    mlflow.set_system_metrics_samples_before_logging(1)
    with (
        mlflow.start_run(run_name=run_name, log_system_metrics=mlflow_p.system_metrics) as run,
        open(history_csv, "w", newline="") as hist,
    ):
        (out / tracking.RUN_FILE).write_text(json.dumps({"run_id": run.info.run_id}))
        mlflow.log_params(tracking.flatten(all_params))
        mlflow.set_tags(
            {
                "params_hash": params_hash,
                "device": str(device),
                **tracking.git_state(root),
                **run_tags,
            }
        )
        n_trainable = sum(q.numel() for q in net.parameters() if q.requires_grad)
        mlflow.log_metrics(
            {
                "model/parameters": sum(q.numel() for q in net.parameters()),
                "model/trainable_parameters": n_trainable,
            }
        )
        writer = csv.writer(hist)
        writer.writerow(["step", "epoch", "loss", "lr", "temperature"])
        step, start, loss_val = 0, time.perf_counter(), float("nan")
        bar = stage.progress(total=total, desc="train", unit="step")
        for epoch in range(p.epochs):
            net.train()
            optim.keep_frozen_eval(frozen)
            order = rng.permutation(len(data))
            for b in range(steps_per_epoch):
                if step >= total:
                    break
                t0 = time.perf_counter()
                idx = np.sort(order[b * p.batch_size : (b + 1) * p.batch_size])
                cap = np.array([captions_of[i][rng.integers(len(captions_of[i]))] for i in idx])
                pixels = augment(to_pixels(data.images[idx]), p.augment).to(
                    device, non_blocking=True
                )
                ids = torch.from_numpy(data.input_ids[cap]).to(device)
                mask = torch.from_numpy(data.attention_mask[cap]).to(device)
                ctx = (
                    torch.autocast(device.type, dtype=amp_dtype)
                    if amp_dtype
                    else contextlib.nullcontext()
                )
                if p.temperature.mode == "scheduled":
                    optim.set_temperature(
                        net, optim.scheduled_temperature(p.temperature, step, total)
                    )
                with ctx:
                    f = net.features(pixels, ids, mask)
                    img, txt = f.image.float(), f.text.float()
                    parts = {"contrastive": loss_fn(img, txt, f.scale)}
                    if net.fusion is not None:
                        parts["itm"] = itm_loss(
                            net.fusion, f.text_hidden, mask, f.fmap, img @ txt.T
                        )
                    if net.ms_proj is not None:
                        parts["multiscale"] = loss_fn(f.image_ms.float(), txt, f.scale)
                    loss = weighting(parts, epoch + b / steps_per_epoch)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(net.parameters(), p.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                net.clamp_logit_scale_()
                step += 1
                loss_val = float(parts["contrastive"].detach())
                temperature = 1.0 / float(net.scale().detach())
                lr = sched.get_last_lr()[0]
                writer.writerow([step, epoch, f"{loss_val:.6f}", f"{lr:.6g}", f"{temperature:.6f}"])
                bar.update(1)
                bar.set_postfix(loss=f"{loss_val:.3f}", epoch=epoch, refresh=False)
                if step % p.log_every == 0 or step == total:
                    extra = {f"train/loss_{k}": float(v.detach()) for k, v in parts.items()}
                    extra.update(
                        {
                            f"train/weight_{k}": v
                            for k, v in weighting.current_weights(epoch).items()
                        }
                    )
                    mlflow.log_metrics(
                        {
                            **extra,
                            "train/loss_total": float(loss.detach()),
                            "train/loss": loss_val,
                            "train/lr": lr,
                            "train/temperature": temperature,
                            "train/samples_per_s": len(idx) / (time.perf_counter() - t0),
                        },
                        step=step,
                        synchronous=False,
                    )
            if val is not None and len(val) > 1:
                img_e, txt_e = embed_split(net, val, 256, device)
                m = retrieval_metrics(img_e @ txt_e.T, val.image_index, ks=(1, 5))
                mlflow.log_metrics(
                    {f"val/{k}": v for k, v in m.items()}, step=step, synchronous=False
                )
                bar.write(f"epoch {epoch}: val i2t_R1={m['i2t_R1']:.3f} t2i_R1={m['t2i_R1']:.3f}")
            if step >= total:
                break
        bar.close()
        seconds = time.perf_counter() - start
        sps = step * p.batch_size / seconds
        mlflow.log_metrics(
            {"train/seconds": seconds, "train/samples_per_s_mean": sps, "train/steps": step}
        )
        torch.save(
            net.cpu().checkpoint(params_hash=params_hash, mlflow_run_id=run.info.run_id),
            out / CHECKPOINT,
        )
        mlflow.flush_async_logging()
    if not math.isfinite(loss_val):
        raise FloatingPointError(f"training diverged: final loss {loss_val}")
    return TrainResult(run.info.run_id, step, seconds, loss_val, sps)


def run(params: Params, root: Path) -> TrainResult:
    paths = params.paths
    return train(
        params.train,
        params.model,
        root / paths.prepared,
        root / paths.train,
        root / paths.train_history,
        params.mlflow,
        root,
        params.params_hash(),
        params.model_dump(mode="json"),
    )


# Never retried: a failed training run is not an I/O hiccup.
@task(name="train", cache_policy=NONE, retries=0, timeout_seconds=4 * 3600)
def train_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("train", run, root, force)


if __name__ == "__main__":
    stage.main("train", run)
