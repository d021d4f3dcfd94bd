"""Ground truth on a real model: every population method against the exact tilt of the same K-step sampler.

The tilt π_K ∝ p_K · exp(λ r) of the sampler itself (the "sampler floor") is estimated by
self-normalised importance sampling of a large base sample, stored as a few statistics per
sample; each method's populations are then scored by their standardised error on every
statistic. One job per module: ``config`` (settings, the compared methods), ``statistics``
(the statistic vector of x0), ``testbed`` (denoiser, reward, statistics), ``snis`` (the estimator),
``reference`` (the resumable base-sample job), ``compare`` (the resumable populations),
``scoring`` (errors and intervals), ``outcome`` (one sampler type read back from disk),
``report`` (results.md), ``run`` (the plan over sampler types and its output files).
"""
