"""The engine's contracts: lineage against the roots gathers carry, potentials against their
formulas, SMC's final correction against the exact linear tilt, the deferred (accelerator)
code path equal to the eager one, and no host read inside the step loop when deferred."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import fvdiffusion as fv
from fvdiffusion import potentials, selection
from fvdiffusion.denoisers.gaussian_mixture import mixture_cov, mixture_mean
from fvdiffusion.checks import HostChecks, force_eager
from fvdiffusion.errors import ConfigError, DenoiserError
from fvdiffusion.loop import DENOISER_RANGE, REWARD_RANGE, STEP_RANGE, auto_batch_rows
from fvdiffusion.population import gather, initial_state
from fvdiffusion.schedule import VPSchedule
from fvdiffusion.testbeds import toy_problem

from engine_golden_cases import CASES, run_case

SCHEDULE = VPSchedule.linear(1000)

LINEAGE_RUNS = [
    ("fvd", {}), ("fvd", {"eta": 0.0}), ("fvd", {"parent_rule": "weighted", "rebirth_noise": 0.3}),
    ("fvd", {"target_dead_fraction": 0.3, "potential": "level"}), ("fvd", {"rebirth": "langevin"}),
    ("smc", {}), ("smc", {"scheme": "systematic"}), ("smc", {"scheme": "residual", "potential": "max"}),
    ("smc", {"scheme": "stratified", "ess_threshold": 0.7}), ("smc", {"scheme": "killing", "potential": "sum"}),
    ("vasr", {}),
]


def _roots_after_each_step(method: str, options: dict, problem_name: str = "gmm2d-component", **size):
    problem = toy_problem(problem_name)
    roots: dict[int, torch.Tensor] = {}

    def keep_roots(event) -> None:
        roots[event.info.k] = event.state.root.clone()

    size = {"n_particles": 32, "num_steps": 10, "seed": 5, **size}
    res = fv.sample(method, problem.denoiser(SCHEDULE), problem.reward, lam=problem.lam, final_selection=False,
                    callback=keep_roots, **size, **options)
    return res, roots


@pytest.mark.parametrize("method,options", LINEAGE_RUNS)
def test_lineage_agrees_with_the_roots_every_gather_carried(method, options):
    """The population after step k is the one entering step k−1: following the lineage back to
    it and reading the root each particle carried must give the lineage's own step-K ancestor.
    Fails if the lineage forgets a record, if ancestors_at is wrong, or if a gather (or an
    in-place copy) does not move the root with the particle."""
    res, roots = _roots_after_each_step(method, options)
    steps = res.lineage.num_steps
    final_roots = res.lineage.ancestors_at(steps)
    assert torch.equal(roots[1], final_roots)
    for k in range(2, steps + 1):
        assert torch.equal(roots[k][res.lineage.ancestors_at(k - 1)], final_roots), f"after step k={k}"
    assert len(set(res.lineage.steps)) > 1, "these runs select, so the lineage must hold records"


def test_a_gather_moves_every_field_and_never_writes_the_source():
    """Roots, aux and the transition's history move with their particles; the old state is unchanged
    (the state is frozen: a selection builds a new one on every device)."""
    x = torch.arange(6.0).reshape(6, 1)
    history = {"x0_prev": x * 100, "order": torch.tensor([1.0, 0, 1, 0, 1, 0])}
    state = initial_state(x).with_aux(tag=torch.arange(6) * 10).with_history(history)
    before = {name: t.clone() for name, t in [("x", state.x), ("root", state.root), ("tag", state.aux["tag"]),
                                                ("x0_prev", state.history["x0_prev"])]}
    ancestors = torch.tensor([0, 0, 2, 2, 4, 0])  # slots 1, 3, 5 reborn, sources keep their own slot
    result = gather(state, ancestors)
    assert result.root.tolist() == ancestors.tolist()
    assert result.x.flatten().tolist() == ancestors.double().tolist()
    assert result.aux["tag"].tolist() == (ancestors * 10).tolist()
    assert result.history["x0_prev"].flatten().tolist() == (ancestors * 100).double().tolist()
    assert result.history["order"].tolist() == history["order"][ancestors].tolist()
    for name, tensor in [("x", state.x), ("root", state.root), ("tag", state.aux["tag"]),
                         ("x0_prev", state.history["x0_prev"])]:
        assert torch.equal(tensor, before[name]), f"the gather wrote into the source's {name}"


# --- potentials against their formulas --------------------------------------------------------

def test_smc_increments_follow_their_formulas_over_a_trajectory():
    lam = 0.7
    rewards = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), torch.tensor([3.0, -1.0, 0.0], dtype=torch.float64),
               torch.tensor([2.0, 4.0, -0.5], dtype=torch.float64)]
    for kind in ("diff", "max", "sum"):
        aux: dict = {}
        seen = []
        for r in rewards:
            inc = potentials.smc_increment(kind, lam, aux, r)
            seen.append(r)
            stacked = torch.stack(seen)
            expected = {"diff": lam * (r - (seen[-2] if len(seen) > 1 else 0.0)),
                        "max": lam * stacked.max(dim=0).values, "sum": lam * stacked.sum(dim=0)}[kind]
            assert torch.allclose(inc.log_g, expected, atol=1e-12), kind
            aux.update(inc.carried)


def test_selection_potentials_level_and_diff():
    r, r_prev = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 3.0], dtype=torch.float64)
    assert torch.equal(potentials.selection_potential("level", 2.0, r, 2.0, r_prev), 2.0 * r)
    diff = potentials.selection_potential("diff", 2.0, r, 1.5, r_prev)
    assert torch.allclose(diff, 2.0 * r - 1.5 * r_prev)


def test_terminal_correction_is_the_tilt_minus_what_the_lineage_already_paid():
    log_w = torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64)
    paid = torch.tensor([1.0, 0.5, -3.0], dtype=torch.float64)
    r0 = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    corrected = potentials.terminal_correction(0.5, log_w, paid, r0)
    assert torch.allclose(corrected, log_w + 0.5 * r0 - paid)
    nan_reward = potentials.terminal_correction(0.5, log_w, paid, torch.tensor([math.nan, 1.0, 1.0]).double())
    assert torch.isneginf(nan_reward[0]) and torch.isfinite(nan_reward[1:]).all()


@pytest.mark.parametrize("potential", ["diff", "max", "sum"])
def test_smc_weighted_population_hits_the_exact_linear_tilt(potential):
    """Without a final selection the weighted samples estimate E[x] under p·exp(λ r): only true
    if the final correction λ r(x0) − Σ log G is applied (dropping it biases max and sum by the
    whole path's reward, and diff by the last step's x̂0 error)."""
    problem = toy_problem("gmm2d-linear")
    res = fv.sample("smc", problem.denoiser(SCHEDULE), problem.reward, lam=problem.lam, n_particles=4096,
                    num_steps=20, seed=11, potential=potential, final_selection=False,
                    selection_start=0.0, selection_interval=4)
    w = res.log_weights.exp()
    mean = (w[:, None] * res.samples.double()).sum(0)
    exact = mixture_mean(problem.target).double()
    std = mixture_cov(problem.target).diagonal().sqrt().double()
    ess = 1.0 / (w * w).sum()
    # 6 standard errors of a weighted mean with this ESS, plus the 20-step sampler's own bias
    tolerance = 6 * std / ess.sqrt() + 0.08 * std
    assert ((mean - exact).abs() <= tolerance).all(), (potential, mean.tolist(), exact.tolist(), float(ess))


# --- the deferred (accelerator) code path -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_deferred_checks_give_the_same_run_as_eager(name):
    """force_eager(False) runs the code an accelerator runs (deferred checks, out-of-place
    gathers) on the CPU: it must draw the same numbers and give the same result."""
    eager = run_case(name)
    with force_eager(False):
        deferred = run_case(name)
    for key in eager:
        assert torch.equal(eager[key], deferred[key]), (name, key)


SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::unique", "aten::_unique",
            "aten::_unique2", "aten::unique_consecutive", "aten::masked_select", "aten::repeat_interleave")


def _host_reads_in_engine_steps(method: str, **options) -> list[str]:
    problem = toy_problem("gmm2d-linear")
    den = problem.denoiser(SCHEDULE)
    with force_eager(False), profile(activities=[ProfilerActivity.CPU]) as prof:
        fv.sample(method, den, problem.reward, lam=problem.lam, n_particles=64, num_steps=6, seed=0, **options)
    found = []
    for event in prof.events():
        if not event.name.startswith(SYNC_OPS):
            continue
        parent, inside_step = event.cpu_parent, False
        while parent is not None:
            if parent.name in (DENOISER_RANGE, REWARD_RANGE):  # the user's code, not the engine's
                inside_step = False
                break
            if parent.name == STEP_RANGE:
                inside_step = True
            parent = parent.cpu_parent
        if inside_step:
            found.append(event.name)
    return found


@pytest.mark.parametrize("method,options", [
    ("fvd", {}), ("fvd", {"eta": 0.0}), ("fvd", {"target_dead_fraction": 0.3}), ("fvd", {"parent_rule": "weighted"}),
    ("smc", {}), ("smc", {"scheme": "systematic", "potential": "max"}), ("vasr", {}), ("base", {}),
])
def test_no_host_read_inside_the_step_loop_when_deferred(method, options):
    assert _host_reads_in_engine_steps(method, **options) == []


def test_the_host_read_probe_sees_a_planted_sync(monkeypatch):
    """The probe above must be able to fail: a kernel that reads a weight on the host is caught."""
    from fvdiffusion.samplers import fvd

    original = fvd.FVDKernel.birth_death

    def reads_host(self, ctx, state, log_potential, k):
        float(log_potential.max())
        return original(self, ctx, state, log_potential, k)

    monkeypatch.setattr(fvd.FVDKernel, "birth_death", reads_host)
    assert "aten::_local_scalar_dense" in _host_reads_in_engine_steps("fvd") or \
        "aten::item" in _host_reads_in_engine_steps("fvd")


@pytest.mark.parametrize("method", ["smc", "vasr", "fvd"])
def test_deferred_lam_overflow_is_still_refused_naming_the_step(method):
    problem = toy_problem("gmm2d-component")
    den = problem.denoiser(SCHEDULE)
    with pytest.raises(ConfigError) as eager:
        fv.sample(method, den, problem.reward, lam=1e308, n_particles=8, num_steps=4, seed=0)
    with force_eager(False), pytest.raises(ConfigError) as deferred:
        fv.sample(method, den, problem.reward, lam=1e308, n_particles=8, num_steps=4, seed=0)
    assert "at step k=4" in str(eager.value)
    assert str(deferred.value) == str(eager.value)  # the same first failure, reported after the loop


def test_deferred_nan_denoiser_is_reported_at_its_first_step():
    problem = toy_problem("gmm2d-component")
    inner = problem.denoiser(SCHEDULE)

    class NaNFromStep2:
        schedule, prediction_type, sample_shape = inner.schedule, inner.prediction_type, inner.sample_shape

        def __call__(self, x, t, cond=None):
            out = inner(x, t, cond)
            return out * math.nan if int(t[0]) <= SCHEDULE.timesteps(5)[2] else out

    with force_eager(False), pytest.raises(DenoiserError, match=r"NaN/inf at step k=3 .*for 8 of 8 particles"):
        fv.sample("fvd", NaNFromStep2(), problem.reward, n_particles=8, num_steps=5, seed=0)


def test_host_checks_resolve_in_order_and_only_once():
    checks = HostChecks(eager=False)
    checks.require(torch.tensor(False), lambda: ValueError("never"))
    checks.require(torch.tensor(True), lambda: ValueError("first"))
    checks.require(torch.tensor(True), lambda: ValueError("second"))
    with pytest.raises(ValueError, match="first"):
        checks.resolve()
    checks.resolve()  # nothing left


def test_ess_tensor_matches_ess():
    log_w = torch.tensor([0.0, -1.0, -3.0, -math.inf], dtype=torch.float64)
    assert float(selection.ess_tensor(log_w)) == pytest.approx(selection.ess(log_w))


# --- micro-batching by default -------------------------------------------------------------------

def test_auto_batch_rows_fits_the_budget():
    assert auto_batch_rows(64, (2,), torch.device("cpu")) == 64  # tiny rows: the whole population
    rows = auto_batch_rows(4096, (1, 28, 28), torch.device("cpu"))
    assert 1 <= rows < 4096 and rows * 28 * 28 * 4 * 256 <= 512 * 2**20
    assert auto_batch_rows(4096, (4, 512, 512), torch.device("cpu")) >= 1


def test_default_batch_splits_big_populations_and_keeps_results():
    problem = toy_problem("gmm8d-linear")
    inner = problem.denoiser(SCHEDULE)
    calls = []

    class Counting:
        schedule, prediction_type, sample_shape = inner.schedule, inner.prediction_type, inner.sample_shape

        def __call__(self, x, t, cond=None):
            calls.append(x.shape[0])
            return inner(x, t, cond)

    import fvdiffusion.loop.context as loop_context

    whole = fv.sample("fvd", Counting(), problem.reward, lam=problem.lam, n_particles=64, num_steps=3, seed=1)
    assert calls == [64, 64, 64]
    calls.clear()
    old = loop_context.CPU_MEMORY_BUDGET
    loop_context.CPU_MEMORY_BUDGET = 8 * 4 * loop_context.ACTIVATION_FACTOR * 16  # 16 rows of 8 floats
    try:
        split = fv.sample("fvd", Counting(), problem.reward, lam=problem.lam, n_particles=64, num_steps=3, seed=1)
    finally:
        loop_context.CPU_MEMORY_BUDGET = old
    assert calls == [16] * 12
    assert torch.equal(whole.samples, split.samples)


def test_callback_observes_every_step_and_changes_nothing():
    problem = toy_problem("gmm2d-component")
    seen = []
    plain = fv.sample("fvd", problem.denoiser(SCHEDULE), problem.reward, n_particles=16, num_steps=6, seed=2)
    observed = fv.sample("fvd", problem.denoiser(SCHEDULE), problem.reward, n_particles=16, num_steps=6, seed=2,
                         callback=lambda event: seen.append((event.info.k, event.trace.dead_fraction)))
    assert [k for k, _ in seen] == [6, 5, 4, 3, 2, 1]
    assert all(isinstance(dead, float) for _, dead in seen)
    assert torch.equal(plain.samples, observed.samples)
    assert [row.as_dict() for row in plain.trace] == [row.as_dict() for row in observed.trace]


# --- the caller's grid and initial noise ---------------------------------------------------------

def test_a_given_grid_decides_the_timesteps():
    from fvdiffusion.schedule import StepGrid

    problem = toy_problem("gmm2d-component")
    den = problem.denoiser(SCHEDULE)
    grid = StepGrid.from_timesteps(SCHEDULE, [999, 749, 499, 249])
    res = fv.sample("fvd", den, problem.reward, n_particles=8, num_steps=4, seed=0, grid=grid)
    assert [row.t for row in res.trace] == [999, 749, 499, 249]
    assert grid[-1].alpha_bar_prev == 1.0 and grid[0].t_prev == 749
    with pytest.raises(ConfigError, match="grid"):
        fv.sample("fvd", den, problem.reward, n_particles=8, num_steps=5, seed=0, grid=grid)


@pytest.mark.parametrize("method", ["base", "svdd"])
def test_x_init_replaces_the_initial_noise(method):
    problem = toy_problem("gmm2d-component")
    den = problem.denoiser(SCHEDULE)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    first = []
    kwargs = dict(n_particles=8, num_steps=4, x_init=x, callback=lambda e: first.append(e.state.x0_hat.clone()))
    if method == "base":  # deterministic DDIM: the output depends on x_init only, not on the seed
        a = fv.sample("base", den, problem.reward, seed=0, eta=0.0, **kwargs)
        b = fv.sample("base", den, problem.reward, seed=1, eta=0.0, **kwargs)
        assert torch.equal(a.samples, b.samples)
        c = fv.sample("base", den, problem.reward, seed=0, eta=0.0, n_particles=8, num_steps=4)
        assert not torch.equal(a.samples, c.samples)
    else:
        fv.sample("svdd", den, problem.reward, seed=0, n_candidates=2, **kwargs)
    assert first  # the run used it; bad shapes are refused
    with pytest.raises(ConfigError, match="x_init"):
        fv.sample(method, den, problem.reward, n_particles=8, num_steps=4, x_init=torch.randn(3, 2))
