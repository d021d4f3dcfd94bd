"""align() against what a diffusion practitioner passes from their own setup (issue 21): every
mistake is one line before any model runs, or works as the user expects; nothing is silent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "fixtures" / "t2i"))
import tiny_diffusers  # noqa: E402
from tiny_diffusers import one_thread, sd  # noqa: E402,F401  (fixtures)

import sharded_runs as runs  # noqa: E402
from fvdiffusion.launch import launch  # noqa: E402

pytest.importorskip("diffusers")


# --- item 1: per-rank calls under a process group --------------------------------------------------

@pytest.mark.parametrize("what, named", [("prompt", "prompt"), ("negative_prompt", "negative_prompt"),
                                         ("generator", "generator state"), ("n", "num_images_per_prompt"),
                                         ("steps", "num_inference_steps")])
def test_per_rank_align_calls_are_refused_on_every_rank_naming_what_differs(what, named):
    messages = launch(runs.align_per_rank_call, (what,), nproc=2, every_rank=True, timeout_s=60)
    assert len(set(messages)) == 1, messages
    line = messages[0]
    assert line.startswith("ConfigError: rank 1 of 2 called align() with a different"), line
    assert f" {named} " in line and "sharded=False" in line and "\n" not in line


def test_per_rank_prompts_with_sharded_false_run_each_rank_alone():
    assert launch(runs.align_per_rank_call, ("sharded_false",), nproc=2, every_rank=True, timeout_s=60) == \
        ["no error", "no error"]
