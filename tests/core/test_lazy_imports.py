"""Importing the package, its exceptions or the ``fvd`` command, and every ``--help``, loads no torch.

The public names of ``fvdiffusion`` resolve on first use (PEP 562) and the CLI's commands import
the engine inside their bodies, so ``fvd --help`` and an ``except ConfigError`` cost tens of
milliseconds, not the seconds of loading torch. Each check runs in a fresh interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fvdiffusion

SRC = Path(importlib.util.find_spec("fvdiffusion").origin).parent.parent

# The numerical stack and the optional extras: none of them may load before a command runs.
HEAVY = {"torch", "numpy", "safetensors", "scipy", "matplotlib", "PIL", "diffusers", "transformers", "huggingface_hub"}


def _run(args: list[str]) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages named by ``-X importtime`` lines (``import time: self | cumulative | name``)."""
    return {line.split("|")[2].strip().split(".")[0] for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("args", [
    ["-c", "import fvdiffusion"],
    ["-c", "import fvdiffusion.errors"],
    ["-c", "from fvdiffusion import ConfigError"],
    ["-c", "import fvdiffusion.cli"],
    ["-m", "fvdiffusion.cli", "--help"],  # the `fvd` entry point, fvdiffusion.cli:main
], ids=lambda args: " ".join(args))
def test_loads_no_numerical_stack(args):
    proc = _run(["-X", "importtime", *args])
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "fvdiffusion" in imported, "the -X importtime parse found nothing"
    assert not imported & HEAVY, f"`{' '.join(args)}` imported {sorted(imported & HEAVY)}"


# Walks the click tree typer builds and asks every group and command for --help through the
# console entry point, in one process; prints the commands and what they imported.
_EVERY_HELP = r"""
import contextlib, io, json, sys
import typer
from fvdiffusion.cli import app, main

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, prefix + [name])

asked = []
for path in paths(typer.main.get_command(app), []):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*path, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (path, exc.code)
    assert "Usage: fvd" in out.getvalue(), path
    asked.append(" ".join(path))
print(json.dumps({"asked": asked, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def test_no_help_loads_the_numerical_stack():
    proc = _run(["-c", _EVERY_HELP])
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    for command in ("", "sample", "train", "train ddpm", "bench mnist", "bench truth", "export"):
        assert command in report["asked"]
    assert not set(report["modules"]) & HEAVY, f"--help imported {sorted(set(report['modules']) & HEAVY)}"


def test_public_names_still_resolve():
    from fvdiffusion import api, config, errors, result, samplers, schedule
    from fvdiffusion.integrations import diffusers

    assert fvdiffusion.sample is api.sample and fvdiffusion.align is diffusers.align
    assert fvdiffusion.AlignResult is diffusers.AlignResult and fvdiffusion.VPSchedule is schedule.VPSchedule
    assert fvdiffusion.METHODS is samplers.METHODS and fvdiffusion.make_config is samplers.make_config
    assert fvdiffusion.ConfigError is errors.ConfigError is config.ConfigError is samplers.ConfigError
    for name in ("SampleResult", "Lineage", "Cost", "StepTrace"):
        assert getattr(fvdiffusion, name) is getattr(result, name)
    namespace: dict = {}
    exec("from fvdiffusion import *", namespace)
    assert set(fvdiffusion.__all__) <= set(namespace) and set(fvdiffusion.__all__) <= set(dir(fvdiffusion))
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        fvdiffusion.no_such_name


def test_train_option_defaults_are_the_recipe_defaults():
    """cli/train.py writes the defaults out (the configs import torch); they must stay the configs'."""
    from fvdiffusion.cli import train as cli_train
    from fvdiffusion.train.classifier import ClassifierTrainConfig
    from fvdiffusion.train.ddpm import DDPMTrainConfig
    from fvdiffusion.train.feature_net import FeatureNetTrainConfig

    for defaults, config in ((cli_train.DDPM_DEFAULTS, DDPMTrainConfig),
                             (cli_train.CLASSIFIER_DEFAULTS, ClassifierTrainConfig),
                             (cli_train.FEATURES_DEFAULTS, FeatureNetTrainConfig)):
        assert defaults == {name: getattr(config, name) for name in defaults}, config.__name__
