"""Exported bundles from a folder or from the MLflow registry, downloaded once per version.

`resolve` turns a `--model` argument into a local bundle and a record of which model it is:

- a folder: opened in place;
- `models:/<name>@<alias>`, `models:/<name>/<version>` or `models:/<name>/latest`: resolved to
  a concrete version with MlflowClient first, then downloaded into the model cache;
- `runs:/<run_id>/<path>`: downloaded into the model cache, by run id and path.

The model cache (params `paths.model_cache`, under the project root):

    <cache>/<sha256(tracking URI)[:12]>/<name>/v<version>-<run_id[:8]>/
    <cache>/<sha256(tracking URI)[:12]>/runs/<run_id>/<path>-<sha256(path)[:8]>/

A download goes into a temporary sibling (`.tmp-*`, in the same folder) and is renamed into place
only once it opens as a bundle, so a concurrent or interrupted download never leaves a folder that
later counts as cached. A cached folder is reused when it opens as a bundle; nothing is written
outside the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from filelock import FileLock

from tasks.common import tracking
from tasks.common.config import MlflowParams, PathsParams
from xmodal_runtime.batch import model_record
from xmodal_runtime.bundle import HASH_TAG, Bundle, BundleError, find_bundle, verify_files

MODELS, RUNS = "models:/", "runs:/"
log = logging.getLogger("xmodal")

TMP_PREFIX = ".tmp-"
# A temporary download folder older than this is left over from a killed process: removed.
STALE_TMP_SECONDS = 24 * 3600
URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/<path>"


@dataclass(frozen=True)
class ResolvedModel:
    """Which model a `--model` argument named, and where its bundle lies locally."""

    uri: str  # as given; for a folder, its absolute path
    path: Path  # the bundle folder (for a registry model: inside the cache)
    name: str | None  # registered model name (None: a folder or a runs:/ URI)
    version: str | None
    run_id: str | None  # the run that logged the model (None: a folder)
    bundle_sha256: str  # Bundle.digest() of `path`

    def record(self) -> dict[str, Any]:
        """summary.json's `model` object."""
        return model_record(self.uri, self.name, self.version, self.run_id, self.bundle_sha256)

    def as_dict(self) -> dict[str, Any]:
        """The record plus the local bundle path (what the batch flow's tasks pass along)."""
        return {**self.record(), "path": str(self.path)}


def redact(uri: str) -> str:
    """The URI without a user or password, fit for messages."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _slug(text: str) -> str:
    """A safe folder name for `text`; a short hash is added when characters had to go."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"
    return slug if slug == text else f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cache_root(root: Path, cache: str | Path, tracking_uri: str) -> Path:
    """The cache folder of one tracking URI (its hash: no credentials end up in a path)."""
    return Path(root) / cache / hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]


def _open_cached(folder: Path) -> Bundle | None:
    """The bundle of a cached download, or None when the folder is absent or not a bundle."""
    if not folder.is_dir():
        return None
    try:
        return Bundle.open(find_bundle(folder))
    except BundleError as err:
        log.warning("cached model %s is not usable (%s): downloading it again", folder, err)
        return None


