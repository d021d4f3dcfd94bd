"""The search of dts / dts*: its configs, the rollouts (batch by batch, level by level), the final
descents, their lineage and trace rows, and the sampler that runs them (see the package docstring).

The tree's storage is :mod:`fvdiffusion.samplers.dts.tree`, its values and choice probabilities
:mod:`fvdiffusion.samplers.dts.values`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fvdiffusion.candidates import draw_from, ess_fraction
from fvdiffusion.config import MULTISTEP_TRANSITIONS, CommonConfig, ConfigError, check_float, check_int
from fvdiffusion.errors import DenoiserError
from fvdiffusion.loop import Finished, RunContext
from fvdiffusion.population import ParticleState
from fvdiffusion.potentials import clean
from fvdiffusion.result import StepTrace
from fvdiffusion.samplers.dts.tree import SearchTree
from fvdiffusion.samplers.dts.values import TreeValues
from fvdiffusion.schedule import Prediction
from fvdiffusion.transitions import require_stochastic_transition


@dataclass(frozen=True)
class DTSConfig(CommonConfig):
    """n_rollouts: search budget in rollouts.  max_children: a node expands a new child while
    it has fewer (fixed branching; the hard cap under widening too).  widening_alpha /
    widening_c: progressive widening, children ≤ min(max_children, ⌈C·visits^α⌉) (None = off).
    node_budget: most nodes the tree may hold; when reached, rollouts only descend.
    rollouts_per_batch: rollouts advanced together (None = n_particles).  greedy: dts*,
    argmax descent in rollouts and final samples.  lam: softmax(λ V); inf = argmax.  eta > 0.
    explore: share of a uniform pick in the rollouts' selection (not dts*); > 0 keeps every
    child's estimate converging (0.5 was best of {0.1, 0.25, 0.5, 0.75, 1} on the toy's tuning seed).
    """

    n_rollouts: int = 256
    max_children: int = 4
    widening_alpha: float | None = None
    widening_c: float = 1.0
    node_budget: int = 100_000
    rollouts_per_batch: int | None = None
    greedy: bool = False
    explore: float = 0.5

    allow_infinite_lambda = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_rollouts", self.n_rollouts, 1)
        check_int("max_children", self.max_children, 2)
        if self.widening_alpha is not None:
            check_float("widening_alpha", self.widening_alpha, 0.0, 1.0)
        check_float("widening_c", self.widening_c, 0.0)
        if self.widening_c <= 0:
            raise ConfigError(f"invalid widening_c={self.widening_c!r}: expected a number > 0")
        # one root-to-leaf chain is K nodes: less and not even one rollout fits
        check_int("node_budget", self.node_budget, self.num_steps)
        if self.rollouts_per_batch is not None:
            check_int("rollouts_per_batch", self.rollouts_per_batch, 1)
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"invalid greedy={self.greedy!r}: expected True or False")
        check_float("explore", self.explore, 0.0, 1.0)
        require_stochastic_transition(self, "dts")
        if self.transition in MULTISTEP_TRANSITIONS:
            raise ConfigError(f"invalid transition={self.transition!r} for dts: its tree keeps no solver history "
                              f"per node; use ddim, ddpm or euler")


@dataclass(frozen=True)
class DTSStarConfig(DTSConfig):
    """dts*: DTS with argmax descent (reward maximisation rather than sampling π*)."""

    greedy: bool = True


@dataclass
class _Batch:
    """Where the rollouts of a batch are."""

    current: list[int]   # node of each rollout
    fresh: list[bool]    # on a new chain: every deeper node is created by this rollout
    reserved: int = 0    # nodes promised to fresh chains but not created yet
    paths: list[list[int]] = field(default_factory=list)  # node of each rollout at each depth passed
    # per depth passed, log[(1/n) / P(the child taken)]: the importance ratio of a uniform pick among
    # the n existing children against the search pick made (0 when the child was new)
    log_ratios: list[Tensor] = field(default_factory=list)


@dataclass
class _Level:
    """What the rollouts do at one level."""

    new_parents: list[int] = field(default_factory=list)  # parent of each node to create, in id order
    new_rows: list[int] = field(default_factory=list)     # the rollout that creates it
    new_ids: dict[int, int] = field(default_factory=dict)  # rollout -> id of the node it creates
    pending: dict[int, list[int]] = field(default_factory=dict)  # node -> ids of its children created now
    selectors: list[int] = field(default_factory=list)    # rollouts choosing among existing children
    joiners: list[int] = field(default_factory=list)      # rollouts joining a child created now


class TreeSearch:
    """The search state of one run: the tree, its values, the cost context and the batch logic."""

    def __init__(self, ctx: RunContext, config: DTSConfig) -> None:
        self.ctx, self.config = ctx, config
        self.sample_shape = tuple(ctx.denoiser.sample_shape)
        self.timesteps = [info.t for info in ctx.grid]
        self.alpha_bars = [info.alpha_bar for info in ctx.grid]
        self.leaf_depth = config.num_steps - 1
        self.values = TreeValues(config.lam, config.greedy, config.explore)
        self.tree = SearchTree(self.sample_shape, config.max_children, config.node_budget,
                               self.values.soft_mean.empty)
        self.rollouts = 0
        self.blocked_by_budget = 0  # expansions the node budget refused

    # --- nodes ------------------------------------------------------------------------
    def create(self, parents: list[int], x: Tensor, depth: int) -> Tensor:
        """Denoise the new states (one call each), store them, and score them if they are leaves.

        Under nonfinite_denoiser="kill" a node whose output is NaN/inf is stored dead: as a leaf it
        is not scored and has value −inf (no weight), and the chain below an inner one is NaN
        too, so it ends in such leaves; the final descents only reach them if nothing else is left.
        """
        k, t = self.config.num_steps - depth, self.timesteps[depth]
        pred, dead = self.ctx.denoise(x, t, self.alpha_bars[depth], k, what="tree nodes")
        if dead is not None and depth == 0:
            raise self.ctx.all_killed(k, t, 1, "tree nodes (the root)")
        ids = self.tree.add(parents, pred, depth)
        if depth == self.leaf_depth:
            # the leaf's sample is its x̂0 (σ = 0 last step)
            # the tree's statistics live on the host: its search is a sequence of host decisions
            reward = self.ctx.rewards_where_alive(pred.x0, 1, dead).cpu()
            self.tree.reward[ids] = reward
            self.tree.value[ids] = clean(reward)[0]
        return ids

    def expand(self, parent_ids: Tensor, depth: int, noise: Tensor) -> Tensor:
        """The children's states: one step of the run's transition from each parent node.

        A node stores (x̂0, ε̂); its x_t is √ᾱ x̂0 + √(1−ᾱ) ε̂ (exact for the transitions dts allows,
        none of which keeps a history)."""
        tree = self.tree
        # the child is denoised at the next node's timestep, so the step lands exactly there
        info = replace(self.ctx.grid[depth], alpha_bar_prev=self.alpha_bars[depth + 1])
        x0, eps = tree.x0_hat[parent_ids], tree.eps_hat[parent_ids]
        x = math.sqrt(info.alpha_bar) * x0 + math.sqrt(1 - info.alpha_bar) * eps
        return self.ctx.transition.step(info, x, Prediction(x0=x0, eps=eps), {}, noise).x

    def plant_root(self) -> None:
        self.create([-1], self.ctx.randn((1, *self.sample_shape)), 0)

    def allowed_children(self, node: int) -> int:
        cfg = self.config
        if cfg.widening_alpha is None:
            return cfg.max_children
        return min(cfg.max_children, math.ceil(cfg.widening_c * self.tree.visits[node] ** cfg.widening_alpha))

    # --- rollouts ---------------------------------------------------------------------
    def run_batch(self, size: int) -> None:
        """``size`` rollouts from the root to leaves, then one backup of every node they passed."""
        batch = _Batch(current=[0] * size, fresh=[False] * size)
        for depth in range(self.leaf_depth):
            batch.paths.append(batch.current)
            uniforms = self.ctx.rand(size).cpu()
            # drawn for every rollout, so the random stream never depends on who expands
            noise = self.ctx.randn((size, *self.sample_shape))
            level = self._decide(batch, depth)
            following = self._follow(batch, level, uniforms)
            if level.new_parents:
                tree = self.tree
                parent_ids = torch.tensor(level.new_parents, device=tree.x0_hat.device)
                x = self.expand(parent_ids, depth, noise[torch.tensor(level.new_rows, device=noise.device)])
                self.create(level.new_parents, x, depth + 1)
                batch.reserved -= len(level.new_parents)
            batch.current = following
        for leaf in batch.current:
            self.tree.visits[leaf] += 1
        if self.values.weighted:
            self.values.backup(self.tree, batch.current, batch.paths, batch.log_ratios)
        else:
            for nodes in reversed(batch.paths):
                self.values.backup_nested(self.tree, torch.tensor(sorted(set(nodes))))
        self.rollouts += size

    def _decide(self, batch: "_Batch", depth: int) -> "_Level":
        """Expand or select, one rollout at a time (rollouts on a new chain first), so caps hold exactly."""
        tree, level = self.tree, _Level()
        chain_length = self.leaf_depth - depth  # nodes a chain started here creates, down to its leaf
        for i in sorted(range(len(batch.current)), key=lambda i: not batch.fresh[i]):
            node = batch.current[i]
            tree.visits[node] += 1
            has = tree.n_children[node] + len(level.pending.get(node, ()))
            if not batch.fresh[i] and has < self.allowed_children(node):
                if tree.n_nodes + batch.reserved + chain_length <= self.config.node_budget:
                    batch.fresh[i] = True
                    batch.reserved += chain_length
                else:
                    self.blocked_by_budget += 1
            if batch.fresh[i]:
                level.new_ids[i] = tree.n_nodes + len(level.new_parents)
                level.pending.setdefault(node, []).append(level.new_ids[i])
                level.new_parents.append(node)
                level.new_rows.append(i)
            elif tree.n_children[node] > 0:
                level.selectors.append(i)
            else:
                level.joiners.append(i)
        return level

    def _follow(self, batch: "_Batch", level: "_Level", uniforms: Tensor) -> list[int]:
        """The node each rollout moves to: its new child, a Boltzmann-chosen child, or a joined new child."""
        following = [level.new_ids.get(i, -1) for i in range(len(batch.current))]
        log_ratio = torch.zeros(len(batch.current), dtype=torch.float64)
        if level.selectors:
            kids, exists, probs = self.values.search_probabilities(
                self.tree, torch.tensor([batch.current[i] for i in level.selectors]))
            rows = torch.arange(len(level.selectors))
            columns = draw_from(probs, uniforms[level.selectors])
            n_existing = exists.sum(dim=1).to(torch.float64)
            log_ratio[level.selectors] = -(n_existing.log() + probs[rows, columns].log())
            for i, child in zip(level.selectors, kids[rows, columns].tolist()):
                following[i] = child
        batch.log_ratios.append(log_ratio)
        for i in level.joiners:
            options = level.pending[batch.current[i]]
            following[i] = options[int(float(uniforms[i]) * len(options))]
        return following

    # --- reading the tree -------------------------------------------------------------
    def expected_descent_reward(self) -> float:
        """E[r] of one final descent under the current tree, computed exactly (no sampling, no calls)."""
        return self.values.expected_descent_reward(self.tree, self.leaf_depth)

    def descend(self, n: int) -> tuple[list[Tensor], list[float]]:
        """N final descents from the root to leaves: node ids per depth, and the ESS/C of each level's choice."""
        current = torch.zeros(n, dtype=torch.long)
        paths, ess = [current], [1.0]
        for _ in range(self.leaf_depth):
            kids, probs = self.values.descent_probabilities(self.tree, current)
            current = kids[torch.arange(n), draw_from(probs, self.ctx.rand(n).cpu())]
            paths.append(current)
            ess.append(float(ess_fraction(probs)))
        return paths, ess


