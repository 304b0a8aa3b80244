"""Where a training process stands among its peers, and launching the train stage under torchrun.

PyTorch's own engine does the distributed work: torchrun (torch.distributed.run) starts the ranks
and runs the rendezvous, torch.distributed carries the collectives, DDP averages the gradients.
This module only reads torchrun's environment, picks the backend (NCCL on CUDA, gloo on CPU),
and lets the stage start torchrun itself when train.distributed asks for more than one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.common.config import DistributedParams
from tasks.common.stage import StageFailed

# Set by the launcher: each failing rank writes its one-line error there (rank<N>.json).
ERRORS_ENV = "XMODAL_RANK_ERRORS"


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(p: DistributedParams) -> bool:
    """True when the stage must start torchrun: more than one process asked, none started yet."""
    return p.nproc_per_node * p.nnodes > 1 and not under_torchrun()


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: this rank's GPU when CUDA is present, else the CPU."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device is {name!r} but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init(device_name: str) -> World:
    """Join torchrun's process group when launched by it (NCCL on CUDA, gloo on CPU)."""
    if not under_torchrun():
        return World()
    env = os.environ
    world = World(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]))
    device = select_device(device_name, world.local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean(x: torch.Tensor, world: World) -> torch.Tensor:
    """The ranks' mean of `x` (a no-op on one process)."""
    if world.size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world.size


def broadcast_int(value: int, world: World) -> int:
    """Rank 0's `value` on every rank."""
    if world.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.broadcast(t, 0)
    return int(t.item())


def gather(obj: object, world: World) -> list[object] | None:
    """Every rank's `obj` on rank 0 (None elsewhere): the per-rank RNG states of a checkpoint."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def record_failure(err: BaseException, world: World) -> None:
    """Leave this rank's one-line error where the launcher looks for it."""
    folder = os.environ.get(ERRORS_ENV)
    if folder:
        message = " ".join(f"{type(err).__name__}: {err}".split())
        (Path(folder) / f"rank{world.rank}.json").write_text(
            json.dumps({"rank": world.rank, "error": message})
        )


class RankFailed(StageFailed):
    """A rank of a torchrun launch failed; the message is that rank's own."""


def torchrun_command(p: DistributedParams, module: str, args: list[str], log_dir: Path):
    """torchrun's command line for `python -m module args` on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={p.nproc_per_node}"]
    if p.nnodes == 1:
        cmd.append("--standalone")  # a local rendezvous on a free port of 127.0.0.1
    else:
        if not p.rdzv_endpoint:
            raise ValueError("train.distributed.rdzv_endpoint is needed when nnodes > 1")
        cmd += [
            f"--nnodes={p.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={p.rdzv_endpoint}",
            f"--rdzv-id={p.rdzv_id}",
        ]
    cmd += [f"--log-dir={log_dir}", "--tee=3", "--max-restarts=0", "-m", module, *args]
    return cmd


def launch(
    p: DistributedParams,
    module: str,
    args: list[str],
    state: Path,
    cwd: Path,
    env: dict[str, str] | None = None,
) -> None:
    """Run `module` on every rank through torchrun, echoing the ranks' output line by line
    (prefixed `[default<rank>]:` by torchrun; full logs under `state/torchrun`). A failure on any
    rank raises RankFailed with the first failing rank's own message."""
    errors = state / "rank-errors"
    errors.mkdir(parents=True, exist_ok=True)
    for old in errors.glob("rank*.json"):
        old.unlink()
    cmd = torchrun_command(p, module, args, state / "torchrun")
    env = {**os.environ, **(env or {}), ERRORS_ENV: str(errors), "PYTHONUNBUFFERED": "1"}
    own_log = state / "torchrun" / "launcher.log"
    own_log.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(own_log, "w") as own,
        subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
    ):
        for line in proc.stdout:
            # The ranks' lines go on; torchrun's own (its banner, its failure report with a
            # traceback of itself) go to its log.
            if line.startswith("[default"):
                print(line, end="", flush=True)
            else:
                own.write(line)
    if proc.returncode == 0:
        return
    failures = sorted(errors.glob("rank*.json"), key=lambda f: f.stat().st_mtime)
    if failures:
        first = json.loads(failures[0].read_text())
        raise RankFailed(f"rank {first['rank']}: {first['error']}")
    raise RankFailed(f"torchrun exited with code {proc.returncode}; its report: {own_log}")
