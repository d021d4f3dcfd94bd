"""Write one small MNIST run of every method (N = 16, K = 10, seed 1, one thread) to a safetensors file.

Run it under two versions of the package and compare the files tensor by tensor, e.g. the
engine before and after a refactor:
    git worktree add /tmp/old <commit>
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/old/src python scripts/mnist_engine_equality.py old.safetensors
    OMP_NUM_THREADS=1 PYTHONPATH=src python scripts/mnist_engine_equality.py new.safetensors
"""
import sys, torch
from safetensors.torch import save_file
import fvdiffusion as fv
from fvdiffusion.rewards.classifier import ClassifierReward
from fvdiffusion.zoo.loaders import load_ddpm, load_reward_classifier
torch.set_num_threads(1)
out = {}
den = load_ddpm(); rew = ClassifierReward(load_reward_classifier(), 2)
for name, method, opts in [("fvd","fvd",{}),("fvd_ddim","fvd",{"eta":0.0}),("smc","smc",{}),("vasr","vasr",{}),("base","base",{}),("svdd","svdd",{"n_candidates":2}),("dts","dts",{"n_rollouts":32})]:
    r = fv.sample(method, den, rew, n_particles=16, num_steps=10, seed=1, lam=1.0, **opts)
    out[name+".samples"] = r.samples.contiguous(); out[name+".rewards"] = r.rewards.contiguous()
    print(name, fv.__file__, flush=True)
save_file(out, sys.argv[1])
