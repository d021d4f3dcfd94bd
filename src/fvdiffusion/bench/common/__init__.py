"""What every benchmark shares: method specs, the tuning protocol, tables, statistics and pictures.

One job per module: ``methods`` (:class:`MethodSpec`, a labelled method and its options),
``protocol`` (the tuning seed, never reported), ``stats`` (mean ± spread, Markdown tables),
``grouped_metrics`` (FID / KID of any resampling of populations), ``paired_stats`` (population
bootstrap intervals and paired comparisons), ``images`` (sample grids and figures on disk).
Resumable results files are :mod:`fvdiffusion.durable` (shared with training).
"""
