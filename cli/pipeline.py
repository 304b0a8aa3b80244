"""`xmodal run`: the training pipeline (promotion and rollback are in cli/registry.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import one_line_errors
from tasks.common.config import DEFAULT_PARAMS, expand_presets, load_params

app = typer.Typer()


@app.command()
@one_line_errors
def run(
    presets: Annotated[
        list[Path] | None,
        typer.Option(
            "--preset",
            "-P",
            help="lay a preset overlay (presets/*.yaml) over params.yaml; repeatable, in order, "
            "before -S. Like -S, runs as a DVC experiment: params.yaml stays as it was",
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
    from tasks.common import checkout, runlock

    preset_files = [str(p.resolve()) for p in presets or []]
    # Fail fast, before Prefect starts: a busy checkout, then params, presets and inputs.
    runlock.ensure_free(root)
    checkout.configure(root, [*expand_presets(preset_files), *(overrides or [])])
    from flows.training_pipeline import training_pipeline
    from tasks.common.stage import USER_ERRORS, StageFailed

    try:
        result = training_pipeline(
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
    print_summary(root, result)


def _skip_word(outcome) -> str:
    return "restored from run cache" if outcome.reason.startswith("restored") else "skipped"


def print_summary(root: Path, result) -> None:
    """The run's stages, metrics, parity, registered version, demo queries and where things are;
    an experiment's files are read from its git ref (the checkout holds the baseline's)."""
    import dvc.api

    def read(rel: str) -> str:
        return dvc.api.read(rel, repo=str(root), rev=result.experiment)

    params = load_params(root / DEFAULT_PARAMS, result.overrides)
    paths, outcomes, echo = params.paths, result.outcomes, typer.echo
    echo(
        "\nstages: "
        + ", ".join(
            f"{n} ({_skip_word(o) if o.skipped else f'{o.seconds:.0f}s'})"
            for n, o in outcomes.items()
        )
    )
    m = json.loads(read(paths.metrics))["test"]
    echo(
        f"test retrieval: i2t R@1 {m['i2t_R1']:.3f} R@5 {m['i2t_R5']:.3f} | "
        f"t2i R@1 {m['t2i_R1']:.3f} R@5 {m['t2i_R5']:.3f}"
    )
    reg = json.loads(read(paths.register_report))
    parity = json.loads(read(paths.export_report))["parity"]
    echo(
        f"ONNX parity: {'passed' if parity['passed'] else 'FAILED'} "
        f"(max abs diff {parity['max_abs_diff']:.2e})"
    )
    echo(
        f"registered: models:/{reg['model_name']}/{reg['version']} "
        f"aliases {reg['aliases']} (run {reg['run_id']})"
    )
    if result.promotion:
        echo(f"promotion: {result.promotion['report']}")
    try:
        t2i = read(f"{paths.infer}/text_to_image.jsonl")
    except FileNotFoundError:
        t2i = ""
    if t2i:
        echo("\ndemo queries (text -> image, ONNX Runtime):")
        for line in t2i.splitlines():
            row = json.loads(line)
            best = ", ".join(f"{h['image']} ({h['score']:.2f})" for h in row["results"][:3])
            echo(f"  {row['query']!r}: {best}")
    if result.experiment:
        echo(
            f"\nDVC experiment {result.experiment} (params.yaml and dvc.lock are as they were):\n"
            f"  dvc exp show             compare it with the baseline\n"
            f"  dvc exp apply {result.experiment}   put its params, dvc.lock and outputs here"
        )
    echo(
        "\noutputs"
        + (
            " (the baseline's; the experiment's are in the DVC cache):"
            if result.experiment
            else ":"
        )
    )
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
