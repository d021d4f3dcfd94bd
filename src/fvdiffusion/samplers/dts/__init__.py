"""Diffusion Tree Sampling (DTS) and its greedy variant dts* (DESIGN.md §5).

A search tree over denoising states. The node at depth d holds x_{t_d} (d = 0 … K−1, one
root x_T ~ N(0, I)) through its denoiser prediction (x̂0, ε̂) — x_t = √ᾱ x̂0 + √(1−ᾱ) ε̂ —
so every node costs exactly one denoiser call, made when it is created. Nodes at depth K−1
(timestep t_1 = 0) are the leaves: the last step to x0 is deterministic (σ = 0 because
ᾱ_prev = 1), so a leaf's sample is its x̂0 and its reward is evaluated once, at creation.

A rollout descends from the root. At a node it *expands* a new child, drawn from the base
DDIM(η) kernel, while the node has fewer children than allowed (``max_children``, or
min(max_children, ⌈C·visits^α⌉) with progressive widening) and the node budget has room for
the whole new chain down to a leaf; otherwise it *selects* an existing child with probability
softmax(λ V(child)) mixed with a uniform pick (weight ``explore``). After an expansion every
deeper node is new, so the rollout keeps expanding to a leaf.

Soft values are consistent estimates of V(s) = (1/λ) log E_{p(x0|s)}[exp(λ r(x0))]. Children
are base-kernel draws, so the target at s is the uniform mean over its children of
exp(λ V(child)); a rollout that selected child c among n with probability P carries the
importance weight 1/(n·P) for that choice, and V(s) is (1/λ) log of the mean, over every
rollout through s, of w·exp(λ r) (w: the product of its weights below s; mean w·r when
λ = 0). Each term is unbiased given the tree, however the rollouts were routed. (The
nested backup log mean_c exp(λ V(c)) is not: the children the descents favour get refined
and regress to the mean while the others keep their low first estimates, so it drifts low
as rollouts grow.) The uniform share ``explore`` keeps every child revisited, so no estimate
is stuck at an unlucky first leaf, and bounds each weight by 1/explore.

The N final descents follow each child's share of the importance mass Σ w·exp(λ r) (w from
the root) of the rollouts through it, so a descent ends at a leaf with probability ∝ the
importance weights of the rollouts that reached it: self-normalised importance sampling of
p·exp(λ r) over all rollouts. dts* (argmax descent) and λ = inf cannot weight a choice that
had probability 0: they keep the nested backup (max at λ = inf) and descend by argmax.

Rollouts run in batches of ``rollouts_per_batch`` that move level by level, so all the new
nodes of a level cost one micro-batched denoiser call. Inside a level the decisions are made
one rollout at a time (rollouts already on a new chain first), so ``max_children`` and the
node budget hold exactly. A rollout at a node whose only children are being created at
this level (their values are not known yet) joins one of them uniformly at random.

Every stored node at depth < K−1 has at least one child, so the N final descents (without
expansion) always end at a leaf: denoiser calls = nodes in the tree, reward
calls = leaves in the tree, nothing else.

The package, by job: :mod:`.tree` stores the nodes, :mod:`.values` turns rollouts into soft
values and choice probabilities, :mod:`.search` holds the configs, the rollouts and final
descents and :class:`DTSSampler`. Choosing among candidates by softmax(λ · value) is the
engine's (:mod:`fvdiffusion.candidates`), shared with svdd.
"""

from __future__ import annotations

from fvdiffusion.samplers.dts.search import DTSConfig, DTSSampler, DTSStarConfig, TreeSearch
from fvdiffusion.samplers.dts.tree import SearchTree
from fvdiffusion.samplers.dts.values import SoftMean, TreeValues

__all__ = ["DTSConfig", "DTSStarConfig", "DTSSampler", "TreeSearch", "SearchTree", "SoftMean", "TreeValues"]
