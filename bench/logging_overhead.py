"""What MLflow step logging costs a training step: target <= 2 % of step time.

Runs real training steps of the configured model (params.yaml, prepared train split) and logs the
train loop's own payload, in interleaved blocks of each mode (off; async and sync at train's
`log_every` cadence; async and sync every step; order rotated per block) so drift on a shared
machine hits every mode alike. Reports, per mode, the mean step time and the time the training
thread spent inside `mlflow.log_metrics`, both against the unlogged step. System metrics are on,
as in `train`.

    .venv/bin/python -m bench.logging_overhead [--blocks 5] [--steps 10] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch

from bench.benchmark import machine
from tasks.common.checkpoint import build_model
from tasks.common.config import load_params
from tasks.common.data import load_features, load_split
from tasks.common.loader import TrainBatches
from tasks.common.trainer import build_trainer, train_step

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--blocks", type=int, default=5, help="interleaved blocks")
    ap.add_argument("--steps", type=int, default=10, help="steps per mode per block")
    ap.add_argument("--tracking-uri", help="default: a throwaway sqlite store")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "logging_overhead.md")
    args = ap.parse_args()

    params = load_params(args.params)
    p = params.train
    torch.manual_seed(0)
    prepared = ROOT / params.paths.prepared
    device = torch.device("cpu")
    net = build_model(params.model, prepared)
    cuts = (
        net.frozen_blocks("image", p.image.trainable_blocks),
        net.frozen_blocks("text", p.text.trainable_blocks),
    )
    cache = load_features(ROOT / params.paths.features, "train", params.model, cuts)
    batches = TrainBatches(load_split(prepared, "train", cache.image is None), p, cache)
    # The real training step (tasks.common.trainer.train_step), not a copy of it.
    trainer = build_trainer(p, net, device, 10**6, (cache.image_cut, cache.text_cut))
    n_steps = [0]

    def step() -> dict[str, float]:
        batch = batches[n_steps[0] % len(batches)]
        parts = train_step(trainer, *batch, n_steps[0], 0.0)
        n_steps[0] += 1
        # the payload train logs each log_every steps
        value = float(parts["contrastive"])
        return {
            "train/loss_contrastive": value,
            "train/weight_contrastive": 1.0,
            "train/loss_total": float(parts["total"]),
            "train/loss": value,
            "train/lr": trainer.sched.get_last_lr()[0],
            "train/temperature": 1.0 / float(net.scale()),
            "train/samples_per_s": 64.0,
        }

    every = p.log_every
    # (name, log every N steps, synchronous); N = 0: no logging
    modes = [
        ("off", 0, False),
        (f"async, every {every} steps (train)", every, False),
        (f"sync, every {every} steps", every, True),
        ("async, every step", 1, False),
        ("sync, every step", 1, True),
    ]
    tmp = tempfile.TemporaryDirectory()
    uri = args.tracking_uri or f"sqlite:///{tmp.name}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("xmodal-logging-bench")
    mlflow.set_system_metrics_sampling_interval(params.mlflow.system_metrics_interval)
    step_times: dict[str, list[float]] = {m[0]: [] for m in modes}
    call_times: dict[str, list[float]] = {m[0]: [] for m in modes}
    net.train()
    for _ in range(2):
        step()  # warm-up
    with mlflow.start_run(log_system_metrics=params.mlflow.system_metrics):
        n = 0
        for block in range(args.blocks):
            # rotate the order each block: no mode always runs first or last
            k = block % len(modes)
            for name, cadence, sync in modes[k:] + modes[:k]:
                for i in range(args.steps):
                    t0 = time.perf_counter()
                    payload = step()
                    if cadence and i % cadence == 0:
                        c0 = time.perf_counter()
                        mlflow.log_metrics(payload, step=n, synchronous=sync)
                        call_times[name].append(time.perf_counter() - c0)
                    step_times[name].append(time.perf_counter() - t0)
                    n += 1
        f0 = time.perf_counter()
        mlflow.flush_async_logging()  # once, as train does at its end
        flush = time.perf_counter() - f0

    base = statistics.mean(step_times["off"])
    spread = 100 * statistics.stdev(step_times["off"]) / base
    rows = []
    for name, _cadence, _sync in modes:
        st = statistics.mean(step_times[name])
        calls = sum(call_times[name]) / len(step_times[name])
        rows.append(
            f"| {name} | {st * 1000:.1f} | {calls * 1000:.3f} | {100 * calls / base:.2f} % | "
            f"{100 * (st - base) / base:+.1f} % |"
        )
    per_mode = args.blocks * args.steps
    text = "\n".join(
        [
            "# MLflow step-logging overhead",
            "",
            f"Machine: {machine()}.",
            f"Model: {params.model.image.backbone} + "
            f"{params.model.text.pretrained or 'BERT from scratch'}, batch {p.batch_size}, "
            f"{params.preprocess.image_size} px; store `{uri.split('://')[0]}`; system metrics "
            f"{'on' if params.mlflow.system_metrics else 'off'} (every "
            f"{params.mlflow.system_metrics_interval:g} s); {per_mode} steps per mode in "
            f"{args.blocks} interleaved blocks, order rotated each block.",
            "",
            "| logging | mean step (ms) | in log calls per step (ms) | log calls / step | "
            "step time vs off |",
            "| --- | --- | --- | --- | --- |",
            *rows,
            "",
            f"The one final flush of the async queue took {flush * 1000:.0f} ms (train pays it "
            "once per run).",
            "",
            "`log calls / step`: time the training thread spends inside `mlflow.log_metrics` "
            "per step, over the unlogged step time. `step time vs off`: whole steps compared, "
            "which also counts the async writer thread competing for the 2 cores, and carries "
            f"noise: the unlogged steps alone vary by {spread:.1f} % (stdev / mean).",
            "",
            "Regenerate: `.venv/bin/python -m bench.logging_overhead` (needs a finished "
            "`make run` for the prepared split).",
        ]
    )
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
