"""Integrations with other libraries' models; each subpackage is an optional extra.

Nothing in the engine (samplers, loop, selection, population, schedule, result) imports
from here. A subpackage imports its library lazily, and a missing one fails with
:class:`~fvdiffusion.errors.MissingExtraError` naming the extra to install.
"""
