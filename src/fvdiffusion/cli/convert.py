"""The ``fvd convert`` command group: published pickled weights -> safetensors, once and explicitly.

The library's loaders read safetensors only. A model published only as a ``torch.save``
pickle is converted here, by the user, with torch's restricted unpickler
(``weights_only=True``: tensors and plain containers, nothing that runs code), and its keys
and shapes are checked before anything is written. See docs/diffusers.md, "Rewards".
"""

from __future__ import annotations

from pathlib import Path

import typer

from fvdiffusion.cli.errors import check_out, handles_errors, set_threads, threads_option


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command group to the ``fvd`` app."""
    convert_app = typer.Typer(help="Convert published pickled weights to safetensors (restricted unpickler, "
                                   "keys and shapes checked).", no_args_is_help=True)
    convert_app.command("aesthetic")(aesthetic_command)
    app.add_typer(convert_app, name="convert")


@handles_errors
def aesthetic_command(
    source: Path = typer.Argument(..., help="The LAION aesthetic predictor's .pth, e.g. sac+logos+ava1-l14-linearMSE.pth."),
    out: Path = typer.Option(..., "--out", help="The .safetensors file to write (AestheticScore's mlp_weights)."),
    threads: int = threads_option(),
) -> None:
    """The LAION improved aesthetic predictor (.pth pickle) -> .safetensors for AestheticScore / --reward aesthetic."""
    set_threads(threads)
    check_out(out, kind="file")
    from fvdiffusion.rewards.model_rewards import convert_aesthetic

    written = convert_aesthetic(source, out)
    typer.echo(f"wrote {written}")