def _first_slot_with_same_node(nodes: Tensor) -> Tensor:
    """For each slot, the first slot holding the same tree node (the lineage's canonical parent)."""
    _, inverse = torch.unique(nodes, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), nodes.numel(), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(nodes.numel()), reduce="amin")
    return first[inverse]


def _tree_ancestry(paths: list[Tensor]) -> tuple[tuple[int, Tensor], ...]:
    """Lineage records of the final samples (the driver writes them): distinct step-k ancestors =
    distinct depth-(K−k) tree nodes."""
    num_steps = len(paths)
    records = [(k, _first_slot_with_same_node(paths[num_steps - k])) for k in range(num_steps, 1, -1)]
    return (*records, (0, _first_slot_with_same_node(paths[-1])))


def _descent_trace(search: TreeSearch, paths: list[Tensor], ess: list[float]) -> list[StepTrace]:
    """One row per depth of the final descents; reward fields are the soft values V of the nodes passed."""
    rows = []
    for depth, (nodes, level_ess) in enumerate(zip(paths, ess)):
        values = search.tree.value[nodes]
        finite = values[torch.isfinite(values)]
        rows.append(StepTrace(
            step=search.config.num_steps - depth, t=search.timesteps[depth], selected=depth > 0, ess=level_ess,
            dead_fraction=0.0, lam=search.config.lam, kappa=1.0, distinct_roots=int(nodes.unique().numel()),
            reward_mean=float(finite.mean()) if finite.numel() else math.nan,
            reward_max=float(finite.max()) if finite.numel() else math.nan,
            nonfinite_rewards=int(values.numel() - finite.numel()),
        ))
    return rows


