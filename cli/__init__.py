"""The `xmodal` command line, one module per command group."""

from __future__ import annotations

import os

import typer

# Prefect's ephemeral API server migrates its database on first start, which takes longer than
# Prefect's 20 s default on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from cli import infer, pipeline, registry, services  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, help="xmodal: train and serve "
                  "image-text dual encoders.")  # fmt: skip
app.registered_commands += pipeline.app.registered_commands + infer.app.registered_commands
app.registered_commands += registry.app.registered_commands  # promote, rollback
app.add_typer(services.app, name="services")
app.add_typer(registry.registry_app, name="registry")
