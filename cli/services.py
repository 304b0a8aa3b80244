"""`xmodal services start|stop|status`: the real services on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, help="The real services on 127.0.0.1 (`make serve`, `make stop`)."
)

StateDir = Annotated[
    Path, typer.Option("--state-dir", envvar="XMODAL_STATE_DIR", help="pid files, logs, stores")
]


def _services(state_dir: Path, **kw):
    from services.manager import Services

    root = Path.cwd().resolve()
    state = state_dir if state_dir.is_absolute() else root / state_dir
    return Services(root=root, state=state, **kw)


@app.command("start")
def services_start(
    state_dir: StateDir = Path(".services"),
    prefect_port: Annotated[int, typer.Option(envvar="XMODAL_PREFECT_PORT")] = 4200,
    mlflow_port: Annotated[int, typer.Option(envvar="XMODAL_MLFLOW_PORT")] = 5000,
    backend: Annotated[
        str, typer.Option(envvar="XMODAL_BACKEND", help="sqlite | postgres (backend stores)")
    ] = "sqlite",
    postgres_port: Annotated[int, typer.Option(envvar="XMODAL_POSTGRES_PORT")] = 5432,
    timeout: Annotated[float, typer.Option(help="seconds to wait for each health check")] = 180,
) -> None:
    """Start Prefect server, work pool, deployments, worker and MLflow server; wait for health.

    Refuses while this state dir's services run; a failed start stops only what it started.
    """
    from services.manager import ServiceError, start

    if backend not in ("sqlite", "postgres"):
        raise typer.BadParameter(f"--backend must be sqlite or postgres, not {backend!r}")
    s = _services(
        state_dir,
        prefect_port=prefect_port,
        mlflow_port=mlflow_port,
        backend=backend,
        postgres_port=postgres_port,
        timeout=timeout,
    )
    try:
        start(s, echo=typer.echo)
    except ServiceError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None


@app.command("stop")
def services_stop(state_dir: StateDir = Path(".services")) -> None:
    """Stop exactly the processes `services start` recorded in its pid files."""
    from services.manager import stop

    if not stop(_services(state_dir), echo=typer.echo):
        typer.echo("nothing was running")


@app.command("status")
def services_status(state_dir: StateDir = Path(".services")) -> None:
    """Which recorded services are running."""
    from services.manager import status

    for name, state in (status(_services(state_dir)) or {"services": "none recorded"}).items():
        typer.echo(f"{name}: {state}")
