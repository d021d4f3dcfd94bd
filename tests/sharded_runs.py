"""Runs the sharded-population tests start in spawned workers (module-level, so they pickle by name)."""

from __future__ import annotations

import os
import time

import torch

import fvdiffusion as fv
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

N, STEPS, SEED, CHUNK = 10, 6, 3, 3  # chunks 3/3/3/1: blocks 6/4 on 2 processes, 3/3/4 on 3

# name -> (method, toy problem, options)
CASES: dict[str, tuple[str, str, dict]] = {
    "fvd": ("fvd", "gmm2d-component", {}),
    "fvd_ddim": ("fvd", "gmm8d-linear", {"eta": 0.0}),
    "fvd_level_controller": ("fvd", "gmm2d-component", {"potential": "level", "target_dead_fraction": 0.3}),
    "fvd_weighted_interval": ("fvd", "gmm2d-linear", {"parent_rule": "weighted", "selection_interval": 2}),
    **{f"smc_{scheme}": ("smc", "gmm2d-component", {"scheme": scheme})
       for scheme in ("multinomial", "systematic", "stratified", "residual", "fleming_viot", "killing")},
    "smc_ess_max": ("smc", "gmm2d-linear", {"scheme": "systematic", "ess_threshold": 0.7, "potential": "max"}),
    "vasr": ("vasr", "gmm2d-linear", {}),
    # a multistep transition: each clone's solver history crosses ranks with it
    "fvd_dpmpp_2m": ("fvd", "gmm2d-component", {"transition": "dpmpp_2m", "eta": 0.0}),
    "smc_dpmpp_2m_sde": ("smc", "gmm2d-linear", {"transition": "dpmpp_2m", "eta": 1.0, "scheme": "systematic"}),
    "fvd_unipc": ("fvd", "gmm2d-component", {"transition": "unipc", "eta": 0.0}),
    "base": ("base", "gmm2d-component", {}),
    "bon": ("bon", "gmm2d-component", {}),
}


def run_case(name: str, noise_chunk: int | None = CHUNK) -> fv.SampleResult:
    method, problem_name, options = CASES[name]
    problem = toy_problem(problem_name)
    return fv.sample(method, problem.denoiser(VPSchedule.linear(1000)), problem.reward, lam=problem.lam,
                     n_particles=N, num_steps=STEPS, seed=SEED, noise_chunk=noise_chunk, **options)


def essentials(result: fv.SampleResult) -> dict:
    """Everything a run reports that must not depend on the number of processes."""
    steps = result.lineage.num_steps
    return {
        "samples": result.samples.detach().cpu(),
        "rewards": result.rewards,
        "log_weights": result.log_weights,
        "ancestors": torch.stack([result.lineage.ancestors_at(k) for k in range(1, steps + 1)]),
        "parents": [p.clone() for p in result.lineage.parents],
        "selection_steps": list(result.lineage.steps),
        "trace": repr([row.as_dict() for row in result.trace]),  # repr: NaN rewards compare equal
        "denoiser_calls": result.cost.denoiser_calls,
        "reward_calls": result.cost.reward_calls,
        "config": result.config,
        "distributed": result.extras.get("distributed"),
    }


# run on the accelerator's code path (checks deferred, out-of-place gathers), forced on the CPU
DEFERRED = ("fvd", "smc_systematic", "vasr")


def all_cases() -> dict[str, dict]:
    from fvdiffusion.checks import force_eager

    results = {name: essentials(run_case(name)) for name in CASES}
    with force_eager(False):
        results.update({f"{name}@deferred": essentials(run_case(name)) for name in DEFERRED})
    return results


def mnist_case(noise_chunk: int = CHUNK) -> dict:
    """FVD on the shipped MNIST UNet and classifier: a real network, micro-batched per block."""
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier

    result = fv.sample("fvd", load_ddpm(), ClassifierReward(load_reward_classifier(), 3), n_particles=7,
                       num_steps=3, seed=1, noise_chunk=noise_chunk, batch_size=2)
    return essentials(result)


