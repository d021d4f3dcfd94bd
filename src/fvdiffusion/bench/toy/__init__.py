"""The exact Gaussian-mixture toy: `fvd toy` and `fvd suite`.

One job per module: ``config`` (method rows, budget sweeps, tuning grids, problems, resume
keys), ``run`` (resumable cells and the seed-0 tuning), ``report`` (tables), ``plots``
(the figure), ``suite`` (the declared tuning suite that picks FVD's defaults).
"""
