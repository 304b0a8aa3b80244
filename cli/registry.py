"""`xmodal promote`, `xmodal rollback` and `xmodal registry history`: the registry's aliases."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import one_line_errors
from tasks.common.config import DEFAULT_PARAMS, load_params

app = typer.Typer()  # top-level commands, merged into `xmodal` itself
registry_app = typer.Typer(
    no_args_is_help=True, help="The model registry: alias history (`xmodal registry history`)."
)

ParamsFile = Annotated[Path, typer.Option("--params", help="params file")]


@app.command()
@one_line_errors
def promote(
    params_file: ParamsFile = DEFAULT_PARAMS,
    force: Annotated[
        bool,
        typer.Option(help="promote a candidate that was rolled back (the other gates still apply)"),
    ] = False,
) -> None:
    """Promote `candidate` to `champion` if it passes the gates (scored by ONNX Runtime).

    With no champion yet, the gates that need none (parity, the floor promote.min_mean_r1)
    decide the first one. Exit code 1 on a refusal."""
    from tasks.promote import report
    from tasks.promote import run as run_promote

    result = run_promote(load_params(params_file), params_file.resolve().parent, force)
    typer.echo(report(result))
    if result.gates and not result.promoted:
        raise typer.Exit(code=1)


@app.command()
@one_line_errors
def rollback(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Move `champion` back one step in the registry's alias history.

    The version it leaves is tagged promotion_status=rolled_back and loses `candidate`;
    `promote` refuses it unless forced."""
    from tasks.promote import rollback as run_rollback
    from tasks.promote import rollback_report

    params = load_params(params_file)
    result = run_rollback(
        params.register, params.promote, params.mlflow, params_file.resolve().parent
    )
    typer.echo(rollback_report(result, params.register, params.promote))


@registry_app.command("history")
@one_line_errors
def history(params_file: ParamsFile = DEFAULT_PARAMS) -> None:
    """Every alias move xmodal made on the registered model, oldest first; the aliases now."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.common import aliases, tracking

    params = load_params(params_file)
    tracking.http_settings(params.mlflow)
    uri = tracking.tracking_uri(params.mlflow, params_file.resolve().parent)
    name = params.register.model_name
    client = MlflowClient(tracking_uri=uri)
    try:
        events = aliases.events(client, name)
        now = client.get_registered_model(name).aliases
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise LookupError(f"no registered model {name!r} in {uri}") from None
        raise
    typer.echo(f"alias history of {name!r} ({uri}):")
    for e in events:
        typer.echo(f"  {e.line()}")
    if not events:
        typer.echo("  (no alias moves recorded)")
    current = ", ".join(f"{a}=v{v}" for a, v in sorted(now.items())) or "(none)"
    typer.echo(f"aliases now: {current}")
