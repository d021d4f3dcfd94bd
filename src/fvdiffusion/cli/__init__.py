"""The ``fvd`` command: one module per command (group), mounted explicitly below.

Every command reports expected failures through :mod:`fvdiffusion.cli.errors` as one line
``error: ...`` with exit code 2. Heavy imports (torch, diffusers) happen inside the
commands so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

import typer

from fvdiffusion.cli import bench_mnist, convert, export, sample, suite, t2i, toy, train
from fvdiffusion.cli.errors import version_callback

app = typer.Typer(
    help="Inference-time reward alignment of diffusion models with particle populations "
         "(Fleming-Viot Diffusion and baselines).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                 help="Print the package version and exit."),
) -> None:
    """Inference-time reward alignment of diffusion models with particle populations
    (Fleming-Viot Diffusion and baselines)."""


for _module in (toy, suite, sample, bench_mnist, t2i, train, convert, export):
    _module.register(app)


def main(argv: list[str] | None = None) -> None:
    """The console entry point: typer's usage errors (a flag that does not parse, a missing
    required flag, an unknown option) become the same one ``error:`` line, exit 2, as every
    other user mistake, instead of typer's multi-line box."""
    import sys

    try:
        code = app(args=argv, prog_name="fvd", standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            code = 0
        else:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo("error: " + " ".join(message.split()) + where, err=True)
            code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
