"""Public results of every method are pinned before the engine is restructured (issue: Engine v2).

tests/golden/engine_outputs.safetensors was written by scripts/record_engine_golden.py from
the cases in engine_golden_cases.py. Integer outputs (lineage ancestors at every step, denoiser
calls) must match exactly; floating outputs to a tolerance far below any change of logic
(float64 1e-9, float32 1e-5 relative), so that a different CPU's vector instructions cannot
fail the test while a reordered draw, a dropped correction or a gather that forgets a field does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_golden_cases import CASES, run_case

GOLDEN = load_file(str(Path(__file__).parents[1] / "golden" / "engine_outputs.safetensors"))


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_the_recorded_engine(name):
    torch.set_num_threads(1)
    for key, value in run_case(name).items():
        expected = GOLDEN[f"{name}.{key}"]
        assert value.shape == expected.shape and value.dtype == expected.dtype, f"{name}.{key}"
        if value.dtype.is_floating_point:
            tol = 1e-9 if value.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(value, expected, rtol=tol, atol=tol, equal_nan=True,
                                       msg=lambda m: f"{name}.{key}: {m}")
        else:
            assert torch.equal(value, expected), f"{name}.{key} differs"
