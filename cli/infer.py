"""`xmodal infer`: batch inference from an exported folder or a registered model."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import UsageError, one_line_errors
from tasks.common.config import DEFAULT_PARAMS, load_params

app = typer.Typer()


def read_queries(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"--texts file does not exist: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_inputs(images: Path | None, out: Path) -> None:
    """Fail on a missing --images folder or an unwritable --out before any model is fetched."""
    if images is not None and not images.is_dir():
        what = "is not a folder" if images.exists() else "does not exist"
        raise FileNotFoundError(f"--images folder {what}: {images}")
    existing = out.absolute()
    while not existing.exists():  # the folder, or the ancestor it would be created in
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out} is not writable: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} is not writable: no write permission on {existing}")


@app.command()
@one_line_errors
def infer(
    model: Annotated[
        str,
        typer.Option(
            help="exported folder, models:/<name>@<alias>, models:/<name>/<version> or "
            "runs:/<run_id>/<path>"
        ),
    ],
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
    from tasks.common.registry import resolve
    from tasks.infer import infer as run_infer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if images is None and texts is None:
        raise UsageError("give --images, --texts or both")
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
    # A ConfigError (a ValueError) is one line, as is every expected error (cli/errors.py).
    if params_file.is_file():
        params = load_params(params_file, overrides)
    else:
        from tasks.common.config import apply_overrides, validate

        params = validate(apply_overrides({}, overrides))
    queries = read_queries(texts) if texts else []
    check_inputs(images, out)
    root = params_file.resolve().parent
    resolved = resolve(model, params.mlflow, root, params.paths.model_cache)
    result = run_infer(params.infer, resolved.path, images, queries, out, model=resolved.record())
    typer.echo(json.dumps(result.files, indent=2))
    version = f"{resolved.name} v{resolved.version}, " if resolved.version else ""
    typer.echo(f"model {resolved.uri}: {version}bundle sha256 {resolved.bundle_sha256[:16]}")
    typer.echo(
        f"{result.images} images, {result.texts} texts, {result.errors} errors, "
        f"on {result.provider}"
    )
