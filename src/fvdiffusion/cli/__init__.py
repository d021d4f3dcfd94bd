"""The ``fvd`` command: one module per command (group), mounted explicitly below.

Every command reports expected failures through :mod:`fvdiffusion.cli.errors` as one line
``error: ...`` with exit code 2. Heavy imports (torch, diffusers) happen inside the
commands so that ``fvd --help`` stays fast.
"""

from __future__ import annotations

import typer

from fvdiffusion.cli import bench_mnist, sample, suite, t2i, toy, train
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


for _module in (toy, suite, sample, bench_mnist, t2i, train):
    _module.register(app)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
