"""Where λ meets a reward: every log-potential the particle methods use, in one place.

A potential is a float64 tensor [N] of log G values. Non-finite values mean "this particle
dies" (−inf); a finite λ so large that λ·r overflows float64 is refused with a ConfigError
naming lam, because silently turning every potential into ±inf would make the run equal
λ = 0. Overflow checks go through :class:`fvdiffusion.checks.HostChecks`, so on an
accelerator they cost no host synchronisation (they are resolved after the loop).

Potentials (k counts steps down; r_k = r(x̂0) at step k):
  level  ℓ_k = λ r_k
  diff   ℓ_k = λ r_k − λ_prev r_prev   (the tilt added since the last selection; telescopes)
  max    ℓ_k = λ max_{s ≥ k} r_s
  sum    ℓ_k = λ Σ_{s ≥ k} r_s
  rt     ℓ_k = λ r_k                   (SMC's increment with no memory: FK steering's "rt")
and the terminal correction that makes SMC's weighted population target p·exp(λ r(x0)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fvdiffusion.checks import HostChecks
from fvdiffusion.errors import ConfigError

FINAL = " on the final samples"


def at_step(k: int | None) -> str:
    """The ``where`` suffix of an error message for step k (None or 0: the final samples)."""
    return f" at step k={k}" if k else FINAL


def clean(log_potential: Tensor) -> tuple[Tensor, Tensor]:
    """NaN/±inf potentials become −inf (the particle dies); returns (clean, how many were bad) as tensors."""
    bad = ~torch.isfinite(log_potential)
    return torch.where(bad, torch.full_like(log_potential, -float("inf")), log_potential), bad.sum()


def refuse_overflow(result: Tensor, *inputs: Tensor, lam: float, where: str = "",
                    checks: HostChecks | None = None) -> Tensor:
    """``result`` (computed from ``inputs`` and λ) unless a row with finite inputs came out ±inf/NaN.

    That is float64 overflow of λ·r: with λ = 1e308 every potential was ±inf, so every particle
    "died" and the run silently equalled λ = 0. It is refused with an error naming lam — at once,
    or after the loop when ``checks`` defers (the message still names the step).
    """
    finite_inputs = torch.isfinite(inputs[0])
    for other in inputs[1:]:
        finite_inputs = finite_inputs & torch.isfinite(other)
    overflow = finite_inputs & ~torch.isfinite(result)

    def error(count: int, largest: float) -> ConfigError:
        return ConfigError(f"invalid lam={lam!r}: lam x reward overflows float64{where} for {count} "
                           f"of {overflow.numel()} finite values (largest input magnitude {largest:.3g}); "
                           f"use a smaller lam or rescale the reward")

    if checks is None or checks.eager:
        if bool(overflow.any()):
            raise error(int(overflow.sum()), max(float(value[finite_inputs].abs().max()) for value in inputs))
        return result
    # deferred: reduce to scalars on the device now, read them only if the check failed
    count = overflow.sum()
    largest = torch.stack([torch.where(finite_inputs, value.abs(), torch.zeros_like(value)).amax()
                           for value in inputs]).amax()
    checks.require(count > 0, lambda: error(int(count), float(largest)))
    return result


def tilt(lam: float, value: Tensor, where: str = "", checks: HostChecks | None = None) -> Tensor:
    """λ · value, with float64 overflow refused (see :func:`refuse_overflow`)."""
    return refuse_overflow(lam * value, value, lam=lam, where=where, checks=checks)


def add(total: Tensor, increment: Tensor, lam: float, where: str = "", checks: HostChecks | None = None) -> Tensor:
    """total + increment (log-weights or Σ log G), with overflow refused."""
    return refuse_overflow(total + increment, total, increment, lam=lam, where=where, checks=checks)


def selection_potential(kind: str, lam: float, reward: Tensor, lam_prev: float, r_prev: Tensor, where: str = "",
                        checks: HostChecks | None = None) -> Tensor:
    """FVD's potential: "level" λ r, or "diff" λ r − λ_prev r_prev (λ_prev = 0 before the first selection)."""
    if kind == "level":
        return tilt(lam, reward, where, checks)
    now, before = tilt(lam, reward, where, checks), tilt(lam_prev, r_prev, where, checks)
    return refuse_overflow(now - before, now, before, lam=lam, where=where, checks=checks)


@dataclass(frozen=True)
class Increment:
    """log G_k of one step and the per-particle statistics the potential carries to the next."""

    log_g: Tensor
    carried: dict[str, Tensor]


def smc_increment(kind: str, lam: float, aux: dict[str, Tensor], reward: Tensor, where: str = "",
                  checks: HostChecks | None = None) -> Increment:
    """log G_k for "diff" (λ(r_k − r_prev)), "max" (λ running max), "sum" (λ running sum) or "rt"
    (λ r_k, the current reward alone; the terminal correction removes what the lineage paid)."""
    if kind == "diff":
        prev = aux.get("r_prev", torch.zeros_like(reward))
        return Increment(tilt(lam, reward - prev, where, checks), {"r_prev": reward})
    if kind == "max":
        running = torch.maximum(aux.get("r_max", torch.full_like(reward, -float("inf"))), reward)
        return Increment(tilt(lam, running, where, checks), {"r_max": running})
    if kind == "sum":
        total = aux.get("r_sum", torch.zeros_like(reward)) + reward
        return Increment(tilt(lam, total, where, checks), {"r_sum": total})
    if kind == "rt":
        return Increment(tilt(lam, reward, where, checks), {})
    raise ValueError(f"potential: unknown value {kind!r}; expected diff, max, sum or rt")


def terminal_correction(lam: float, log_weight: Tensor, log_g_sum: Tensor, final_reward: Tensor,
                        checks: HostChecks | None = None) -> Tensor:
    """Weights for p·exp(λ r(x0)): current weights × exp(λ r(x0) − Σ log G along the lineage)."""
    tilted = tilt(lam, final_reward, FINAL, checks)
    corrected = refuse_overflow(log_weight + tilted - log_g_sum, log_weight, tilted, log_g_sum, lam=lam,
                                where=FINAL, checks=checks)
    return clean(corrected)[0]


def log_z_increment(log_w_before: Tensor, increment: Tensor) -> Tensor:
    """log Σ_i W̄_i G_i, one factor of the SMC estimate of the normalising constant (0-dim).

    W̄ are the normalised weights before the reweighting (uniform when every one is −inf, as the
    engine then continues), G_i = exp(increment_i); −inf terms contribute nothing. Summed over
    the steps and the final weighting it estimates log E_p[exp(λ r(x0))] for a population that is
    properly weighted between reweightings (docs/method.md, "log Z")."""
    base = torch.where(torch.isneginf(log_w_before).all(), torch.zeros_like(log_w_before), log_w_before)
    normalised = torch.log_softmax(base.to(torch.float64), dim=0)
    terms = normalised + increment.to(torch.float64)
    return torch.logsumexp(torch.where(torch.isnan(terms), torch.full_like(terms, -math.inf), terms), dim=0)
