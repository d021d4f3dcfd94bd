"""Selection schemes: pure functions from log-weights to ancestor indices.

Every scheme takes unnormalised log-weights ℓ [N] (float32 or float64; −inf means zero
weight) and a ``torch.Generator``, and returns a :class:`Selection`: slot i of the next
population takes the state of particle ``ancestors[i]``. Every scheme is unbiased: the
expected number of offspring of particle i is N·W_i with W = softmax(ℓ).

Leading dimensions are independent populations: ℓ [..., N] gives ancestors [..., N],
each row indexing into its own row. This lets several populations (one per prompt, or
many repetitions in a test) be selected in one call.

Work is done in float64 on the generator's device, so a result depends only on the
weights and the generator state, not on where the particles live.

Every scheme validates its input (NaN, +inf, all −inf) unless called with ``checked=False``:
the engine cleans potentials before selecting and passes ``checked=False`` so that selection
never reads a device tensor on the host (no synchronisation in the step loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

PARENT_RULES = ("excess", "weighted")
# How a Fleming–Viot step hands its dead slots to parents: i.i.d. draws, or one shared offset
# (each parent gets ⌊D·m_j/M⌋ or ⌈D·m_j/M⌉ of the D dead). Residual-systematic (whole shares,
# then a shared offset over the fractions) gives exactly the systematic counts, so it is not
# a separate option: ⌈S_j − U⌉ = Σ_{i≤j} ⌊s_i⌋ + ⌈F_j − U⌉ for cumulative shares S and fractions F.
ALLOCATIONS = ("multinomial", "systematic")


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection step.

    ``ancestors[..., i]`` is the particle whose state slot i takes; ``reborn[..., i]`` is
    True iff slot i was overwritten by a copy of another particle (``ancestors != i``).
    """

    ancestors: Tensor  # long [..., N]
    reborn: Tensor  # bool [..., N]


def normalize(log_w: Tensor, checked: bool = True) -> Tensor:
    """Log-softmax over the last dimension (computed in float64, returned in the input dtype)."""
    ell = _validated(log_w, log_w.device, checked)
    return (ell - torch.logsumexp(ell, dim=-1, keepdim=True)).to(log_w.dtype)


def ess(log_w: Tensor) -> float:
    """Effective sample size of one population [N] as a fraction of N: (Σw)² / Σw² / N, in (0, 1]."""
    return float(ess_tensor(log_w))


def ess_tensor(log_w: Tensor, checked: bool = True) -> Tensor:
    """:func:`ess` as a float64 0-dim tensor on log_w's device (nothing is read on the host)."""
    if isinstance(log_w, Tensor) and log_w.ndim != 1:
        raise ValueError(f"log_w: ess takes one population [N], got shape {tuple(log_w.shape)}")
    w = _relative_weights(log_w, log_w.device, checked)
    return w.sum() ** 2 / (w * w).sum() / w.numel()


def offspring_to_ancestors(counts: Tensor, checked: bool = True) -> Tensor:
    """Ancestor indices [..., N] for offspring counts [..., N], in the stable arrangement.

    Every particle with at least one offspring keeps its own slot for one copy; its extra
    copies fill, in index order, the slots of particles with no offspring. Slots change
    only where they must, so ``ancestors != arange(N)`` marks exactly the replaced ones.
    Fixed shapes throughout (no host read): the j-th empty slot of a row takes the particle
    whose extra copies cover position j of the row's running total of extra copies.
    """
    if counts.ndim < 1 or counts.dtype != torch.long:
        raise ValueError(f"counts: expected a long tensor [..., N], got shape {tuple(counts.shape)} and dtype {counts.dtype}")
    size = counts.shape[-1]
    if checked and (bool((counts < 0).any()) or bool((counts.sum(-1) != size).any())):
        raise ValueError(f"counts: expected non-negative counts summing to N = {size} in every row")
    own = torch.arange(size, device=counts.device).expand(counts.shape)
    empty = counts == 0
    extra_total = torch.cumsum((counts - 1).clamp(min=0), dim=-1)
    # Per row Σ extra copies = #(empty slots), so every empty slot's rank has a donor.
    empty_rank = torch.cumsum(empty.long(), dim=-1) - 1
    donors = torch.searchsorted(extra_total, empty_rank.clamp(min=0), right=True).clamp(max=size - 1)
    return torch.where(empty, donors, own)


