"""`xmodal infer`: batch inference from an exported folder or a registered model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from tasks.common.config import DEFAULT_PARAMS, ConfigError, load_params

app = typer.Typer()


def read_queries(path: Path) -> list[str]:
    if not path.is_file():
        raise typer.BadParameter(f"queries file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    from tasks.common.registry import resolve_model
    from tasks.infer import infer as run_infer

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
            from tasks.common.config import apply_overrides, validate

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
