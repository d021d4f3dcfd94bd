"""The ``fvd export`` command group: shipped zoo models in other libraries' formats.

``fvd export diffusers-ddpm --out DIR`` writes the shipped MNIST DDPM as a diffusers
``DDPMPipeline`` folder (``UNet2DModel`` + ``DDPMScheduler``, safetensors), loadable with
``DDPMPipeline.from_pretrained(DIR)``. See docs/diffusers.md, "The shipped MNIST DDPM as a
diffusers pipeline".
"""

from __future__ import annotations

from pathlib import Path

import typer

from fvdiffusion.cli.errors import check_out, handles_errors, set_threads, threads_option


def register(app: typer.Typer) -> None:
    """Add the ``export`` command group to the ``fvd`` app."""
    export_app = typer.Typer(help="Export shipped zoo models to other libraries' formats.", no_args_is_help=True)
    export_app.command("diffusers-ddpm")(diffusers_ddpm_command)
    app.add_typer(export_app, name="export")


@handles_errors
def diffusers_ddpm_command(
    out: Path = typer.Option(..., "--out", help="The folder to write the DDPMPipeline into (save_pretrained, safetensors)."),
    threads: int = threads_option(),
) -> None:
    """The shipped MNIST DDPM -> a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler)."""
    set_threads(threads)
    check_out(out, kind="dir")
    from fvdiffusion.rewards.model_rewards import require_installed

    require_installed("diffusers", "diffusers")
    from fvdiffusion.integrations.diffusers.export_mnist import export_ddpm_pipeline

    written = export_ddpm_pipeline(out)
    typer.echo(f"wrote {written}")