class FailingReward:
    """The toy reward, except that on ``rank`` its ``calls``-th call raises (or hangs, or kills the process)."""

    def __init__(self, reward, rank: int, calls: int, how: str = "raise") -> None:
        self.reward, self.rank, self.calls, self.how, self.seen = reward, rank, calls, how, 0

    def __call__(self, x, cond=None):
        self.seen += 1
        if torch.distributed.get_rank() == self.rank and self.seen == self.calls:
            if self.how == "raise":
                raise ValueError("injected fault")
            if self.how == "exit":
                os._exit(3)
            time.sleep(3600)  # "hang"
        return self.reward(x, cond)


def failing_run(rank: int, calls: int, how: str = "raise") -> str:
    """An FVD run where one rank's reward fails; returns the error this rank raised."""
    problem = toy_problem("gmm2d-component")
    reward = FailingReward(problem.reward, rank, calls, how)
    started = time.monotonic()
    try:
        fv.sample("fvd", problem.denoiser(VPSchedule.linear(1000)), reward, lam=problem.lam, n_particles=N,
                  num_steps=STEPS, seed=SEED)
    except Exception as exc:  # every rank must raise; report what and how fast
        return f"{type(exc).__name__}|{exc}|{time.monotonic() - started:.2f}"
    return "no error"


def refusals() -> dict[str, str]:
    """What a process group refuses, one line each; and sharded=False runs alone in each process."""
    problem = toy_problem("gmm2d-component")
    denoiser = problem.denoiser(VPSchedule.linear(1000))
    messages = {}
    for name, method, options in [("svdd", "svdd", {}), ("kill", "fvd", {"nonfinite_denoiser": "kill"}),
                                  ("langevin", "fvd", {"rebirth": "langevin"}),
                                  ("too_few", "fvd", {"n_particles": 1})]:
        options = {"n_particles": N, **options}
        try:
            fv.sample(method, denoiser, problem.reward, num_steps=2, **options)
            messages[name] = "no error"
        except Exception as exc:
            messages[name] = f"{type(exc).__name__}: {exc}"
    alone = fv.sample("fvd", denoiser, problem.reward, lam=problem.lam, n_particles=N, num_steps=STEPS, seed=SEED,
                      sharded=False)
    messages["alone_samples"] = alone.samples
    messages["alone_extras"] = sorted(alone.extras)
    return messages


def failing_run_raising(rank: int, calls: int, how: str = "raise") -> None:
    """As :func:`failing_run`, but the error propagates (to the launcher)."""
    problem = toy_problem("gmm2d-component")
    fv.sample("fvd", problem.denoiser(VPSchedule.linear(1000)), FailingReward(problem.reward, rank, calls, how),
              lam=problem.lam, n_particles=N, num_steps=STEPS, seed=SEED)


def align_mnist_pipeline(pipeline_dir: str, noise_chunk: int = CHUNK) -> dict:
    """align() on the exported MNIST DDPMPipeline: FVD toward class 3 from the pipeline's own latents."""
    from diffusers import DDPMPipeline

    from fvdiffusion.integrations.diffusers.export_mnist import DigitImageReward
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_reward_classifier

    pipe = DDPMPipeline.from_pretrained(pipeline_dir)
    reward = DigitImageReward(ClassifierReward(load_reward_classifier(), 3))
    aligned = fv.align(pipe, None, reward, method="fvd", num_inference_steps=3, num_images_per_prompt=7,
                       generator=torch.Generator().manual_seed(5), output_type="latent", noise_chunk=noise_chunk)
    return essentials(aligned.result)


def mismatched_call() -> str:
    """Rank 1 asks for a different lam than rank 0: refused on every rank, no hang."""
    problem = toy_problem("gmm2d-component")
    lam = 1.0 if torch.distributed.get_rank() == 0 else 2.0
    try:
        fv.sample("fvd", problem.denoiser(VPSchedule.linear(1000)), problem.reward, lam=lam, n_particles=N,
                  num_steps=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _tiny_sd():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "t2i"))
    import tiny_diffusers

    return tiny_diffusers.sd_pipeline()


