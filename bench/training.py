"""What the train stage costs beyond the arithmetic: its loop against a bare PyTorch loop, a
checkpoint's seconds and size, and DDP on 2 gloo processes against one process.

`python -m bench.training` after `make run` (it reads data/prepared and data/features of
params.yaml). Every run happens in a throwaway root beside those folders (symlinked), with its
own MLflow store; the project's own outputs and mlflow.db are never touched.

- stage: `python -m tasks.train` as DVC runs it (MLflow logging, loader worker, validation at
  epoch ends, checkpoints), its throughput from the MLflow timestamps of steps 10 to N, so that
  process start and model loading are left out, as they are from the bare loop;
- bare: the same model, batches (tasks.common.loader.TrainBatches, read inline) and optimiser
  settings in a hand-written loop: features, ClipLoss, backward, clip, AdamW, nothing else;
- steps: the project's training step (tasks.common.trainer.train_step) against the bare step on
  two copies of the model in one process, alternating blocks of 8 steps;
- ddp: the stage with -P presets/cpu-ddp-2.yaml against the stage alone (samples/s of its
  result.json, over all steps).
Runs alternate (bare, stage, bare, stage) so that drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.benchmark import machine

ROOT = Path(__file__).resolve().parents[1]

# What both timings share: the model with the stage's frozen blocks, its batches, and the bare
# step (features, ClipLoss, backward, clip, AdamW: nothing else).
SETUP = """
import json, sys, time
import torch
from pathlib import Path
from model.loss import ClipLoss
from tasks.common.checkpoint import build_model
from tasks.common.config import load_params
from tasks.common.data import load_features, load_split
from tasks.common.loader import TrainBatches
root, steps = Path(sys.argv[1]), int(sys.argv[2])
params = load_params(root / "params.yaml")
p = params.train
torch.manual_seed(p.seed)
net = build_model(params.model, root / "data/prepared")
cuts = (net.frozen_blocks("image", p.image.trainable_blocks),
        net.frozen_blocks("text", p.text.trainable_blocks))
for block in net.blocks("image")[: cuts[0]] + net.blocks("text")[: cuts[1]]:
    block.requires_grad_(False)
    block.eval()
cache = load_features(root / "data/features", "train", params.model, cuts)
batches = TrainBatches(load_split(root / "data/prepared", "train", cache.image is None), p, cache)
opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=p.lr,
                        weight_decay=p.weight_decay)
loss_fn = ClipLoss()
def bare(s):
    image, text, mask = batches[s]
    f = net.features(image, text, mask, cache.image_cut, cache.text_cut)
    loss = loss_fn(f.image, f.text, f.scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), p.grad_clip)
    opt.step()
"""

# The bare loop in its own process, timed over steps 10..N as the stage is.
BARE = (
    SETUP
    + """
for s in range(steps):
    if s == 10:
        t0 = time.perf_counter()
    bare(s)
print(json.dumps({"samples_per_s": (steps - 10) * p.batch_size / (time.perf_counter() - t0)}))
"""
)

# The project's training step (tasks.common.trainer.train_step, with the deterministic algorithms
# train() turns on, its AdamW groups, scheduler and finite checks) against the bare step (without
# them), on two copies of the same model in one process, in alternating blocks of 8 steps.
STEPS = (
    SETUP
    + """
from tasks.common import optim
from tasks.common.trainer import build_trainer, train_step
twin = build_model(params.model, root / "data/prepared")
twin.load_state_dict(net.state_dict())
t = build_trainer(p, twin, torch.device("cpu"), 10**6, (cache.image_cut, cache.text_cut))
twin.train()
optim.keep_frozen_eval(t.frozen)
def project(s):
    train_step(t, *batches[s], s, 0.0)
seconds = {"bare": 0.0, "project": 0.0}
for s in range(3):
    bare(s), project(s)
