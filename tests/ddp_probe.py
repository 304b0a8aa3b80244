"""One training step through the project's trainer, run alone or on every rank under torchrun:
`python -m tests.ddp_probe PARAMS PREPARED OUT`. Rank 0 saves the step's loss parts, gradients
and updated weights to OUT, for tests/test_distributed.py to compare across world sizes."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tasks.common import distributed, optim
from tasks.common.checkpoint import build_model
from tasks.common.config import load_params
from tasks.common.data import load_split
from tasks.common.loader import TrainBatches
from tasks.common.trainer import build_trainer, train_step


def main(params_file: str, prepared: str, out: str) -> None:
    params = load_params(Path(params_file))
    p = params.train
    world = distributed.init(p.device)
    try:
        torch.manual_seed(p.seed)
        net = build_model(params.model, Path(prepared))
        batches = TrainBatches(load_split(Path(prepared), "train"), p, None, world.rank, world.size)
        t = build_trainer(p, net, torch.device("cpu"), total=10, world=world)
        net.train()
        optim.keep_frozen_eval(t.frozen)
        parts = train_step(t, *batches[0], 0, 0.0)
        grads = {n: q.grad.clone() for n, q in net.named_parameters() if q.grad is not None}
        if world.is_main:
            torch.save({"parts": parts, "grads": grads, "weights": net.state_dict()}, out)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
