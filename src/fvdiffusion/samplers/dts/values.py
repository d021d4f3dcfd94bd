"""The values of the search tree: soft values from the rollouts' returns, and the choice probabilities.

Soft values are consistent estimates of V(s) = (1/λ) log E_{p(x0|s)}[exp(λ r(x0))]. With
Boltzmann descent (dts) every rollout's return is importance weighted (:class:`SoftMean`,
:meth:`TreeValues.backup`); dts* and λ = inf keep the nested backup (:meth:`TreeValues.backup_nested`).
Rollouts select children by :meth:`TreeValues.search_probabilities`, the final descents by
:meth:`TreeValues.descent_probabilities` (see the package docstring for why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fvdiffusion.candidates import choice_probabilities
from fvdiffusion.potentials import refuse_overflow, tilt
from fvdiffusion.samplers.dts.tree import SearchTree

SEARCH = " in the tree search"  # where a λ overflow happened, for its error message


def _log_add_at(acc: Tensor, index: Tensor, log_terms: Tensor) -> None:
    """acc[index[j]] = log(exp(acc[index[j]]) + exp(log_terms[j])) in place, repeated indices summed, stably."""
    nodes, inverse = index.unique(return_inverse=True)
    local = acc[nodes]
    peak = local.scatter_reduce(0, inverse, log_terms, reduce="amax", include_self=True)
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # nothing yet: stays −inf
    total = (local - shift).exp().index_add(0, inverse, (log_terms - shift[inverse]).exp())
    acc[nodes] = shift + total.log()


@dataclass(frozen=True)
class SoftMean:
    """V(s) from the weighted returns of the rollouts through s: the soft mean (1/λ) log mean w·exp(λ r).

    The accumulator is log Σ w·exp(λ r) for λ > 0 and Σ w·r for λ = 0 (the limit: V = mean w·r).
    """

    lam: float

    @property
    def empty(self) -> float:
        return -math.inf if self.lam > 0 else 0.0

    def accumulate(self, acc: Tensor, index: Tensor, log_weight: Tensor, reward: Tensor) -> None:
        if self.lam > 0:
            tilted = tilt(self.lam, reward, SEARCH)
            terms = refuse_overflow(log_weight + tilted, log_weight, tilted, lam=self.lam, where=SEARCH)
            _log_add_at(acc, index, terms)
        else:  # a worthless leaf (r = −inf) makes the mean −inf, as it would with λ > 0 in the limit
            acc.index_add_(0, index, torch.where(torch.isneginf(reward), reward, log_weight.exp() * reward))

    def value(self, acc: Tensor, visits: Tensor) -> Tensor:
        if self.lam > 0:
            return (acc - visits.log()) / self.lam
        return acc / visits


class TreeValues:
    """How the search values its tree: the backup after each batch of rollouts, and the probabilities
    with which rollouts (search) and final descents choose among a node's children."""

    def __init__(self, lam: float, greedy: bool, explore: float) -> None:
        self.lam, self.greedy, self.explore = lam, greedy, explore
        self.soft_mean = SoftMean(lam)
        # Boltzmann descent gives every child positive probability, so returns can be importance
        # weighted; argmax descent (dts*, λ = inf) cannot be, and keeps the nested backup
        self.weighted = not (greedy or math.isinf(lam))

    # --- choosing children ------------------------------------------------------------
    def search_probabilities(self, tree: SearchTree, nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(children [n, C], which exist, probability that a rollout selects each).

        softmax(λ V) (argmax for dts*), mixed with a uniform pick (weight ``explore``) when the
        returns are importance weighted: every child keeps being revisited, so its estimate
        converges however unlucky its first leaf was, and no weight exceeds 1 / explore per level.
        """
        kids, exists, values = tree.child_table(nodes)
        probs = choice_probabilities(values, exists, self.lam, self.greedy, SEARCH)
        if self.weighted and self.explore > 0:
            uniform = exists.to(probs.dtype) / exists.sum(dim=1, keepdim=True)
            probs = (1 - self.explore) * probs + self.explore * uniform
        return kids, exists, probs

    def descent_probabilities(self, tree: SearchTree, nodes: Tensor) -> tuple[Tensor, Tensor]:
        """(children [n, C], probability that a final descent takes each).

        Weighted returns: each child's share of the importance mass, so a descent ends at a leaf
        with probability ∝ the summed importance weights w·exp(λ r) of the rollouts that reached
        it (self-normalised importance sampling over all rollouts). Otherwise softmax(λ V) / argmax.
        """
        kids, exists, values = tree.child_table(nodes)
        if self.weighted:
            return kids, choice_probabilities(tree.log_mass[kids], exists, 1.0)
        return kids, choice_probabilities(values, exists, self.lam, self.greedy, SEARCH)

    # --- backups ----------------------------------------------------------------------
    def backup(self, tree: SearchTree, leaves: list[int], paths: list[list[int]], log_ratios: list[Tensor]) -> None:
        """Add each rollout's importance-weighted return to every node it passed, then refresh V there.

        ``leaves``: the leaf each rollout of the batch reached; ``paths``: its node at each depth
        passed; ``log_ratios``: per depth, log[(1/n) / P(the child taken)] of each rollout (0 for a
        new child).

        A rollout's return seen from node s is exp(λ r) · w, w = Π 1 / (n_d · P_d) over the choices
        it made below s among n_d existing children with search probability P_d (a new child is a
        base-kernel draw and needs no weight). Given the tree before the batch, w·exp(λ r) is an
        unbiased estimate of the uniform-over-children value that the nested backup
        (1/λ) log mean_c exp(λ V(c)) estimates, whatever routed the rollout. The nested mean is not:
        rollouts refine the children whose first estimates were high (which then regress to the
        mean) and leave the others at their low first estimates, so it drifts low as rollouts grow.
        """
        est = self.soft_mean
        leaf_ids = torch.tensor(leaves)
        reward = tree.value[leaf_ids]  # the leaf's potential: its reward, −inf if not finite
        log_weight = torch.zeros(len(leaf_ids), dtype=torch.float64)
        for nodes, log_ratio in zip(reversed(paths), reversed(log_ratios)):
            log_weight = log_weight + log_ratio  # the choice made at this depth weighs the return from here up
            est.accumulate(tree.returns, torch.tensor(nodes), log_weight, reward)
        # from the root, w·exp(λ r) is the rollout's importance weight for the final descents
        lam, worthless = self.lam, torch.isneginf(reward)
        tilted = torch.where(worthless, reward, tilt(lam, reward, SEARCH))
        log_mass = torch.where(worthless, reward, refuse_overflow(log_weight + tilted, log_weight, tilted, lam=lam,
                                                                  where=SEARCH))
        passed = torch.cat([torch.tensor(nodes) for nodes in paths] + [leaf_ids])
        _log_add_at(tree.log_mass, passed, log_mass.repeat(len(paths) + 1))
        # long even when empty: at K = 1 a rollout goes straight from the root to a leaf (no inner node)
        inner = torch.tensor(sorted({node for nodes in paths for node in nodes}), dtype=torch.long)
        visits = torch.tensor([tree.visits[i] for i in inner.tolist()], dtype=torch.float64)
        tree.value[inner] = est.value(tree.returns[inner], visits)

    def backup_nested(self, tree: SearchTree, nodes: Tensor) -> None:
        """V(s) = (1/λ) log mean_c exp(λ V(c)) over existing children (max at λ = inf), for argmax descent."""
        _, exists, values = tree.child_table(nodes)
        values = torch.where(exists, values, torch.full_like(values, -math.inf))
        lam = self.lam
        count = exists.sum(dim=1).to(torch.float64)
        if math.isinf(lam):
            v = values.max(dim=1).values
        elif lam == 0:
            v = torch.where(exists, values, torch.zeros_like(values)).sum(dim=1) / count
        else:
            v = (torch.logsumexp(tilt(lam, values, SEARCH), dim=1) - count.log()) / lam
        tree.value[nodes] = v

    # --- reading the tree -------------------------------------------------------------
    def expected_descent_reward(self, tree: SearchTree, leaf_depth: int) -> float:
        """E[r] of one final descent under the current tree, computed exactly (no sampling, no calls)."""
        n = tree.n_nodes
        depth = tree.depth[:n]
        expected = tree.reward[:n].clone()
        for d in range(leaf_depth - 1, -1, -1):
            nodes = torch.nonzero(depth == d).flatten()
            kids, probs = self.descent_probabilities(tree, nodes)
            terms = torch.where(probs > 0, probs * expected[kids], torch.zeros_like(probs))
            expected[nodes] = terms.sum(dim=1)
        return float(expected[0])