def _remove_stale_tmp(parent: Path) -> None:
    now = time.time()
    for tmp in parent.glob(f"{TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass  # another process removed it meanwhile


def cached_download(artifact_uri: str, folder: Path, tracking_uri: str) -> Bundle:
    """The bundle downloaded from `artifact_uri` into `folder`, downloading only when `folder`
    does not already hold one. Atomic: see the module docstring."""
    cached = _open_cached(folder)
    if cached is not None:
        return cached
    import mlflow

    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(folder.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{folder.name}-", dir=folder.parent))
    try:
        mlflow.artifacts.download_artifacts(
            artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=tracking_uri
        )
        try:  # only a complete bundle is ever published
            Bundle.open(find_bundle(tmp))
        except BundleError as err:
            # named by the URI: the temporary folder is about to go
            raise BundleError(str(err).replace(str(tmp), artifact_uri)) from None
        # Publishing is serialised per version: another process may have published (then its
        # folder is used, never set aside while it is being read) or left a broken one.
        with FileLock(str(folder.parent / f".{folder.name}.lock"), timeout=600):
            if folder.exists() and _open_cached(folder) is None:  # not a bundle: set aside
                trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}old-", dir=folder.parent))
                os.replace(folder, trash / folder.name)
                shutil.rmtree(trash, ignore_errors=True)
            if not folder.exists():
                os.rename(tmp, folder)  # atomic: readers see all of it or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    bundle = _open_cached(folder)
    if bundle is None:
        raise BundleError(f"{artifact_uri} downloaded to {folder} is not an exported model")
    return bundle


def _listing(items: list[str], limit: int = 12) -> str:
    """`a, b, c`, or the first and last few of a long list and how many there are."""
    if not items:
        return "none"
    if len(items) <= limit:
        return ", ".join(items)
    half = limit // 2
    return f"{', '.join(items[:half])}, ..., {', '.join(items[-half:])} ({len(items)} in all)"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


def _registered_model(client, name: str, where: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise
    names = sorted(m.name for m in client.search_registered_models(max_results=100))
    raise LookupError(
        f"no registered model {name!r} at {where} (registered models: {_listing(names)})"
    )


def _versions(client, name: str) -> list[str]:
    quoted = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{quoted}'", max_results=1000)
    return sorted((str(v.version) for v in found), key=int)


def _aliases(model) -> dict[str, str]:
    aliases = model.aliases or {}
    if isinstance(aliases, dict):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(a.alias): str(a.version) for a in aliases}


def _model_version(client, name: str, ref: str, sep: str, where: str):
    """The model version that `name` + `sep` + `ref` names (sep "@": an alias, "/": a version)."""
    from mlflow.exceptions import MlflowException

    model = _registered_model(client, name, where)
    if sep == "@":
        aliases = _aliases(model)
        if ref not in aliases:
            have = _listing([f"@{a} (v{v})" for a, v in sorted(aliases.items())])
            raise LookupError(
                f"registered model {name!r} has no alias {ref!r} at {where} (aliases: {have})"
            )
        ref = aliases[ref]
    elif ref == "latest":
        versions = _versions(client, name)
        if not versions:
            raise LookupError(f"registered model {name!r} has no versions at {where}")
        ref = versions[-1]
    elif not ref.isdigit():
        raise ValueError(
            f"models:/{name}/{ref}: a version must be a number or `latest` (stages are not "
            "supported; use an alias: models:/<name>@<alias>)"
        )
    try:
        return client.get_model_version(name, ref)
    except MlflowException as err:
        if not _not_found(err):
            raise
    raise LookupError(
        f"registered model {name!r} has no version {ref} at {where} "
        f"(versions: {_listing(_versions(client, name))})"
    )


def _parse_models_uri(uri: str) -> tuple[str, str, str]:
    """(name, "@" or "/", alias or version) of a `models:/` URI."""
    body = uri[len(MODELS) :].strip("/")
    if "@" in body:
        name, _, ref = body.rpartition("@")
        sep = "@"
    else:
        name, _, ref = body.rpartition("/")
        sep = "/"
    if not name or not ref:
        raise ValueError(f"{uri}: expected {URI_FORMS}")
    return name, sep, ref


def _resolve_registered(uri: str, tracking_uri: str, cache: Path) -> ResolvedModel:
    client = _client(tracking_uri)
    where = redact(tracking_uri)
    name, sep, ref = _parse_models_uri(uri)
    mv = _model_version(client, name, ref, sep, where)
    version, run_id = str(mv.version), mv.run_id or None
    folder = cache / _slug(name) / (f"v{version}-{run_id[:8]}" if run_id else f"v{version}")
    bundle = cached_download(f"{MODELS}{name}/{version}", folder, tracking_uri)
    # The bundle's own sha256.json travels with the files; the version's tags were written at
    # registration into the tracking store: a file changed in the artifact store (or the
    # cache) since then is refused, by name, even if its manifest was changed to match.
    registered = {
        k.removeprefix(HASH_TAG): v for k, v in (mv.tags or {}).items() if k.startswith(HASH_TAG)
    }
    if registered:
        try:
            verify_files(bundle.root, registered)
        except BundleError as err:
            raise BundleError(
                f"{err} (registered {name} v{version} recorded its files' sha256 in its tags; "
                f"delete {folder} to download it again)"
            ) from None
    return ResolvedModel(uri, bundle.root, name, version, run_id, bundle.digest())


def _resolve_run(uri: str, tracking_uri: str, cache: Path) -> ResolvedModel:
    from mlflow.exceptions import MlflowException

    run_id, _, path = uri[len(RUNS) :].strip("/").partition("/")
    if not run_id:
        raise ValueError(f"{uri}: expected {URI_FORMS}")
    try:
        _client(tracking_uri).get_run(run_id)
    except MlflowException as err:
        if not _not_found(err):
            raise
        raise LookupError(f"no run {run_id!r} at {redact(tracking_uri)} ({uri})") from None
    folder = cache / "runs" / _slug(run_id) / _slug(path or "_root")
    bundle = cached_download(uri, folder, tracking_uri)
    return ResolvedModel(uri, bundle.root, None, None, run_id, bundle.digest())


def _resolve_folder(model: str) -> ResolvedModel:
    path = Path(model)
    if not path.exists():
        hint = f" (registry models: {URI_FORMS})" if re.match(r"^\w+:/", model) else ""
        raise BundleError(f"model folder does not exist: {model}{hint}")
    if not path.is_dir():
        raise BundleError(f"--model {model} is a file, not an exported model folder")
    bundle = Bundle.open(path)
    return ResolvedModel(str(path.resolve()), bundle.root, None, None, None, bundle.digest())


def resolve(
    model: str,
    mlflow_p: MlflowParams | None = None,
    root: Path = Path("."),
    cache: str | Path | None = None,
) -> ResolvedModel:
    """The bundle `model` names (a folder, or a `models:/` or `runs:/` URI, downloaded into the
    cache `root`/`cache` once per version) and its record. A name, alias, version or run that the
    registry lacks raises LookupError naming it and the tracking URI."""
    if not model.startswith((MODELS, RUNS)):
        return _resolve_folder(model)
    tracking.http_settings(mlflow_p or MlflowParams())
    uri = tracking.tracking_uri(mlflow_p or MlflowParams(), Path(root))
    store = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(store).is_file():
        # Opening a missing sqlite store would create an empty one: say what is missing instead.
        raise LookupError(f"no MLflow store at {uri}: no registered models to resolve {model}")
    folder = cache_root(Path(root), PathsParams().model_cache if cache is None else cache, uri)
    if model.startswith(MODELS):
        return _resolve_registered(model, uri, folder)
    return _resolve_run(model, uri, folder)


def resolve_model(model: str, mlflow_p: MlflowParams | None = None, root: Path = Path(".")) -> Path:
    """The bundle folder only (tasks/promote.py's call); see `resolve`."""
    return resolve(model, mlflow_p, root).path