for block in range(steps // 8):
    for name, fn in (("bare", bare), ("project", project))[:: 1 if block % 2 else -1]:
        torch.use_deterministic_algorithms(name == "project", warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = False  # as train() sets it
        t0 = time.perf_counter()
        for s in range(3 + 8 * block, 11 + 8 * block):
            fn(s)
        seconds[name] += time.perf_counter() - t0
print(json.dumps({k: (steps // 8) * 8 * p.batch_size / v for k, v in seconds.items()}))
"""
)


def make_root(base: Path, name: str) -> Path:
    """A throwaway project root reading the real prepared data and features."""
    root = base / name
    (root / "data").mkdir(parents=True)
    for folder in ("prepared", "features"):
        (root / "data" / folder).symlink_to(ROOT / "data" / folder)
    (root / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return root


def run(cmd: list[str], root: Path) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout


def stage(root: Path, steps: int, *extra: str) -> dict:
    """The train stage for `steps` steps; its result, checkpoint metrics and steady throughput."""
    import mlflow

    run([sys.executable, "-m", "tasks.train", "--params", str(root / "params.yaml"),
         "-S", f"train.max_steps={steps}", *extra], root)  # fmt: skip
    from tasks.common.config import load_params

    result = json.loads((root / "models/train/result.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    loss = {m.step: m.timestamp for m in client.get_metric_history(result["run_id"], "train/loss")}
    out = {"result": result, "steady": None}
    if 10 in loss and steps in loss:
        size = load_params(root / "params.yaml").train.batch_size
        window = (loss[steps] - loss[10]) / 1000
        val = sum(m.value for m in client.get_metric_history(result["run_id"], "val/seconds")
                  if 10 < m.step < steps)  # fmt: skip
        out["steady"] = (steps - 10) * size / window
        out["steady_without_val"] = (steps - 10) * size / (window - val)
    for name in ("train/checkpoint_seconds", "train/checkpoint_mb"):
        out[name] = [m.value for m in client.get_metric_history(result["run_id"], name)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="steps per run (validation at 25, 50)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ddp-steps", type=int, default=40)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="xmodal-bench-train-"))
    print(machine())
    root = make_root(base, "steps")
    sps = json.loads(run([sys.executable, "-c", STEPS, str(root), str(args.steps)], root)
                     .strip().splitlines()[-1])  # fmt: skip
    print(f"training step, in one process, interleaved: project {sps['project']:.1f} samples/s, "
          f"bare {sps['bare']:.1f} ({sps['project'] / sps['bare']:.3f}x)", flush=True)  # fmt: skip
    bare, staged, ckpt = [], {}, []
    variants = {"stage": (), "stage, workers 0": ("-S", "train.workers=0")}
    for i in range(args.repeats):
        root = make_root(base, f"bare{i}")
        bare.append(json.loads(run([sys.executable, "-c", BARE, str(root), str(args.steps)], root)
                               .strip().splitlines()[-1])["samples_per_s"])  # fmt: skip
        print(f"repeat {i}: bare {bare[-1]:.1f} samples/s", flush=True)
        for name, extra in variants.items():
            s = stage(make_root(base, f"{name.replace(', ', '-')}{i}"), args.steps, *extra)
            staged.setdefault(name, []).append((s["steady"], s["steady_without_val"]))
            ckpt += list(zip(s["train/checkpoint_seconds"], s["train/checkpoint_mb"], strict=True))
            print(f"  {name}: {s['steady']:.1f} samples/s ({s['steady'] / bare[-1]:.3f}x), "
                  f"without its validation time {s['steady_without_val']:.1f} "
                  f"({s['steady_without_val'] / bare[-1]:.3f}x)", flush=True)  # fmt: skip
    for name, runs in staged.items():
        whole = sum(r[0] for r in runs) / sum(bare)
        no_val = sum(r[1] for r in runs) / sum(bare)
        print(f"{name} / bare: {whole:.3f}x, without validation {no_val:.3f}x (target >= 0.9x)")
    for sec, mb in ckpt:
        print(f"checkpoint: {sec:.2f} s, {mb:.1f} MB")
    one = stage(make_root(base, "ddp1"), args.ddp_steps)["result"]["samples_per_second"]
    two = stage(make_root(base, "ddp2"), args.ddp_steps, "-P", str(ROOT / "presets/cpu-ddp-2.yaml"))
    two = two["result"]["samples_per_second"]
    print(f"DDP on 2 gloo processes: {two:.1f} samples/s against {one:.1f} for one process "
          f"({two / one:.3f}x), {args.ddp_steps} steps each")  # fmt: skip


if __name__ == "__main__":
    main()