class DTSSampler:
    """The tree search of dts / dts*: rollouts in batches, then N final descents."""

    def __init__(self, config: DTSConfig) -> None:
        self.config = config

    def run(self, ctx: RunContext) -> Finished:
        config = self.config
        method = "dts*" if config.greedy else "dts"
        if ctx.progress is not None:  # progress counts rollouts here, not steps
            ctx.progress.reset(total=config.n_rollouts)
        if ctx.x_init is not None:
            raise ConfigError(f"invalid x_init for {method}: the search tree has one root x_T drawn from the seed; "
                              f"x_init (one x_T per particle) applies to the population methods and svdd")
        search = TreeSearch(ctx, config)
        batch = config.rollouts_per_batch or config.n_particles
        search.plant_root()
        anytime: list[dict[str, Any]] = []
        # a full tree cannot change any more: later rollouts would only re-visit known leaves
        while search.rollouts < config.n_rollouts and search.tree.n_nodes < config.node_budget:
            search.run_batch(min(batch, config.n_rollouts - search.rollouts))
            anytime.append({"rollouts": search.rollouts, "denoiser_calls": ctx.cost.denoiser_calls,
                            "reward_calls": ctx.cost.reward_calls, "n_nodes": search.tree.n_nodes,
                            "reward_mean_of_descent_samples": search.expected_descent_reward()})
            if ctx.progress is not None:
                ctx.progress.update(anytime[-1]["rollouts"] - ctx.progress.n)
        paths, ess = search.descend(config.n_particles)
        ctx.trace.extend(_descent_trace(search, paths, ess))
        leaves = paths[-1]
        tree = search.tree
        dev_leaves = leaves.to(tree.x0_hat.device)
        if ctx.health.nonfinite_denoiser and not bool(torch.isfinite(tree.x0_hat[dev_leaves]).all()):
            raise DenoiserError(f"{method}: the final descents reached leaves whose denoiser output was NaN/inf "
                                f"(nonfinite_denoiser='kill': {ctx.health.nonfinite_denoiser} of "
                                f"{ctx.health.denoiser_values} tree nodes were bad and no leaf with a finite "
                                f"reward was left to prefer)")
        rewards = tree.reward[leaves]
        state = ParticleState(x=tree.x0_hat[dev_leaves], x0_hat=tree.x0_hat[dev_leaves],
                              eps_hat=tree.eps_hat[dev_leaves], reward=rewards,
                              log_weight=torch.zeros(config.n_particles, dtype=torch.float64),
                              root=torch.zeros(config.n_particles, dtype=torch.long))  # one tree root
        bytes_per_node = tree.bytes_per_node()
        extras = {
            "rollouts": search.rollouts, "n_nodes": tree.n_nodes, "n_leaves": int((tree.depth[: tree.n_nodes]
                                                                                   == search.leaf_depth).sum()),
            "node_budget": config.node_budget, "budget_reached": search.blocked_by_budget > 0,
            "expansions_blocked_by_budget": search.blocked_by_budget, "bytes_per_node": bytes_per_node,
            "tree_bytes": tree.n_nodes * bytes_per_node, "tree_bytes_allocated": tree.capacity * bytes_per_node,
            "root_value": float(tree.value[0]), "anytime": anytime,
        }
        return Finished(state, extras, ancestry=_tree_ancestry(paths))
