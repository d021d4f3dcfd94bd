"""Kernel conformance: every method over every config axis (DESIGN.md §7), in the style of
diffusers' common scheduler tests. Tiny exact Gaussian-mixture problems, public API only
(``fv.sample``, ``fv.make_config``, ``SampleResult``, the observe-only callback, ``selection``,
``result.Lineage``, testbeds), so the suite survives a rewrite of the engine's insides.

What it checks
1. Switch sensitivity (:data:`AXES`): every declared option of every method changes the
   output where it should (η, seed, λ, noise_chunk, scheme, potential, ess_threshold, the
   selection window, final_selection, FVD's controller and rebirth kernels, svdd and dts
   budgets, the transition and its x̂0 processing), every choice of a choice-valued option gives
   its own output, an option that must not matter (batch_size, kill on a healthy run, an option
   its context disables) leaves the whole run alone, and one that cannot apply is refused.
   :func:`test_every_declared_option_is_covered` fails when a config grows a field this table
   does not name.
2. Lineage against carried roots: the roots every gather moved agree with the lineage walk,
   final samples included (anchored by matching them to the population after step 1), for
   every population method, with kills and selections at the same step; a lineage that
   forgets a record is caught.
3. Cost: denoiser and reward calls against the documented formulas of every method.
4. Exact target: weighted final samples of smc, vasr and fvd near the exact tilted mean.
5. Rules derived from the docs: a killed particle's clone gets the survivors' mean weight;
   FVD's final selection weighs r(x0); its controller follows γ_j = γ_0 / j^0.6; every
   registered resampling scheme is unbiased, in range, stable and consistently masked.

Planted bugs, each applied alone in a scratch worktree, this module run, reverted. Same red tests
on 86b4930 (before the loop package and the transition object) and on 196c045 (after; the site
there in brackets); the module then had 190 and 233 tests:

  a. svdd ignores η: its candidate steps use η = 1 (samplers/svdd.py: ddim_step(..., 1.0, noise)
     for config.eta [transition = make_transition(replace(ctx.config, eta=1.0), ctx.grid)]) -- 1 red:
     test_switch[svdd-eta]
  b. dts ignores η: its expansions use η = 1 (samplers/dts.py ddim_step [dts/search.py: the
     children's transition.step]) -- 2 red: test_switch[dts-eta], test_switch[dts*-eta]
  c. FVD's final selection reads the reward of the last selection instead of r(x0)
     (samplers/fvd.py finish: self.potential(ctx, state, state.aux["r_prev"], 0)) -- 4 red:
     test_fvd_final_selection_weighs_r_x0[diff] and [level],
     test_switch[fvd-final_selection,selection_end=0.5],
     test_a_lineage_that_forgets_a_selection_is_caught[fvd-final] (the final selection kills nobody)
  d. a clone reborn on the kill path keeps its parent's log-weight (loop.py [loop/driver.py]
     rebirth_killed: replace(state, log_weight=torch.where(dead, mean_log_w, ...)) dropped) -- 1 red:
     test_killed_clones_get_the_survivors_mean_weight
  e. two selections of one step composed in reverse. Since the driver became the only lineage
     writer (engine v3) the kill rebirth and the step's selection are composed by the driver into
     one record (loop/driver.py _record), and Lineage.record composes only what is recorded at one
     step in two calls (a ranking, then a final selection):
     - in the driver (outcome.ancestors[ancestors] for ancestors[outcome.ancestors]) -- 5 red:
       test_lineage_matches_carried_roots[smc-kill], [vasr-kill], [fvd-kill], [fvd-langevin-kill],
       test_a_lineage_that_forgets_a_selection_is_caught[fvd-kill-step];
     - in Lineage.record (result.py: parents[self.parents[-1]] for self.parents[-1][parents]) --
       1 red: test_lineage_composes_two_records_of_one_step.
  f. FVD's controller step exponent 0.6 -> 1.6 (samplers/fvd.py birth_death) -- 2 red:
     test_fvd_controller_follows_robbins_monro[1] and [2]
  g. a biased (tempered), unmasked or unstable (sorted) scheme registered in selection.SCHEMES:
     planted inside test_a_broken_scheme_in_the_registry_is_rejected, where the generic check over
     the whole registry must raise AssertionError for it (and pass for every real scheme).

A real discrepancy found by this suite, on 86b4930 and 196c045, fixed since: bon ranked its final
samples with a permutation the lineage did not record, so ``lineage.ancestors_at(K)`` named the
wrong root for every reordered sample (test_lineage_matches_carried_roots[bon]); the ranking is now
the kernel's ``FinalWeighting.reordered``, recorded by the driver.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import pytest
import torch

import fvdiffusion as fv
from fvdiffusion import selection
from fvdiffusion.config import TRANSITIONS
from fvdiffusion.denoisers.gaussian_mixture import mixture_cov, mixture_mean
from fvdiffusion.errors import DenoiserError, NonFiniteDenoiserWarning
from fvdiffusion.result import Lineage
from fvdiffusion.samplers.fvd import (
    ALLOCATIONS, MAX_LOG_KAPPA, NU_SCHEDULES, PARENT_RULES, POTENTIALS as FVD_POTENTIALS, REBIRTH_KERNELS,
)
from fvdiffusion.samplers.smc import SMC_POTENTIALS
from fvdiffusion.samplers.svdd import svdd_cost
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

SCHEDULE = VPSchedule.linear(1000)
PROBLEM = toy_problem("gmm2d-component")
DENOISER = PROBLEM.denoiser(SCHEDULE)
# the same mixture under a milder reward: genealogies stay diverse, so a wrong lineage shows
LINEAR_REWARD = toy_problem("gmm2d-linear").reward
SIZE = dict(n_particles=16, num_steps=6, seed=0)
# small search budgets (below 24 rollouts dts's tree is too small for λ, greedy or explore to
# change which leaves its 16 final descents reach)
BUDGET = {"svdd": {"n_candidates": 2}, "dts": {"n_rollouts": 24}, "dts*": {"n_rollouts": 24}}
SEARCH_METHODS = ("svdd", "dts", "dts*")      # no population stepped K … 1 (dts refuses a callback)
POPULATION_METHODS = tuple(m for m in fv.METHODS if m not in SEARCH_METHODS)
STEERED = tuple(m for m in fv.METHODS if m not in ("base", "bon"))  # λ enters the sampling


# --- helpers ---------------------------------------------------------------------------------

def run(method: str, denoiser=None, reward=PROBLEM.reward, **options) -> fv.SampleResult:
    """One small run of ``method`` on the 2-D mixture (options override the defaults)."""
    kwargs = {**SIZE, **BUDGET.get(method, {}), **options}
    return fv.sample(method, DENOISER if denoiser is None else denoiser, reward, **kwargs)


class NaNRows:
    """The exact denoiser, except that its calls numbered in ``calls`` (1-based) return NaN in
    ``rows`` (those that exist in the call): the particles there are killed under "kill"."""

    def __init__(self, inner=DENOISER, rows=slice(None, None, 4), calls=range(2, 10**6)) -> None:
        self.inner, self.rows, self.calls, self.count = inner, rows, calls, 0
        self.schedule, self.prediction_type = inner.schedule, inner.prediction_type
        self.sample_shape = inner.sample_shape

    def __call__(self, x, t, cond=None):
        self.count += 1
        out = self.inner(x, t, cond)
        if self.count in self.calls:
            out = out.clone()
            rows = self.rows if isinstance(self.rows, slice) else [r for r in self.rows if r < out.shape[0]]
            out[rows] = math.nan
        return out


class CountingDenoiser:
    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, 0
        self.schedule, self.prediction_type = inner.schedule, inner.prediction_type
        self.sample_shape = inner.sample_shape

    def __call__(self, x, t, cond=None):
        self.rows += x.shape[0]
        return self.inner(x, t, cond)


class CountingReward:
    name = "counted"

    def __init__(self, inner) -> None:
        self.inner, self.rows = inner, 0

    def __call__(self, x, cond=None):
        self.rows += x.shape[0]
        return self.inner(x)


@dataclass
class Recorder:
    """Observe-only callback: the population after every step k (= the one entering step k−1)."""

    root: dict = field(default_factory=dict)
    x: dict = field(default_factory=dict)
    reward: dict = field(default_factory=dict)
    log_weight: dict = field(default_factory=dict)

    def __call__(self, event) -> None:
        k, state = event.info.k, event.state
        self.root[k], self.x[k] = state.root.clone(), state.x.clone()
        self.reward[k], self.log_weight[k] = state.reward.clone(), state.log_weight.clone()


def _trace_rows(result, skip=()):
    """Trace rows as comparable tuples (NaN → None, fields in ``skip`` left out)."""
    def clean(value):
        return None if isinstance(value, float) and math.isnan(value) else value
    return [tuple((k, clean(v)) for k, v in row.as_dict().items() if k not in skip) for row in result.trace]


def assert_same_run(a: fv.SampleResult, b: fv.SampleResult, trace_skip=("lam",)) -> None:
    """Two runs that must be the same run: samples, rewards, weights, lineage, trace and cost."""
    assert torch.equal(a.samples, b.samples), "samples differ"
    assert torch.equal(a.rewards.nan_to_num(123.0), b.rewards.nan_to_num(123.0)), "rewards differ"
    assert torch.equal(a.log_weights, b.log_weights), "log_weights differ"
    assert a.lineage.steps == b.lineage.steps and all(
        torch.equal(p, q) for p, q in zip(a.lineage.parents, b.lineage.parents)), "lineage differs"
    assert _trace_rows(a, trace_skip) == _trace_rows(b, trace_skip), "trace differs"
    assert (a.cost.denoiser_calls, a.cost.reward_calls) == (b.cost.denoiser_calls, b.cost.reward_calls), "cost differs"


def roots_of_final_samples(result: fv.SampleResult, recorder: Recorder) -> torch.Tensor:
    """The root each final sample carried: the final samples are (copies of) the population after
    step 1, so each is matched to a slot there (exact copies of one slot share its root)."""
    after_last_step, roots = recorder.x[1], recorder.root[1]
    carried = []
    for i, sample in enumerate(result.samples):
        slots = torch.nonzero((after_last_step == sample).all(dim=1)).flatten()
        assert slots.numel() > 0, f"final sample {i} is not a particle of the population after step 1"
        assert roots[slots].unique().numel() == 1, f"final sample {i} matches particles of different roots"
        carried.append(int(roots[slots[0]]))
    return torch.tensor(carried)


def assert_lineage_matches_carried_roots(result: fv.SampleResult, lineage: Lineage, recorder: Recorder) -> None:
    """The lineage walk against the roots the gathers carried: at the final samples and after
    every step k (the population entering step k−1 is reached by undoing selections at steps < k)."""
    steps = lineage.num_steps
    final_roots = lineage.ancestors_at(steps)
    assert torch.equal(roots_of_final_samples(result, recorder), final_roots), "final samples' roots"
    for k in range(1, steps + 1):
        assert torch.equal(recorder.root[k][lineage.ancestors_at(k - 1)], final_roots), f"after step k={k}"
    walked = [int(lineage.ancestors_at(k).unique().numel()) for k in range(steps, 0, -1)]
    assert lineage.genealogy_curve() == walked


def in_selection_window(config, index: int) -> bool:
    """The selection window of SelectionScheduleMixin (0 = the first step, 1 = the last)."""
    pos = index / max(config.num_steps - 1, 1)
    return config.selection_start - 1e-9 <= pos <= config.selection_end + 1e-9


def documented_cost(method: str, config, result: fv.SampleResult, scored: bool) -> tuple[int, int]:
    """(denoiser calls, reward calls) by each method's documented formula; calls count rows."""
    n, k = config.n_particles, config.num_steps
    if method == "svdd":
        cost = svdd_cost(n, k, config.n_candidates)
        return cost["denoiser_calls"], cost["reward_calls"]
    if method in ("dts", "dts*"):  # one denoiser call per tree node, one reward call per leaf
        return result.extras["n_nodes"], result.extras["n_leaves"]
    denoiser = n * k
    if method in ("base", "bon"):  # the reward scores the final samples only
        return denoiser, n if scored else 0
    if method == "smc":  # weights move at every step of the window; + r(x0)
        scoring_steps = sum(in_selection_window(config, i) for i in range(k))
    else:  # vasr, fvd: rewards at the selection steps; + r(x0)
        scoring_steps = sum(config.is_selection_step(i, k) for i in range(k))
    if method == "fvd" and config.rebirth == "langevin":  # one call per clone per Langevin step
        clones = sum(round(row.dead_fraction * n) for row in result.trace if row.selected)
        denoiser += config.langevin_steps * clones
    return denoiser, n * (scoring_steps + 1)


