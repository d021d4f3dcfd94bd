"""The search tree's storage: one row per node, grown by doubling up to the node budget.

A node holds its denoiser prediction (x̂0, ε̂) — its state is x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂ — its
children (a fixed-width row, −1 = none), its soft value V, a leaf's reward, and the statistics
of the rollouts through it that the values are computed from (``fvdiffusion.samplers.dts.values``).
Tree statistics live on the host; x̂0 and ε̂ on the denoiser's device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fvdiffusion.schedule import Prediction

_INDEX_BYTES = 8  # long / float64 per-node fields and Python list slots


class SearchTree:
    """Node storage, grown by doubling up to the node budget (never beyond it)."""

    def __init__(self, sample_shape: tuple[int, ...], max_children: int, node_budget: int,
                 empty_return: float = -math.inf) -> None:
        self.sample_shape = sample_shape
        self.empty_return = empty_return
        self.max_children = max_children
        self.node_budget = node_budget
        self.n_nodes = 0
        self.x0_hat = torch.empty(0)
        self.eps_hat = torch.empty(0)
        self.children = torch.empty(0, max_children, dtype=torch.long)  # −1 = no child
        self.value = torch.empty(0, dtype=torch.float64)   # soft value V (leaf: reward, −inf if not finite)
        self.reward = torch.empty(0, dtype=torch.float64)  # leaf reward (NaN for inner nodes)
        # the rollouts through the node: sum of their returns weighted from the node (see SoftMean),
        # and log of the sum of their importance weights from the root (what the final descents follow)
        self.returns = torch.empty(0, dtype=torch.float64)
        self.log_mass = torch.empty(0, dtype=torch.float64)
        self.depth = torch.empty(0, dtype=torch.long)
        self.n_children: list[int] = []
        self.visits: list[int] = []

    @property
    def capacity(self) -> int:
        return self.value.numel()

    def bytes_per_node(self) -> int:
        """x̂0, ε̂, the children row, value, reward, returns, mass, depth, 2 list slots (children count, visits)."""
        numel = math.prod(self.sample_shape)
        return 2 * numel * self.x0_hat.element_size() + (self.max_children + 7) * _INDEX_BYTES

    def add(self, parents: list[int], pred: Prediction, depth: int) -> Tensor:
        """Store new nodes (one per row of ``pred``) as children of ``parents`` (−1: the root)."""
        count = pred.x0.shape[0]
        self._reserve(self.n_nodes + count, pred.x0)
        ids = torch.arange(self.n_nodes, self.n_nodes + count)
        dev_ids = ids.to(self.x0_hat.device)
        self.x0_hat[dev_ids] = pred.x0
        self.eps_hat[dev_ids] = pred.eps
        self.value[ids] = math.nan
        self.reward[ids] = math.nan
        self.returns[ids] = self.empty_return
        self.log_mass[ids] = -math.inf
        self.depth[ids] = depth
        linked = [(p, i) for p, i in zip(parents, ids.tolist()) if p >= 0]
        for p, i in linked:
            self.children[p, self.n_children[p]] = i
            self.n_children[p] += 1
        self.n_children.extend([0] * count)
        self.visits.extend([0] * count)
        self.n_nodes += count
        return ids

    def _reserve(self, needed: int, like: Tensor) -> None:
        if needed <= self.capacity:
            return
        if needed > self.node_budget:
            raise RuntimeError(f"tree would hold {needed} nodes, over node_budget={self.node_budget}")
        new_cap = min(self.node_budget, max(needed, 2 * self.capacity, 64))
        extra = new_cap - self.capacity
        self.x0_hat = torch.cat([self.x0_hat.reshape(-1, *self.sample_shape).to(like),
                                 like.new_empty((extra, *self.sample_shape))])
        self.eps_hat = torch.cat([self.eps_hat.reshape(-1, *self.sample_shape).to(like),
                                  like.new_empty((extra, *self.sample_shape))])
        self.children = torch.cat([self.children, torch.full((extra, self.max_children), -1, dtype=torch.long)])
        self.value = torch.cat([self.value, torch.empty(extra, dtype=torch.float64)])
        self.reward = torch.cat([self.reward, torch.empty(extra, dtype=torch.float64)])
        self.returns = torch.cat([self.returns, torch.empty(extra, dtype=torch.float64)])
        self.log_mass = torch.cat([self.log_mass, torch.empty(extra, dtype=torch.float64)])
        self.depth = torch.cat([self.depth, torch.empty(extra, dtype=torch.long)])

    def child_table(self, nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(children ids with −1 replaced by 0, which exist, their values) for ``nodes``: [n, C] each."""
        kids = self.children[nodes]
        exists = kids >= 0
        kids = kids.clamp(min=0)
        return kids, exists, self.value[kids]
