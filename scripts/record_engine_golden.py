"""Record the engine's outputs for every method on small exact-toy runs (tests/golden/).

Recorded before the engine is restructured, so the refactor can show that public results did
not change (tests/core/test_engine_golden.py). Rerun only when a change of results is intended, and
say so in the commit:
    OMP_NUM_THREADS=1 python scripts/record_engine_golden.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from engine_golden_cases import CASES, run_case  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "engine_outputs.safetensors"


def main() -> None:
    torch.set_num_threads(1)
    tensors = {}
    for name in CASES:
        for key, value in run_case(name).items():
            tensors[f"{name}.{key}"] = value.contiguous()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata={"torch": torch.__version__})
    print(f"wrote {OUT} ({len(tensors)} tensors, torch {torch.__version__})")


if __name__ == "__main__":
    main()
