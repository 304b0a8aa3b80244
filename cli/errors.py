"""One clear line for an expected error; the traceback only with `--verbose`.

Every `xmodal` command is wrapped by `one_line_errors`, which adds its `--verbose` option. What
counts as expected: bad params or arguments, missing or malformed files, a registry that lacks
the asked-for model, alias or version, and a server that cannot be reached. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

VERBOSE = inspect.Parameter(
    "verbose",
    inspect.Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[bool, typer.Option("--verbose", help="show the traceback of an error")],
)


class UsageError(ValueError):
    """Arguments that cannot work together or at all (exit code 2, like invalid params)."""


def is_expected(err: BaseException) -> bool:
    """Bad input or an unreachable/refusing server, as opposed to a bug in xmodal."""
    if isinstance(err, ValueError | OSError | LookupError | FloatingPointError | TimeoutError):
        return True
    # MLflow's and requests' errors, checked by module so the CLI imports neither up front.
    module = type(err).__module__
    return module.startswith(("mlflow.", "requests.", "urllib3."))


def one_line(err: BaseException) -> str:
    """The message on one line: its lines joined by "; " (after a colon, by a space); a server
    that did not answer is named as such."""
    from tasks.common.stage import unreachable

    server = unreachable(err)
    if server:
        return f"error: {server}"
    text = ""
    for line in (" ".join(x.split()) for x in str(err).splitlines()):
        if line:
            text += (" " if not text or text.endswith(":") else "; ") + line
    text = text.strip() or type(err).__name__
    return text if text.startswith("error:") else f"error: {text}"


def exit_code(err: BaseException) -> int:
    """2 for invalid params or arguments (as a usage error), 1 for anything else expected."""
    return 2 if isinstance(err, UsageError) or type(err).__name__ == "ConfigError" else 1


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a command: expected errors print one line to stderr and exit 1, or 2 for bad params
    (`--verbose`: raise)."""
    # eval_str: typer reads the wrapper's __signature__ as is, and under `from __future__ import
    # annotations` the annotations are strings it would not recognise as typer options.
    sig = inspect.signature(fn, eval_str=True)
    own_verbose = "verbose" in sig.parameters

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs["verbose"] if own_verbose else kwargs.pop("verbose", False)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as err:
            if verbose or not is_expected(err):
                raise
            typer.echo(one_line(err), err=True)
            raise typer.Exit(code=exit_code(err)) from None

    if not own_verbose:
        wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), VERBOSE])
    return wrapper