def align_per_rank_call(what: str) -> str:
    """align() on a tiny SD pipeline where each rank passes its own ``what`` (the DAS pattern);
    returns the error line this rank raised, or 'no error'."""
    from fvdiffusion.rewards.image_rewards import Brightness

    rank = torch.distributed.get_rank()
    options = dict(method="fvd", num_images_per_prompt=4, num_inference_steps=2, guidance_scale=2.0, seed=0,
                   output_type="latent", noise_chunk=1)
    prompt = "a photo of the sea"
    if what == "prompt":
        prompt = ["a photo of the sea", "a red bicycle"][rank]
    elif what == "negative_prompt":
        options["negative_prompt"] = ["blurry", "dark"][rank]
    elif what == "generator":  # same seed, but rank 1 has already drawn from its generator
        generator = torch.Generator().manual_seed(0)
        if rank == 1:
            torch.randn(1, generator=generator)
        options.pop("seed")
        options["generator"] = generator
    elif what == "n":
        options["num_images_per_prompt"] = 4 + 2 * rank
    elif what == "steps":
        options["num_inference_steps"] = 2 + rank
    elif what == "sharded_false":  # per-rank prompts, each rank its own population
        prompt = ["a photo of the sea", "a red bicycle"][rank]
        options["sharded"] = False
    try:
        fv.align(_tiny_sd(), prompt, Brightness(), **options)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def sample_per_rank_call(what: str) -> str:
    """fvdiffusion.sample where rank 1 differs in ``what``; returns this rank's error line or 'no error'."""
    problem = toy_problem("gmm2d-component")
    other = torch.distributed.get_rank() == 1
    options: dict = dict(lam=problem.lam, n_particles=N, num_steps=2, seed=SEED)
    if what == "seed":
        options["seed"] = SEED + other
    elif what == "cond":
        options["cond"] = "class 1" if other else "class 0"
    elif what == "x_init":
        options["x_init"] = torch.full((N, 2), float(other))
    elif what == "method":
        return _error_line(lambda: fv.sample("smc" if other else "fvd", problem.denoiser(VPSchedule.linear(1000)),
                                             problem.reward, **options))
    return _error_line(lambda: fv.sample("fvd", problem.denoiser(VPSchedule.linear(1000)), problem.reward, **options))


def _error_line(run) -> str:
    try:
        run()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# --- process groups end cleanly (tests/core/test_process_groups_end.py) ---------------------------

def listening_addresses() -> list[str]:
    """The local addresses of this process's listening TCP sockets (Linux /proc), hex as the kernel writes them."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/net/{table}") as fh:
            next(fh)
            for line in fh:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    found.append(fields[1].rsplit(":", 1)[0])
    return found


def collective_timing(sleep_s: float) -> dict:
    """Rank 1 joins an all-reduce ``sleep_s`` late; rank 0 reports how long it waited and whether it gave up."""
    start = time.monotonic()
    if torch.distributed.get_rank() == 1:
        time.sleep(sleep_s)
    raised = False
    try:
        torch.distributed.all_reduce(torch.ones(1))
    except Exception:
        raised = True
    return {"env": os.environ.get("FVD_COLLECTIVE_TIMEOUT"), "waited": time.monotonic() - start, "raised": raised}


def leaving_order(peer_delay_s: float, grace_s: float) -> bool:
    """Rank 1 writes a key ``peer_delay_s`` late, then leaves; rank 0 leaves at once and reports
    whether the key was there when its ``leave_group`` returned (it waited for the peer)."""
    from fvdiffusion.distributed import _default_store, leave_group

    store = _default_store()
    if torch.distributed.get_rank() == 1:
        time.sleep(peer_delay_s)
        store.set("test/peer-was-here", "1")
        leave_group(grace_s)
        return True
    leave_group(grace_s)
    return store.check(["test/peer-was-here"])
