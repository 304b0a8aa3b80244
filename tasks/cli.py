"""The `xmodal` command line: run the pipeline, run batch inference."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from tasks.config import DEFAULT_PARAMS, ConfigError, load_params

# Prefect's ephemeral API server migrates its database on first start, which takes longer than
# Prefect's 20 s default on a 2-core machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-S", help="override a param by dotted key, e.g. -S train.epochs=2"),
    ] = None,
    force: Annotated[bool, typer.Option(help="rerun stages DVC considers up to date")] = False,
    root: Annotated[
        Path, typer.Option(help="project root holding params.yaml and dvc.yaml")
    ] = Path("."),
    promote: Annotated[
        bool, typer.Option(help="finish with the gated promotion of the new candidate")
    ] = False,
) -> None:
    """Run the training-pipeline flow locally (no server) and print where everything is."""
    try:
        load_params(root / DEFAULT_PARAMS, overrides)  # fail fast, before Prefect starts
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    from flows.training_pipeline import training_pipeline

    outcomes = training_pipeline(
        overrides=overrides or [], force=force, root=str(root), promote=promote
    )
    params = load_params(root / DEFAULT_PARAMS)
    print_summary(root, params, outcomes)


def print_summary(root: Path, params, outcomes: dict) -> None:
    paths = params.paths
    echo = typer.echo
    echo(
        "\nstages: "
        + ", ".join(
            f"{n} ({'skipped' if o.skipped else f'{o.seconds:.0f}s'})" for n, o in outcomes.items()
        )
    )
    m = json.loads((root / paths.metrics).read_text())["test"]
    echo(
        f"test retrieval: i2t R@1 {m['i2t_R1']:.3f} R@5 {m['i2t_R5']:.3f} | "
        f"t2i R@1 {m['t2i_R1']:.3f} R@5 {m['t2i_R5']:.3f}"
    )
    reg = json.loads((root / paths.register_report).read_text())
    parity = json.loads((root / paths.export_report).read_text())["parity"]
    echo(
        f"ONNX parity: {'passed' if parity['passed'] else 'FAILED'} "
        f"(max abs diff {parity['max_abs_diff']:.2e})"
    )
    echo(
        f"registered: models:/{reg['model_name']}/{reg['version']} "
        f"aliases {reg['aliases']} (run {reg['run_id']})"
    )
    t2i = root / paths.infer / "text_to_image.jsonl"
    if t2i.is_file():
        echo("\ndemo queries (text -> image, ONNX Runtime):")
        for line in t2i.read_text().splitlines():
            row = json.loads(line)
            best = ", ".join(f"{h['image']} ({h['score']:.2f})" for h in row["results"][:3])
            echo(f"  {row['query']!r}: {best}")
    echo("\noutputs:")
    for label, rel in (
        ("dataset (DVC-versioned)", paths.raw),
        ("prepared arrays", paths.prepared),
        ("checkpoint", f"{paths.train}/checkpoint.pt"),
        ("metrics (dvc metrics show)", paths.metrics),
        ("plots (dvc plots show)", paths.figures),
        ("ONNX towers + tokenizer", paths.onnx),
        ("parity report", paths.export_report),
        ("inference outputs", paths.infer),
    ):
        echo(f"  {label:28s} {root / rel}")
    echo(
        f"  {'MLflow UI':28s} .venv/bin/mlflow ui --backend-store-uri {params.mlflow.tracking_uri}"
    )


@app.command()
def promote(
    params_file: Annotated[Path, typer.Option("--params", help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Promote `candidate` to `champion` if it passes the gates (both scored by ONNX Runtime)."""
    from tasks.promote import report
    from tasks.promote import run as run_promote

    root = params_file.resolve().parent
    result = run_promote(_params_or_exit(params_file), root)
    typer.echo(report(result))
    if result.gates and not result.promoted:
        raise typer.Exit(code=1)


@app.command()
def rollback(
    params_file: Annotated[Path, typer.Option("--params", help="params file")] = DEFAULT_PARAMS,
) -> None:
    """Swap `champion` and `previous-champion` back."""
    from tasks.promote import rollback as run_rollback

    params = _params_or_exit(params_file)
    champ, prev = run_rollback(
        params.register, params.promote, params.mlflow, params_file.resolve().parent
    )
    typer.echo(f"champion -> v{champ}, {params.promote.previous_alias} -> v{prev}")


def _params_or_exit(path: Path):
    try:
        return load_params(path)
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def infer(
    model: Annotated[str, typer.Option(help="exported folder or models:/<name>@<alias>")],
    images: Annotated[Path | None, typer.Option(help="folder of images to embed")] = None,
    texts: Annotated[Path | None, typer.Option(help="text file of queries, one per line")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("outputs/batch"),
    top_k: Annotated[int | None, typer.Option(help="results per query")] = None,
    chunk_size: Annotated[int | None, typer.Option(help="images per ONNX Runtime call")] = None,
    provider: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    threads: Annotated[
        int | None, typer.Option(help="ONNX Runtime intra-op threads (0: default)")
    ] = None,
    params_file: Annotated[
        Path, typer.Option("--params", help="params file for defaults")
    ] = DEFAULT_PARAMS,
) -> None:
    """Embed images and/or queries with the ONNX towers; write embeddings and top-k results."""
    from tasks.infer import infer as run_infer
    from tasks.infer import read_queries, resolve_model

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if images is None and texts is None:
        raise typer.BadParameter("give --images, --texts or both")
    overrides = [
        f"infer.{k}={v}"
        for k, v in (
            ("top_k", top_k),
            ("chunk_size", chunk_size),
            ("provider", provider),
            ("threads", threads),
        )
        if v is not None
    ]
    try:
        params = load_params(params_file, overrides) if params_file.is_file() else None
        if params is None:
            from tasks.config import apply_overrides, validate

            params = validate(apply_overrides({}, overrides))
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    model_dir = resolve_model(model, params.mlflow, params_file.resolve().parent)
    queries = read_queries(texts) if texts else []
    result = run_infer(params.infer, model_dir, images, queries, out)
    typer.echo(json.dumps(result.files, indent=2))
    typer.echo(
        f"{result.images} images, {result.texts} texts, {result.errors} errors, "
        f"on {result.provider}"
    )


services_app = typer.Typer(
    no_args_is_help=True, help="The real services on 127.0.0.1 (`make serve`, `make stop`)."
)
app.add_typer(services_app, name="services")

StateDir = Annotated[
    Path, typer.Option("--state-dir", envvar="XMODAL_STATE_DIR", help="pid files, logs, stores")
]


def _services(state_dir: Path, **kw):
    from tasks.services import Services

    root = Path.cwd().resolve()
    state = state_dir if state_dir.is_absolute() else root / state_dir
    return Services(root=root, state=state, **kw)


@services_app.command("start")
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
    """Start Prefect server, work pool, deployments, worker and MLflow server; wait for health."""
    from tasks.services import ServiceError, start

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


@services_app.command("stop")
def services_stop(state_dir: StateDir = Path(".services")) -> None:
    """Stop exactly the processes `services start` recorded in its pid files."""
    from tasks.services import stop

    if not stop(_services(state_dir), echo=typer.echo):
        typer.echo("nothing was running")


@services_app.command("status")
def services_status(state_dir: StateDir = Path(".services")) -> None:
    """Which recorded services are running."""
    from tasks.services import status

    for name, state in (status(_services(state_dir)) or {"services": "none recorded"}).items():
        typer.echo(f"{name}: {state}")


if __name__ == "__main__":
    app()
