"""`xmodal run`, `xmodal promote`, `xmodal rollback`: the training pipeline and the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tasks.common.config import DEFAULT_PARAMS, ConfigError, load_params

app = typer.Typer()


@app.command()
def run(
    presets: Annotated[
        list[Path] | None,
        typer.Option(
            "--preset",
            "-P",
            help="lay a preset overlay (presets/*.yaml) over params.yaml; repeatable, in order, "
            "before -S. Persisted into params.yaml like -S, so dvc.lock records what ran",
        ),
    ] = None,
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
    verbose: Annotated[bool, typer.Option(help="show the traceback of a failed stage")] = False,
) -> None:
    """Run the training-pipeline flow locally (no server) and print where everything is."""
    preset_files = [str(p.resolve()) for p in presets or []]
    try:
        load_params(root / DEFAULT_PARAMS, overrides, preset_files)  # fail fast, before Prefect
    except ConfigError as err:
        raise typer.BadParameter(str(err)) from None
    from flows.training_pipeline import training_pipeline
    from tasks.common.stage import USER_ERRORS, StageFailed

    try:
        outcomes = training_pipeline(
            overrides=overrides or [],
            presets=preset_files,
            force=force,
            root=str(root),
            promote=promote,
        )
    except (StageFailed, *USER_ERRORS) as err:
        if verbose:
            raise
        # One line naming the problem (bad data or params); Prefect's run log above holds the
        # traceback, and --verbose re-raises it here.
        typer.echo(f"error: {' '.join(str(err).split())}", err=True)
        raise typer.Exit(1) from None
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
