"""An ordered, bounded parallel map, shared by ingest (validation) and preprocess (decoding):
on local processes, or on a Dask cluster when given its scheduler address (the engine batch
inference uses). Results come back in input order either way, so the output is the same."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from itertools import islice
from multiprocessing import get_context
from typing import Any


def workers_for(n: int) -> int:
    """`n` worker processes, 0 meaning every core this process may use."""
    return n or len(os.sched_getaffinity(0))


def ordered_map(
    fn: Callable[..., Any],
    items: Iterable,
    workers: int,
    block: int = 1024,
    dask_address: str | None = None,
    **kwargs,
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(item, **kwargs)) in input order, on `workers` processes (0: every core; 1: in
    this process) or on the Dask cluster at `dask_address`. Items are submitted a block at a
    time, so at most `block` are in flight whatever the input's length."""
    call = partial(fn, **kwargs)
    if dask_address:
        yield from _dask_map(call, items, block, dask_address)
        return
    n = workers_for(workers)
    if n == 1:
        for item in items:
            yield item, call(item)
        return
    # spawn, not fork: the parent may hold Prefect/MLflow threads, which fork would copy mid-lock.
    with ProcessPoolExecutor(n, mp_context=get_context("spawn")) as pool:
        it = iter(items)
        while chunk := list(islice(it, block)):
            yield from zip(chunk, pool.map(call, chunk, chunksize=32), strict=True)


def _dask_map(call: Callable, items: Iterable, block: int, address: str) -> Iterator[tuple]:
    from distributed import Client

    # The workers import `call`'s module: they need this project installed (as batch inference's
    # workers need the runtime).
    with Client(address) as client:
        it = iter(items)
        while chunk := list(islice(it, block)):
            futures = client.map(call, chunk, pure=False)
            yield from zip(chunk, client.gather(futures), strict=True)
