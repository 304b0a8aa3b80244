"""Retries: I/O tasks retry network and server errors with backoff, never bad input; train never."""

from __future__ import annotations

import pytest
from prefect import flow, task

from tasks.common import stage


def test_io_tasks_retry_only_transient_errors_and_train_never_retries():
    from tasks.batch import resolve_model_task
    from tasks.ingest import ingest_task
    from tasks.promote import promote_task
    from tasks.register import register_task
    from tasks.train import train_task

    for t in (ingest_task, register_task, promote_task, resolve_model_task):
        assert t.retries >= 2 and t.retry_condition_fn is stage.retry_if_transient, t.name
    assert train_task.retries == 0


def test_a_transient_error_is_retried_and_a_bad_input_is_not():
    calls = {"network": 0, "input": 0}

    @task(**stage.io_retries(0, 0))
    def flaky_network() -> str:
        calls["network"] += 1
        if calls["network"] < 3:
            raise ConnectionError("connection refused by 127.0.0.1:5000")
        return "ok"

    @task(**stage.io_retries(0, 0))
    def bad_input() -> None:
        calls["input"] += 1
        raise ValueError("register.model_name is empty")

    @flow
    def both() -> str:
        result = flaky_network()
        bad_input()
        return result

    with pytest.raises(ValueError, match="model_name"):
        both()
    assert calls == {"network": 3, "input": 1}
