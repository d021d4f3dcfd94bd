"""The recipes that produced the zoo (``fvd train ...``): DDPM, classifiers, export, quality check.

Submodules are imported on use; ``commands.register(app)`` adds the CLI group.
"""
