"""One population over several processes (gloo on the CPU) equals one process, bit for bit.

Workers are spawned by :func:`fvdiffusion.launch.launch`; what they run lives in
``tests/sharded_runs.py`` so that it pickles by name.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import fvdiffusion as fv
import sharded_runs as runs
from fvdiffusion.distributed import block_starts
from fvdiffusion.errors import ConfigError, ShardFailedError
from fvdiffusion.launch import launch
from fvdiffusion.noise import ChunkedNoise, stream_seed


def assert_same_run(one: dict, many: dict, name: str) -> None:
    for key, value in one.items():
        if key == "distributed":
            continue
        other = many[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), f"{name}: {key} differs"
        elif key == "parents":
            assert len(value) == len(other) and all(torch.equal(a, b) for a, b in zip(value, other)), \
                f"{name}: lineage differs"
        else:
            assert value == other, f"{name}: {key} differs: {value!r} vs {other!r}"


@pytest.fixture(scope="module")
def one_process() -> dict[str, dict]:
    return {name: runs.essentials(runs.run_case(name)) for name in runs.CASES}  # the CPU code path


@pytest.fixture(scope="module", params=[2, 3], ids=["2-procs", "3-procs"])
def sharded(request) -> tuple[int, dict[str, dict]]:
    return request.param, launch(runs.all_cases, nproc=request.param)


def test_every_method_and_scheme_over_processes_equals_one_process(one_process, sharded):
    world, results = sharded
    for name in [*runs.CASES, *(f"{n}@deferred" for n in runs.DEFERRED)]:
        # the accelerator's code path over processes equals the CPU path in one process
        assert_same_run(one_process[name.split("@")[0]], results[name], f"{name} on {world} processes")
        info = results[name]["distributed"]
        assert info["world_size"] == world and info["blocks"] == list(block_starts(runs.N, world, runs.CHUNK))


def test_the_blocks_are_uneven_and_made_of_whole_noise_chunks(sharded):
    world, results = sharded
    blocks = results["fvd"]["distributed"]["blocks"]
    assert blocks == {2: [0, 6, 10], 3: [0, 3, 6, 10]}[world]  # uneven: 6/4 and 3/3/4
    assert all(edge % runs.CHUNK == 0 for edge in blocks[1:-1])


@pytest.mark.parametrize("n, world, chunk", [(10, 2, 3), (10, 3, 3), (7, 2, 3), (1000, 3, 64), (64, 4, 16), (5, 5, 1)])
def test_blocks_cover_the_slots_in_whole_chunks(n, world, chunk):
    starts = block_starts(n, world, chunk)
    assert starts[0] == 0 and starts[-1] == n and len(starts) == world + 1
    sizes = [b - a for a, b in zip(starts, starts[1:])]
    assert all(size > 0 for size in sizes)
    assert all(edge % chunk == 0 for edge in starts[1:-1])
    assert max(sizes) - min(sizes) <= chunk  # as even as whole chunks allow


def test_selections_move_particles_across_ranks_within_the_bound(sharded):
    """bytes per run <= sum over selections of 2 x dead fraction x N x particle size (one x0/eps pair per clone)."""
    world, results = sharded
    moved_any = False
    for name in ("fvd", "smc_multinomial", "vasr", "fvd_ddim"):
        run = results[name]
        info = run["distributed"]
        particle_bytes = run["samples"][0].numel() * run["samples"].element_size()
        trace = eval(run["trace"], {"nan": math.nan, "inf": math.inf})
        bound = sum(2 * row["dead_fraction"] * runs.N * particle_bytes for row in trace if row["selected"])
        assert info["particle_bytes_moved"] <= bound + 1e-9, name
        assert info["scalar_bytes_gathered"] > 0
        moved_any |= info["particle_bytes_moved"] > 0
    assert moved_any  # clones did cross ranks: the equality above exercised the exchange


def test_the_shipped_mnist_unet_over_two_processes_equals_one():
    assert_same_run(runs.mnist_case(), launch(runs.mnist_case, nproc=2), "mnist fvd")


def test_a_failing_reward_on_one_rank_ends_every_rank_with_its_one_line():
    reports = launch(runs.failing_run, (1, 3), nproc=2, every_rank=True, timeout_s=20)
    kinds, messages, seconds = zip(*(r.split("|") for r in reports))
    assert set(kinds) == {"ShardFailedError"}
    assert len(set(messages)) == 1, messages  # the same line on every rank
    message = messages[0]
    assert message.startswith("rank 1 of 2 failed at step k=") and "ValueError: injected fault" in message
    assert "\n" not in message
    assert max(float(s) for s in seconds) < 30  # not the collective timeout


def test_a_failing_rank_makes_launch_raise_the_same_line():
    with pytest.raises(ShardFailedError, match=r"^rank 0 of 3 failed at step k=\d+ .*injected fault$"):
        launch(runs.failing_run_raising, (0, 2), nproc=3, timeout_s=20)


def test_a_rank_that_dies_ends_the_run_within_the_timeout():
    started = time.monotonic()
    with pytest.raises(ShardFailedError, match="rank"):
        launch(runs.failing_run, (1, 2, "exit"), nproc=2, timeout_s=10, grace_s=2)
    assert time.monotonic() - started < 40


def test_a_rank_that_hangs_is_caught_by_the_collective_timeout():
    """Rank 1 never returns from its reward: rank 0 gives up after the timeout, the launcher ends rank 1."""
    started = time.monotonic()
    with pytest.raises(ShardFailedError, match=r"^rank 0 of 2: all-gather at step k=\d+ .*did not complete within 3 s"):
        launch(runs.failing_run_raising, (1, 2, "hang"), nproc=2, timeout_s=3, grace_s=1)
    assert time.monotonic() - started < 30


def test_what_cannot_be_sharded_is_refused_in_one_line_and_sharded_false_runs_alone():
    messages = launch(runs.refusals, nproc=2)
    assert messages["svdd"].startswith("ConfigError: method 'svdd' cannot spread one population")
    assert messages["kill"].startswith("ConfigError: invalid nonfinite_denoiser='kill' across processes")
    assert messages["langevin"].startswith("ConfigError: invalid rebirth='langevin' across processes")
    assert messages["too_few"].startswith("ConfigError: invalid n_particles=1")
    for key in ("svdd", "kill", "langevin", "too_few"):
        assert "\n" not in messages[key]
    assert "distributed" not in messages["alone_extras"]
    alone = runs.toy_problem("gmm2d-component")
    expected = fv.sample("fvd", alone.denoiser(runs.VPSchedule.linear(1000)), alone.reward, lam=alone.lam,
                         n_particles=runs.N, num_steps=runs.STEPS, seed=runs.SEED)
    assert torch.equal(messages["alone_samples"], expected.samples)  # today's single-process stream


# --- without processes ---------------------------------------------------------------------

@pytest.mark.parametrize("splits", [[0, 10], [0, 5, 10], [0, 3, 6, 10], [0, 1, 2, 9, 10], [0, 4, 8, 10]])
def test_chunked_noise_is_the_same_for_any_split_of_the_slots(splits):
    def draws(lo, hi):
        noise = ChunkedNoise(seed=7, chunk=3, n=10, lo=lo, hi=hi, device=torch.device("cpu"))
        return [noise.particles((2,)), noise.particles((2,))]

    whole = draws(0, 10)
    pieces = [draws(a, b) for a, b in zip(splits, splits[1:])]
    for d in range(2):
        assert torch.equal(torch.cat([p[d] for p in pieces]), whole[d])
    assert not torch.equal(whole[0], whole[1])  # consecutive draws differ


def test_chunks_draws_and_seeds_give_distinct_streams():
    keys = {(s, d, c) for s in (0, 1) for d in range(4) for c in (-1, 0, 1, 2)}
    assert len({stream_seed(*k) for k in keys}) == len(keys)
    assert all(0 <= stream_seed(*k) < 2**63 for k in keys)


def test_noise_chunk_is_validated_and_refused_for_tree_methods():
    problem = runs.toy_problem("gmm2d-component")
    denoiser = problem.denoiser(runs.VPSchedule.linear(1000))
    with pytest.raises(ConfigError, match="noise_chunk"):
        fv.sample("fvd", denoiser, problem.reward, n_particles=4, num_steps=2, noise_chunk=0)
    with pytest.raises(ConfigError, match="invalid noise_chunk=4 for method 'svdd'"):
        fv.sample("svdd", denoiser, problem.reward, n_particles=4, num_steps=2, noise_chunk=4)


def test_noise_chunk_changes_the_stream_but_not_the_law():
    """Chunked and one-stream noise are different draws of the same sampler (means agree)."""
    problem = runs.toy_problem("gmm2d-component")
    denoiser = problem.denoiser(runs.VPSchedule.linear(1000))
    one = fv.sample("base", denoiser, n_particles=2048, num_steps=10, seed=0)
    chunked = fv.sample("base", denoiser, n_particles=2048, num_steps=10, seed=0, noise_chunk=256)
    assert not torch.equal(one.samples, chunked.samples)
    assert torch.allclose(one.samples.mean(0), chunked.samples.mean(0), atol=0.25)
    assert chunked.config["noise_chunk"] == 256 and "noise_chunk" not in one.config


def test_align_on_a_diffusers_pipeline_over_two_processes_equals_one(tmp_path):
    pytest.importorskip("diffusers")
    from fvdiffusion.integrations.diffusers.export_mnist import export_ddpm_pipeline

    pipeline_dir = str(export_ddpm_pipeline(tmp_path / "mnist-ddpm"))
    one = runs.align_mnist_pipeline(pipeline_dir)
    many = launch(runs.align_mnist_pipeline, (pipeline_dir,), nproc=2)
    assert_same_run(one, many, "align on the MNIST DDPMPipeline")
    assert many["distributed"]["world_size"] == 2 and many["distributed"]["particle_bytes_moved"] >= 0


def test_ranks_that_make_different_calls_are_refused_instead_of_hanging():
    messages = launch(runs.mismatched_call, nproc=2, every_rank=True, timeout_s=20)
    assert len(set(messages)) == 1, messages
    assert "called fvdiffusion.sample() with a different lam than rank 0" in messages[0], messages[0]
    assert "sharded=False" in messages[0] and "\n" not in messages[0]


@pytest.mark.parametrize("what, named", [("seed", "seed"), ("cond", "cond (the prompt or condition)"),
                                         ("x_init", "x_init"), ("method", "method and its options")])
def test_every_rank_names_what_differs_in_a_sample_call(what, named):
    messages = launch(runs.sample_per_rank_call, (what,), nproc=2, every_rank=True, timeout_s=30)
    assert len(set(messages)) == 1 and messages[0].startswith("ConfigError: rank 1 of 2 called"), messages
    assert f"different {named} than rank 0" in messages[0] and "sharded=False" in messages[0]
