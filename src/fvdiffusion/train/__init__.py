"""The recipes that produced the zoo (``fvd train ...``): DDPM, classifiers, export, quality check.

Submodules are imported on use; the CLI group lives in :mod:`fvdiffusion.cli.train`.
"""