def multinomial(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Selection:
    """N independent draws from W."""
    n = _expected_offspring(log_w, generator, checked)
    size = n.shape[-1]
    positions = _uniform(n.shape, generator) * size
    return _from_counts(_counts_at(n, positions), log_w.device, checked)


def systematic(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Selection:
    """One uniform offset shared by N evenly spaced points: each count is ⌊N·W_i⌋ or ⌈N·W_i⌉."""
    n = _expected_offspring(log_w, generator, checked)
    offset = _uniform((*n.shape[:-1], 1), generator)
    return _from_counts(_counts_at(n, _grid_like(n) + offset), log_w.device, checked)


def stratified(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Selection:
    """One independent uniform point in each of N equal strata."""
    n = _expected_offspring(log_w, generator, checked)
    return _from_counts(_counts_at(n, _grid_like(n) + _uniform(n.shape, generator)), log_w.device, checked)


def residual(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Selection:
    """⌊N·W_i⌋ copies of each particle, the remaining slots by multinomial draws on the fractions."""
    n = _expected_offspring(log_w, generator, checked)
    whole = torch.floor(n)
    counts = whole.long()
    remaining = n.shape[-1] - counts.sum(-1, keepdim=True)
    fractions = n - whole
    # Draw N per row (a fixed amount of randomness) and use the first `remaining`.
    positions = _uniform(n.shape, generator) * fractions.sum(-1, keepdim=True)
    used = _grid_like(n) < remaining
    return _from_counts(counts + _counts_at(fractions, positions, used), log_w.device, checked)


def fleming_viot(log_w: Tensor, generator: torch.Generator, parent_rule: str = "excess",
                 allocation: str = "multinomial", checked: bool = True) -> Selection:
    """Independent survival, then rebirth of every dead slot as a copy of a parent.

    With n = N·W: parent rule "excess" (default) keeps particle i with probability
    min(1, n_i) and gives parents the birth mass m_j = (n_j − 1)_+, which yields
    E[offspring_j] = n_j with the fewest deaths of any unbiased scheme (expected deaths
    N·TV(W, uniform)). Parent rule "weighted" keeps i with probability exp(ℓ_i − max ℓ) and
    uses m = n: also unbiased, but kills more. Surviving particles keep their own slot.

    Survival is always independent across particles (the method's defining property); only
    the D dead slots are shared out over the birth mass M = Σ m, by ``allocation``:
    "multinomial" — D i.i.d. draws ∝ m; "systematic" — D evenly spaced points with one shared
    offset, so parent j gets ⌊D·m_j/M⌋ or ⌈D·m_j/M⌉ births (the same counts as
    residual-systematic). Given D each parent's expected births are D·m_j/M and E[D] = M
    (the mass is fixed by the weights), so every allocation keeps E[offspring_j] = n_j.
    """
    if parent_rule not in PARENT_RULES:
        raise ValueError(f"parent_rule: unknown value {parent_rule!r}; expected one of {', '.join(PARENT_RULES)}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation: unknown value {allocation!r}; expected one of {', '.join(ALLOCATIONS)}")
    relative = _relative_weights(log_w, _device_of(generator), checked)
    size = relative.shape[-1]
    n = size * relative / relative.sum(-1, keepdim=True)
    survival = n.clamp(max=1.0) if parent_rule == "excess" else relative
    alive = _uniform(n.shape, generator) < survival
    counts = alive.long()
    num_dead = size - counts.sum(-1, keepdim=True)
    births = _allocate(_birth_mass(n, parent_rule), num_dead, allocation, generator)
    return _from_counts(counts + births, log_w.device, checked)


def _allocate(mass: Tensor, num_dead: Tensor, allocation: str, generator: torch.Generator) -> Tensor:
    """Births per parent [..., N] for ``num_dead`` [..., 1] dead slots over the birth ``mass``.

    Every allocation draws N uniforms per row whatever D is (a fixed amount of randomness), so
    the generator's stream after a selection does not depend on how many died."""
    uniforms = _uniform(mass.shape, generator)
    total = mass.sum(-1, keepdim=True)
    grid = _grid_like(mass)
    if allocation == "multinomial":
        return _counts_at(mass, uniforms * total, grid < num_dead)
    # D points (j + U)·M/D, j < D: one offset shared by the row's dead slots
    positions = (grid + uniforms[..., :1]) * total / num_dead.to(mass.dtype).clamp(min=1.0)
    return _counts_at(mass, positions, grid < num_dead)


def offspring_variance(log_w: Tensor, ancestors: Tensor) -> Tensor:
    """Mean over particles of (O_i − N·W_i)², the realised offspring-count noise of one selection.

    ``ancestors`` [..., N] from a scheme applied to ``log_w`` [..., N]; returns [...] float64 on
    the ancestors' device (no host read). Multinomial resampling has E = Σ n_i(1 − n_i/N)/N;
    the low-variance schemes are far below it."""
    counts = torch.zeros(ancestors.shape, dtype=torch.float64, device=ancestors.device)
    counts = counts.scatter_add_(-1, ancestors, torch.ones_like(counts))
    relative = _relative_weights(log_w, ancestors.device, checked=False)
    n = relative.shape[-1] * relative / relative.sum(-1, keepdim=True)
    return ((counts - n) ** 2).mean(-1)


def killing(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Selection:
    """Fleming–Viot with the "weighted" parent rule: survival exp(ℓ_i − max ℓ), parents ∝ W."""
    return fleming_viot(log_w, generator, parent_rule="weighted", checked=checked)


SCHEMES: dict[str, Callable[..., Selection]] = {
    "multinomial": multinomial,
    "systematic": systematic,
    "stratified": stratified,
    "residual": residual,
    "fleming_viot": fleming_viot,
    "killing": killing,
}


def rebirth_dead(log_w: Tensor, dead: Tensor, generator: torch.Generator) -> Selection:
    """The kill path's rule: every live particle keeps its slot; each dead slot is reborn as a copy of
    a live particle drawn i.i.d. ∝ its weight (uniformly when every live weight is −inf).

    Not a resampling scheme (a live particle always survives, so E[O_i] ≠ N·W_i): it replaces
    particles whose denoiser output was not finite, for every method (the driver and svdd)."""
    alive = ~dead
    live_log_w = log_w[alive]
    if bool(torch.isneginf(live_log_w).all()):
        live_log_w = torch.zeros_like(live_log_w)
    parents = torch.multinomial(torch.softmax(live_log_w, dim=0), int(dead.sum()), replacement=True,
                                generator=generator)
    ancestors = torch.arange(log_w.numel(), device=dead.device)
    ancestors[dead] = torch.nonzero(alive).flatten()[parents.to(dead.device)]
    return Selection(ancestors=ancestors, reborn=dead.clone())


# Rules for replacing killed particles (a registry of its own: they are not resampling schemes).
REBIRTH_RULES: dict[str, Callable[..., Selection]] = {"weighted": rebirth_dead}


def get_scheme(name: str) -> Callable[..., Selection]:
    """The selection function registered under ``name``."""
    if name not in SCHEMES:
        raise ValueError(f"scheme: unknown value {name!r}; expected one of {', '.join(SCHEMES)}")
    return SCHEMES[name]


def _birth_mass(n: Tensor, parent_rule: str) -> Tensor:
    """Unnormalised parent probabilities for dead slots, given expected offspring n [..., N]."""
    if parent_rule == "weighted":
        return n
    excess = (n - 1.0).clamp(min=0.0)
    # A row whose every n_j ≤ 1 can still lose a particle: exactly, Σn = N would force
    # every n_j = 1 and no deaths, so this happens only when rounding puts some n_j a hair
    # below 1. Both that deficit and the excess that should pay for it are rounding error;
    # drawing ∝ W there keeps the step well defined (no 0/0, no NaN) at a bias of rounding size.
    return torch.where(excess.sum(-1, keepdim=True) > 0, excess, n)


def _validated(log_w: Tensor, device: torch.device, checked: bool = True) -> Tensor:
    """``log_w`` as float64 on ``device`` after checking it is a usable weight tensor.

    The value checks read the tensor on the host; ``checked=False`` skips them (the caller
    guarantees finite-or-−inf entries and at least one finite entry per row)."""
    if not isinstance(log_w, Tensor) or log_w.ndim == 0 or log_w.numel() == 0:
        shape = tuple(log_w.shape) if isinstance(log_w, Tensor) else type(log_w).__name__
        raise ValueError(f"log_w: expected a non-empty tensor [..., N], got {shape}")
    if not log_w.is_floating_point():
        raise ValueError(f"log_w: expected a floating-point tensor, got dtype {log_w.dtype}")
    ell = log_w.detach().to(device=device, dtype=torch.float64)
    if not checked:
        return ell
    if bool(torch.isnan(ell).any()):
        raise ValueError("log_w: contains NaN; map invalid rewards to -inf before selection")
    if bool((ell == float("inf")).any()):
        raise ValueError("log_w: contains +inf; log-weights must be finite or -inf")
    if bool((ell == float("-inf")).all(-1).any()):
        raise ValueError("log_w: every entry of a population is -inf (all weights zero); nothing to select from")
    return ell


def _relative_weights(log_w: Tensor, device: torch.device, checked: bool = True) -> Tensor:
    """exp(ℓ − max ℓ) per row in float64: the largest weight is exactly 1, −inf gives exactly 0."""
    ell = _validated(log_w, device, checked)
    return torch.exp(ell - ell.amax(-1, keepdim=True))


def _expected_offspring(log_w: Tensor, generator: torch.Generator, checked: bool = True) -> Tensor:
    """n = N·W per row, in float64 on the generator's device."""
    relative = _relative_weights(log_w, _device_of(generator), checked)
    # N·w/Σw rather than N·softmax: equal weights then give exactly n_i = 1.
    return relative.shape[-1] * relative / relative.sum(-1, keepdim=True)


def _counts_at(mass: Tensor, positions: Tensor, used: Tensor | None = None) -> Tensor:
    """Offspring counts from inverse-CDF lookups: position u selects j with C_{j−1} ≤ u < C_j.

    A particle with zero mass owns an empty interval and is never selected; a position at
    or past the row total (reachable only through rounding) goes to the last particle with
    mass. Positions where ``used`` is False are not counted.
    """
    cdf = torch.cumsum(mass, dim=-1)
    index = torch.searchsorted(cdf, positions.contiguous(), right=True)
    grid = torch.arange(mass.shape[-1], device=mass.device)
    last_with_mass = torch.where(mass > 0, grid, 0).amax(-1, keepdim=True)
    index = torch.minimum(index, last_with_mass)
    weight = torch.ones_like(index) if used is None else used.long()
    return torch.zeros(mass.shape, dtype=torch.long, device=mass.device).scatter_add_(-1, index, weight)


def _from_counts(counts: Tensor, device: torch.device, checked: bool = True) -> Selection:
    ancestors = offspring_to_ancestors(counts, checked).to(device)
    return Selection(ancestors=ancestors, reborn=ancestors != torch.arange(ancestors.shape[-1], device=device))


def _grid_like(n: Tensor) -> Tensor:
    """0, 1, …, N−1 as float64 on n's device, broadcastable against n."""
    return torch.arange(n.shape[-1], dtype=torch.float64, device=n.device)


def _uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=_device_of(generator))


def _device_of(generator: torch.Generator) -> torch.device:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    return generator.device
