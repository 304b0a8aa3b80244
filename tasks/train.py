"""train: fit the dual encoder with the symmetric InfoNCE loss; log steps to MLflow.

Writes checkpoint.pt (weights + model config + params hash) and run.json (the MLflow run id that
evaluate, export and register append to) under paths.train, and a per-step history CSV.

Across processes it runs under torchrun (DDP over the global batch, tasks/common/trainer.py),
which the stage starts itself when train.distributed asks for more than one. On the way it
writes resumable checkpoints to paths.train_state (model, optimiser, scheduler, scaler, every
rank's RNGs, the loader position, the MLflow run id); with train.resume auto a rerun after a
crash continues from the newest one and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from prefect import task
from prefect.cache_policies import NONE

from model.config import ModelConfig
from model.dual_encoder import DualEncoder
from model.metrics import retrieval_metrics
from tasks.common import distributed, optim, stage, tracking
from tasks.common.checkpoint import (
    CHECKPOINT,
    build_model,
    clear_states,
    data_version,
    latest_state,
    rng_state,
    save_atomic,
    save_state,
    set_rng_state,
    state_path,
)
from tasks.common.config import Params, TrainParams
from tasks.common.data import (
    PrefixCache,
    Split,
    embed_images,
    embed_texts,
    load_features,
    load_split,
)
from tasks.common.distributed import World
from tasks.common.loader import TrainBatches, train_loader
from tasks.common.trainer import NonFiniteLoss, Trainer, build_trainer, train_step

log = logging.getLogger("xmodal")

RESULT_FILE = "result.json"  # the TrainResult, for the process that launched torchrun
HISTORY_HEADER = ["step", "epoch", "loss", "lr", "temperature"]


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    steps: int
    seconds: float
    final_loss: float
    samples_per_second: float


def _record(t: Trainer, parts: dict, step: int, epoch: int, history, bar, sink, sps: float):
    """One history row and progress update per step; metrics to the sink at the log cadence."""
    loss = float(parts["contrastive"])
    temperature = 1.0 / float(t.net.scale().detach())
    lr = t.sched.get_last_lr()[0]
    history.append([step, epoch, f"{loss:.6f}", f"{lr:.6g}", f"{temperature:.6f}"])
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
    t0 = time.perf_counter()
    img, txt = embed_cached(net, val, cache, 256, device)
    m = retrieval_metrics(img, txt, val.image_index, ks=(1, 5))
    sink.log(
        {**{f"val/{k}": v for k, v in m.items()}, "val/seconds": time.perf_counter() - t0}, step
    )
    bar.write(f"step {step}: val i2t_R1={m['i2t_R1']:.3f} t2i_R1={m['t2i_R1']:.3f}")


@dataclass(frozen=True)
class Checkpointing:
    """Where resumable checkpoints go (None: nowhere) and what resuming one must match."""

    folder: Path | None = None
    resume_key: str = ""


@dataclass
class Session:
    """What the loop carries from step to step, and a checkpoint from process to process."""

    history: list[list[str]] = field(default_factory=list)
    start: int = 0  # the first step this process takes
    seconds: float = 0.0  # training time spent before this process
    began: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.began


def _state(t: Trainer, step: int, s: Session, ck: Checkpointing, run_id: str) -> dict | None:
    """The resumable state after `step` (every rank's RNGs, gathered on rank 0; None elsewhere).
    Non-finite weights raise: a checkpoint that cannot train on is never written."""
    rngs = distributed.gather(rng_state(), t.world)
    if not t.world.is_main:
        return None
    weights = t.net.state_dict()
    if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
        raise NonFiniteLoss(f"the weights went non-finite by step {step}; no checkpoint written")
    return {
        "resume_key": ck.resume_key,
        "step": step,
        "model": weights,
        "optimizer": t.opt.state_dict(),
        "scheduler": t.sched.state_dict(),
        "scaler": t.scaler.state_dict(),
        "weighting": t.weighting.state_dict(),
        "skipped": t.skipped,
        "rng": rngs,
        "mlflow_run_id": run_id,
        "history": s.history,
        "seconds": s.elapsed(),
    }


def _restore(t: Trainer, state: dict) -> Session:
    """Put a checkpoint's state back (the RNGs wait until the loader is running)."""
    t.net.load_state_dict(state["model"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.scaler.load_state_dict(state["scaler"])
    t.weighting.load_state_dict(state["weighting"])
    t.skipped = state["skipped"]
    return Session(list(state["history"]), state["step"], state["seconds"])


def _setup(p, model_cfg, prepared, features, world: World):
    """The model and its trainer on this rank's device, this rank's batches, the val split."""
    torch.manual_seed(p.seed + world.rank)  # dropout differs per rank; DDP syncs the weights
    torch.use_deterministic_algorithms(True, warn_only=True)
    # The NaN fill of every new tensor that deterministic mode adds by default is a debugging aid
    # for kernels reading uninitialised memory; it was 7.6 % of a step (bench/results.md).
    torch.utils.deterministic.fill_uninitialized_memory = False
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    device = distributed.select_device(p.device, world.local_rank)
    net = build_model(model_cfg, prepared).to(device)
    cuts = (
        net.frozen_blocks("image", p.image.trainable_blocks),
        net.frozen_blocks("text", p.text.trainable_blocks),
    )
    # With a cached image prefix the image shards are never read.
    cache = load_features(features, "train", model_cfg, cuts)
    data = load_split(prepared, "train", cache.image is None)
    batches = TrainBatches(data, p, cache, world.rank, world.size)
    val, val_cache = None, PrefixCache()
    if world.is_main and (prepared / "val").is_dir():
        val_cache = load_features(features, "val", model_cfg, cuts)
        val = load_split(prepared, "val", images=val_cache.image is None)
    total = min(p.max_steps or len(batches), len(batches))
    t = build_trainer(p, net, device, total, (cache.image_cut, cache.text_cut), world)
    return t, batches, (val, val_cache)


def _loop(t: Trainer, batches, validation, s: Session, ck, sink, rng, run_id) -> float:
    """Steps s.start..t.total-1; validation at each epoch's end, checkpoints as configured."""
    p, net, world, per_epoch = t.p, t.net, t.world, batches.per_epoch
    device = next(net.parameters()).device
    loader = iter(train_loader(batches, s.start, t.total, p.workers, device.type == "cuda"))
    if rng is not None:  # after the loader took its seed from torch's RNG, as the first run's did
        set_rng_state(rng)
    loss = float("nan")
    bar = stage.progress(
        total=t.total, initial=s.start, desc="train", unit="step", disable=not world.is_main
    )
    with bar:
        t0 = time.perf_counter()
        for step, batch in enumerate(loader, s.start):
            epoch, b = divmod(step, per_epoch)
            if b == 0 or step == s.start:
                net.train()
                optim.keep_frozen_eval(t.frozen)
            batch = [x.to(device, non_blocking=True) for x in batch]
            parts = train_step(t, *batch, step, epoch + b / per_epoch)
            done = step + 1
            sps = len(batch[1]) * world.size / (time.perf_counter() - t0)
            loss = _record(t, parts, done, epoch, s.history, bar, sink, sps)
            if world.is_main and (done % per_epoch == 0 or done == t.total):
                _validate(net, *validation, device, sink, done, bar)
            if (
                ck.folder
                and done < t.total
                and (done % per_epoch == 0 or done % p.checkpoint_every == 0)
            ):
                c0 = time.perf_counter()
                state = _state(t, done, s, ck, run_id)
                if state is not None:
                    size = save_state(ck.folder, done, state)
                    sink.log({"train/checkpoint_seconds": time.perf_counter() - c0,
                              "train/checkpoint_mb": size / 2**20}, done)  # fmt: skip
            t0 = time.perf_counter()
    return loss


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
    ck: Checkpointing | None = None,
    resumed: dict | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train on the prepared train split, validate each epoch, save a self-describing checkpoint.
    `features`: the features stage's output (cached frozen prefixes); `ck`: where resumable
    checkpoints go; `resumed`: the checkpoint to continue from; `world`: this rank (rank 0
    validates, logs and writes)."""
    world, ck = world or World(), ck or Checkpointing()
    t, batches, validation = _setup(p, model_cfg, prepared, features, world)
    s = _restore(t, resumed) if resumed else Session()
    if not world.is_main:
        sink = tracking.NullSink()
    n_trainable = sum(q.numel() for q in t.net.parameters() if q.requires_grad)
    n_all = sum(q.numel() for q in t.net.parameters())
    sink.log({"model/parameters": n_all, "model/trainable_parameters": n_trainable})
    rng = resumed["rng"][world.rank] if resumed else None
    loss = _loop(t, batches, validation, s, ck, sink, rng, run_id)
    seconds = s.elapsed()
    sps = (t.total - s.start) * p.batch_size / (time.perf_counter() - s.began)
    result = TrainResult(run_id, t.total, seconds, loss, sps)
    if not world.is_main:
        return result
    sink.log({"train/seconds": seconds, "train/samples_per_s_mean": sps, "train/steps": t.total,
              "train/skipped_steps": t.skipped})  # fmt: skip
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(history_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(history_csv, "w", newline="") as f:
        csv.writer(f).writerows([HISTORY_HEADER, *s.history])
    ckpt = t.net.cpu().checkpoint(params_hash=params_hash, mlflow_run_id=run_id)
    save_atomic(ckpt, Path(out) / CHECKPOINT)
    if ck.folder:
        clear_states(ck.folder)  # the run is complete: a rerun starts over
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: final loss {loss}")
    return result


def _find_resume(ck: Checkpointing, p: TrainParams, world: World) -> dict | None:
    """The checkpoint to continue from (rank 0 chooses; every rank reads it), or None. A fresh
    start drops the checkpoints of other params or data."""
    step = -1
    if world.is_main:
        state, passed = None, []
        if p.resume == "auto":
            state, passed = latest_state(ck.folder, ck.resume_key)
        for why in passed:
            log.warning("train: not resuming from %s", why)
        if state is None:
            clear_states(ck.folder)
        else:
            step = state["step"]
    step = distributed.broadcast_int(step, world)
    if step < 0:
        return None
    if world.is_main:
        return state
    return torch.load(state_path(ck.folder, step), map_location="cpu", weights_only=True)


def _run_rank(params: Params, root: Path, world: World) -> TrainResult:
    """This rank's part of the stage: rank 0 owns the output folder and the MLflow run."""
    paths, p = params.paths, params.train
    out, prepared = root / paths.train, root / paths.prepared
    ck = Checkpointing(root / paths.train_state, f"{params.resume_key()}:{data_version(prepared)}")
    if world.size > 1:
        log.info("train: rank %d of %d, %d rows of each batch", world.rank, world.size,
                 p.batch_size // world.size)  # fmt: skip
    resumed = _find_resume(ck, p, world)
    args = (p, params.model, prepared, out, root / paths.train_history)
    kwargs = {"params_hash": params.params_hash(), "features": root / paths.features,
              "ck": ck, "resumed": resumed, "world": world}  # fmt: skip
    if not world.is_main:
        return train(*args, tracking.NullSink(), **kwargs)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tags = {"params_hash": kwargs["params_hash"], "world_size": str(world.size),
            "device": str(distributed.select_device(p.device))}  # fmt: skip
    everything = params.model_dump(mode="json")
    before = resumed["mlflow_run_id"] if resumed else None
    mlflow_run = tracking.training_run(params.mlflow, root, out, everything, tags, before)
    with mlflow_run as (run_id, sink):
        if resumed:
            log.info("train: resumed from the checkpoint of step %d", resumed["step"])
            tracking.set_tags({"resumed_from_step": str(resumed["step"])})
        result = train(*args, sink, run_id=run_id, **kwargs)
    (out / RESULT_FILE).write_text(json.dumps(asdict(result)))
    return result


def _launch(params: Params, root: Path) -> TrainResult:
    """Start this stage on every rank under torchrun, with these exact params."""
    state = root / params.paths.train_state
    state.mkdir(parents=True, exist_ok=True)
    resolved = state / "launch-params.yaml"
    resolved.write_text(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    name, _ = tracking.run_identity()
    env = {"PREFECT__RUNTIME__FLOW_RUN__NAME": name} if name else {}
    args = ["--params", str(resolved), "--root", str(root)]
    distributed.launch(params.train.distributed, "tasks.train", args, state, root, env)
    return TrainResult(**json.loads((root / params.paths.train / RESULT_FILE).read_text()))


def run(params: Params, root: Path) -> TrainResult:
    """The stage. With train.distributed asking for more than one process it starts torchrun,
    whose ranks run it again; on a rank (or alone), `train` with rank 0's MLflow run."""
    if distributed.wants_launch(params.train.distributed):
        return _launch(params, root)
    world = distributed.init(params.train.device)
    try:
        return _run_rank(params, Path(root), world)
    except BaseException as err:
        distributed.record_failure(err, world)
        raise
    finally:
        distributed.shutdown()


# Never retried: a failed training run is not an I/O hiccup.
@task(name="train", cache_policy=NONE, retries=0, timeout_seconds=4 * 3600)
def train_task(root: str = ".", force: bool = False) -> stage.StageOutcome:
    return stage.run_stage("train", run, root, force)


if __name__ == "__main__":
    stage.main("train", run)
