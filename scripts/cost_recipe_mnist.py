"""What selecting less often saves and costs, measured through align() on the exported MNIST DDPM.

    .venv/bin/fvd export diffusers-ddpm --out /tmp/mnist-ddpm
    OMP_NUM_THREADS=1 .venv/bin/python scripts/cost_recipe_mnist.py /tmp/mnist-ddpm

FVD steering towards digit 3 (log p(3 | x) from the shipped reward classifier) with its selection
every step, every 2nd or 4th step, or inside a window, against base; N particles, K steps, one
population per seed. Per setting: reward calls (= the VAE decodes a latent pipeline would make
for the reward; its output adds N), mean log p(3 | x) of the returned samples, the share the
shipped evaluation net (a held-out judge) reads as a 3, and the distinct lineages. Prints a
markdown table (docs/diffusers.md, "Cost").
"""

from __future__ import annotations

import sys
import time

import torch

N, K, SEEDS, DIGIT = 16, 20, tuple(range(8)), 3
SETTINGS = [
    ("base", "base", {}),
    ("fvd, every step (default)", "fvd", {}),
    ("fvd, selection_interval=2", "fvd", {"selection_interval": 2}),
    ("fvd, selection_interval=4", "fvd", {"selection_interval": 4}),
    ("fvd, selection_start=0.5", "fvd", {"selection_start": 0.5}),
    ("fvd, selection_interval=2, selection_start=0.3", "fvd", {"selection_interval": 2, "selection_start": 0.3}),
]


def main(folder: str) -> None:
    from diffusers import DDPMPipeline

    import fvdiffusion
    from fvdiffusion.integrations.diffusers.export_mnist import DigitImageReward
    from fvdiffusion.rewards.classifier import ClassifierReward
    from fvdiffusion.zoo.loaders import load_eval_net, load_reward_classifier

    torch.set_num_threads(1)
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    reward = DigitImageReward(ClassifierReward(load_reward_classifier(), DIGIT))
    judge = load_eval_net()
    print(f"N = {N}, K = {K}, seeds {', '.join(map(str, SEEDS))}, digit {DIGIT}\n")
    print("| setting | reward calls per population | UNet calls | mean log p(3 given x) | judged a 3 | "
          "distinct lineages | s per population |")
    print("|---|---|---|---|---|---|---|")
    for label, method, options in SETTINGS:
        calls, unet, logp, hits, lineages, wall = [], [], [], [], [], []
        for seed in SEEDS:
            start = time.perf_counter()
            out = fvdiffusion.align(pipe, None, reward, method=method, num_images_per_prompt=N,
                                    num_inference_steps=K, seed=seed, output_type="latent", **options)
            wall.append(time.perf_counter() - start)
            samples = out.result.samples.clamp(-1, 1)
            calls.append(out.result.cost.reward_calls)
            unet.append(out.result.cost.denoiser_calls)
            logp.append(float(out.rewards.double().mean()))
            with torch.no_grad():
                hits.append(float((judge(samples).argmax(dim=1) == DIGIT).double().mean()))
            lineages.append(out.result.distinct_lineages())
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        print(f"| {label} | {mean(calls):.0f} | {mean(unet):.0f} | {mean(logp):.3f} | {mean(hits):.2f} | "
              f"{mean(lineages):.1f} | {mean(wall):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