# --- 1. switch sensitivity -------------------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One config axis of one method: ``kind`` is "switch" (value a and b give different samples),
    "choices" (every value gives its own samples), "invariant" (a and b give the same run) or
    "refused" (b is a ConfigError naming the option); ``context`` holds the other options the
    comparison runs under."""

    method: str
    option: str
    kind: str
    values: tuple
    context: tuple = ()

    @property
    def id(self) -> str:
        suffix = "".join(f",{k}={v}" for k, v in self.context)
        return f"{self.method}-{self.option}{suffix}"


def _axes() -> list[Axis]:
    axes = []
    for m in fv.METHODS:
        axes.append(Axis(m, "eta", "switch", (0.5, 1.0)))
        axes.append(Axis(m, "seed", "switch", (0, 1)))
        # dts*'s argmax search sees λ only through its soft backup: compare λ = 1 with the hard max
        lams = (1.0, math.inf) if m == "dts*" else (1.0, 3.0)
        axes.append(Axis(m, "lam", "switch" if m in STEERED else "invariant", lams))
        axes.append(Axis(m, "batch_size", "invariant", (None, 3)))
        axes.append(Axis(m, "nonfinite_denoiser", "invariant", ("raise", "kill")))  # a healthy run
        # the transition and its x̂0 processing move every method's particles (driver, candidates, tree);
        # "ddpm" equals DDIM(1) in exact arithmetic, so it is checked as that, not as a switch
        # "unipc" is an ODE solver (η = 0): compared with the others at η = 0 where a method allows it
        if m in ("dts", "dts*"):  # the tree keeps no per-node solver history: multistep solvers refused
            axes.append(Axis(m, "transition", "choices", ("ddim", "euler")))
            axes.append(Axis(m, "transition", "refused", ("ddim", "dpmpp_2m")))
            axes.append(Axis(m, "transition", "refused", ("ddim", "unipc")))
        else:
            axes.append(Axis(m, "transition", "choices", tuple(t for t in TRANSITIONS if t not in ("ddpm", "unipc"))))
            if m == "svdd":  # candidates need a stochastic transition
                axes.append(Axis(m, "transition", "refused", ("ddim", "unipc")))
            else:
                axes.append(Axis(m, "transition", "choices", ("ddim", "dpmpp_2m", "unipc"), (("eta", 0.0),)))
        axes.append(Axis(m, "clip_x0", "switch", (None, 0.5)))
        # thresholding divides by s >= 1, a no-op while every |x̂0| <= 1: at seed 0 no particle SMC
        # keeps ever gets past 1 (its x̂0 start near the mixture mean); seed 1 gives every method some
        dynamic = (("seed", 1), ("dynamic_threshold", 0.9))
        axes.append(Axis(m, "dynamic_threshold", "switch", (None, 0.9), dynamic[:1]))
        axes.append(Axis(m, "dynamic_threshold_max", "switch", (1.0, 3.0), dynamic))
        axes.append(Axis(m, "dynamic_threshold_max", "invariant", (1.0, 3.0)))  # no thresholding, no max
        if m in POPULATION_METHODS:
            axes.append(Axis(m, "noise_chunk", "switch", (None, 4)))
            axes.append(Axis(m, "batch_size", "invariant", (None, 3), (("noise_chunk", 4),)))
        else:  # slot-keyed noise applies to populations only
            axes.append(Axis(m, "noise_chunk", "refused", (None, 4)))
    window = [("selection_interval", (1, 2)), ("selection_start", (0.0, 0.5)), ("selection_end", (1.0, 0.5))]
    for m in ("smc", "vasr", "fvd"):
        axes += [Axis(m, name, "switch", values) for name, values in window]
        # with selection up to the last step r(x0) ≈ r(x̂0) there and the final selection has little
        # to do; a window closing at mid-trajectory leaves it the whole second half
        axes.append(Axis(m, "final_selection", "switch", (True, False), (("selection_end", 0.5),)))
    axes += [
        Axis("bon", "top_k", "invariant", (1, 3)),  # the run alone; test_invariant checks the picks
        Axis("smc", "scheme", "choices", tuple(selection.SCHEMES)),
        Axis("smc", "potential", "choices", SMC_POTENTIALS),
        Axis("smc", "ess_threshold", "switch", (None, 0.5)),
        Axis("smc", "selection_interval", "invariant", (1, 3), (("ess_threshold", 0.5),)),  # ESS decides
        Axis("fvd", "potential", "choices", FVD_POTENTIALS),
        Axis("fvd", "parent_rule", "choices", PARENT_RULES),
        Axis("fvd", "parent_allocation", "choices", ALLOCATIONS),
        Axis("fvd", "rebirth", "choices", REBIRTH_KERNELS),
        Axis("fvd", "nu_schedule", "choices", NU_SCHEDULES, (("rebirth_noise", 0.8),)),
        Axis("fvd", "nu_schedule", "invariant", ("constant", "decay"), (("rebirth_noise", 0.0),)),
        Axis("fvd", "rebirth_noise", "switch", (0.0, 0.5)),
        Axis("fvd", "rebirth_noise", "invariant", (0.3, 0.9), (("rebirth", "langevin"),)),
        Axis("fvd", "nu_by_copies", "switch", (False, True), (("rebirth_noise", 0.8),)),
        Axis("fvd", "nu_by_copies", "invariant", (False, True), (("rebirth_noise", 0.0),)),
        Axis("fvd", "langevin_steps", "switch", (1, 2), (("rebirth", "langevin"),)),
        Axis("fvd", "langevin_steps", "invariant", (1, 3), (("rebirth", "renoise"), ("rebirth_noise", 0.5))),
        Axis("fvd", "langevin_step", "switch", (0.2, 0.5), (("rebirth", "langevin"),)),
        Axis("fvd", "langevin_step", "invariant", (0.2, 0.7), (("rebirth", "renoise"), ("rebirth_noise", 0.5))),
        Axis("fvd", "target_dead_fraction", "switch", (None, 0.3)),
        Axis("fvd", "controller_gain", "switch", (1.0, 4.0), (("target_dead_fraction", 0.3),)),
        Axis("fvd", "controller_gain", "invariant", (1.0, 4.0)),  # no controller, no gain
        Axis("svdd", "n_candidates", "switch", (2, 3)),
    ]
    for m in ("dts", "dts*"):
        axes += [
            Axis(m, "n_rollouts", "switch", (24, 32)),
            Axis(m, "max_children", "switch", (4, 2)),
            Axis(m, "widening_alpha", "switch", (None, 0.5)),
            Axis(m, "widening_c", "switch", (1.0, 3.0), (("widening_alpha", 0.5),)),
            Axis(m, "widening_c", "invariant", (1.0, 3.0)),  # no widening, no C
            Axis(m, "node_budget", "switch", (100_000, 12)),
            Axis(m, "rollouts_per_batch", "switch", (None, 4)),
            Axis(m, "greedy", "switch", (False, True)),
        ]
    axes.append(Axis("dts", "explore", "switch", (0.5, 0.1)))
    axes.append(Axis("dts*", "explore", "invariant", (0.5, 0.1)))  # argmax descent never explores
    return axes


AXES = _axes()
STRUCTURAL = {"n_particles", "num_steps"}  # sizes, not switches: checked by the shape of every result


def _run_axis(axis: Axis, value, **extra):
    return run(axis.method, **dict(axis.context), **{axis.option: value}, **extra)


@pytest.mark.parametrize("method", list(fv.METHODS))
def test_every_declared_option_is_covered(method):
    """A config field that no axis names is an option nobody checked: add it to AXES."""
    declared = {f.name for f in fields(fv.METHODS[method].config_class)} - STRUCTURAL
    covered = {axis.option for axis in AXES if axis.method == method}
    assert declared <= covered, f"{method}: options without a conformance axis: {sorted(declared - covered)}"


@pytest.mark.parametrize("axis", [a for a in AXES if a.kind == "switch"], ids=lambda a: a.id)
def test_switch(axis):
    """The option changes the samples, with the same seed and everything else equal."""
    a, b = (_run_axis(axis, value) for value in axis.values)
    assert a.samples.shape == b.samples.shape == (SIZE["n_particles"], 2)
    assert not torch.equal(a.samples, b.samples), f"{axis.id}: {axis.values} give the same samples"


@pytest.mark.parametrize("axis", [a for a in AXES if a.kind == "choices"], ids=lambda a: a.id)
def test_every_choice_gives_its_own_samples(axis):
    outputs = {value: _run_axis(axis, value).samples for value in axis.values}
    for i, first in enumerate(axis.values):
        for second in axis.values[i + 1:]:
            assert not torch.equal(outputs[first], outputs[second]), f"{axis.id}: {first} and {second} agree"


@pytest.mark.parametrize("axis", [a for a in AXES if a.kind == "invariant"], ids=lambda a: a.id)
def test_invariant(axis):
    """The option must not change anything here (micro-batching, a disabled sub-option, ...)."""
    a, b = (_run_axis(axis, value) for value in axis.values)
    assert_same_run(a, b)
    if axis.option == "top_k":  # bon: the same ranking, and the picks are its first top_k
        assert torch.equal(b.extras["top_k_samples"], b.samples[: axis.values[1]])
        assert b.extras["top_k_samples"].shape[0] != a.extras["top_k_samples"].shape[0]


@pytest.mark.parametrize("axis", [a for a in AXES if a.kind == "refused"], ids=lambda a: a.id)
def test_refused(axis):
    """An option that cannot apply to the method is refused, never silently ignored."""
    _run_axis(axis, axis.values[0])
    with pytest.raises(fv.ConfigError, match=axis.option):
        _run_axis(axis, axis.values[1])


def test_the_ddpm_transition_is_ddim_at_eta_one():
    """transitions.py: the DDPM posterior "equal to DDIM(1) in exact arithmetic" — the same noise
    stream gives the same samples up to rounding (base: no selection to amplify a last bit)."""
    ddim, ddpm = (run("base", transition=name) for name in ("ddim", "ddpm"))
    assert torch.allclose(ddim.samples, ddpm.samples, atol=1e-4), (ddim.samples - ddpm.samples).abs().max()
    with pytest.raises(fv.ConfigError, match="eta"):
        run("base", transition="ddpm", eta=0.5)


@pytest.mark.parametrize("method", list(fv.METHODS))
def test_nonfinite_denoiser_switch_on_a_faulty_denoiser(method):
    """"raise" stops at the first NaN output; "kill" drops those particles, counts them and goes on."""
    with pytest.raises(DenoiserError, match="NaN/inf at step k="):
        run(method, NaNRows())
    with pytest.warns(NonFiniteDenoiserWarning):
        res = run(method, NaNRows(), nonfinite_denoiser="kill")
    assert torch.isfinite(res.samples).all() and not torch.isnan(res.log_weights).any()
    assert res.extras["health"]["nonfinite_denoiser"] > 0


# --- 2. lineage against the roots the population carried ---------------------------------------

# the third and fourth denoiser calls are steps k = 4 and 3 of 6 (a Langevin move may take one):
# enough kills that a parent of a selection is a fresh clone, and a clone's parent dies in it
KILLS = dict(rows=(1, 3, 6, 9, 11, 14), calls=(3, 4))

LINEAGE_RUNS = [
    pytest.param("base", {}, None, id="base"),
    pytest.param("base", {}, KILLS, id="base-kill"),
    pytest.param("bon", {}, None, id="bon"),  # its ranking is recorded as the step-0 lineage entry
    *[pytest.param("smc", {"scheme": s}, None, id=f"smc-{s}") for s in selection.SCHEMES],
    pytest.param("smc", {"ess_threshold": 0.6, "selection_end": 0.7}, None, id="smc-ess-window"),
    pytest.param("smc", {}, KILLS, id="smc-kill"),
    pytest.param("smc", {"ess_threshold": 0.0}, KILLS, id="smc-no-resampling-kill"),
    pytest.param("vasr", {"selection_interval": 2}, None, id="vasr"),
    pytest.param("vasr", {}, KILLS, id="vasr-kill"),
    pytest.param("fvd", {}, None, id="fvd"),
    pytest.param("fvd", {"eta": 0.0}, None, id="fvd-ddim"),
    pytest.param("fvd", {"parent_rule": "weighted", "target_dead_fraction": 0.3}, None, id="fvd-weighted-controller"),
    pytest.param("fvd", {"selection_start": 0.2, "selection_end": 0.6}, None, id="fvd-window"),
    pytest.param("fvd", {}, KILLS, id="fvd-kill"),
    pytest.param("fvd", {"rebirth": "langevin"}, KILLS, id="fvd-langevin-kill"),
]


def _recorded_run(method, options, kill):
    recorder = Recorder()
    denoiser = NaNRows(**kill) if kill else None
    extra = {"nonfinite_denoiser": "kill"} if kill else {}
    with pytest.warns(NonFiniteDenoiserWarning) if kill else nullcontext():
        res = run(method, denoiser, LINEAR_REWARD, callback=recorder, **options, **extra)
    return res, recorder


def test_population_methods_are_covered_by_the_lineage_runs():
    assert {p.values[0] for p in LINEAGE_RUNS} == set(POPULATION_METHODS)


@pytest.mark.parametrize("method,options,kill", LINEAGE_RUNS)
def test_lineage_matches_carried_roots(method, options, kill):
    res, recorder = _recorded_run(method, options, kill)
    if kill:
        assert res.extras["health"]["nonfinite_denoiser"] >= len(kill["rows"])
    assert_lineage_matches_carried_roots(res, res.lineage, recorder)


@pytest.mark.parametrize("method,options,kill,must_include", [
    pytest.param("fvd", {}, KILLS, 3, id="fvd-kill-step"),  # kills folded into selections at k = 4, 3
    pytest.param("fvd", {"selection_start": 0.2, "selection_end": 0.6}, None, 0, id="fvd-final"),
    pytest.param("smc", {}, None, 6, id="smc-first"),
])
def test_a_lineage_that_forgets_a_selection_is_caught(method, options, kill, must_include):
    """The check above has teeth: drop any one record of a real run's lineage that moves some
    final particle's root, and it fails. (In the stable arrangement a parent keeps its slot, so
    forgetting a record that no final lineage passes through a copied slot of is harmless.)"""
    res, recorder = _recorded_run(method, options, kill)
    lineage = res.lineage
    assert_lineage_matches_carried_roots(res, lineage, recorder)
    harmful = []
    for position, step in enumerate(lineage.steps):
        forgetful = Lineage(n_particles=lineage.n_particles, num_steps=lineage.num_steps,
                            parents=[p for i, p in enumerate(lineage.parents) if i != position],
                            steps=[s for i, s in enumerate(lineage.steps) if i != position])
        if torch.equal(forgetful.ancestors_at(lineage.num_steps), lineage.ancestors_at(lineage.num_steps)):
            continue
        harmful.append(step)
        with pytest.raises(AssertionError):
            assert_lineage_matches_carried_roots(res, forgetful, recorder)
    assert must_include in harmful, (must_include, harmful)


def test_lineage_composes_two_records_of_one_step():
    """A kill-rebirth then a selection at step k: slot i takes selection parent p, which after the
    kill holds a copy of kill-parent[p], so the one record is kill[selection] — the same walk as the
    two records at consecutive steps."""
    kill = torch.tensor([0, 0, 2, 3, 4])        # slot 1 died, reborn from 0
    chosen = torch.tensor([0, 1, 1, 3, 3])      # slots 2 and 4 take slots 1 and 3
    same_step = Lineage(n_particles=5, num_steps=3)
    same_step.record(3, torch.tensor([0, 1, 2, 4, 4]))
    same_step.record(2, kill)
    same_step.record(2, chosen)
    assert same_step.steps == [3, 2] and same_step.parents[-1].tolist() == kill[chosen].tolist() == [0, 0, 0, 3, 3]
    split = Lineage(n_particles=5, num_steps=3)  # the kill one step earlier: the same genealogy
    split.record(3, torch.tensor([0, 1, 2, 4, 4]))
    split.record(2, kill)
    split.record(1, chosen)
    assert same_step.ancestors_at(3).tolist() == split.ancestors_at(3).tolist() == [0, 0, 0, 4, 4]


# --- 3. cost ---------------------------------------------------------------------------------

COST_RUNS = [
    *[pytest.param(m, {}, id=m) for m in fv.METHODS],
    pytest.param("base", {"reward": None}, id="base-unscored"),
    pytest.param("smc", {"selection_start": 0.4, "selection_end": 0.8, "selection_interval": 2}, id="smc-window"),
    pytest.param("smc", {"ess_threshold": 0.5}, id="smc-ess"),
    pytest.param("vasr", {"selection_interval": 2, "selection_start": 0.2}, id="vasr-window"),
    pytest.param("fvd", {"selection_interval": 2, "selection_end": 0.6, "final_selection": False}, id="fvd-window"),
    pytest.param("fvd", {"rebirth": "langevin", "langevin_steps": 2}, id="fvd-langevin"),
    pytest.param("fvd", {"batch_size": 5, "noise_chunk": 4}, id="fvd-batched-chunked"),
    pytest.param("fvd", {"nonfinite_denoiser": "kill", "denoiser": "kill"}, id="fvd-kill"),
    pytest.param("svdd", {"n_candidates": 3, "batch_size": 5}, id="svdd-batched"),
    pytest.param("svdd", {"num_steps": 1, "n_candidates": 3}, id="svdd-one-step"),
    pytest.param("dts", {"widening_alpha": 0.5, "n_rollouts": 12, "rollouts_per_batch": 5}, id="dts-widening"),
    pytest.param("dts*", {"node_budget": 15}, id="dts*-budget"),
]


@pytest.mark.parametrize("method,options", COST_RUNS)
def test_cost_follows_the_documented_formula(method, options):
    options = dict(options)
    reward = options.pop("reward", PROBLEM.reward)
    inner = NaNRows(**KILLS) if options.pop("denoiser", None) == "kill" else DENOISER
    denoiser, counted_reward = CountingDenoiser(inner), (None if reward is None else CountingReward(reward))
    if options.get("nonfinite_denoiser") == "kill":
        with pytest.warns(NonFiniteDenoiserWarning):
            res = run(method, denoiser, counted_reward, **options)
    else:
        res = run(method, denoiser, counted_reward, **options)
    config = fv.make_config(method, **{**SIZE, **BUDGET.get(method, {}), **options})
    assert (res.cost.denoiser_calls, res.cost.reward_calls) == documented_cost(method, config, res, reward is not None)
    assert res.cost.denoiser_calls == denoiser.rows
    assert res.cost.reward_calls == (0 if counted_reward is None else counted_reward.rows)
    assert res.samples.shape == (config.n_particles, 2)
    if method in ("dts", "dts*"):  # each rollout adds at most one chain below the root
        assert res.extras["n_leaves"] <= config.n_rollouts
        assert res.extras["n_nodes"] <= min(config.node_budget, 1 + (config.num_steps - 1) * config.n_rollouts)
    else:
        assert [row.step for row in res.trace] == list(range(config.num_steps, 0, -1))


# --- 4. the exact target -----------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("smc", {"final_selection": False}), ("smc", {"scheme": "systematic"}), ("vasr", {"final_selection": False}),
    ("fvd", {}), ("fvd", {"eta": 0.0}),
])
def test_weighted_samples_land_on_the_exact_tilted_mean(method, options):
    """8 seeds of N = 64, K = 10 on the linear tilt (whose exact mean moves ~1 std from the base
    mean): the pooled weighted mean is within 4 standard errors plus the 10-step sampler's bias
    (measured ≤ 0.35 std for every method at this size; base misses by 1.1 std)."""
    problem = toy_problem("gmm2d-linear")
    denoiser = problem.denoiser(SCHEDULE)
    exact = mixture_mean(problem.target)
    std = mixture_cov(problem.target).diagonal().sqrt()

    def pooled(method, options):
        means = []
        for seed in range(8):
            res = fv.sample(method, denoiser, problem.reward, lam=problem.lam, n_particles=64, num_steps=10,
                            seed=seed, **options)
            w = res.log_weights.exp()
            means.append((w[:, None] * res.samples.double()).sum(0))
        means = torch.stack(means)
        return means.mean(0), means.std(0) / math.sqrt(len(means))

    mean, standard_error = pooled(method, options)
    tolerance = 4 * standard_error + 0.35 * std
    assert ((mean - exact).abs() <= tolerance).all(), (mean.tolist(), exact.tolist(), tolerance.tolist())
    base_mean, _ = pooled("base", {})
    assert ((base_mean - exact).abs() > tolerance).any(), "the check cannot tell the base sampler from the target"


# --- 5. rules derived from the documentation -------------------------------------------------------

def test_killed_clones_get_the_survivors_mean_weight():
    """loop.rebirth_killed: "The copy gets the survivors' mean weight". SMC that never resamples
    (ess_threshold = 0) keeps non-uniform weights; at the kill step a clone and its parent get the
    same increment, so weight(clone) − weight(parent) after that step must be
    log mean_{survivors} w − log w(parent), both read before the kill."""
    recorder = Recorder()
    rows = KILLS["rows"]
    with pytest.warns(NonFiniteDenoiserWarning):
        res = run("smc", NaNRows(**KILLS), ess_threshold=0.0, nonfinite_denoiser="kill", callback=recorder)
    before, after = recorder.log_weight[5], recorder.log_weight[4]  # entering step 4, after it
    assert float(before.max() - before.min()) > 0.1, "the weights must differ for the rule to bite"
    parents = res.lineage.parents[res.lineage.steps.index(4)]
    dead = torch.zeros(before.numel(), dtype=torch.bool)
    dead[list(rows)] = True
    assert torch.equal(parents != torch.arange(before.numel()), dead)
    survivors = before[~dead]
    mean_log_w = torch.logsumexp(survivors, 0) - math.log(survivors.numel())
    for slot in rows:
        parent = int(parents[slot])
        assert float(after[slot] - after[parent]) == pytest.approx(float(mean_log_w - before[parent]), abs=1e-9)


@pytest.mark.parametrize("potential", ["diff", "level"])
def test_fvd_final_selection_weighs_r_x0(potential):
    """FVD's final birth–death selects on ℓ = κ(λ r(x0) − λ_prev r_prev) ("diff") or κ λ r(x0)
    ("level"). With the window closing at mid-trajectory, r_prev (the reward at the last selection,
    carried by each slot) is far from r(x0): the final ESS must be that of this ℓ, and particles die."""
    lam = 2.0
    kw = dict(n_particles=64, num_steps=10, seed=3, lam=lam, selection_end=0.5, potential=potential)
    recorder = Recorder()
    unselected = run("fvd", final_selection=False, callback=recorder, **kw)  # the same population before it
    selected = run("fvd", **kw)
    r_prev = recorder.reward[1]
    ell = lam * unselected.rewards - (lam * r_prev if potential == "diff" else 0.0)
    assert selected.extras["final_kappa"] == 1.0
    assert selected.extras["final_ess"] == pytest.approx(selection.ess(ell), rel=1e-9)
    assert selected.extras["final_dead_fraction"] > 0.05
    assert selected.rewards.mean() > unselected.rewards.mean()


@pytest.mark.parametrize("interval", [1, 2])
def test_fvd_controller_follows_robbins_monro(interval):
    """log κ_{j+1} = clip(log κ_j + γ_0 j^−0.6 (α* − dead_j), ±MAX_LOG_KAPPA), κ_1 = 1 (FVDConfig:
    "controller_gain: γ_0 of the Robbins–Monro step γ_j = γ_0 / j^0.6"), recomputed from the trace:
    every row reports the κ in force, every selection row its deaths; the last κ is the final one."""
    target, gain = 0.3, 2.0
    res = run("fvd", n_particles=64, num_steps=10, target_dead_fraction=target, controller_gain=gain,
              selection_interval=interval)
    log_kappa, selections = 0.0, 0
    for row in res.trace:
        assert row.kappa == pytest.approx(math.exp(log_kappa), rel=1e-9), f"step k={row.step}"
        if row.selected:
            selections += 1
            step = gain / selections**0.6 * (target - row.dead_fraction)
            log_kappa = min(max(log_kappa + step, -MAX_LOG_KAPPA), MAX_LOG_KAPPA)
    assert selections == len(range(0, 10, interval))
    assert res.extras["final_kappa"] == pytest.approx(math.exp(log_kappa), rel=1e-9)
    assert abs(log_kappa) > 0.05, "the controller must have moved for the check to bite"


# --- resampling schemes --------------------------------------------------------------------------

SKEWED = torch.tensor([0.3, -1.2, 2.0, 0.0, -0.5, 1.1, -math.inf, -2.5], dtype=torch.float64)
UNIFORM = torch.zeros(8, dtype=torch.float64)
SCHEME_REPS = 4000


def check_scheme_conforms(scheme, **options) -> None:
    """A registered scheme over many independent populations (rows): ancestors long and in range,
    ``reborn`` exactly the slots whose ancestor is another particle, every copied particle keeps its
    own slot (the stable arrangement the engine's in-place copy relies on), zero weights never
    chosen, N offspring per row, E[offspring_i] = N·W_i within 5 standard errors, reproducible."""
    for log_w in (SKEWED, UNIFORM):
        size = log_w.numel()
        batch = log_w.expand(SCHEME_REPS, size)
        out = scheme(batch, torch.Generator().manual_seed(0), **options)
        ancestors, reborn = out.ancestors, out.reborn
        assert ancestors.dtype == torch.long and ancestors.shape == batch.shape, "ancestors: long [..., N]"
        assert bool(((ancestors >= 0) & (ancestors < size)).all()), "ancestors out of range"
        assert reborn.dtype == torch.bool and torch.equal(reborn, ancestors != torch.arange(size)), "reborn mask"
        assert torch.equal(ancestors.gather(-1, ancestors), ancestors), "a copied particle lost its own slot"
        counts = torch.zeros_like(ancestors).scatter_add_(-1, ancestors, torch.ones_like(ancestors)).double()
        assert not bool(counts[:, torch.isneginf(log_w)].any()), "a zero-weight particle was chosen"
        expected = size * torch.softmax(log_w, dim=0)
        error = (counts.mean(0) - expected).abs()
        assert bool((error <= 5 * counts.std(0) / math.sqrt(SCHEME_REPS) + 1e-3).all()), f"biased: {error.tolist()}"
        again = scheme(batch, torch.Generator().manual_seed(0), **options)
        assert torch.equal(again.ancestors, ancestors), "not reproducible from the generator"


@pytest.mark.parametrize("name", list(selection.SCHEMES))
def test_every_registered_scheme_conforms(name):
    check_scheme_conforms(selection.get_scheme(name))


@pytest.mark.parametrize("parent_rule", PARENT_RULES)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_fleming_viot_conforms_for_every_parent_rule_and_allocation(parent_rule, allocation):
    check_scheme_conforms(selection.get_scheme("fleming_viot"), parent_rule=parent_rule, allocation=allocation)


def _tempered(log_w, generator, checked=True):
    """Broken: resamples on W^0.5 (a flatter law): offspring counts are biased towards N·W^0.5."""
    return selection.multinomial(0.5 * log_w, generator, checked=checked)


def _unmasked(log_w, generator, checked=True):
    """Broken: the right ancestors, but no slot marked reborn (the in-place copy would skip them)."""
    out = selection.systematic(log_w, generator, checked=checked)
    return selection.Selection(ancestors=out.ancestors, reborn=torch.zeros_like(out.reborn))


def _sorted(log_w, generator, checked=True):
    """Broken: unbiased counts, but ancestors sorted, so copied particles leave their own slots."""
    out = selection.multinomial(log_w, generator, checked=checked)
    ancestors = out.ancestors.sort(dim=-1).values
    return selection.Selection(ancestors=ancestors, reborn=ancestors != torch.arange(ancestors.shape[-1]))


@pytest.mark.parametrize("broken", [_tempered, _unmasked, _sorted], ids=lambda f: f.__name__.strip("_"))
def test_a_broken_scheme_in_the_registry_is_rejected(monkeypatch, broken):
    monkeypatch.setitem(selection.SCHEMES, "planted", broken)
    for name in selection.SCHEMES:  # the generic check over the whole registry
        if name == "planted":
            with pytest.raises(AssertionError):
                check_scheme_conforms(selection.get_scheme(name))
        else:
            check_scheme_conforms(selection.get_scheme(name))
