"""Print the collapsed-vs-diverse table of docs/feature_space.md (both feature spaces, per class).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/feature_space_table.py [--n 200] [--distinct 4] [--seed 0]

Needs the MNIST data (`make data`); runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import argparse

import torch

from fvdiffusion.metrics.collapse_check import collapse_row, collapse_sets
from fvdiffusion.metrics.feature_spaces import FEATURE_SPACES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--n", type=int, default=200, help="rows in each set")
    parser.add_argument("--distinct", type=int, default=4, help="distinct digits in the collapsed set")
    parser.add_argument("--noise", type=float, default=0.01, help="pixel noise std added to both sets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    print(f"n = {args.n} per set, collapsed = {args.distinct} digits repeated, pixel noise {args.noise}, "
          f"seed {args.seed}; reference = the held-out digits of the class\n")
    print("| space | class | FID diverse | FID collapsed | FID ratio | KID diverse | KID collapsed |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for cls in args.classes:
        sets = collapse_sets(cls, n=args.n, distinct=args.distinct, noise=args.noise, seed=args.seed)
        for space in FEATURE_SPACES:
            r = collapse_row(sets, space)
            print(f"| {space} | {cls} | {r.fid_diverse:.3g} | {r.fid_collapsed:.3g} | {r.fid_ratio:.2f} | "
                  f"{r.kid_diverse:.3g} | {r.kid_collapsed:.3g} |")


if __name__ == "__main__":
    main()
