"""Print the tables of docs/feature_space.md: collapsed vs diverse per class, and what else each space sees.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/feature_space_table.py [--n 200] [--distinct 4] [--seed 0]

Needs the MNIST data (`make data`); runs in well under a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from fvdiffusion.metrics.collapse_check import collapse_row, collapse_sets, ranking_row
from fvdiffusion.metrics.feature_spaces import FEATURE_SPACES, image_features
from fvdiffusion.metrics.images import FeatureFID

CONTEXT_CLASSES = (0, 3, 7)


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
    print("| space | class | FID diverse | FID collapsed | FID jittered | ratio collapsed | ratio jittered "
          "| KID diverse | KID collapsed | KID jittered |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios: dict[str, list[tuple[float, float]]] = {space: [] for space in FEATURE_SPACES}
    for cls in args.classes:
        sets = collapse_sets(cls, n=args.n, distinct=args.distinct, noise=args.noise, seed=args.seed)
        for space in FEATURE_SPACES:
            r = collapse_row(sets, space)
            ratios[space].append((r.fid_ratio, r.fid_ratio_jittered))
            print(f"| {space} | {cls} | {r.fid_diverse:.3g} | {r.fid_collapsed:.3g} | {r.fid_jittered:.3g} | "
                  f"{r.fid_ratio:.1f} | {r.fid_ratio_jittered:.1f} | {r.kid_diverse:.2g} | {r.kid_collapsed:.2g} | "
                  f"{r.kid_jittered:.2g} |")
    print("\n| space | FID ratio collapsed: min / median | FID ratio jittered: min / median |")
    print("|---|---:|---:|")
    for space, pairs in ratios.items():
        collapsed, jittered = zip(*pairs)
        print(f"| {space} | {min(collapsed):.1f} / {statistics.median(collapsed):.1f} | "
              f"{min(jittered):.1f} / {statistics.median(jittered):.1f} |")
    context_table(args.seed)
    ranking_table(args.classes, args.seed)


def ranking_table(classes: list[int], seed: int, n: int = 256, distinct: int = 8) -> None:
    """FID of a diverse set, a collapsed one and a diverse set of class c+1: must rank in that order."""
    print(f"\n{n} rows a set: diverse, {distinct} digits repeated, diverse digits of class c+1\n")
    print("| space | class | FID diverse | FID collapsed | FID wrong class | collapsed / diverse "
          "| wrong class / collapsed | ranked |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for space in FEATURE_SPACES:
        for cls in classes:
            r = ranking_row(cls, space, n=n, distinct=distinct, seed=seed)
            print(f"| {space} | {cls} | {r.fid_diverse:.3g} | {r.fid_collapsed:.3g} | {r.fid_wrong_class:.4g} | "
                  f"{r.fid_collapsed / r.fid_diverse:.1f} | {r.fid_wrong_class / r.fid_collapsed:.1f} | "
                  f"{'yes' if r.ranked else 'no'} |")


def context_table(seed: int) -> None:
    """FID / FID(diverse) of other defects: how much each space weighs collapse against them."""
    generator = torch.Generator().manual_seed(seed)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None]) / 16  # 3x3 binomial blur
    print("\n| space | class | collapsed | pixel noise 0.2 | 3x3 blur | diverse digits of class c+1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for cls in CONTEXT_CLASSES:
        sets = collapse_sets(cls, seed=seed)
        defects = [
            sets.collapsed,
            (sets.diverse + 0.2 * torch.randn(sets.diverse.shape, generator=generator)).clamp(-1, 1),
            F.conv2d(sets.diverse + 1, kernel[None, None], padding=1) - 1,  # blur the ink, keep the -1 background
            collapse_sets((cls + 1) % 10, seed=seed).diverse,
        ]
        for space in FEATURE_SPACES:
            fid = FeatureFID(image_features(sets.reference, space))
            base = fid(image_features(sets.diverse, space))
            ratios = " | ".join(f"{fid(image_features(x, space)) / base:.1f}" for x in defects)
            print(f"| {space} | {cls} | {ratios} |")


if __name__ == "__main__":
    main()
