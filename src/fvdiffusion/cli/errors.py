"""The one error path of the ``fvd`` command: a failure the user can fix is one line ``error: ...``, exit 2."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)
