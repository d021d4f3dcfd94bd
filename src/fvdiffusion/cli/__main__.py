"""``python -m fvdiffusion.cli`` runs the ``fvd`` command."""

from fvdiffusion.cli import main

main()
